"""What the local scheduler holds in memory: the queue of waiting tasks and the slots of the jobs
that are starting or running, with the CPUs, memory and GPUs each one holds (a GPU is one job's
alone while it runs).

Admission is FIFO, except that a smaller task that fits may start before an older one that does
not. The head of the queue may also be placed behind a job that holds the cores it asks for
(`take_behind`): its launcher holds the request and starts it as soon as that job ended, without
waiting for the gateway, which then places the next one behind it. Nothing here reads files or
starts processes: the plugin does, when `admissible` says a task may start.
"""
from __future__ import annotations

import asyncio
from collections.abc import Iterator
from dataclasses import dataclass, field

from ..base import JobStatus, Task, TaskState
from .cgpool import Lease


@dataclass
class Slot:
    """A job that is starting (no pid yet) or running, and what it holds."""

    task: Task
    cpus: tuple[int, ...]
    memory: int
    pid: int | None = None
    started_at: int | None = None  # the pid's start time in clock ticks, against pid reuse
    status: JobStatus | None = None  # RUNNING once the job runs
    pidfd: int | None = None  # watched with the event loop when the job is not the launcher's child
    canceling: bool = False
    lease: Lease | None = None  # the pooled cgroup the job runs in
    recorded: bool = False  # its pid file is written
    launched: asyncio.Event = field(default_factory=asyncio.Event)  # the launcher answered
    gpus: tuple[str, ...] = ()  # the ids of the GPUs it holds
    ended: asyncio.Event = field(default_factory=asyncio.Event)
    launcher: int | None = None  # the index of the launcher asked to start it (None: adopted)
    after: str | None = None  # the task whose job it waits for, on the same CPUs (take_behind)
    behind: str | None = None  # the task that waits for this job's end to start on its CPUs
    recalled: bool = False  # waiting behind a job, and taken back from its launcher for idle CPUs

    @property
    def task_id(self) -> str:
        return self.task.id


class Admission:
    """The queue and the slots, against a pool of CPUs, a memory budget (MiB) and a list of GPU ids."""

    def __init__(self, cpu_pool: tuple[int, ...], memory: int, gpu_pool: tuple[str, ...] = ()) -> None:
        self.cpu_pool = cpu_pool
        self.memory = memory
        self.gpu_pool = gpu_pool
        self._free_gpus = list(gpu_pool)
        self.queue: dict[str, Task] = {}
        self.slots: dict[str, Slot] = {}
        self._free = list(cpu_pool)
        self._used_memory = 0

    def waiting(self, task: Task) -> JobStatus:
        """The status of a queued task: what it waits for, and what is free as it is said."""
        cores, memory = task.cores or 1, task.memory or 0
        gpus = f", {task.gpus} GPU(s), {len(self._free_gpus)} free" if task.gpus else ""
        return JobStatus(TaskState.QUEUED, f"waiting for {cores} {'core' if cores == 1 else 'cores'}, "
                                           f"{len(self._free)} free{gpus}, and {memory} MiB, "
                                           f"{self.memory - self._used_memory} MiB free; {len(self.queue)} queued")

    def enqueue(self, task: Task, front: bool = False) -> None:
        """Add `task` at the end of the queue (or, when it lost its place, at the front)."""
        if front:
            self.queue = {task.id: task, **self.queue}
        else:
            self.queue[task.id] = task

    def admissible(self) -> Iterator[Slot]:
        """Take the queued tasks that fit now, in queue order, each given its slot. The head of the
        queue is taken as long as it fits, without looking further (a long queue costs nothing per
        start); only when it does not fit are the others scanned for smaller ones."""
        while self._free and self.queue:
            head = next(iter(self.queue.values()))
            slot = self.take(head)
            if slot is None:
                break
            del self.queue[head.id]
            yield slot
        if not self._free or not self.queue:
            return
        for task in list(self.queue.values()):
            if not self._free:
                return
            if task.id not in self.queue:  # taken (or canceled) meanwhile
                continue
            slot = self.take(task)
            if slot is not None:
                del self.queue[task.id]
                yield slot

    def take(self, task: Task) -> Slot | None:
        """A slot for `task` with its cores, memory and GPUs, or None if they are not free."""
        cores, memory = task.cores or 1, task.memory or 0
        if cores > len(self._free) or self._used_memory + memory > self.memory or task.gpus > len(self._free_gpus):
            return None
        cpus, self._free = tuple(self._free[:cores]), self._free[cores:]
        return self.hold(Slot(task, cpus, memory, gpus=tuple(self._free_gpus[:task.gpus])))

    def take_behind(self, ahead: Slot) -> Slot | None:
        """A slot for the head of the queue on the CPUs of `ahead`, to start once the job of
        `ahead` ended (it holds them meanwhile), or None: only when the head asks for as many cores
        and no GPU, its memory is free beside what the running jobs hold, and nothing already waits
        behind `ahead`, nor `ahead` behind another."""
        if not self.queue or ahead.behind is not None or ahead.after is not None or ahead.gpus \
                or self.slots.get(ahead.task_id) is not ahead:
            return None
        head = next(iter(self.queue.values()))
        memory = head.memory or 0
        if (head.cores or 1) != len(ahead.cpus) or head.gpus or self._used_memory + memory > self.memory:
            return None
        del self.queue[head.id]
        slot = Slot(head, ahead.cpus, memory, after=ahead.task_id)
        ahead.behind = head.id
        self.slots[head.id] = slot
        self._used_memory += memory
        return slot

    def movable(self) -> list[Slot]:
        """The slots waiting behind another job (`take_behind`) that the free CPUs could start now,
        oldest first, as many as those CPUs take beside the ones already recalled: a task sent
        ahead must not wait for an unrelated job, however long it runs, while cores are idle."""
        waiting = [s for s in self.slots.values() if s.after is not None and s.pid is None and not s.canceling]
        free = len(self._free) - sum(len(s.cpus) for s in waiting if s.recalled)
        found = []
        for slot in waiting:
            if not slot.recalled and len(slot.cpus) <= free:
                found.append(slot)
                free -= len(slot.cpus)
        return found

    def hold(self, slot: Slot) -> Slot:
        """Record `slot` (e.g. a job found running after a restart) with what it holds."""
        self.slots[slot.task_id] = slot
        self._free = sorted(set(self._free) - set(slot.cpus))
        self._free_gpus = [g for g in self._free_gpus if g not in slot.gpus]
        self._used_memory += slot.memory
        return slot

    def free(self, task_id: str) -> Slot | None:
        """Give back what the job of `task_id` held; answer its slot if it had one."""
        slot = self.slots.pop(task_id, None)
        if slot is not None:
            behind = self.slots.get(slot.behind) if slot.behind is not None else None
            ahead = self.slots.get(slot.after) if slot.after is not None else None
            if behind is not None and behind.after == task_id:
                behind.after = None  # the CPUs pass to the job that waited for them
            elif ahead is not None and ahead.behind == task_id:
                ahead.behind = None  # it never started: the CPUs stay with the job ahead
            else:
                self._free = sorted(set(self._free) | (set(slot.cpus) & set(self.cpu_pool)))
            held = set(self._free_gpus) | (set(slot.gpus) & set(self.gpu_pool))
            self._free_gpus = [g for g in self.gpu_pool if g in held]
            self._used_memory -= slot.memory
        return slot
