"""The scheduler plugin contract.

A plugin turns tasks into jobs of one batch system. The gateway creates it with the site's
options (already checked against `options_schema`, defaults filled in), then calls:

1. `start(report)` once, before anything else. `report(task_id, status)` is how a plugin that
   learns of changes by itself (`reports_changes = True`, e.g. a local child's exit) tells the
   gateway at once, from the event loop's thread.
2. `admit(task)` at submit time, before anything is stored: refuse (`TaskRefused`) what this
   scheduler can never run, e.g. more cores than any node has.
3. The gateway makes the task's folder (`task.workdir`, mode 0700, the job account's) with the
   files the task brings, records the task, then calls `submit(task)`, which answers the
   scheduler's own id for the job (the "native id"). A plugin that `makes_task_folders` is given
   a task without files before its folder exists, and makes it when the job starts. The job must
   carry the gateway's task id (job name, comment or environment), so that `find(task)` can
   recover it after a crash between the two steps.
4. `status(jobs)`: one batched query about many jobs, never one call per job. A poller calls it
   once per interval with every active job of this scheduler; for a plugin that
   `reports_changes`, only once at start-up, to reconcile what happened while the gateway was
   down. It answers the jobs whose state it knows.
5. `cancel(job)` stops a job and everything it started; `release(job)` frees what the plugin
   keeps for a job once the gateway has forgotten the task.

Plugins are found through the entry-point group `jobproxy.schedulers`; the site config names the
one to run and gives its options. Errors a user should read: `SchedulerConfigError` from the
constructor or `start` (the gateway does not start; the message says which option is wrong),
`TaskRefused` (answered 400, with the JSON path of what is refused in `path`) and
`SchedulerUnavailable` (answered 503, the task is not kept); their message is shown as it is.
"""
from __future__ import annotations

import abc
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from .script import Command, check_template, command_argv, load_template, placeholders
from .task import ACTIVE, TERMINAL, Container, Mount, Port, Task, TaskState, path_within

if TYPE_CHECKING:
    from .containers import ContainerRuntime

__all__ = [
    "ACTIVE",
    "TEMPLATE_OPTION",
    "TERMINAL",
    "Container",
    "JobRef",
    "JobStatus",
    "Mount",
    "Port",
    "Report",
    "Scheduler",
    "SchedulerConfigError",
    "SchedulerError",
    "SchedulerUnavailable",
    "Task",
    "TaskRefused",
    "TaskState",
    "path_within",
]

#: The `template` option every plugin with a job-script template takes.
TEMPLATE_OPTION: dict[str, Any] = {
    "type": "string", "minLength": 1,
    "description": "path of a job-script template replacing the built-in one",
}

NO_CONTAINER_RUNTIME = (
    "$.container: this gateway has no container runtime configured, so it cannot run a task in a "
    "container; submit the task without `container`, or ask the site to configure a runtime"
)


class SchedulerError(Exception):
    """An error whose message is fit for the end user."""


class SchedulerConfigError(SchedulerError):
    """The plugin's options (or the machine) cannot work: the gateway refuses to start."""


class TaskRefused(SchedulerError):
    """This scheduler will never run the task as asked (HTTP 400). `path` is the JSON path of the
    refused part of the task (e.g. `$.cores`), `$` for the task as a whole."""

    def __init__(self, message: str, path: str = "$") -> None:
        super().__init__(message)
        self.path = path


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


#: How a plugin tells the gateway of a change it saw by itself: `report(task_id, status)`.
Report = Callable[[str, JobStatus], None]


def _ignore(task_id: str, status: JobStatus) -> None:
    """The report sink until `start` is given the gateway's."""


