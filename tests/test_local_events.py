"""The local scheduler is event-driven: job ends are reported as they happen, the next queued task
starts at once, the launcher process is replaced when it dies, and a new plugin instance adopts
the jobs of the one before (a gateway restart). Real processes throughout; no status polling
except where a test says so."""
from __future__ import annotations

import asyncio
import itertools
import json
import os
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from gateway import config as configuration
from gateway.plugins import create_scheduler
from schedulers.base import JobRef, JobStatus, Scheduler, TaskState
from schedulers.local import lifecycle, proc
from schedulers.local import plugin as local_plugin

from .reporting import Reports
from .test_contract import make_task

Factory = Callable[..., Any]


def _terminal(status: JobStatus) -> bool:
    return status.state.terminal




async def _submit(scheduler: Scheduler, task: Any) -> JobRef:
    scheduler.admit_task(task)
    return JobRef(task, await scheduler.submit(task))


async def _ended(reports: Reports, *jobs: JobRef, timeout: float = 60) -> None:
    await reports.wait(lambda: all(j.task_id in reports.latest and _terminal(reports.latest[j.task_id]) for j in jobs),
                       timeout)


async def test_a_job_end_is_reported_without_any_status_call(local: Factory, tmp_path: Path) -> None:
    scheduler, reports = await local()
    ok = await _submit(scheduler, make_task(tmp_path, cmd=["/bin/echo", "reported"]))
    failed = await _submit(scheduler, make_task(tmp_path, cmd="exit 7"))
    await _ended(reports, ok, failed)
    assert [s.state for s in reports.of(ok.task_id)] == [TaskState.RUNNING, TaskState.COMPLETE]
    assert reports.of(ok.task_id)[0].description.startswith("running as pid ")
    assert (reports.latest[failed.task_id].exit_code, reports.latest[failed.task_id].description) == (7, "exit code 7")
    assert Path(ok.task.stdout).read_text() == "reported\n"


async def test_queued_tasks_start_one_after_another_as_each_ends(local: Factory, tmp_path: Path) -> None:
    """20 tasks on 1 core: each one starts when the one before it ends, in submission order, and
    none waits for a poll (nothing here polls)."""
    scheduler, reports = await local(cores=1)
    jobs = [await _submit(scheduler, make_task(tmp_path, cmd=["/bin/true"])) for _ in range(20)]
    await _ended(reports, *jobs)
    assert all(reports.latest[j.task_id].state == TaskState.COMPLETE for j in jobs)
    for before, after in itertools.pairwise(jobs):
        assert reports.of(after.task_id)[0].description.startswith("waiting for 1 core, 0 free, and 0 MiB, ")
        assert reports.position(before.task_id, TaskState.COMPLETE) < reports.position(after.task_id, TaskState.RUNNING)


async def test_a_smaller_task_that_fits_starts_first(local: Factory, tmp_path: Path) -> None:
    scheduler, reports = await local(cores=2)
    flag = tmp_path / "go"
    holder = await _submit(scheduler, make_task(tmp_path, cmd=f"while [ ! -e {flag} ]; do sleep 0.05; done", cores=1))
    big = await _submit(scheduler, make_task(tmp_path, cmd="true", cores=2))
    small = await _submit(scheduler, make_task(tmp_path, cmd="true", cores=1))
    await _ended(reports, small)
    assert reports.latest[big.task_id].state == TaskState.QUEUED
    assert reports.latest[big.task_id].description.startswith("waiting for 2 cores, 1 free, and 0 MiB, ")
    flag.touch()
    await _ended(reports, holder, big)
    assert reports.latest[big.task_id].state == TaskState.COMPLETE
    assert reports.position(holder.task_id, TaskState.COMPLETE) < reports.position(big.task_id, TaskState.RUNNING)


