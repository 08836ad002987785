"""The local scheduler's direct path (no job script: the launcher execs the command and writes the
exit-code file) and its pooled cgroups (one group reused job after job on the same CPUs). Real
processes throughout."""
from __future__ import annotations

import asyncio
import resource
import sys
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from schedulers.base import JobRef, JobStatus, TaskState
from schedulers.local import LocalScheduler, launcher
from schedulers.script import EXIT_FILE

from .reporting import Reports
from .test_contract import make_task

Factory = Callable[..., Any]




async def _run(scheduler: LocalScheduler, reports: Reports, task: Any, timeout: float = 60) -> JobStatus:
    scheduler.admit_task(task)
    job = JobRef(task, await scheduler.submit(task))
    await reports.wait(lambda: job.task_id in reports.latest and reports.latest[job.task_id].state.terminal, timeout)
    return reports.latest[job.task_id]


def _spool(scheduler: LocalScheduler) -> set[str]:
    return {p.name for p in scheduler.spool.root.iterdir()}


async def test_exit_codes_and_the_exit_file_come_from_the_launcher(local: Factory, tmp_path: Path) -> None:
    scheduler, reports = await local()
    ok = make_task(tmp_path, cmd=["/bin/true"])
    three = make_task(tmp_path, cmd=["/bin/sh", "-c", "exit 3"])
    assert (await _run(scheduler, reports, ok)).state == TaskState.COMPLETE
    status = await _run(scheduler, reports, three)
    assert (status.state, status.exit_code, status.description) == (TaskState.EXECUTOR_ERROR, 3, "exit code 3")
    assert (Path(ok.workdir) / EXIT_FILE).read_text() == "0\n"
    assert (Path(three.workdir) / EXIT_FILE).read_text() == "3\n"
    assert not (Path(three.workdir) / f"{EXIT_FILE}.part").exists()
    spool = _spool(scheduler)
    assert scheduler.spool.known(ok.id) and f"{ok.id}.sh" not in spool, "a direct job got a job script"
    assert f"{ok.id}\n" in (scheduler.state_dir / "submitted").read_text(), "not in the spool's journal"


async def test_the_job_is_the_command_itself(local: Factory, tmp_path: Path) -> None:
    """No bash between the launcher and the command: the job's pid runs /bin/sleep."""
    scheduler, reports = await local()
    task = make_task(tmp_path, cmd=["/bin/sleep", "30"])
    scheduler.admit_task(task)
    job = JobRef(task, await scheduler.submit(task))
    await reports.wait(lambda: reports.state(job.task_id) == TaskState.RUNNING, 30)
    pid = int(reports.latest[job.task_id].description.split()[3])
    assert Path(f"/proc/{pid}/exe").resolve() == Path("/bin/sleep").resolve()
    # the job is reported once its exec has begun: the kernel names the new program before it has
    # placed its environment, which reads empty meanwhile
    for _ in range(500):
        environ = Path(f"/proc/{pid}/environ").read_bytes()
        if environ:
            break
        await asyncio.sleep(0.01)
    assert f"JOBPROXY_TASK_ID={task.id}".encode() in environ
    await scheduler.cancel(job)
    await reports.wait(lambda: reports.state(job.task_id) == TaskState.CANCELED, 30)


async def test_a_signal_is_128_plus_its_number(local: Factory, tmp_path: Path) -> None:
    scheduler, reports = await local()
    task = make_task(tmp_path, cmd=["/bin/sh", "-c", "kill -TERM $$"])
    status = await _run(scheduler, reports, task)
    assert (status.state, status.exit_code, status.description) == (TaskState.EXECUTOR_ERROR, 143, "killed by SIGTERM")
    assert (Path(task.workdir) / EXIT_FILE).read_text() == "143\n"


