"""The scheduler plugin contract.

A plugin turns tasks into jobs of one batch system. The gateway calls it in this order:

1. `admit(task)` at submit time, before anything is stored: refuse (`TaskRefused`) what this
   scheduler can never run, e.g. more cores than any node has.
2. The gateway records the task, then calls `submit(task)`, which answers the scheduler's own id
   for the job (the "native id"). The job must carry the gateway's task id (job name, comment or
   environment), so that `find(task_id)` can recover it after a crash between the two steps.
3. A poller calls `status(jobs)` once per interval with every active job of this scheduler:
   one batched query, never one call per job. It answers the jobs whose state it knows.
4. `cancel(job)` stops a job and everything it started; `release(job)` frees what the plugin
   keeps for a job once the gateway has forgotten the task.

Plugins are found through the entry-point group `jobproxy.schedulers`; the site config names the
one to run and gives its options, validated against the plugin's `options_schema` at start-up.
Errors a user should read are raised as `TaskRefused` (answered 400) or `SchedulerUnavailable`
(answered 503, the task is not kept); their message is shown as it is.
"""
from __future__ import annotations

import abc
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Mapping, Sequence

from .task import ACTIVE, TERMINAL, Container, Mount, Port, Task, TaskState, path_within

from .script import Command, command_argv

if TYPE_CHECKING:
    from .containers import ContainerRuntime

__all__ = [
    "ACTIVE", "TERMINAL", "Container", "Mount", "Port", "Task", "TaskState", "path_within",
    "JobRef", "JobStatus", "Scheduler", "SchedulerError", "SchedulerUnavailable", "TaskRefused",
]

NO_CONTAINER_RUNTIME = (
    "$.container: this gateway has no container runtime configured, so it cannot run a task in a "
    "container; submit the task without `container`, or ask the site to configure a runtime"
)


class SchedulerError(Exception):
    """An error whose message is fit for the end user."""


class TaskRefused(SchedulerError):
    """This scheduler will never run the task as asked (HTTP 400)."""


class SchedulerUnavailable(SchedulerError):
    """The scheduler cannot take or answer requests right now (HTTP 503); try again later."""


@dataclass(frozen=True)
class JobRef:
    """A job as the gateway knows it: its task and the scheduler's id for it."""

    task: Task
    native_id: str

    @property
    def task_id(self) -> str:
        return self.task.id


@dataclass(frozen=True)
class JobStatus:
    """What a scheduler says about one job, in the common state vocabulary."""

    state: TaskState
    description: str = ""
    exit_code: int | None = None
    started: datetime | None = None
    finished: datetime | None = None


class Scheduler(abc.ABC):
    """Base class of every scheduler plugin."""

    #: JSON Schema of the `[scheduler.options]` table this plugin takes.
    options_schema: ClassVar[dict[str, Any]] = {"type": "object", "additionalProperties": False}
    #: Whether the plugin can run each job as the task's Unix user (`[run_as] enabled`).
    supports_run_as: ClassVar[bool] = False

    def __init__(self, name: str, options: Mapping[str, Any], state_dir: Path) -> None:
        """`name` is the instance name recorded with each task; `state_dir` is the plugin's own."""
        self.name = name
        self.options = dict(options)
        self.state_dir = state_dir
        #: The container runtime the site enabled for this scheduler, set by the gateway.
        self.runtime: ContainerRuntime | None = None
        #: Run each job as the Unix user named by `task.user` (set by the gateway, if enabled).
        self.run_as_user = False

    def admit_task(self, task: Task) -> None:
        """The gateway's admission check: the container policy, then the plugin's own `admit`."""
        if task.container is not None:
            if self.runtime is None:
                raise TaskRefused(NO_CONTAINER_RUNTIME)
            self.runtime.admit(task)
        self.admit(task)

    def job_command(self, task: Task) -> Command:
        """What the job script runs: the task's command, inside its container if it has one."""
        argv = command_argv(task)
        if task.container is None:
            return Command(argv)
        if self.runtime is None:
            raise TaskRefused(NO_CONTAINER_RUNTIME)
        return self.runtime.job_command(task, argv)

    async def start(self) -> None:
        """Prepare for work (check commands, open sessions). Raise SchedulerError to stop start-up."""

    async def close(self) -> None:
        """Release what `start` acquired. Running jobs keep running."""

    def admit(self, task: Task) -> None:
        """Raise TaskRefused if this scheduler can never run `task`. Must not block."""

    @abc.abstractmethod
    async def submit(self, task: Task) -> str:
        """Hand `task` to the scheduler; answer the native job id."""

    @abc.abstractmethod
    async def status(self, jobs: Sequence[JobRef]) -> dict[str, JobStatus]:
        """The states of `jobs`, keyed by task id, from one batched query."""

    @abc.abstractmethod
    async def cancel(self, job: JobRef) -> None:
        """Stop `job` and all its processes. A job that already ended is not an error."""

    async def find(self, task: Task) -> str | None:
        """The native id of a job that carries `task.id`, or None: recovery after a crash."""
        return None

    async def release(self, job: JobRef) -> None:
        """Forget `job` (its task was deleted): remove the plugin's files for it."""
