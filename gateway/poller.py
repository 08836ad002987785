"""One poller per scheduler instance: one batched status query per interval, changes to the store.

It also finishes what a crash interrupted: a task recorded but never handed to its scheduler is
found again by its id (`Scheduler.find`) or submitted now, so nothing accepted is lost.
"""
from __future__ import annotations

import asyncio
import logging

from schedulers.base import JobRef, JobStatus, Scheduler, SchedulerError, SchedulerUnavailable

from schedulers.base import TaskState
from .model import now
from .store import Change, Record, Store

log = logging.getLogger(__name__)


class Poller:
    #: Seconds between two rounds at least, however often a submit wakes the poller: many submits
    #: in a burst then cost one round, not one each.
    MIN_GAP = 0.1

    def __init__(self, store: Store, scheduler: Scheduler, interval: float) -> None:
        self.store = store
        self.scheduler = scheduler
        self.interval = interval
        self.inflight: set[str] = set()  # tasks whose submit call is running right now
        self.status_calls = 0
        self._wake = asyncio.Event()

    def report(self, task_id: str, status: JobStatus) -> None:
        """A change the scheduler saw by itself (the plugin contract's `report`)."""
        record = self.store.get(task_id)
        change = _change(record, status) if record is not None and not record.state.terminal else None
        if change is not None:
            self.store.apply([change])

    def wake(self) -> None:
        """Poll now rather than at the end of the interval (e.g. after a submit)."""
        self._wake.set()

    async def run(self) -> None:
        while True:
            try:
                await self.poll_once()
            except Exception:  # the poller must outlive any one bad round
                log.exception("poller of scheduler %s: round failed", self.scheduler.name)
            await asyncio.sleep(min(self.MIN_GAP, self.interval))
            try:
                await asyncio.wait_for(self._wake.wait(), max(0.0, self.interval - self.MIN_GAP))
            except asyncio.TimeoutError:
                pass
            self._wake.clear()

    async def poll_once(self) -> None:
        records = self.store.active(self.scheduler.name)
        submitted = [r for r in records if r.native_id is not None]
        for record in records:
            if record.native_id is None and record.id not in self.inflight:
                await self._recover(record)
        if not submitted:
            return
        jobs = [JobRef(r.task, r.native_id or "") for r in submitted]
        try:
            self.status_calls += 1
            answers = await self.scheduler.status(jobs)
        except SchedulerError as exc:
            log.warning("scheduler %s: status query failed, will retry: %s", self.scheduler.name, exc)
            return
        changes = [c for r in submitted if (c := _change(r, answers.get(r.id))) is not None]
        if changes:
            self.store.apply(changes)

    async def _recover(self, record: Record) -> None:
        try:
            native = await self.scheduler.find(record.task)
            if native is None:
                native = await self.scheduler.submit(record.task)
                log.warning("task %s: submitted after recovery as job %s", record.id, native)
            else:
                log.warning("task %s: recovered its job %s", record.id, native)
        except SchedulerUnavailable as exc:
            log.warning("task %s: not yet submitted, will retry: %s", record.id, exc)
            return
        except SchedulerError as exc:
            self.store.apply([Change(record.id, TaskState.SYSTEM_ERROR, f"could not submit: {exc}", finished=now())])
            return
        self.store.set_native_id(record.id, native)


def _change(record: Record, status: JobStatus | None) -> Change | None:
    if status is None:
        return None
    if (status.state, status.description, status.exit_code) == (record.state, record.description, record.exit_code):
        return None
    started = status.started or (now() if status.state in (TaskState.RUNNING, TaskState.PAUSED) else None)
    finished = status.finished or (now() if status.state.terminal else None)
    return Change(record.id, status.state, status.description, status.exit_code, started, finished)