async def test_a_cgroup_a_process_outlived_its_job_in_is_not_taken_again(local: Factory, tmp_path: Path) -> None:
    """The launcher sees, as it reaps a job, that a process the job left behind (in a session of
    its own) is still in the job's cgroup: the next job on those CPUs gets another group."""
    scheduler, reports = await local(cores=1)
    if scheduler.pool is None:
        pytest.skip("no writable cgroup hierarchy on this machine")
    pid_file = tmp_path / "left.pid"
    leaver = await _submit(scheduler, make_task(tmp_path, cmd=[
        "sh", "-c", f"setsid sleep 120 </dev/null >/dev/null 2>&1 & echo $! > {pid_file}"]))
    await _ended(reports, leaver)
    left = int(pid_file.read_text())
    try:
        after = await _submit(scheduler, make_task(tmp_path, cmd=["cat", "/proc/self/cgroup"]))
        await _ended(reports, after)
        assert reports.latest[after.task_id].state == TaskState.COMPLETE

        def memory_group(lines: str) -> str:  # the memory controller's group (v1), or the one group (v2)
            found = dict(line.split(":", 2)[1:] for line in lines.splitlines())
            return found.get("memory", found.get("", ""))

        left_in = memory_group(Path(f"/proc/{left}/cgroup").read_text())
        assert scheduler.pool.prefix in left_in
        assert memory_group(Path(after.task.stdout).read_text()) not in ("", left_in)
    finally:
        os.kill(left, signal.SIGKILL)


async def test_cancel_a_queued_task_takes_it_off_the_queue(local: Factory, tmp_path: Path) -> None:
    scheduler, reports = await local(cores=1)
    running = await _submit(scheduler, make_task(tmp_path, cmd="sleep 300"))
    queued = await _submit(scheduler, make_task(tmp_path, cmd="echo never"))
    await reports.wait(lambda: reports.state(running.task_id) == TaskState.RUNNING, 30)
    assert scheduler.admission.slots[queued.task_id].after == running.task_id  # held by the launcher
    assert reports.latest[queued.task_id].state == TaskState.QUEUED
    started = asyncio.get_running_loop().time()
    await scheduler.cancel(queued)
    assert asyncio.get_running_loop().time() - started < local_plugin.CANCEL_WAIT, "the launcher did not answer"
    await scheduler.cancel(running)
    await _ended(reports, running, queued)
    assert reports.latest[queued.task_id].state == TaskState.CANCELED
    assert reports.latest[running.task_id].state == TaskState.CANCELED
    assert not Path(queued.task.stdout).exists(), "the canceled queued task ran"
    assert scheduler.admission.queue == {} and scheduler.admission.slots == {}


async def test_a_job_that_cannot_start_says_why(local: Factory, tmp_path: Path) -> None:
    scheduler, reports = await local()
    task = make_task(tmp_path, cmd="true", stdout=str(tmp_path / "tasks" / "nowhere" / "out"))
    job = JobRef(task, await scheduler.submit(task))  # admission would refuse it: the folder is missing
    await _ended(reports, job)
    status = reports.latest[job.task_id]
    assert status.state == TaskState.SYSTEM_ERROR
    assert status.description.startswith("could not start the job: FileNotFoundError")
    assert "nowhere" in status.description


@pytest.mark.parametrize("template", [False, True], ids=["direct", "job script"])
async def test_the_launcher_is_replaced_when_it_dies(local: Factory, tmp_path: Path, template: bool) -> None:
    """The job outlives its launcher. A job script records its exit status itself; a direct job's
    launcher would have, so without it the job ends as one that recorded none (documented)."""
    options: dict[str, Any] = {"cores": 2}
    if template:
        options["template"] = str(Path(local_plugin.__file__).with_name("local.sh"))
    scheduler, reports = await local(**options)
    flag = tmp_path / "go"
    job = await _submit(scheduler, make_task(tmp_path, cmd=f"until [ -e {flag} ]; do sleep 0.05; done; echo survived"))
    await reports.wait(lambda: reports.state(job.task_id) == TaskState.RUNNING, 30)
    await _kill_launcher_of(scheduler, job)
    assert reports.latest[job.task_id].state == TaskState.RUNNING  # the job did not die with its launcher
    flag.touch()
    await _ended(reports, job)
    assert Path(job.task.stdout).read_text() == "survived\n"
    ended = reports.latest[job.task_id]
    if template:
        assert ended.state == TaskState.COMPLETE
    else:
        assert (ended.state, ended.description) == (TaskState.SYSTEM_ERROR,
                                                    f"the job did not finish normally: {lifecycle.NO_EXIT_STATUS}")
    after = await _submit(scheduler, make_task(tmp_path, cmd=["/bin/echo", "new launcher"]))
    await _ended(reports, after)
    assert reports.latest[after.task_id].state == TaskState.COMPLETE


