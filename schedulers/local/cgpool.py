"""Cgroups reused from job to job, so that starting a job creates and removes no directory.

A job's CPU quota and cpuset depend only on the CPUs it holds, and the local scheduler gives each
CPU to one job at a time: so there is a pool of groups per CPU set, each made once with its CPU
limits. A job takes a free group of its CPU set (`take`), its memory limit written (or lifted)
before the job joins; when the job ended the group goes back (`give_back`), unless a process is
still in it (one that left the job's session), in which case it is retired and a new group takes
its place. OOM kills are counted per job as the difference of the group's `oom_kill` counter
before and after it (`finish`).

Group names start with a prefix of the gateway's state folder, so gateways on one machine do not
share groups, and a restarted gateway finds the groups of the jobs it adopts (their pid files name
them): a group some process is in is never taken.
"""
from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from .cgroups import Cgroups, counter, counter_in

log = logging.getLogger(__name__)

_UNKNOWN = -1  # the memory limit of a group found on disk: written at its first use


@dataclass(frozen=True)
class Lease:
    """The group a job runs in, and its OOM-kill counter when the job took it."""

    name: str
    procs: tuple[str, ...]  # the cgroup.procs files the job joins
    oom_base: int


def prefix_for(state_dir: Path) -> str:
    """The group-name prefix of the gateway whose plugin state is in `state_dir`."""
    return "p" + hashlib.sha256(str(state_dir.resolve()).encode()).hexdigest()[:10]


class CgroupPool:
    """The reusable groups of one local scheduler in `hierarchy`."""

    def __init__(self, hierarchy: Cgroups, prefix: str) -> None:
        self.hierarchy = hierarchy
        self.prefix = prefix
        self._free: dict[tuple[int, ...], list[str]] = {}
        self._procs: dict[str, tuple[str, ...]] = {}
        self._files: dict[str, tuple[str, str]] = {}  # the oom_kill counter's file, the first cgroup.procs
        self._memory: dict[str, int | None] = {}  # the limit last written, None for none
        self._oom: dict[str, int] = {}  # the oom_kill counter when the last job left
        self._oom_fds: dict[str, int] = {}  # the oom_kill counter's file of each group in use, kept open
        self._next: dict[tuple[int, ...], int] = {}
        self._retired: set[str] = set()
        self._taken: set[str] = set()

    def take(self, cpus: Sequence[int], memory_bytes: int | None) -> Lease:
        """A group for a job on `cpus` limited to `memory_bytes` (None: no limit). OSError if the
        group cannot be made or limited."""
        key = tuple(sorted(cpus))
        free = self._free.get(key)
        name = free.pop() if free else self._new(key)
        try:
            self._limit(name, memory_bytes)
        except OSError as exc:  # e.g. a lower limit than what the group still holds (page cache)
            log.info("cgroup %s cannot take a memory limit of %s bytes (%s): a new one instead", name, memory_bytes,
                     exc)
            self._retire(name)
            name = self._new(key)
            self._limit(name, memory_bytes)
        base = self._oom.pop(name, None)
        if base is None:
            base = self._oom_kills(name)
        self._taken.add(name)
        return Lease(name, self._procs[name], base)

    def _limit(self, name: str, memory_bytes: int | None) -> None:
        if self._memory.get(name, _UNKNOWN) != memory_bytes:
            self._memory[name] = _UNKNOWN
            self.hierarchy.set_memory(name, memory_bytes)
            self._memory[name] = memory_bytes

    def adopt(self, name: str, oom_base: int) -> Lease:
        """The lease of a running job found after a restart, in group `name`."""
        self._procs.setdefault(name, tuple(str(group / "cgroup.procs") for group in self.hierarchy.groups(name)))
        self._memory[name] = _UNKNOWN
        self._taken.add(name)
        self._retired.discard(name)
        return Lease(name, self._procs[name], oom_base)

    def finish(self, lease: Lease, cpus: Sequence[int], busy: bool | None = None) -> int:
        """The job of `lease` (on `cpus`) ended: its group is free again, unless a process is still
        in it (`busy`, when the caller knows; else its `cgroup.procs` is read). Answers how many
        processes the memory limit killed in the group since the job took it."""
        name = lease.name
        kills = self._oom_kills(name)
        self._taken.discard(name)
        if busy is None:
            busy = self._busy(name)
        if busy:
            log.info("cgroup %s still holds processes after its job ended: not reused", name)
            self._retire(name)
        else:
            self._oom[name] = kills
            self._free.setdefault(tuple(sorted(cpus)), []).append(name)
        return max(0, kills - lease.oom_base)

    def close(self) -> None:
        """Remove the groups no job is in."""
        for name in list(self._oom_fds):
            self._close(name)
        for name in [n for names in self._free.values() for n in names] + sorted(self._retired):
            if not self.hierarchy.busy(name):
                self.hierarchy.remove(name)
        self._free.clear()
        self._retired.clear()

    def _paths(self, name: str) -> tuple[str, str]:
        paths = self._files.get(name)
        if paths is None:
            paths = self._files[name] = (str(self.hierarchy.oom_file(name)),
                                         str(self.hierarchy.groups(name)[0] / "cgroup.procs"))
        return paths

    def _oom_kills(self, name: str) -> int:
        """The group's oom_kill counter, read again (from the start) through its file kept open: an
        open is most of the cost of a read of a cgroup file. By its path once the group is gone."""
        fd = self._oom_fds.get(name)
        if fd is None:
            try:
                fd = self._oom_fds[name] = os.open(self._paths(name)[0], os.O_RDONLY | os.O_CLOEXEC)
            except OSError:
                return 0
        try:
            return counter_in(os.pread(fd, 4096, 0).decode("ascii", "replace"), "oom_kill")
        except OSError:  # removed (ENODEV), and maybe made again
            self._close(name)
            return counter(self._paths(name)[0], "oom_kill")

    def _close(self, name: str) -> None:
        fd = self._oom_fds.pop(name, None)
        if fd is not None:
            os.close(fd)

    def _retire(self, name: str) -> None:
        self._retired.add(name)
        self._close(name)

    def _busy(self, name: str) -> bool:
        try:
            with open(self._paths(name)[1], "rb") as f:
                return bool(f.read().strip())
        except OSError:
            return False

    def _new(self, key: tuple[int, ...]) -> str:
        while True:
            number = self._next.get(key, 0)
            self._next[key] = number + 1
            name = f"{self.prefix}-{'_'.join(map(str, key)) or 'all'}-{number}"
            if name in self._taken or name in self._retired:
                continue
            found = self.hierarchy.exists(name)
            if found and self.hierarchy.busy(name):  # a job from before a restart still runs in it
                self._retired.add(name)
                continue
            self._procs[name] = tuple(str(p) for p in self.hierarchy.make(name, key))
            self._memory[name] = _UNKNOWN if found else None
            return name