async def test_the_cputime_limit_stops_it_with_sigxcpu(local: Factory, tmp_path: Path) -> None:
    scheduler, reports = await local()
    task = make_task(tmp_path, cmd="while :; do :; done", cputime=1)
    status = await _run(scheduler, reports, task)
    assert (status.state, status.exit_code) == (TaskState.EXECUTOR_ERROR, 152)
    assert status.description == "killed: CPU time limit of 1 s exceeded"


async def test_a_string_command_runs_through_bin_sh(local: Factory, tmp_path: Path) -> None:
    scheduler, reports = await local()
    task = make_task(tmp_path, cmd='echo "$0" "$JOBPROXY_TASK_ID"; exit 4')
    status = await _run(scheduler, reports, task)
    assert (status.state, status.exit_code) == (TaskState.EXECUTOR_ERROR, 4)
    assert Path(task.stdout).read_text() == f"/bin/sh {task.id}\n"


async def test_a_missing_command_exits_127_as_in_bash(local: Factory, tmp_path: Path) -> None:
    scheduler, reports = await local()
    task = make_task(tmp_path, cmd=["no-such-command-anywhere"])
    status = await _run(scheduler, reports, task)
    assert (status.state, status.exit_code) == (TaskState.EXECUTOR_ERROR, 127)
    assert "no-such-command-anywhere: command not found" in Path(task.stderr).read_text()


async def test_the_launcher_makes_a_missing_folder_as_the_job_starts(local: Factory, tmp_path: Path) -> None:
    """The gateway leaves a task without files without its folder until the job starts."""
    scheduler, reports = await local()
    assert scheduler.makes_task_folders
    task = make_task(tmp_path, cmd=["/bin/sh", "-c", "pwd; echo x > here"])
    Path(task.workdir).rmdir()
    status = await _run(scheduler, reports, task)
    assert status.state == TaskState.COMPLETE
    assert Path(task.stdout).read_text() == f"{task.workdir}\n"
    assert (Path(task.workdir) / "here").read_text() == "x\n"
    assert Path(task.workdir).stat().st_mode & 0o777 == 0o700


async def test_a_folder_that_cannot_be_made_is_a_system_error(local: Factory, tmp_path: Path) -> None:
    scheduler, reports = await local()
    task = make_task(tmp_path, cmd=["/bin/true"])
    task = replace(task, workdir=str(tmp_path / "gone" / task.id), stdout=str(tmp_path / "out"),
                   stderr=str(tmp_path / "err"))
    status = await _run(scheduler, reports, task)
    assert status.state == TaskState.SYSTEM_ERROR
    assert status.description == (f"could not start the job: cannot make the task's folder {task.workdir}: "
                                  "No such file or directory")


async def test_a_workdir_that_is_no_folder_exits_1_without_an_exit_status(local: Factory, tmp_path: Path) -> None:
    """As `cd WORKDIR || exit 1` in the job script: exit status 1, and no exit-code file."""
    scheduler, reports = await local()
    task = make_task(tmp_path, cmd=["/bin/true"])
    blocked = tmp_path / "file"
    blocked.write_text("not a folder")
    task = replace(task, workdir=str(blocked), stdout=str(tmp_path / "out"), stderr=str(tmp_path / "err"))
    status = await _run(scheduler, reports, task)
    assert status.state == TaskState.SYSTEM_ERROR
    assert status.description == ("the job did not finish normally: its job script exited with 1 without recording "
                                  "an exit status")
    assert f"cd: {blocked}: Not a directory" in (tmp_path / "err").read_text()


async def test_a_site_template_keeps_the_job_script(local: Factory, tmp_path: Path) -> None:
    template = tmp_path / "site.sh"
    template.write_text("#!/bin/bash\necho from the site template\n{{run}}\n")
    scheduler, reports = await local(template=str(template))
    task = make_task(tmp_path, cmd=["/bin/sh", "-c", "exit 5"])
    status = await _run(scheduler, reports, task)
    assert (status.state, status.exit_code) == (TaskState.EXECUTOR_ERROR, 5)
    assert Path(task.stdout).read_text() == "from the site template\n"
    assert f"{task.id}.sh" in _spool(scheduler)


