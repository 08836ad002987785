"""Control groups for local jobs: memory, CPU quota and CPU pinning, on cgroup v2 or v1.

`detect()` answers the hierarchy this machine lets the gateway write to, or None. Groups live under
a `jobproxy` parent; `make()` creates one with its CPU limits (quota and cpuset), `set_memory()`
sets or lifts its memory limit, and the job's launcher joins it by writing its pid to every file
`make()` answers, before it executes the job. The local scheduler reuses its groups from job to
job (cgpool.py); `create()` makes a group with all its limits at once.
"""
from __future__ import annotations

import contextlib
import logging
import os
import signal
from collections.abc import Sequence
from pathlib import Path

log = logging.getLogger(__name__)

PARENT = "jobproxy"
CFS_PERIOD_US = 100_000


def _write(path: Path, value: str) -> None:
    with open(path, "w", encoding="ascii") as f:
        f.write(value)


def _read(path: Path | str) -> str:
    try:
        with open(path, encoding="ascii") as f:
            return f.read()
    except OSError:
        return ""


def counter(path: Path | str, key: str) -> int:
    """The value of `key N` in the flat-keyed cgroup file at `path` (0 if none)."""
    return counter_in(_read(path), key)


def counter_in(text: str, key: str) -> int:
    """The value of `key N` in a flat-keyed cgroup file such as memory.events."""
    for line in text.splitlines():
        name, _, value = line.partition(" ")
        if name == key and value.strip().isdigit():
            return int(value)
    return 0


def _cpu_list(cpus: Sequence[int]) -> str:
    return ",".join(str(c) for c in sorted(cpus))


class Cgroups:
    """A writable cgroup hierarchy; subclasses know the v1 or v2 file layout."""

    version = ""

    def prepare(self) -> None:
        """Create the `jobproxy` parent group; raises OSError where the hierarchy is not writable."""
        raise NotImplementedError

    def create(self, name: str, *, memory_bytes: int | None, cpus: Sequence[int]) -> list[Path]:
        """Make the group `name` with its limits; answer the `cgroup.procs` files to join."""
        procs = self.make(name, cpus)
        if memory_bytes:
            self.set_memory(name, memory_bytes)
        return procs

    def make(self, name: str, cpus: Sequence[int]) -> list[Path]:
        """Make the group `name` (if new) limited to `cpus` (a CPU quota of as many CPUs, and the
        cpuset; nothing for none); answer the `cgroup.procs` files to join."""
        raise NotImplementedError

    def set_memory(self, name: str, memory_bytes: int | None) -> None:
        """Limit the memory of the group (swap included), or lift its limit (None)."""
        raise NotImplementedError

    def groups(self, name: str) -> list[Path]:
        raise NotImplementedError

    def oom_file(self, name: str) -> Path:
        """The group's file with its `oom_kill` counter."""
        raise NotImplementedError

    def oom_kills(self, name: str) -> int:
        """How many processes of the group the memory limit killed, ever."""
        return counter(self.oom_file(name), "oom_kill")

    def exists(self, name: str) -> bool:
        """Whether the group is there."""
        return self.groups(name)[0].is_dir()

    def busy(self, name: str) -> bool:
        """Whether any process is in the group."""
        return bool(_read(self.groups(name)[0] / "cgroup.procs").split())

    def pids(self, name: str) -> set[int]:
        found: set[int] = set()
        for group in self.groups(name):
            found.update(int(p) for p in _read(group / "cgroup.procs").split())
        return found

    def kill(self, name: str) -> None:
        """SIGKILL every process in the group, including any that left the job's session."""
        for pid in self.pids(name):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)

    def remove(self, name: str) -> None:
        for group in self.groups(name):
            try:
                group.rmdir()
            except FileNotFoundError:
                pass
            except OSError as exc:
                log.warning("could not remove cgroup %s: %s", group, exc)


