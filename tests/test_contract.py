"""The scheduler contract, run against every scheduler that is available here.

Backends other than `local` need their dev cluster (etc/dev/); without one they skip, except in CI.
A plugin that `reports_changes` is waited on through its reports, never polled; one that does not
is polled with one status call per round.
"""
from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from gateway import config as configuration
from gateway.model import new_task_id, task_from_document
from gateway.plugins import create_scheduler
from schedulers.base import JobRef, JobStatus, Scheduler, Task, TaskState

from . import backends
from .reporting import Reports


@pytest.fixture(params=backends.NAMES)
async def scheduler(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Scheduler]:
    kind, options = backends.prepare(request.param)
    document = {"gateway": {"state_dir": str(tmp_path / "state")},
                "scheduler": {"type": kind, "poll_interval": 0.5, "options": options},
                # the suite tests the plugins, which the gateway gives folders it made for their
                # jobs' account: here jobs run as this process's user, also as root
                "run_as": {"allow_root_jobs": True}}
    instance = create_scheduler(configuration.from_document(document, tmp_path, "contract test"))
    await instance.start(Reports())
    yield instance
    await instance.close()


def make_task(tmp_path: Path, **fields: Any) -> Task:
    task_id = new_task_id()
    workdir = tmp_path / "tasks" / task_id
    workdir.mkdir(parents=True)
    return task_from_document({"user": "tester", **fields}, task_id, str(workdir))


async def submitted(scheduler: Scheduler, task: Task) -> JobRef:
    scheduler.admit(task)
    return JobRef(task, await scheduler.submit(task))


async def wait_for(scheduler: Scheduler, jobs: list[JobRef], done: Any = lambda s: s.state.terminal,
                   timeout: float = 120) -> dict[str, JobStatus]:
    """Until each of `jobs` satisfies `done`: from the reports of a plugin that `reports_changes`
    (then one status call must answer the same), else polling all with one status call per round."""
    if scheduler.reports_changes:
        reports = scheduler.report
        assert isinstance(reports, Reports)
        await reports.wait(lambda: all(j.task_id in reports.latest and done(reports.latest[j.task_id]) for j in jobs),
                           timeout)
        reported = {j.task_id: reports.latest[j.task_id] for j in jobs}
        again = await scheduler.status(jobs)
        assert {i: (s.state, s.description, s.exit_code) for i, s in again.items()} == \
            {i: (s.state, s.description, s.exit_code) for i, s in reported.items()}
        return reported
    deadline = time.monotonic() + timeout
    latest: dict[str, JobStatus] = {}
    while time.monotonic() < deadline:
        latest.update(await scheduler.status([j for j in jobs
                                              if j.task_id not in latest or not done(latest[j.task_id])]))
        if all(j.task_id in latest and done(latest[j.task_id]) for j in jobs):
            return latest
        await asyncio.sleep(0.3)
    raise AssertionError(f"jobs did not finish in {timeout} s: {latest}")


async def test_success_and_output(scheduler: Scheduler, tmp_path: Path) -> None:
    task = make_task(tmp_path, cmd=["/bin/echo", "hello", "it's  me"])
    job = await submitted(scheduler, task)
    status = (await wait_for(scheduler, [job]))[task.id]
    assert (status.state, status.exit_code) == (TaskState.COMPLETE, 0)
    assert Path(task.stdout).read_text() == "hello it's  me\n"


async def test_exit_code_is_kept(scheduler: Scheduler, tmp_path: Path) -> None:
    task = make_task(tmp_path, cmd="echo oops >&2; exit 3")
    job = await submitted(scheduler, task)
    status = (await wait_for(scheduler, [job]))[task.id]
    assert (status.state, status.exit_code, status.description) == (TaskState.EXECUTOR_ERROR, 3, "exit code 3")
    assert "oops" in Path(task.stderr).read_text()


async def test_cputime_limit_kills(scheduler: Scheduler, tmp_path: Path) -> None:
    task = make_task(tmp_path, cmd=["python3", "-c", "while True: pass"], cputime=2)
    job = await submitted(scheduler, task)
    status = (await wait_for(scheduler, [job]))[task.id]
    assert status.state == TaskState.EXECUTOR_ERROR
    assert "CPU time limit of 2 s" in status.description


async def test_memory_limit_kills(scheduler: Scheduler, tmp_path: Path) -> None:
    hog = "import time; b = bytearray(400 * 1024 * 1024); b[::4096] = b'x' * len(b[::4096]); time.sleep(1)"
    task = make_task(tmp_path, cmd=["python3", "-c", hog], memory=150)
    job = await submitted(scheduler, task)
    status = (await wait_for(scheduler, [job]))[task.id]
    assert status.state == TaskState.EXECUTOR_ERROR
    assert "memory" in status.description, status


async def test_cancel_running_job(scheduler: Scheduler, tmp_path: Path) -> None:
    task = make_task(tmp_path, cmd="sleep 300")
    job = await submitted(scheduler, task)
    await wait_for(scheduler, [job], lambda s: s.state == TaskState.RUNNING)
    await scheduler.cancel(job)
    status = (await wait_for(scheduler, [job]))[task.id]
    assert status.state == TaskState.CANCELED


async def test_many_jobs_in_one_status_call(scheduler: Scheduler, tmp_path: Path) -> None:
    tasks = [make_task(tmp_path, cmd=f"exit {i % 3}") for i in range(8)]
    jobs = [await submitted(scheduler, t) for t in tasks]
    answers = await wait_for(scheduler, jobs, timeout=180)
    assert [answers[t.id].exit_code for t in tasks] == [i % 3 for i in range(8)]


async def test_find_recovers_a_submitted_job(scheduler: Scheduler, tmp_path: Path) -> None:
    task = make_task(tmp_path, cmd="true")
    job = await submitted(scheduler, task)
    assert await scheduler.find(task) == job.native_id
    assert await scheduler.find(make_task(tmp_path, cmd="true")) is None
    await wait_for(scheduler, [job])