async def test_a_task_held_by_a_launcher_that_dies_waits_and_runs_after_the_job_ahead(
        local: Factory, tmp_path: Path) -> None:
    """The next task is sent ahead to the launcher of the running job; that launcher dies: the
    task goes back to the queue, and starts (once) when the job ahead, watched by pidfd, ended."""
    scheduler, reports = await local(cores=1)
    flag = tmp_path / "go"
    ahead = await _submit(scheduler, make_task(tmp_path, cmd=f"until [ -e {flag} ]; do sleep 0.05; done"))
    held = await _submit(scheduler, make_task(tmp_path, cmd=["/bin/echo", "ran"]))
    await reports.wait(lambda: reports.state(ahead.task_id) == TaskState.RUNNING, 30)
    assert scheduler.admission.slots[held.task_id].after == ahead.task_id
    await _kill_launcher_of(scheduler, ahead)
    await reports.wait(lambda: held.task_id in scheduler.admission.queue, 30)
    assert reports.latest[held.task_id].state == TaskState.QUEUED
    flag.touch()
    await _ended(reports, ahead, held)
    assert reports.latest[held.task_id].state == TaskState.COMPLETE
    assert Path(held.task.stdout).read_text() == "ran\n"
    assert reports.position(ahead.task_id, reports.latest[ahead.task_id].state) \
        < reports.position(held.task_id, TaskState.RUNNING)


async def _kill_launcher_of(scheduler: local_plugin.LocalScheduler, job: JobRef) -> int:
    """Kill the launcher that started `job` and wait for its replacement; answers the old pid."""
    index = scheduler.admission.slots[job.task_id].launcher
    assert index is not None
    launcher = scheduler.launchers[index]
    old = launcher.pid
    assert old is not None
    os.kill(old, signal.SIGKILL)
    for _ in range(600):
        if launcher.pid not in (None, old):
            break
        await asyncio.sleep(0.05)
    assert launcher.pid not in (None, old), "no new launcher"
    return old


def _parent(pid: int) -> int:
    stat = Path(f"/proc/{pid}/stat").read_text()
    return int(stat[stat.rindex(")") + 2:].split()[1])


async def test_jobs_start_side_by_side_from_several_launchers(local: Factory, tmp_path: Path) -> None:
    """Two cores, two launchers (the default): two jobs at once are children of different
    launchers. When one launcher dies, only its own job loses its exit status; the other
    launcher's job is still its child, reported by its exit notice with its exit code."""
    scheduler, reports = await local(cores=2)
    assert len(scheduler.launchers) == 2
    flag = tmp_path / "go"
    wait = f"while [ ! -e {flag} ]; do sleep 0.05; done; exit 3"
    jobs = [await _submit(scheduler, make_task(tmp_path, cmd=["/bin/sh", "-c", wait])) for _ in range(2)]
    await reports.wait(lambda: all(reports.state(j.task_id) == TaskState.RUNNING for j in jobs), 30)
    slots = [scheduler.admission.slots[j.task_id] for j in jobs]
    assert sorted(slot.launcher for slot in slots) == [0, 1]
    assert {_parent(slot.pid) for slot in slots if slot.pid} == {launcher.pid for launcher in scheduler.launchers}
    killed, kept = sorted(jobs, key=lambda j: scheduler.admission.slots[j.task_id].launcher != 0)
    await _kill_launcher_of(scheduler, killed)
    assert scheduler.admission.slots[killed.task_id].pidfd is not None  # watched: no longer a child
    assert scheduler.admission.slots[kept.task_id].pidfd is None  # still its launcher's child
    flag.touch()
    await _ended(reports, *jobs)
    assert (reports.latest[kept.task_id].state, reports.latest[kept.task_id].exit_code) == (
        TaskState.EXECUTOR_ERROR, 3)
    assert (reports.latest[killed.task_id].state, reports.latest[killed.task_id].description) == (
        TaskState.SYSTEM_ERROR, f"the job did not finish normally: {lifecycle.NO_EXIT_STATUS}")


