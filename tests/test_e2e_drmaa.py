"""End to end: `jobproxy serve` as a real process on the DRMAA scheduler, against the dev Grid
Engine (etc/dev/gridengine.sh), driven over HTTP. The Grid Engine side is checked with its own
commands (qstat, qacct), never through the gateway's view of it."""
from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from gateway import config as configuration
from gateway.model import new_task_id, task_from_document
from gateway.plugins import create_scheduler
from schedulers.base import JobRef, Scheduler, Task, TaskState
from schedulers.drmaa import gridengine
from schedulers.drmaa.mapping import GRID_ENGINE_SPEC
from schedulers.drmaa.session import shared
from schedulers.local import proc
from schedulers.script import quote

from . import backend_drmaa
from .conftest import ROOT, Gateway

pytestmark = [pytest.mark.e2e, pytest.mark.drmaa]

CONFIG = """
[run_as]
allow_root_jobs = true   # DRMAA cannot run jobs as another account: as root with auth off, say so
[scheduler]
type = "drmaa"
poll_interval = 0.3
[scheduler.options]
cancel_timeout = 30
"""


@pytest.fixture(autouse=True)
def grid_engine() -> dict[str, str]:
    return backend_drmaa.environment()


@pytest.fixture
def gateway(gateway_factory: Callable[..., Gateway]) -> Gateway:
    return gateway_factory(CONFIG).start()


def job_id(gateway: Gateway, task_id: str) -> str:
    """The Grid Engine job id the plugin recorded for a task."""
    return (gateway.workdir / "jobproxy-state" / "schedulers" / "drmaa" / task_id / "job_id").read_text().strip()


