"""GPUs and scheduler options on real schedulers: the local scheduler with a fake list of GPU ids
(each given to one job at a time, exported as CUDA_VISIBLE_DEVICES, counted by admission, kept
across a restart), and the dev Slurm cluster, whose node has two stand-in GPUs (`Gres=gpu:2`
with gres.conf device files), so `--gres=gpu:N` is scheduled and Slurm sets CUDA_VISIBLE_DEVICES.
The dev Slurm also preempts by partition: a job of `urgent` takes the cores of a job of `debug`
(cancelled, PREEMPTED) or of `requeueable` (requeued when submitted with --requeue)."""
from __future__ import annotations

import asyncio
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from schedulers.base import JobRef, Scheduler, TaskRefused, TaskState

from . import backend_drmaa, backend_slurm
from .conftest import IN_CI
from .reporting import Reports
from .test_contract import make_task
from .test_e2e_drmaa import plugin as drmaa_plugin
from .test_e2e_slurm import plugin as slurm_plugin

Factory = Callable[..., Any]
SHOW = 'echo "gpus=${CUDA_VISIBLE_DEVICES-unset}"; sleep 1'


async def _submit(scheduler: Scheduler, task: Any) -> JobRef:
    scheduler.admit_task(task)
    return JobRef(task, await scheduler.submit(task))


def _shown(job: JobRef) -> str:
    return Path(job.task.stdout).read_text().strip()


# ---- local ---------------------------------------------------------------------------------------


async def test_local_gpus_are_exclusive_and_exported(local: Factory, tmp_path: Path) -> None:
    scheduler, reports = await local(gpus=["0", "1", "GPU-fake-2"])
    with pytest.raises(TaskRefused) as refused:
        scheduler.admit_task(make_task(tmp_path, cmd="true", gpus=4))
    assert refused.value.path == "$.gpus" and "has 3 in all" in str(refused.value)
    two = await _submit(scheduler, make_task(tmp_path, cmd=SHOW, gpus=2))
    one = await _submit(scheduler, make_task(tmp_path, cmd=["/bin/sh", "-c", SHOW], gpus=1))  # a direct job
    waits = await _submit(scheduler, make_task(tmp_path, cmd=SHOW, gpus=1))  # none left: waits for one
    none = await _submit(scheduler, make_task(tmp_path, cmd=SHOW))
    queued = (await scheduler.status([waits]))[waits.task_id]
    assert queued.state == TaskState.QUEUED and "1 GPU(s), 0 free" in queued.description
    jobs = [two, one, waits, none]
    await reports.wait(lambda: all(j.task_id in reports.latest and reports.latest[j.task_id].state.terminal
                                   for j in jobs), 60)
    assert all(reports.latest[j.task_id].state == TaskState.COMPLETE for j in jobs)
    assert (_shown(two), _shown(one), _shown(none)) == ("gpus=0,1", "gpus=GPU-fake-2", "gpus=")
    assert _shown(waits) in ("gpus=0", "gpus=1", "gpus=GPU-fake-2")


@pytest.mark.parametrize("pid_file", ["written", "lost"])
async def test_local_gpus_held_by_a_job_survive_a_restart(local: Factory, tmp_path: Path, pid_file: str) -> None:
    """After a restart the GPUs of a running job stay taken: from its pid file, or, when the
    gateway died before writing that, from the job's own environment."""
    first, reports = await local(gpus=["0", "1"])
    held = await _submit(first, make_task(tmp_path, cmd="sleep 4", gpus=2))
    await reports.wait(lambda: reports.latest.get(held.task_id) is not None
                       and reports.latest[held.task_id].state == TaskState.RUNNING, 30)
    await asyncio.sleep(0.5)  # the pid file (with the GPUs) is written shortly after the start
    await first.close()
    if pid_file == "lost":
        Path(first.spool.root / f"{held.task_id}.pid").unlink()
    second, later = await local(gpus=["0", "1"])
    assert (await second.status([held]))[held.task_id].state == TaskState.RUNNING  # adopted, GPUs held
    waits = await _submit(second, make_task(tmp_path, cmd=SHOW, gpus=1))
    queued = (await second.status([waits]))[waits.task_id]
    assert queued.state == TaskState.QUEUED and "1 GPU(s), 0 free" in queued.description
    await later.wait(lambda: waits.task_id in later.latest and later.latest[waits.task_id].state.terminal, 60)
    assert _shown(waits) in ("gpus=0", "gpus=1")