@pytest.mark.parametrize("launchers", [0, 65, "2"])
def test_a_bad_launchers_option_stops_the_start_with_its_path(tmp_path: Path, launchers: Any) -> None:
    document = {"scheduler": {"type": "local", "options": {"launchers": launchers}}}
    with pytest.raises(configuration.ConfigError, match=r"^t: \$\.scheduler\.options\.launchers: "):
        create_scheduler(configuration.from_document(document, tmp_path, "t"))


async def test_one_launcher_when_asked(local: Factory, tmp_path: Path) -> None:
    scheduler, reports = await local(cores=2, launchers=1)
    assert len(scheduler.launchers) == 1
    jobs = [await _submit(scheduler, make_task(tmp_path, cmd=["/bin/true"])) for _ in range(4)]
    await _ended(reports, *jobs)
    assert all(reports.latest[j.task_id].state == TaskState.COMPLETE for j in jobs)


async def test_the_jobs_one_turn_starts_go_to_the_launcher_in_one_write(local: Factory, tmp_path: Path) -> None:
    """Submits answered together (one group commit) start their jobs with one write to the
    launcher's pipe, in the order they were asked for; each job still runs and is reported."""
    scheduler, reports = await local(cores=2, launchers=1)
    launcher = scheduler.launchers[0]
    await _ended(reports, await _submit(scheduler, make_task(tmp_path, cmd=["/bin/true"])))  # it runs
    assert launcher._process is not None
    transport, writes = launcher._process.writer, []
    real_write = transport.write

    def counted(data: bytes | bytearray | memoryview) -> None:
        writes.append(bytes(data))
        real_write(data)

    transport.write = counted
    tasks = [make_task(tmp_path, cmd=["/bin/true"]) for _ in range(4)]
    jobs = await asyncio.gather(*(_submit(scheduler, task) for task in tasks))
    await _ended(reports, *jobs)
    assert all(reports.latest[j.task_id].state == TaskState.COMPLETE for j in jobs)
    first = [json.loads(line)["id"] for line in writes[0].splitlines()]
    assert len(first) >= 2 and first == [task.id for task in tasks[:len(first)]]