def accounting(job: str, task_id: str, timeout: float = 30) -> dict[str, str]:
    """Grid Engine's accounting record of `job`, named after `task_id`, once it is there."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        out = subprocess.run(["qacct", "-j", job], capture_output=True, text=True).stdout
        record = gridengine.parse_qacct(out, f"jobproxy-{task_id}")
        if record:
            return record
        time.sleep(0.5)
    raise AssertionError(f"no accounting record for Grid Engine job {job} after {timeout} s")


def known_to_qmaster(job: str) -> bool:
    return subprocess.run(["qstat", "-j", job], capture_output=True).returncode == 0


def test_cores_become_slots_and_the_job_carries_the_task_id(gateway: Gateway) -> None:
    task_id = gateway.submit({"user": "alice", "cmd": "echo $NSLOTS $JOBPROXY_TASK_ID", "cores": 2})
    state = gateway.wait(task_id)
    assert (state["code"], state["exit_code"]) == ("COMPLETE", 0)
    assert Path(state["stdout"]).read_text() == f"2 {task_id}\n"
    record = accounting(job_id(gateway, task_id), task_id)
    assert (record["slots"], record["granted_pe"]) == ("2", "smp")


def test_memory_over_the_limit_fails_naming_memory(gateway: Gateway) -> None:
    task_id = gateway.submit({"user": "alice", "cmd": ["python3", "-c", "b = bytearray(300 * 1024 * 1024)"],
                              "memory": 100, "cores": 2})
    state = gateway.wait(task_id)
    assert (state["code"], state["exit_code"]) == ("EXECUTOR_ERROR", 1)
    assert state["description"] == "memory limit of 100 MiB exceeded (MemoryError on stderr); exit code 1"
    # h_vmem is per slot: the job got 100 MiB in all (2 x 51200K), not 200
    assert "h_vmem=51200K" in accounting(job_id(gateway, task_id), task_id)["category"]


def test_busy_loop_over_its_cputime_is_killed(gateway: Gateway) -> None:
    task_id = gateway.submit({"user": "alice", "cmd": "while :; do :; done", "cputime": 2})
    state = gateway.wait(task_id)
    assert state["code"] == "EXECUTOR_ERROR"
    assert state["description"] == "killed: CPU time limit of 2 s exceeded"
    assert float(accounting(job_id(gateway, task_id), task_id)["cpu"].rstrip("s")) < 10


def test_exit_3_is_an_executor_error_with_exit_code_3(gateway: Gateway) -> None:
    task_id = gateway.submit({"user": "alice", "cmd": "echo oops >&2; exit 3"})
    state = gateway.wait(task_id)
    assert (state["code"], state["exit_code"], state["description"]) == ("EXECUTOR_ERROR", 3, "exit code 3")
    assert Path(state["stderr"]).read_text() == "oops\n"


def test_delete_running_task_ends_its_job_and_processes(gateway: Gateway, tmp_path: Path) -> None:
    pids = tmp_path / "pids"
    task_id = gateway.submit({"user": "alice", "cmd": f"echo $$ > {pids}; sleep 300 & echo $! >> {pids}; wait"})
    gateway.wait(task_id, lambda s: s["code"] == "RUNNING")
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and len(pids.read_text().split() if pids.exists() else []) < 2:
        time.sleep(0.1)
    started = [int(p) for p in pids.read_text().split()]
    job = job_id(gateway, task_id)
    assert known_to_qmaster(job) and all(proc.alive(p, None) for p in started)
    status, _, _ = gateway.request("DELETE", f"/v1/jobproxy/delete/{task_id}")
    assert status == 204
    assert gateway.request("GET", f"/v1/jobproxy/state/{task_id}")[0] == 404
    assert not known_to_qmaster(job), "Grid Engine still has the job of the deleted task"
    assert accounting(job, task_id)["failed"].startswith("100")  # ended by a signal (qdel), not on its own
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and any(proc.alive(p, None) for p in started):
        time.sleep(0.1)
    assert not any(proc.alive(p, None) for p in started), "processes of the deleted task survived"


def test_task_the_drm_refuses_answers_400_with_its_reason(gateway_factory: Callable[..., Gateway]) -> None:
    gateway = gateway_factory(CONFIG + 'native_spec = ["-w e", "-l nosuchresource=1"]\n').start()
    status, _, body = gateway.request("POST", "/v1/jobproxy/submit", json.dumps({"user": "a", "cmd": "true"}).encode(),
                                      {"Content-Type": "application/json"})
    assert status == 400
    assert json.loads(body)["error"] == 'Grid Engine refused the job: unknown resource "nosuchresource"'
    assert json.loads(gateway.request("GET", "/v1/jobproxy/state")[2])["state"] == []  # nothing kept


def test_more_cores_than_any_queue_has_answers_400(gateway: Gateway) -> None:
    status, _, body = gateway.request("POST", "/v1/jobproxy/submit",
                                      json.dumps({"user": "a", "cmd": "true", "cores": 1000}).encode(),
                                      {"Content-Type": "application/json"})
    assert (status, json.loads(body)["error"]) == (400, "Grid Engine refused the job: error: no suitable queues")


def test_gateway_restart_mid_run_loses_nothing(gateway_factory: Callable[..., Gateway], tmp_path: Path) -> None:
    gateway = gateway_factory(CONFIG).start()
    flag = tmp_path / "go"
    wait_flag = f"while [ ! -e {flag} ]; do sleep 0.2; done"
    done = gateway.submit({"user": "a", "cmd": "exit 4"})
    gateway.wait(done)
    finishing = gateway.submit({"user": "a", "cmd": f"{wait_flag}; echo finished"})
    killed = gateway.submit({"user": "a", "cmd": f"{wait_flag}; kill -9 $PPID; sleep 5"})
    long = gateway.submit({"user": "a", "cmd": "sleep 300", "cores": 1})
    for task_id in (finishing, killed):
        gateway.wait(task_id, lambda s: s["code"] == "RUNNING")
    gateway.stop(kill=True)  # a crash: the DRMAA session is not even closed

    flag.touch()  # while the gateway is down, one job finishes, the other's job script is killed
    killed_job = job_id(gateway, killed)
    accounting(killed_job, killed)
    gateway.start()  # a new process, a new DRMAA session that never saw these jobs
    assert gateway.wait(finishing)["code"] == "COMPLETE"
    assert Path(gateway.state(finishing)["stdout"]).read_text() == "finished\n"
    lost = gateway.wait(killed)  # no exit-code file: only Grid Engine's accounting knows
    assert (lost["code"], lost["exit_code"]) == ("EXECUTOR_ERROR", 137) and "SIGKILL" in lost["description"]
    assert gateway.state(done)["exit_code"] == 4
    assert gateway.wait(long, lambda s: s["code"] in ("QUEUED", "RUNNING"))["code"] in ("QUEUED", "RUNNING")
    late = gateway.submit({"user": "a", "cmd": "echo late"})
    assert gateway.wait(late)["code"] == "COMPLETE"
    long_job = job_id(gateway, long)
    assert gateway.request("DELETE", f"/v1/jobproxy/delete/{long}")[0] == 204
    assert not known_to_qmaster(long_job)
    _, _, body = gateway.request("GET", "/v1/jobproxy/state")
    assert {s["id"] for s in json.loads(body)["state"]} == {done, finishing, killed, late}


def test_drm_down_answers_503_and_the_gateway_recovers(gateway: Gateway, tmp_path: Path) -> None:
    flag = tmp_path / "go"
    running = gateway.submit({"user": "a", "cmd": f"while [ ! -e {flag} ]; do sleep 0.2; done; echo done"})
    gateway.wait(running, lambda s: s["code"] == "RUNNING")
    cluster = ["bash", str(ROOT / "etc" / "dev" / "gridengine.sh")]
    subprocess.run([*cluster, "stop"], check=True, capture_output=True)
    try:
        flag.touch()  # the job ends while qmaster and execd are down
        status, headers, body = gateway.request("POST", "/v1/jobproxy/submit",
                                                json.dumps({"user": "a", "cmd": "true"}).encode(),
                                                {"Content-Type": "application/json"})
        assert (status, headers.get("Retry-After")) == (503, "30"), body
        assert json.loads(body)["error"].startswith("Grid Engine cannot take the job right now: unable to ")
        assert [s["id"] for s in json.loads(gateway.request("GET", "/v1/jobproxy/state")[2])["state"]] == [running]
    finally:
        subprocess.run([*cluster, "start"], check=True, capture_output=True)
    done = gateway.wait(running, timeout=120)
    assert (done["code"], Path(done["stdout"]).read_text()) == ("COMPLETE", "done\n")
    assert gateway.wait(_submit_once_the_drm_answers(gateway, {"user": "a", "cmd": "true"}))["code"] == "COMPLETE"


def _submit_once_the_drm_answers(gateway: Gateway, task: dict[str, Any], timeout: float = 120) -> str:
    """Submit `task` as a client honouring 503 + Retry-After does, only sooner: the first DRMAA
    call after a qmaster restart may wait on the session's old connection past the gateway's
    5 s, and is then answered 503 (see above) until the DRM answers again."""
    deadline = time.monotonic() + timeout
    while True:
        status, headers, body = gateway.request("POST", "/v1/jobproxy/submit", json.dumps(task).encode(),
                                                {"Content-Type": "application/json"})
        if status == 200:
            return str(json.loads(body)["id"])
        assert (status, headers.get("Retry-After")) == (503, "30"), body
        assert time.monotonic() < deadline, f"still 503 after {timeout} s: {body!r}"
        time.sleep(1)


@pytest.mark.parametrize("unset, message", [
    ("DRMAA_LIBRARY_PATH", "DRMAA_LIBRARY_PATH is not set"),
    ("SGE_ROOT", "SGE_ROOT is not set"),
    ("GLIBC_TUNABLES", "GLIBC_TUNABLES=glibc.rtld.optional_static_tls=16384"),
])
def test_start_up_says_what_is_missing(gateway_factory: Callable[..., Gateway], unset: str, message: str) -> None:
    gateway = gateway_factory(CONFIG, env={unset: ""})
    with pytest.raises(AssertionError, match="exited with") as failed:
        gateway.start()
    said = str(failed.value)
    assert message in said and "Traceback" not in said
    assert "jobproxy: configuration error:" in said or "jobproxy: scheduler 'drmaa' could not start:" in said


# ---- one qstat call per poll (the plugin itself, against the dev Grid Engine) ----------------------


@pytest.fixture
def logged_bin(tmp_path: Path) -> tuple[Path, Path]:
    """qstat and qacct behind wrappers that log each call: (the folder, the log)."""
    folder, calls = tmp_path / "sge-bin", tmp_path / "sge-calls.log"
    folder.mkdir()
    for name in ("qstat", "qacct"):
        real = shutil.which(name)
        assert real, f"{name} is not installed"
        (folder / name).write_text(f"#!/bin/bash\necho {name} \"$*\" >> {quote(str(calls))}\n"
                                   f"exec {quote(real)} \"$@\"\n")
        (folder / name).chmod(0o755)
    return folder, calls


def logged(calls: Path, name: str) -> list[str]:
    return [line for line in (calls.read_text().splitlines() if calls.exists() else []) if line.split()[0] == name]


async def drm_answers(timeout: float = 180) -> None:
    """Wait until this process's DRMAA session, if open, answers a call that reaches qmaster.
    After the qmaster restart in test_drm_down_answers_503_and_the_gateway_recovers, the session's
    first call may wait on its old connection for longer than a plugin's 5 s (libdrmaa says "GDI
    mismatch"), and every later call queues behind it: the gateway answers 503 meanwhile (see
    _submit_once_the_drm_answers); the tests below are about something else, so they wait."""
    drm = shared()
    if drm.session is None:
        return
    deadline = time.monotonic() + timeout
    while True:
        try:
            await asyncio.wait_for(asyncio.wrap_future(drm.submit(drm.probe, ["0"])),  # no job 0: "gone"
                                   deadline - time.monotonic())
            return
        except TimeoutError:
            raise AssertionError(f"the DRMAA session did not answer within {timeout:g} s") from None
        except drm.lib.errors.DrmaaException as exc:  # qmaster not reachable yet
            assert time.monotonic() < deadline, f"the DRMAA session still fails after {timeout:g} s: {exc}"
            await asyncio.sleep(1)


async def plugin(tmp_path: Path, **options: Any) -> Scheduler:
    await drm_answers()
    document = {"gateway": {"state_dir": str(tmp_path / "state")}, "run_as": {"allow_root_jobs": True},
                "scheduler": {"type": "drmaa", "poll_interval": 1, "options": options}}
    scheduler = create_scheduler(configuration.from_document(document, tmp_path, "test config"))
    await scheduler.start(lambda *_: None)
    return scheduler


def tasks(tmp_path: Path, *commands: str) -> list[Task]:
    made = []
    for i, cmd in enumerate(commands):
        workdir = tmp_path / f"t{i}"
        workdir.mkdir()
        made.append(task_from_document({"user": "a", "cmd": cmd}, new_task_id(), str(workdir)))
    return made


async def test_one_qstat_call_per_status_and_no_drmaa_state_queries(tmp_path: Path,
                                                                    logged_bin: tuple[Path, Path]) -> None:
    """22 active jobs (2 slots: most stay queued): each status() is one `qstat -xml -u *` call and
    no DRMAA jobStatus at all; the two jobs that end are reaped with wait() once qstat no longer
    lists them, and say how they ended."""
    folder, calls = logged_bin
    scheduler = await plugin(tmp_path, bin_dir=str(folder))
    session = shared()
    made = tasks(tmp_path, "exit 3", "true", *["sleep 120"] * 20)
    jobs = [JobRef(task, await scheduler.submit(task)) for task in made]
    before = dict(session.counts)
    try:
        rounds, deadline, answers = 0, time.monotonic() + 90, {}
        while time.monotonic() < deadline:
            answers = await scheduler.status(jobs)
            rounds += 1
            if all(task.id in answers and answers[task.id].state.terminal for task in made[:2]):
                break
            await asyncio.sleep(0.5)
        qstat = logged(calls, "qstat")
        assert qstat == ["qstat -xml -u *"] * rounds
        assert session.counts["jobStatus"] == before.get("jobStatus", 0), "DRMAA was asked the state of a listed job"
        assert 2 <= session.counts["wait"] - before.get("wait", 0) <= 2 * rounds
        assert (answers[made[0].id].state, answers[made[0].id].exit_code) == (TaskState.EXECUTOR_ERROR, 3)
        assert (answers[made[1].id].state, answers[made[1].id].exit_code) == (TaskState.COMPLETE, 0)
        waiting = {answers[task.id].state for task in made[2:]}
        assert waiting <= {TaskState.QUEUED, TaskState.INITIALIZING, TaskState.RUNNING} and TaskState.QUEUED in waiting
        assert all(answers[t.id].description.endswith(f"as Grid Engine job {j.native_id}")
                   for t, j in zip(made[2:], jobs[2:], strict=True))
    finally:
        await asyncio.gather(*(scheduler.cancel(job) for job in jobs[2:]))
    final = await scheduler.status(jobs[2:])
    assert {status.state for status in final.values()} == {TaskState.CANCELED}
    await scheduler.close()


async def test_twenty_cancels_side_by_side_wait_on_one_probe_per_period(tmp_path: Path,
                                                                        logged_bin: tuple[Path, Path]) -> None:
    """Twenty DELETEs at once: each terminates its job, and all wait for their jobs' ends on one
    `qstat -xml` call per half second, never a DRMAA state query per job; none answers 503, and
    every job ends CANCELED."""
    folder, calls = logged_bin
    scheduler = await plugin(tmp_path, bin_dir=str(folder))
    session = shared()
    made = tasks(tmp_path, *["sleep 120"] * 20)
    jobs = [JobRef(task, await scheduler.submit(task)) for task in made]
    before, started = dict(session.counts), time.monotonic()
    try:
        await asyncio.gather(*(scheduler.cancel(job) for job in jobs))
        took = time.monotonic() - started
        assert session.counts["control"] - before.get("control", 0) == 20
        assert session.counts["jobStatus"] == before.get("jobStatus", 0)
        qstat = logged(calls, "qstat")
        assert 1 <= len(qstat) <= took / 0.5 + 1, f"{len(qstat)} qstat calls in {took:.1f} s"
        final = await scheduler.status(jobs)
        assert {status.state for status in final.values()} == {TaskState.CANCELED}, final
    finally:
        subprocess.run(["qdel", *(job.native_id for job in jobs)], capture_output=True)  # what a failure left
        await scheduler.close()


async def test_drm_other_asks_drmaa_for_each_jobs_state(tmp_path: Path, logged_bin: tuple[Path, Path]) -> None:
    """`drm = "other"` knows no qstat: one DRMAA jobStatus per active job, as before."""
    folder, calls = logged_bin
    scheduler = await plugin(tmp_path, drm="other", native_spec=list(GRID_ENGINE_SPEC), bin_dir=str(folder))
    session = shared()
    made = tasks(tmp_path, "exit 3", "sleep 1")
    jobs = [JobRef(task, await scheduler.submit(task)) for task in made]
    before = session.counts["jobStatus"]
    first = await scheduler.status(jobs)
    assert session.counts["jobStatus"] - before == 2 and len(first) == 2
    deadline = time.monotonic() + 90
    while not all(s.state.terminal for s in (await scheduler.status(jobs)).values()):
        assert time.monotonic() < deadline
        await asyncio.sleep(0.5)
    ended = await scheduler.status(jobs)
    assert ([(ended[t.id].state, ended[t.id].exit_code) for t in made]
            == [(TaskState.EXECUTOR_ERROR, 3), (TaskState.COMPLETE, 0)])
    assert logged(calls, "qstat") == [] and logged(calls, "qacct") == []
    await scheduler.close()