# ---- Slurm ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def slurm() -> None:
    backend_slurm.prepare()


def _partition() -> str:
    out = subprocess.run(["sinfo", "-h", "-o", "%P"], capture_output=True, text=True, check=True).stdout
    return out.split()[0].rstrip("*")


async def _slurm_run(scheduler: Scheduler, job: JobRef) -> TaskState:
    deadline = time.monotonic() + 90
    while not (status := (await scheduler.status([job]))[job.task_id]).state.terminal:
        assert time.monotonic() < deadline, status
        await asyncio.sleep(0.3)
    return status.state


@pytest.mark.e2e
@pytest.mark.slurm
@pytest.mark.parametrize("api", ["cli", "rest"])
async def test_slurm_gres_gpus_and_options(slurm: None, tmp_path: Path, api: str) -> None:
    """Over sbatch and over slurmrestd alike."""
    scheduler = slurm_plugin(tmp_path, api, command_timeout=30)
    await scheduler.start(Reports())
    partition = _partition()
    gpu = make_task(tmp_path, cmd=SHOW, gpus=1, options={"slurm.partition": partition})
    job = JobRef(gpu, await scheduler.submit(gpu))
    assert await _slurm_run(scheduler, job) == TaskState.COMPLETE
    assert _shown(job) in ("gpus=0", "gpus=1")  # one of the two stand-in GPUs (another job may hold one)
    both = make_task(tmp_path, cmd=SHOW, gpus=2)
    job = JobRef(both, await scheduler.submit(both))
    assert await _slurm_run(scheduler, job) == TaskState.COMPLETE and _shown(job) == "gpus=0,1"

    with pytest.raises(TaskRefused) as refused:  # the node has two
        await scheduler.submit(make_task(tmp_path, cmd="true", gpus=3))
    assert refused.value.path == "$.gpus" and "node configuration is not available" in str(refused.value)
    with pytest.raises(TaskRefused, match=r"(?i)invalid partition"):
        await scheduler.submit(make_task(tmp_path, cmd="true", options={"slurm.partition": "nosuchpartition"}))
    with pytest.raises(TaskRefused, match=r"(?i)reservation"):
        await scheduler.submit(make_task(tmp_path, cmd="true", options={"slurm.reservation": "nosuchresv"}))
    await scheduler.close()


def _node() -> tuple[str, int]:
    """The dev node's name and core count, from `scontrol show node`."""
    line = subprocess.run(["scontrol", "-o", "show", "node"], capture_output=True, text=True, check=True).stdout
    fields = dict(field.split("=", 1) for field in line.split() if "=" in field)
    return fields["NodeName"], int(fields["CPUTot"])


async def _node_idle(node: str, within: float = 60) -> None:
    """Wait until no job runs on `node`: a preempting job must find only this test's blocker there.
    Skips when the node stays busy (jobs of others); in CI that is a failure."""
    deadline = time.monotonic() + within
    while (state := subprocess.run(["sinfo", "-h", "-N", "-n", node, "-o", "%T"], capture_output=True,
                                   text=True, check=True).stdout.split()[0]) != "idle":
        if time.monotonic() > deadline:
            reason = f"Slurm node {node} did not become idle within {within:g} s (state {state}): other jobs run there"
            if IN_CI:
                pytest.fail(reason)
            pytest.skip(reason)
        await asyncio.sleep(1)


async def _until(scheduler: Scheduler, job: JobRef, done: Callable[[TaskState], bool], timeout: float = 90) -> Any:
    """Poll `job` until its state satisfies `done`; its status then."""
    deadline = time.monotonic() + timeout
    while not done((status := (await scheduler.status([job]))[job.task_id]).state):
        assert time.monotonic() < deadline, status
        await asyncio.sleep(0.3)
    return status


