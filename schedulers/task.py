"""The task model of the plugin contract: what a scheduler plugin is given to run.

The gateway builds these from its API documents (v1, TES) and stores them; plugins only read
them. Nothing here knows about HTTP.
"""
from __future__ import annotations

import enum
import os
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field, fields
from typing import Any


class TaskState(str, enum.Enum):
    """The GA4GH TES task states: the one vocabulary of every backend and API."""

    UNKNOWN = "UNKNOWN"
    QUEUED = "QUEUED"
    INITIALIZING = "INITIALIZING"
    RUNNING = "RUNNING"
    PAUSED = "PAUSED"
    COMPLETE = "COMPLETE"
    EXECUTOR_ERROR = "EXECUTOR_ERROR"
    SYSTEM_ERROR = "SYSTEM_ERROR"
    CANCELING = "CANCELING"
    CANCELED = "CANCELED"
    PREEMPTED = "PREEMPTED"

    @property
    def terminal(self) -> bool:
        return self in TERMINAL


#: Final states. PREEMPTED is final: a plugin whose site requeues preempted jobs reports them
#: QUEUED again instead.
TERMINAL = frozenset({TaskState.COMPLETE, TaskState.EXECUTOR_ERROR, TaskState.SYSTEM_ERROR,
                      TaskState.CANCELED, TaskState.PREEMPTED})
ACTIVE = frozenset(s for s in TaskState if s not in TERMINAL)


def path_within(path: str, roots: Iterable[str]) -> bool:
    """Whether `path`, with `..` and symbolic links resolved, lies in or under one of `roots`
    (themselves resolved): the one check behind every confined path."""
    real = os.path.realpath(path)
    for root in roots:
        top = os.path.realpath(root)
        if real == top or real.startswith(top.rstrip("/") + "/"):
            return True
    return False


@dataclass(frozen=True)
class Port:
    """A container port published on the host."""

    host: int
    container: int


@dataclass(frozen=True)
class Mount:
    """A host path bound into a container."""

    host: str
    container: str
    read_only: bool = False


@dataclass(frozen=True)
class Container:
    """The container a task's command runs in."""

    image: str
    ports: tuple[Port, ...] = ()
    volumes: tuple[Mount, ...] = ()


@dataclass(frozen=True)
class Task:
    """A validated task. Units: `memory` in MiB, `cputime` in CPU seconds, `cores` in CPU cores,
    `gpus` in whole GPUs (each the task's alone).

    `backend_parameters` are scheduler-specific requests a client made by name (v1 `options`,
    TES `resources.backend_parameters`), namespaced by scheduler (`slurm.partition`,
    `sge.queue`, see PARAMETERS); their values were checked against the task schema's patterns
    before they got here. A plugin applies the ones of its namespace and ignores the others. `name` and `tags` are
    the client's own labels. `extra` is the API's own data kept with the task (e.g. the TES
    request); plugins do not read it.
    """

    id: str
    user: str
    workdir: str
    stdout: str
    stderr: str
    cmd: str | tuple[str, ...] | None = None
    cores: int | None = None
    memory: int | None = None
    cputime: int | None = None
    gpus: int = 0
    container: Container | None = None
    backend_parameters: dict[str, str] = field(default_factory=dict)
    name: str | None = None
    tags: dict[str, str] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        """The task as plain JSON data (what `from_json` reads back)."""
        data = {name: getattr(self, name) for name in _FIELDS}
        if isinstance(self.cmd, tuple):
            data["cmd"] = list(self.cmd)
        if self.container is not None:
            data["container"] = asdict(self.container)
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Task:
        data = dict(data)
        if isinstance(data.get("cmd"), list):
            data["cmd"] = tuple(data["cmd"])
        if data.get("container"):
            c = data["container"]
            data["container"] = Container(
                image=c["image"],
                ports=tuple(Port(**p) for p in c.get("ports", ())),
                volumes=tuple(Mount(**m) for m in c.get("volumes", ())),
            )
        return cls(**data)


_FIELDS = tuple(f.name for f in fields(Task))

#: The backend parameters built-in plugins apply (`Task.backend_parameters` keys), with what each
#: one is: the Slurm plugin the `slurm.` ones, the DRMAA plugin (Grid Engine) the `sge.` ones. The
#: task schema (`$defs/options`) says which values each may have.
PARAMETERS: dict[str, str] = {
    "slurm.partition": "sbatch --partition",
    "slurm.account": "sbatch --account",
    "slurm.qos": "sbatch --qos",
    "slurm.constraint": "sbatch --constraint (node features, e.g. haswell&ib)",
    "slurm.reservation": "sbatch --reservation",
    "sge.queue": "qsub -q",
    "sge.project": "qsub -P",
}