def test_the_cpu_limits_never_raise_a_lower_hard_limit() -> None:
    assert launcher.cpu_limits(10, 15, resource.RLIM_INFINITY) == (10, 15)
    assert launcher.cpu_limits(10, 15, 100) == (10, 15)
    assert launcher.cpu_limits(10, 15, 12) == (10, 12)
    assert launcher.cpu_limits(10, 15, 4) == (4, 4)
    assert launcher.exit_code(0x0300) == 3  # exited with 3
    assert launcher.exit_code(9) == 137  # killed by SIGKILL


HOG = ("import sys; print(open('/proc/self/cgroup').read(), flush=True); b = bytearray({mib} * 1024 * 1024); "
       "b[::4096] = b'x' * len(b[::4096]); sys.exit({code})")


def _memory_group(stdout: str) -> str:
    return next(line.split(":", 2)[2] for line in Path(stdout).read_text().splitlines()
                if line.split(":")[1] == "memory")


async def test_a_pooled_cgroup_is_reused_after_an_oom_kill(local: Factory, tmp_path: Path) -> None:
    """One core, so every job takes the same pooled group: an OOM kill there is the killed job's
    alone; the next job, without a limit, gets none of it (its exit code 3 stays an exit code); a
    limited one that fits completes."""
    scheduler, reports = await local(cores=1)
    if scheduler.cgroups is None or scheduler.cgroups.version != "v1":
        pytest.skip("no writable cgroup v1 hierarchy on this machine")
    killed = make_task(tmp_path, cmd=[sys.executable, "-c", HOG.format(mib=200, code=0)], memory=64)
    free = make_task(tmp_path, cmd=[sys.executable, "-c", HOG.format(mib=100, code=3)])
    fits = make_task(tmp_path, cmd=[sys.executable, "-c", HOG.format(mib=20, code=0)], memory=200)
    status = await _run(scheduler, reports, killed)
    assert (status.state, status.description) == (TaskState.EXECUTOR_ERROR, "killed: memory limit of 64 MiB exceeded")
    status = await _run(scheduler, reports, free)
    assert (status.state, status.exit_code, status.description) == (TaskState.EXECUTOR_ERROR, 3, "exit code 3")
    assert (await _run(scheduler, reports, fits)).state == TaskState.COMPLETE
    groups = {_memory_group(t.stdout) for t in (killed, free, fits)}
    assert len(groups) == 1 and next(iter(groups)).startswith("/jobproxy/"), groups


async def test_a_job_without_a_pid_file_is_adopted_with_its_cpus_and_cgroup(local: Factory, tmp_path: Path) -> None:
    """A crash before a job's pid file is written (it is written 0.1 s after the start): the next
    instance finds the job by its environment, with the CPUs it is pinned to and its cgroup."""
    first, reports = await local(cores=1)
    task = make_task(tmp_path, cmd=["/bin/sleep", "30"])
    first.admit_task(task)
    job = JobRef(task, await first.submit(task))
    await reports.wait(lambda: reports.state(job.task_id) == TaskState.RUNNING, 30)
    cpus = first.admission.slots[task.id].cpus
    lease = first.admission.slots[task.id].lease
    await first.close()
    Path(first.spool.root, f"{task.id}.pid").unlink()
    second, second_reports = await local(cores=1)
    answers = await second.status([job])
    assert answers[task.id].state == TaskState.RUNNING
    record = second.spool.read_pid(task.id)
    assert record is not None and record.cpus == cpus
    assert record.cgroup == (lease.name if lease else None)
    assert second.admission.slots[task.id].cpus == cpus
    await second.cancel(job)
    await second_reports.wait(lambda: second_reports.state(job.task_id) == TaskState.CANCELED, 30)