async def test_a_new_instance_adopts_the_jobs_of_the_last(local: Factory, tmp_path: Path) -> None:
    """A gateway restart: the first plugin's launcher goes away, its job lives on; the next plugin
    is told about it once through status(), sees it end through its pidfd, and starts the task
    that was still queued."""
    first, first_reports = await local(cores=1)
    flag = tmp_path / "go"
    running = await _submit(first, make_task(tmp_path, cmd=f"while [ ! -e {flag} ]; do sleep 0.05; done; exit 5"))
    queued = await _submit(first, make_task(tmp_path, cmd=["/bin/echo", "late"]))
    done = await _submit(first, make_task(tmp_path, cmd="true"))
    await first.cancel(done)  # it ends while the first instance runs; the next must not start it
    await first_reports.wait(lambda: first_reports.state(running.task_id) == TaskState.RUNNING, 30)
    pid = int(first_reports.latest[running.task_id].description.split()[3])
    await first.close()
    assert proc.alive(pid, None), "the job died with its gateway"

    second, reports = await local(cores=1)
    answers = await second.status([running, queued, done])
    assert answers[running.task_id].state == TaskState.RUNNING
    assert answers[queued.task_id].state == TaskState.QUEUED
    assert answers[queued.task_id].description.startswith("waiting for 1 core, 0 free, and 0 MiB, ")
    assert answers[queued.task_id].description.endswith("MiB free; 1 queued")
    assert answers[done.task_id].state == TaskState.CANCELED
    assert all(launcher.pid is not None for launcher in second.launchers)
    assert pid not in [launcher.pid for launcher in second.launchers]
    flag.touch()
    await _ended(reports, running, queued)
    ended = reports.latest[running.task_id]
    assert (ended.state, ended.exit_code) == (TaskState.EXECUTOR_ERROR, 5)
    assert reports.latest[queued.task_id].state == TaskState.COMPLETE
    assert Path(queued.task.stdout).read_text() == "late\n"
    assert reports.position(running.task_id, TaskState.EXECUTOR_ERROR) < reports.position(queued.task_id,
                                                                                           TaskState.RUNNING)
    again = await second.status([running, queued, done])
    assert {i: s.state for i, s in again.items()} == {
        running.task_id: TaskState.EXECUTOR_ERROR, queued.task_id: TaskState.COMPLETE, done.task_id: TaskState.CANCELED}


async def test_a_new_instance_reads_what_each_task_left_in_the_spool_and_its_folder(local: Factory,
                                                                                    tmp_path: Path) -> None:
    """A restart looks at the spool once, not once per task: still, a cancel mark, the pid file
    of an older version's task folder and an exit code written by a job whose pid file a crash
    never wrote each give their task's outcome, and a task with none of them is queued again."""
    first, _ = await local(cores=1)
    flag = tmp_path / "go"
    holder = await _submit(first, make_task(tmp_path, cmd=f"while [ ! -e {flag} ]; do sleep 0.05; done"))
    tasks = {name: make_task(tmp_path, cmd="true") for name in ("marked", "legacy", "exited", "queued")}
    jobs = {name: await _submit(first, task) for name, task in tasks.items()}
    await first.close()
    root = first.spool.root
    (root / f"{tasks['marked'].id}.cancelled").touch()
    (root / tasks["legacy"].id).mkdir()
    (root / tasks["legacy"].id / "pid").write_text("999999999 1 0 0\n")  # an older version's: long gone
    Path(tasks["exited"].workdir, "exit_code").write_text("3\n")

    second, reports = await local(cores=1)
    answers = await second.status([holder, *jobs.values()])
    assert answers[holder.task_id].state == TaskState.RUNNING
    assert answers[tasks["marked"].id].state == TaskState.CANCELED
    assert answers[tasks["legacy"].id].state == TaskState.SYSTEM_ERROR  # no exit code: it did not end by itself
    assert (answers[tasks["exited"].id].state, answers[tasks["exited"].id].exit_code) == (TaskState.EXECUTOR_ERROR, 3)
    assert answers[tasks["queued"].id].state == TaskState.QUEUED
    flag.touch()
    await _ended(reports, holder, jobs["queued"])
    assert reports.latest[jobs["queued"].task_id].state == TaskState.COMPLETE


async def test_close_waits_for_the_starts_it_asked_for_and_records_them(local: Factory, tmp_path: Path) -> None:
    """A start still in a launcher's pipe when the plugin closes happens after it: close waits for
    its answer and writes the job's pid file, so that the next instance adopts the job instead of
    queuing its task again (and starting it twice)."""
    first, _ = await local(cores=1)
    launchers = [launcher.pid for launcher in first.launchers if launcher.pid is not None]
    for pid in launchers:
        os.kill(pid, signal.SIGSTOP)
    try:
        job = await _submit(first, make_task(tmp_path, cmd=["sleep", "30"]))
        closing = asyncio.create_task(first.close())
        await asyncio.sleep(0.5)
        assert not closing.done(), "close did not wait for the start it asked for"
    finally:
        for pid in launchers:
            os.kill(pid, signal.SIGCONT)
    await asyncio.wait_for(closing, 30)
    assert first.spool.read_pid(job.task_id) is not None
    second, _ = await local(cores=1)
    answers = await second.status([job])
    assert answers[job.task_id].state == TaskState.RUNNING
    await second.cancel(job)


