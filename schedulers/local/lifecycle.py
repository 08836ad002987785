"""What the local scheduler does with one job's processes and files: the environment it starts
with, its limits in words, its final status once it ended, and stopping it."""
from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
from collections.abc import Sequence
from datetime import UTC, datetime

from .. import accounts, outcome
from ..base import JobStatus, Task, TaskState
from ..files import recorded_exit
from . import proc
from .admission import Slot
from .cgroups import Cgroups
from .spool import Spool

log = logging.getLogger(__name__)

NO_EXIT_STATUS = "it was killed, or ended without recording an exit status"


def now() -> datetime:
    """The current time, in UTC."""
    return datetime.now(UTC)


def cpu_list(cpus: Sequence[int]) -> str:
    """CPUs as `0,1` (`-` for none)."""
    return ",".join(map(str, cpus)) or "-"


def running(pid: int, cpus: Sequence[int], started: datetime | None) -> JobStatus:
    """The status of a job that runs."""
    return JobStatus(TaskState.RUNNING, f"running as pid {pid} on CPUs {cpu_list(cpus)}", started=started)


def clean_environment(user: str) -> dict[str, str]:
    """The environment of a job run as `user`: nothing of the gateway's, as a login would set
    (KeyError if there is no such user). The account is read at most once per `accounts.TTL`."""
    entry = accounts.entry(user)
    return {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": entry.pw_dir, "USER": entry.pw_name,
            "LOGNAME": entry.pw_name, "SHELL": entry.pw_shell or "/bin/sh", "LANG": "C.UTF-8"}


def how_limited(slot: Slot, cgroups: Cgroups | None, account: str | None) -> str:
    """How the job's limits are enforced, in words for the log."""
    task = slot.task
    how = [f"pinned to CPUs {cpu_list(slot.cpus)}"]
    if cgroups:
        how.append(f"cgroup {cgroups.version} ({len(slot.cpus)} CPU quota"
                   + (f", memory {task.memory} MiB)" if task.memory else ")"))
    elif task.memory:
        how.append(f"RLIMIT_AS {task.memory} MiB")
    if task.cputime:
        how.append(f"RLIMIT_CPU {task.cputime} s")
    if account:
        how.append(f"as user {account}")
    return ", ".join(how)


def final_status(task: Task, wait_status: int | None, spool: Spool, *, oom: bool = False, code: int | None = None,
                 canceled: bool = False, started: datetime | None = None) -> JobStatus:
    """The final status of a job that ended: from `code` when the launcher says what it wrote to
    the exit-code file, else from that file; `oom` says its cgroup saw an OOM kill. File times
    come from the kernel's coarse clock: never before `started`, when the job is known to have
    started then."""
    if canceled:
        return JobStatus(TaskState.CANCELED, outcome.CANCELED_ON_REQUEST, finished=spool.cancelled(task.id) or now())
    if code is not None:
        return outcome.from_exit_code(task, code, oom=oom, finished=now())
    code, when = recorded_exit(task)
    if when is not None and started is not None and when < started:
        when = started
    if code is not None:
        return outcome.from_exit_code(task, code, oom=oom, finished=when)
    if oom:
        return JobStatus(TaskState.EXECUTOR_ERROR, outcome.memory_exceeded(task), finished=now())
    return JobStatus(TaskState.SYSTEM_ERROR, f"the job did not finish normally: {why(wait_status)}", finished=now())


def why(wait_status: int | None) -> str:
    """Why a job script ended without recording an exit status, from its wait status if known."""
    if wait_status is None:
        return NO_EXIT_STATUS
    code = os.waitstatus_to_exitcode(wait_status)
    if code < 0:
        return f"its job script was killed by {outcome.signal_name(-code)}"
    return f"its job script exited with {code} without recording an exit status"


async def terminate(task_id: str, pid: int, started_at: int | None, grace: float, cgroups: Cgroups | None,
                    group: str | None) -> None:
    """SIGTERM the job's process group (and whatever carries its task id), then SIGKILL what is
    left after `grace` seconds, its cgroup `group` included."""
    stragglers = proc.by_task().get(task_id, set())
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGKILL):
        if proc.alive(pid, started_at):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, sig)
        for straggler in stragglers:
            with contextlib.suppress(ProcessLookupError):
                os.kill(straggler, sig)
        if sig == signal.SIGKILL and cgroups and group:
            cgroups.kill(group)
        deadline = loop.time() + (grace if sig == signal.SIGTERM else 5)
        while loop.time() < deadline:
            stragglers = proc.by_task().get(task_id, set())
            if not proc.alive(pid, started_at) and not stragglers:
                log.info("task %s: job stopped (%s)", task_id, sig.name)
                return
            await asyncio.sleep(0.05)
    log.warning("task %s: processes %s survived SIGKILL", task_id, sorted(stragglers))
