"""The gateway's side of the task model: task ids, times, and the v1 wire shape of a task."""
from __future__ import annotations

import secrets
import time
from datetime import UTC, datetime
from typing import Any

from schedulers.base import Container, Mount, Port, Task


def new_task_id() -> str:
    """A unique id that sorts by creation time: milliseconds (hex) + 32 random bits."""
    return f"{time.time_ns() // 1_000_000:011x}{_random_hex()}"


_RANDOM: list[str] = []


def _random_hex() -> str:
    """8 hex digits from the system's random source, fetched 4 KiB at a time: one getrandom call
    serves 1024 ids (each call costs tens of microseconds on some virtual machines)."""
    if not _RANDOM:
        pool = secrets.token_hex(4096)
        _RANDOM.extend(pool[i:i + 8] for i in range(0, len(pool), 8))
    return _RANDOM.pop()


def now() -> datetime:
    return datetime.now(UTC)


def rfc3339(moment: datetime | None) -> str | None:
    if moment is None:
        return None
    return moment.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def parse_rfc3339(text: str | None) -> datetime | None:
    if not text:
        return None
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


def task_from_document(doc: dict[str, Any], task_id: str, workdir: str) -> Task:
    """Build a Task from a v1 document that passed `schemas/task.schema.json`."""
    cmd = doc.get("cmd")
    return Task(
        id=task_id,
        user=doc["user"],
        workdir=workdir,
        stdout=doc.get("stdout") or f"{workdir}/stdout",
        stderr=doc.get("stderr") or f"{workdir}/stderr",
        cmd=tuple(cmd) if isinstance(cmd, list) else cmd,
        cores=doc.get("cores"),
        memory=doc.get("memory"),
        cputime=doc.get("cputime"),
        gpus=doc.get("gpus", 0),
        backend_parameters=dict(doc.get("options", {})),
        container=_container(doc["container"]) if "container" in doc else None,
    )


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