class Scheduler(abc.ABC):
    """Base class of every scheduler plugin."""

    #: JSON Schema of the `[scheduler.options]` table this plugin takes.
    options_schema: ClassVar[dict[str, Any]] = {"type": "object", "additionalProperties": False}
    #: Whether the plugin can run each job as the task's Unix user (`[run_as] enabled`).
    supports_run_as: ClassVar[bool] = False
    #: Whether the plugin reports every change of its jobs through `report` as it happens, so
    #: the gateway polls it only at start-up.
    reports_changes: ClassVar[bool] = False
    #: Whether the plugin makes a task's folder, if it is not there, when the task's job starts
    #: (mode 0700, the job account's): the gateway then leaves a task that brings no files
    #: without one until then, which costs a queued task no file-system call.
    makes_task_folders: ClassVar[bool] = False

    def __init__(self, name: str, options: Mapping[str, Any], state_dir: Path, *,
                 runtime: ContainerRuntime | None = None, run_as_user: bool = False,
                 account: str | None = None) -> None:
        """`name` is the instance name recorded with each task; `options` the site's, checked
        against `options_schema` with its defaults filled in; `state_dir` is the plugin's own
        folder; `runtime` the container runtime the site enabled for it, if any; `run_as_user`
        asks to run each job as the Unix user named by `task.user`; otherwise `account`, if
        given, is the one Unix account every job runs as instead of the gateway's own.
        Raise SchedulerConfigError for options that cannot work here."""
        self.name = name
        self.options = dict(options)
        self.state_dir = state_dir
        self.runtime = runtime
        self.run_as_user = run_as_user
        self.account = account
        self.report: Report = _ignore

    def job_account(self, task: Task) -> str | None:
        """The Unix account `task`'s job runs as: the task's user (`run_as_user`), else the fixed
        `account`, else None: the gateway's own. Plugins that `supports_run_as` honour it."""
        return task.user if self.run_as_user else self.account

    def job_template(self, known: Iterable[str], required: Iterable[str] = ("run",)) -> str:
        """The job-script template: the admin's `template` option, else `<name>.sh` beside the
        plugin's module; checked to use only the `known` placeholders and all `required` ones."""
        override = self.options.get("template")
        package = type(self).__module__.rpartition(".")[0]
        origin = override or f"{package.rpartition('.')[2]}.sh"
        try:
            template = load_template(package, override)
        except OSError as exc:
            raise SchedulerConfigError(f"cannot read the job-script template {origin}: {exc.strerror}") from None
        try:
            check_template(template, known, origin)
        except ValueError as exc:
            raise SchedulerConfigError(str(exc)) from None
        lacking = set(required) - placeholders(template)
        if lacking:
            raise SchedulerConfigError(f"job-script template {origin}: lacks "
                                       + ", ".join("{{" + n + "}}" for n in sorted(lacking)))
        return template

    def admit_task(self, task: Task) -> None:
        """The gateway's admission check: the container policy, the output folders, then the
        plugin's own `admit`."""
        if task.container is not None:
            if self.runtime is None:
                raise TaskRefused(NO_CONTAINER_RUNTIME, "$.container")
            self.runtime.admit(task)
        for key, path in (("stdout", task.stdout), ("stderr", task.stderr)):
            parent = os.path.dirname(path)
            if not path.startswith(task.workdir + "/") and not os.path.isdir(parent):
                raise TaskRefused(f"cannot write {path}: the directory {parent} does not exist", f"$.{key}")
        self.admit(task)

    def job_command(self, task: Task) -> Command:
        """What the job script runs: the task's command, inside its container if it has one."""
        argv = command_argv(task)
        if task.container is None:
            return Command(argv)
        if self.runtime is None:
            raise TaskRefused(NO_CONTAINER_RUNTIME, "$.container")
        return self.runtime.job_command(task, argv)

    async def start(self, report: Report) -> None:
        """Prepare for work (check commands, open sessions); keep `report`. Raise SchedulerError
        (SchedulerConfigError for a mistake of the site's) to stop start-up. Overrides call
        `super().start(report)` first."""
        self.report = report

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
        """The native id of a job that carries `task.id`, or None: recovery after a crash
        between the gateway recording the task and `submit` answering."""
        return None

    async def release(self, job: JobRef) -> None:
        """Forget `job` (its task was deleted): remove the plugin's files for it."""
