"""How a finished job is described: one wording for every scheduler."""
from __future__ import annotations

import signal
from datetime import datetime
from pathlib import Path

from .base import JobStatus
from .script import OOM_FILE
from .task import Task, TaskState

#: The description of a task stopped through the API.
CANCELED_ON_REQUEST = "canceled on request"


def memory_exceeded(task: Task) -> str:
    limit = f"{task.memory} MiB" if task.memory else "its memory limit"
    return f"killed: memory limit of {limit} exceeded"


def cputime_exceeded(task: Task) -> str:
    return f"killed: CPU time limit of {task.cputime} s exceeded"


def memory_limit_hit(task: Task, evidence: str, code: int) -> str:
    """A job that ended with `code` at its memory limit without being killed for it: under an
    address-space limit the allocation fails and the program exits. `evidence` says how we know."""
    return f"memory limit of {task.memory} MiB exceeded ({evidence}); exit code {code}"


def signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def from_exit_code(task: Task, code: int, *, oom: bool = False, finished: datetime | None = None) -> JobStatus:
    """The final status of a job script that exited with `code` (128+N: its command got signal N).

    `oom` says the memory limit killed a process of the job; so does an OOM_FILE the job script
    left in the task's folder.
    """
    if code == 0:
        return JobStatus(TaskState.COMPLETE, "exit code 0", 0, finished=finished)
    if oom or (Path(task.workdir) / OOM_FILE).exists():
        description = memory_exceeded(task)
    elif code - 128 == signal.SIGXCPU and task.cputime:
        description = cputime_exceeded(task)
    elif code > 128:
        description = f"killed by {signal_name(code - 128)}"
    else:
        description = f"exit code {code}"
    return JobStatus(TaskState.EXECUTOR_ERROR, description, code, finished=finished)