class CgroupsV2(Cgroups):
    """The unified hierarchy: one directory per job with memory.max, cpu.max and cpuset.cpus."""

    version = "v2"

    def __init__(self, root: Path) -> None:
        self.root = root
        self.parent = root / PARENT

    def prepare(self) -> None:
        wanted = {"memory", "cpu", "cpuset"} & set(_read(self.root / "cgroup.controllers").split())
        enable = " ".join("+" + c for c in sorted(wanted))
        _write(self.root / "cgroup.subtree_control", enable)
        self.parent.mkdir(exist_ok=True)
        _write(self.parent / "cgroup.subtree_control", enable)

    def groups(self, name: str) -> list[Path]:
        return [self.parent / name]

    def make(self, name: str, cpus: Sequence[int]) -> list[Path]:
        group = self.parent / name
        group.mkdir(exist_ok=True)
        if cpus:
            _write(group / "cpu.max", f"{len(cpus) * CFS_PERIOD_US} {CFS_PERIOD_US}")
            _write(group / "cpuset.cpus", _cpu_list(cpus))
        return [group / "cgroup.procs"]

    def set_memory(self, name: str, memory_bytes: int | None) -> None:
        group = self.parent / name
        _write(group / "memory.max", str(memory_bytes) if memory_bytes else "max")
        _write(group / "memory.swap.max", "0" if memory_bytes else "max")

    def oom_file(self, name: str) -> Path:
        return self.parent / name / "memory.events"

    def kill(self, name: str) -> None:
        kill_file = self.parent / name / "cgroup.kill"
        if kill_file.exists():
            _write(kill_file, "1")
        super().kill(name)


class CgroupsV1(Cgroups):
    """Separate memory, cpu and cpuset hierarchies, one `jobproxy/<task>` directory in each."""

    version = "v1"

    def __init__(self, root: Path) -> None:
        self.root = root

    def _dir(self, controller: str) -> Path:
        return self.root / controller / PARENT

    def prepare(self) -> None:
        for controller in ("memory", "cpu", "cpuset"):
            self._dir(controller).mkdir(exist_ok=True)
        cpuset = self._dir("cpuset")
        for key in ("cpuset.cpus", "cpuset.mems"):
            if not _read(cpuset / key).strip():
                _write(cpuset / key, _read(self.root / "cpuset" / key).strip())

    def groups(self, name: str) -> list[Path]:
        return [self._dir(c) / name for c in ("memory", "cpu", "cpuset")]

    def make(self, name: str, cpus: Sequence[int]) -> list[Path]:
        memory, cpu, cpuset = self.groups(name)
        for group in (memory, cpu, cpuset):
            group.mkdir(exist_ok=True)
        if cpus:
            _write(cpu / "cpu.cfs_period_us", str(CFS_PERIOD_US))
            _write(cpu / "cpu.cfs_quota_us", str(len(cpus) * CFS_PERIOD_US))
            _write(cpuset / "cpuset.cpus", _cpu_list(cpus))
            _write(cpuset / "cpuset.mems", _read(self._dir("cpuset") / "cpuset.mems").strip())
        return [g / "cgroup.procs" for g in (memory, cpu, cpuset)]

    def set_memory(self, name: str, memory_bytes: int | None) -> None:
        memory = self._dir("memory") / name
        value = str(memory_bytes) if memory_bytes else "-1"
        limit, memsw = memory / "memory.limit_in_bytes", memory / "memory.memsw.limit_in_bytes"
        if not memsw.exists():
            _write(limit, value)
            return
        try:  # memory.limit_in_bytes may never exceed memory.memsw.limit_in_bytes: lower it first
            _write(limit, value)
        except OSError:  # raising it: memsw first
            _write(memsw, value)
            _write(limit, value)
        else:
            _write(memsw, value)

    def oom_file(self, name: str) -> Path:
        return self._dir("memory") / name / "memory.oom_control"


def detect(root: Path = Path("/sys/fs/cgroup")) -> Cgroups | None:
    """The writable hierarchy under `root`: v2 when it has a memory controller, else v1, else None."""
    candidates: list[Cgroups] = []
    for v2_root in (root, root / "unified"):
        if "memory" in _read(v2_root / "cgroup.controllers").split():
            candidates.append(CgroupsV2(v2_root))
    if (root / "memory" / "memory.limit_in_bytes").exists():
        candidates.append(CgroupsV1(root))
    for hierarchy in candidates:
        try:
            hierarchy.prepare()
        except OSError as exc:
            log.info("cgroup %s under %s is not usable: %s", hierarchy.version, root, exc)
            continue
        return hierarchy
    return None
