"""The task and state model shared by the HTTP layer, the store and the scheduler plugins."""
from __future__ import annotations

import enum
import os
import secrets
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from typing import Any, Iterable


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


TERMINAL = frozenset({TaskState.COMPLETE, TaskState.EXECUTOR_ERROR, TaskState.SYSTEM_ERROR, TaskState.CANCELED})
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


def new_task_id() -> str:
    """A unique id that sorts by creation time: milliseconds (hex) + 32 random bits."""
    return f"{time.time_ns() // 1_000_000:011x}{secrets.token_hex(4)}"


def now() -> datetime:
    return datetime.now(timezone.utc)


def rfc3339(moment: datetime | None) -> str | None:
    if moment is None:
        return None
    return moment.astimezone(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def parse_rfc3339(text: str | None) -> datetime | None:
    if not text:
        return None
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


@dataclass(frozen=True)
class Port:
    host: int
    container: int


@dataclass(frozen=True)
class Mount:
    host: str
    container: str
    read_only: bool = False


@dataclass(frozen=True)
class Container:
    image: str
    ports: tuple[Port, ...] = ()
    volumes: tuple[Mount, ...] = ()


@dataclass(frozen=True)
class Task:
    """A validated task. Units: `memory` in MiB, `cputime` in CPU seconds, `cores` in CPU cores."""

    id: str
    user: str
    workdir: str
    stdout: str
    stderr: str
    cmd: str | tuple[str, ...] | None = None
    cores: int | None = None
    memory: int | None = None
    cputime: int | None = None
    container: Container | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_document(cls, doc: dict[str, Any], task_id: str, workdir: str) -> "Task":
        """Build a Task from a document that passed `schemas/task.schema.json`."""
        cmd = doc.get("cmd")
        return cls(
            id=task_id,
            user=doc["user"],
            workdir=workdir,
            stdout=doc.get("stdout") or f"{workdir}/stdout",
            stderr=doc.get("stderr") or f"{workdir}/stderr",
            cmd=tuple(cmd) if isinstance(cmd, list) else cmd,
            cores=doc.get("cores"),
            memory=doc.get("memory"),
            cputime=doc.get("cputime"),
            container=_container(doc["container"]) if "container" in doc else None,
        )

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "Task":
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


def _listed(value: Any, item_key: str) -> list[Any]:
    """The seed's `{"port": x}` / `{"mount": [...]}` shapes, or a plain list, as a list."""
    if isinstance(value, dict):
        value = value[item_key]
    return value if isinstance(value, list) else [value]


def _container(doc: dict[str, Any]) -> Container:
    ports = []
    for pair in _listed(doc.get("ports", []), "port"):
        host, inner = (pair["host"], pair["container"]) if isinstance(pair, dict) else pair
        ports.append(Port(host, inner))
    volumes = [
        Mount(m["host"], m["container"], m.get("mode", "RW") == "RO")
        for m in _listed(doc.get("volumes", []), "mount")
    ]
    return Container(image=doc["image"], ports=tuple(ports), volumes=tuple(volumes))
