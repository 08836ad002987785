"""Process facts from /proc, robust against pid reuse and slow reaping of zombies."""
from __future__ import annotations

import os
from pathlib import Path


def _stat_fields(pid: int) -> list[str] | None:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # the command name (field 2) may contain spaces and parentheses: split after its last ')'
    return text[text.rindex(")") + 2:].split()


def start_time(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (field 22 of /proc/PID/stat)."""
    fields = _stat_fields(pid)
    return int(fields[19]) if fields else None


def alive(pid: int, started: int | None) -> bool:
    """True while process `pid`, started at `started`, exists and is not a zombie."""
    fields = _stat_fields(pid)
    if not fields or fields[0] in ("Z", "X"):
        return False
    return started is None or int(fields[19]) == started


def zombie_of_launcher(pid: int, started: int | None) -> bool:
    """Whether `pid` (started at `started`) ended but is not reaped yet by the job launcher that
    ran it, which records a direct job's exit status before it reaps it."""
    fields = _stat_fields(pid)
    if not fields or fields[0] != "Z" or (started is not None and int(fields[19]) != started):
        return False
    try:
        command = Path(f"/proc/{fields[1]}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return any(arg.endswith(b"launcher.py") for arg in command) and b"--serve" in command


def group_under(pid: int, parent: str) -> str | None:
    """The name of the cgroup right under `/parent/` that process `pid` is in (its memory group on
    cgroup v1, its group on v2), or None."""
    try:
        text = Path(f"/proc/{pid}/cgroup").read_text()
    except OSError:
        return None
    for line in text.splitlines():
        _, controllers, path = line.split(":", 2)
        if (controllers == "" or "memory" in controllers.split(",")) and path.startswith(f"/{parent}/"):
            return path[len(parent) + 2:].split("/")[0] or None
    return None


def pgid(pid: int) -> int | None:
    """The process group of `pid`, or None if there is no such process."""
    try:
        return os.getpgid(pid)
    except ProcessLookupError:
        return None


def by_task() -> dict[str, set[int]]:
    """Live processes by the JOBPROXY_TASK_ID in their environment, wherever their session. Reads
    every process's environment: for the rare moments that need it (cancel, adoption)."""
    found: dict[str, set[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            environ = (entry / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        for item in environ:
            if item.startswith(b"JOBPROXY_TASK_ID=") and alive(int(entry.name), None):
                found.setdefault(item[17:].decode(errors="replace"), set()).add(int(entry.name))
    return found


def visible_gpus(pid: int) -> tuple[str, ...]:
    """The GPU ids in a process's CUDA_VISIBLE_DEVICES (what the launcher gave its job), if any."""
    try:
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return ()
    for item in environ:
        if item.startswith(b"CUDA_VISIBLE_DEVICES="):
            return tuple(g for g in item[21:].decode(errors="replace").split(",") if g)
    return ()