@pytest.mark.e2e
@pytest.mark.slurm
@pytest.mark.parametrize("api", ["cli", "rest"])
@pytest.mark.parametrize(("requeue", "partition"), [(False, "debug"), (True, "requeueable"), (True, "debug")],
                         ids=["cancel", "requeue", "requeue-cancelled"])
async def test_slurm_preempted_job(slurm: None, tmp_path: Path, api: str, requeue: bool, partition: str) -> None:
    """A job holding all the node's cores is preempted by a job of the partition `urgent`: from
    `debug` (PreemptMode CANCEL) it ends PREEMPTED, final, with option `requeue` or without; with
    `requeue` from `requeueable` (PreemptMode REQUEUE) Slurm requeues it: QUEUED again, waiting to run."""
    node, cores = _node()
    await _node_idle(node)
    scheduler = slurm_plugin(tmp_path, api, command_timeout=30, requeue=requeue)
    await scheduler.start(Reports())
    jobs: list[JobRef] = []
    try:
        blocker = make_task(tmp_path, cmd="sleep 600", cores=cores, memory=100, options={"slurm.partition": partition})
        jobs.append(JobRef(blocker, await scheduler.submit(blocker)))
        await _until(scheduler, jobs[0], lambda state: state == TaskState.RUNNING)
        urgent = make_task(tmp_path, cmd="true", cores=cores, memory=100, options={"slurm.partition": "urgent"})
        jobs.append(JobRef(urgent, await scheduler.submit(urgent)))
        if partition == "requeueable":
            preempted = await _until(scheduler, jobs[0], lambda state: state != TaskState.RUNNING)
            assert preempted.state == TaskState.QUEUED, preempted
            assert await _slurm_run(scheduler, jobs[1]) == TaskState.COMPLETE
            again = (await scheduler.status([jobs[0]]))[blocker.id]
            assert again.state in (TaskState.QUEUED, TaskState.RUNNING), again  # not final: it runs again
            shown = subprocess.run(["scontrol", "-o", "show", "job", jobs[0].native_id], capture_output=True,
                                   text=True, check=True).stdout
            assert "Restarts=1" in shown, shown
            print(f"requeued: {preempted.state.name} {preempted.description!r}; then {again.state.name}")
            await scheduler.cancel(jobs[0])
            cancelled = await _until(scheduler, jobs[0], lambda state: state.terminal)
            assert cancelled.state == TaskState.CANCELED, cancelled
        else:
            preempted = await _until(scheduler, jobs[0], lambda state: state.terminal)
            assert preempted.state == TaskState.PREEMPTED, preempted
            assert "preempted" in preempted.description, preempted
            assert ("rather than requeue it" in preempted.description) == requeue, preempted
            assert await _slurm_run(scheduler, jobs[1]) == TaskState.COMPLETE
            print(f"preempted: {preempted.state.name} {preempted.description!r}")
    finally:
        subprocess.run(["scancel", *(job.native_id for job in jobs)], capture_output=True, check=False)
        await scheduler.close()


# ---- Grid Engine (DRMAA) -------------------------------------------------------------------------


@pytest.mark.e2e
@pytest.mark.drmaa
async def test_grid_engine_takes_the_queue_and_refuses_what_it_lacks(tmp_path: Path) -> None:
    """The dev cluster has the queue all.q and no projects (and no GPU complex: the rendered
    `-l gpu=N` is checked in test_task_options.py only)."""
    backend_drmaa.prepare()
    scheduler = await drmaa_plugin(tmp_path)
    queued = make_task(tmp_path, cmd="echo in-queue", options={"sge.queue": "all.q"})
    job = JobRef(queued, await scheduler.submit(queued))
    deadline = time.monotonic() + 90
    while not (status := (await scheduler.status([job]))[job.task_id]).state.terminal:
        assert time.monotonic() < deadline, status
        await asyncio.sleep(0.5)
    assert status.state == TaskState.COMPLETE and _shown(job) == "in-queue"
    for options in ({"sge.queue": "nosuch.q"}, {"sge.project": "nosuchproject"}):
        with pytest.raises(TaskRefused):
            await scheduler.submit(make_task(tmp_path, cmd="true", options=options))
    await scheduler.close()