def test_a_queued_task_says_what_it_waits_for() -> None:
    from schedulers.base import Task
    from schedulers.local.admission import Admission

    admission = Admission((0, 1), 1000)
    holder = Task(id="h", user="u", workdir="/w/h", stdout="/o", stderr="/e", cores=1, memory=200)
    big = Task(id="b", user="u", workdir="/w/b", stdout="/o", stderr="/e", cores=2, memory=100)
    assert admission.take(holder) is not None
    admission.enqueue(big)
    assert admission.take(big) is None
    assert admission.waiting(big) == JobStatus(TaskState.QUEUED,
                                               "waiting for 2 cores, 1 free, and 100 MiB, 800 MiB free; 1 queued")


async def test_the_launchers_answers_are_read_line_by_line_however_they_arrive() -> None:
    from schedulers.local.client import _Answers

    lines: list[bytes] = []
    answers = _Answers(lines.append)
    answers.data_received(b'{"a": 1}\n{"b"')
    answers.data_received(b': 2}\n')
    answers.data_received(b"x" * (_Answers.LIMIT + 1))  # never a line the launcher sends: dropped
    answers.data_received(b'\n{"c": 3}\n')
    assert lines == [b'{"a": 1}', b'{"b": 2}', b"", b'{"c": 3}']
    assert not answers.ended.done()
    answers.connection_lost(None)
    assert answers.ended.done()


def test_a_jobs_environment_is_the_users_read_again_once_old(monkeypatch: pytest.MonkeyPatch) -> None:
    import pwd

    from schedulers import accounts

    first = lifecycle.clean_environment("nobody")
    assert (first["HOME"], first["USER"]) == (pwd.getpwnam("nobody").pw_dir, "nobody")
    first["PATH"] = "changed by its caller"
    assert lifecycle.clean_environment("nobody")["PATH"] == "/usr/local/bin:/usr/bin:/bin"
    with pytest.raises(KeyError):
        lifecycle.clean_environment("no-such-user-here")
    moment, entry = accounts._known["nobody"]
    stale = pwd.struct_passwd(("nobody", "x", entry.pw_uid, entry.pw_gid, "", "/stale", "/bin/sh"))
    accounts._known["nobody"] = (moment, stale)
    assert lifecycle.clean_environment("nobody")["HOME"] == "/stale"  # within the TTL: what was read
    accounts._known["nobody"] = (moment - accounts.TTL, stale)
    assert lifecycle.clean_environment("nobody")["HOME"] == pwd.getpwnam("nobody").pw_dir


async def test_a_task_sent_ahead_behind_a_long_job_moves_to_a_core_that_frees(local: Factory, tmp_path: Path) -> None:
    """Two cores: a long job on one, short ones on the other. A task placed behind the long job
    (sent ahead to its launcher) is taken back and started on the other core once that core has
    nothing left to do: it never waits for an unrelated job while a core is idle."""
    scheduler, reports = await local(cores=2)
    flag = tmp_path / "go"
    long = await _submit(scheduler, make_task(tmp_path, cmd=f"while [ ! -e {flag} ]; do sleep 0.05; done"))
    await reports.wait(lambda: reports.latest.get(long.task_id, JobStatus(TaskState.QUEUED)).state
                       == TaskState.RUNNING, 30)
    short = await _submit(scheduler, make_task(tmp_path, cmd="sleep 0.5"))
    queued = [await _submit(scheduler, make_task(tmp_path, cmd=["/bin/true"])) for _ in range(3)]
    try:
        await _ended(reports, short, *queued, timeout=20)
        assert all(reports.latest[j.task_id].state == TaskState.COMPLETE for j in [short, *queued])
        assert reports.latest[long.task_id].state == TaskState.RUNNING
    finally:
        flag.touch()
    await _ended(reports, long)
