"""One poller per scheduler instance: the one place where a task's state changes.

It applies each change to the active set at once and queues it for the store (the changes of one
turn of the event loop as one write, committed in groups), whether the change comes from a
scheduler's `report` (e.g. a local job's end, as it happens), from the one batched status query
per interval that remote schedulers get, or from a cancel. A scheduler that `reports_changes` is
asked about its jobs only at start-up, to reconcile what happened while the gateway was down.

It also finishes what a crash interrupted: a task recorded but never handed to its scheduler is
found again by its id (`Scheduler.find`) or submitted now, so nothing accepted is lost. Such a task
whose inputs the gateway stages is given to the stager first (`restage`), which fetches them again
and then submits it (`hand_over`): never before all its inputs are in.
"""
from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from concurrent.futures import Future
from dataclasses import replace
from typing import Any

from schedulers.base import JobRef, JobStatus, Scheduler, SchedulerError, SchedulerUnavailable, TaskState

from .active import ActiveSet
from .model import now
from .store import Change, Record
from .storecommon import answer
from .taskstore import TaskStore

#: How many tasks that reached a final state lately a poller remembers, against late older records.
ENDED_KEPT = 10_000

log = logging.getLogger(__name__)


class Poller:
    def __init__(self, store: TaskStore, scheduler: Scheduler, active: ActiveSet, interval: float) -> None:
        self.store = store
        self.scheduler = scheduler
        self.active = active
        self.interval = interval
        self.status_calls = 0
        # observers (gateway/metrics.py): each round's seconds; each task reaching a final state
        self.on_round: Callable[[float], None] = _ignore
        self.on_final: Callable[[str, TaskState], None] = _ignore
        # listeners of every applied change, called with the task's record as it now is (the event
        # stream; other replicas): add with `listeners.append`; a listener must neither block nor raise.
        # They hear of a new task only once it is accepted: its scheduler took it, or its inputs are
        # being staged; a task its scheduler refuses (and whose record is deleted) is never heard of
        self.listeners: list[Callable[[Record], None]] = []
        self._unheard: dict[str, list[Record]] = {}  # new tasks not accepted yet: what they will hear
        # tasks seen reaching a final state lately: an older record of one, arriving late (another
        # replica's notification), must not bring it back into the active set
        self._ended: collections.OrderedDict[str, None] = collections.OrderedDict()
        # staging (gateway/staging): `held` tasks are not submitted by a round (their inputs are on
        # their way; `hand_over` submits them); `defer_final` may take a task's final change over
        # (answering True) to apply it later itself, with `apply(..., deferrable=False)`; `restage` may
        # take a task without a job that this poller takes on (at start-up, or adopted from another
        # replica) to fetch its inputs first (answering True: it is held, then handed over)
        self.held: Callable[[Record], bool] = _never
        self.defer_final: Callable[[Record, Change], bool] = _never
        self.restage: Callable[[Record], bool] = _never
        # replicas (gateway/replicas.py): only the holder of the scheduler's lease polls; another
        # replica may hand a task it recorded to the holder instead of submitting it (True)
        self.leading = True
        self.to_leader: Callable[[Record], bool] = _keep
        self._unwritten: tuple[list[Change], list[Future[Any]]] | None = None  # this loop turn's (`_write`)
        self._submitting: set[str] = set()  # tasks whose submit call is running right now
        self._unsubmitted: set[str] = set()  # recorded, never handed to the scheduler (a crash)

    # ---- changes ----

    def report(self, task_id: str, status: JobStatus) -> None:
        """A change the scheduler saw by itself (the plugin contract's `report`)."""
        record = self.active.get(task_id)
        if record is None:  # final already (e.g. canceled), or not ours
            return
        change = _change(record, status)
        if change is not None:
            self.apply([change])

    def apply(self, changes: Iterable[Change], deferrable: bool = True) -> Future[Any]:
        """Apply state changes to the active set now and queue them for the store; a task that
        became final leaves the active set once its state is on disk. A final change that
        `defer_final` takes over (when `deferrable`) is left out."""
        changes = [c for c in changes if not (deferrable and self._deferred(c))]
        final = []
        for c in changes:
            record = self.active.get(c.task_id)
            if record is None:
                continue
            changed = self.active.update(c.task_id, state=c.state, description=c.description,
                                         exit_code=c.exit_code, started=record.started or c.started,
                                         finished=record.finished or c.finished)
            if changed is not None:
                self._tell(changed)
            if c.state.terminal:
                final.append(c.task_id)
                if not record.state.terminal:
                    self.on_final(record.scheduler, c.state)
        written = self._write(changes)
        if final:
            loop = asyncio.get_running_loop()
            written.add_done_callback(lambda _: loop.is_closed() or loop.call_soon_threadsafe(self._forget, final))
        return written

    def _write(self, changes: list[Change]) -> Future[Any]:
        """Queue `changes` for the store with the others applied in this turn of the event loop:
        one write for them all (a job's end, the next one's start and the submits' QUEUED lines
        arrive together), queued once the turn's callbacks ran. The future answers as that write
        does; each caller has its own, so one that gives up on it leaves the others waiting."""
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # not on the event loop: on its own
            return self.store.apply(changes)
        if self._unwritten is None:
            self._unwritten = ([], [])
            loop.call_soon(self._flush)
        mine: Future[Any] = Future()
        self._unwritten[0].extend(changes)
        self._unwritten[1].append(mine)
        return mine

    def _flush(self) -> None:
        assert self._unwritten is not None
        changes, waiters = self._unwritten
        self._unwritten = None
        self.store.apply(changes).add_done_callback(lambda written: _answer_all(written, waiters))

    def _deferred(self, change: Change) -> bool:
        record = self.active.get(change.task_id)
        return (record is not None and change.state.terminal and not record.state.terminal
                and change.state != TaskState.CANCELED and self.defer_final(record, change))

    def observed(self, record: Record) -> None:
        """A change another replica made (already in the store): into the active set and to the
        listeners, never written again. A record older than what the set holds is ignored; one
        that says what the set holds already (a new lease holder reading every active task again)
        is not told twice."""
        current = self.active.get(record.id)
        if current is not None and _rank(record.state) < _rank(current.state):
            return
        if current is None and not record.state.terminal and record.id in self._ended:
            return
        if current is not None and record.native_id is None:
            record = replace(record, native_id=current.native_id)
        if record.state.terminal:
            self.active.discard(record.id)
            self._ended_now(record.id)
        else:
            self.active.put(record)
        if current is not None and (current.state, current.description, current.exit_code) == \
                (record.state, record.description, record.exit_code):
            return
        if record.native_id is None and record.state == TaskState.QUEUED:  # its submit may yet be refused
            self._unheard.setdefault(record.id, [record])
            return
        if record.state == TaskState.QUEUED:  # with its job: says all that the held record did
            self._unheard.pop(record.id, None)
        self._tell(record)  # a later state: after what was held (the task's QUEUED)

    def _tell(self, record: Record) -> None:
        """The listeners hear of `record`: now, or once the new task is accepted (`submitted`). A
        state past QUEUED (its job runs, its inputs are being fetched, it ended) means it was:
        told at once, after what was held back."""
        held = self._unheard.get(record.id)
        if held is not None:
            held.append(record)
            if record.state == TaskState.QUEUED:
                return
            del self._unheard[record.id]
        for told in held or [record]:
            self._notify(told)

    def _notify(self, record: Record) -> None:
        for listener in self.listeners:
            listener(record)

    def _forget(self, task_ids: list[str]) -> None:
        for task_id in task_ids:
            record = self.active.get(task_id)
            if record is not None and record.state.terminal:
                self.active.discard(task_id)
                self._ended_now(task_id)

    def _ended_now(self, task_id: str) -> None:
        self._ended[task_id] = None
        self._ended.move_to_end(task_id)
        if len(self._ended) > ENDED_KEPT:
            self._ended.popitem(last=False)

    # ---- submitting ----

    @contextlib.asynccontextmanager
    async def submitting(self, record: Record) -> AsyncIterator[None]:
        """Around a submit call: the task is active, and no round recovers it meanwhile. Its
        listeners hear of it (QUEUED, and whatever changed during the call) once the scheduler took
        it (`submitted`), never if it refused it (`withdrawn`)."""
        self._submitting.add(record.id)
        self.active.put(record)
        self._unheard[record.id] = [record]
        try:
            yield
        finally:
            self._submitting.discard(record.id)
            self._hear(record.id)  # e.g. an unexpected error: the task stays recorded

    def submitted(self, task_id: str, native_id: str) -> None:
        """The scheduler took the task as job `native_id`."""
        self.active.update(task_id, native_id=native_id)
        self.store.set_native_id(task_id, native_id)
        self._hear(task_id)

    def _hear(self, task_id: str) -> None:
        """A new task is accepted: its listeners hear what was held back."""
        for record in self._unheard.pop(task_id, []):
            self._notify(record)

    async def hand_over(self, record: Record) -> None:
        """Submit a recorded task whose submission was held back (staging): as after a crash, its
        job is looked for first; a scheduler that cannot take it now is asked again each round."""
        self._unsubmitted.add(record.id)
        self._submitting.add(record.id)  # no round recovers it meanwhile
        try:
            await self._recover(record, staged=True)
        finally:
            self._submitting.discard(record.id)
        current = self.active.get(record.id)
        if current is not None and current.native_id is not None and current.state == TaskState.INITIALIZING:
            self.apply([Change(record.id, TaskState.QUEUED, "submitted")])

    def withdrawn(self, task_id: str) -> None:
        """The task's record is being deleted (its submit failed here, or another replica deleted
        it): no longer active, and what its listeners have not heard yet they never will."""
        self.active.discard(task_id)
        self._unheard.pop(task_id, None)

    # ---- rounds ----

    async def reconcile(self) -> None:
        """At start-up, before serving: submit what a crash left unsubmitted (or stage its inputs
        again first), and ask the scheduler once about every active job."""
        self._unsubmitted = {r.id for r in self.active.of(self.scheduler.name)
                             if r.native_id is None and not self.held(r) and not self.restage(r)}
        await self._recover_unsubmitted()
        await self._ask()

    async def adopt(self, claim: Callable[[list[str]], Awaitable[list[str]]]) -> None:
        """Replicas: recover, from the next round on, the tasks without a job that `claim` gives
        this replica (handed over, or left by a replica that died before submitting them, or while
        it staged their inputs: those are staged again first, `restage`)."""
        candidates = [r.id for r in self.active.of(self.scheduler.name)
                      if r.native_id is None and not r.state.terminal and r.id not in self._submitting
                      and r.id not in self._unsubmitted and not self.held(r)]
        if not candidates:
            return
        for task_id in await claim(candidates):
            record = self.active.get(task_id)
            if record is None or not self.restage(record):
                self._unsubmitted.add(task_id)

    async def catch_up(self) -> None:
        """Replicas: a new lease holder's reconcile (what was adopted, and every active job)."""
        await self._recover_unsubmitted()
        await self._ask()

    async def run(self) -> None:
        """One round per interval: recovery of unsubmitted tasks (rare) and, for a scheduler that
        does not report its changes, one batched status query."""
        while True:
            await asyncio.sleep(self.interval)
            if not self.leading:
                continue
            started = time.perf_counter()
            try:
                await self._recover_unsubmitted()
                if not self.scheduler.reports_changes:
                    await self._ask()
            except Exception:  # the poller must outlive any one bad round
                log.exception("poller of scheduler %s: round failed", self.scheduler.name)
            self.on_round(time.perf_counter() - started)

    async def _ask(self) -> None:
        submitted = [r for r in self.active.of(self.scheduler.name)
                     if r.native_id is not None and r.id not in self._submitting]
        if not submitted:
            return
        jobs = [JobRef(r.task, r.native_id or "") for r in submitted]
        try:
            self.status_calls += 1
            answers = await self.scheduler.status(jobs)
        except SchedulerError as exc:
            log.warning("scheduler %s: status query failed, will retry: %s", self.scheduler.name, exc)
            return
        changes = []
        for job in submitted:
            current = self.active.get(job.id)  # a report may have changed it meanwhile
            if current is not None and not current.state.terminal:
                change = _change(current, answers.get(job.id))
                if change is not None:
                    changes.append(change)
        if changes:
            self.apply(changes)

    async def _recover_unsubmitted(self) -> None:
        for task_id in sorted(self._unsubmitted):
            record = self.active.get(task_id)
            if record is None or record.native_id is not None or record.state.terminal:
                self._unsubmitted.discard(task_id)
            elif task_id not in self._submitting and not self.held(record):
                await self._recover(record)

    async def _recover(self, record: Record, staged: bool = False) -> None:
        try:
            native = await self.scheduler.find(record.task)
            if native is None:
                native = await self.scheduler.submit(record.task)
                if staged:
                    log.info("task %s: inputs staged, submitted as job %s", record.id, native, extra=_about(record))
                else:
                    log.warning("task %s: submitted after recovery as job %s", record.id, native, extra=_about(record))
            else:
                log.warning("task %s: recovered its job %s", record.id, native, extra=_about(record))
        except SchedulerUnavailable as exc:
            log.warning("task %s: not yet submitted, will retry: %s", record.id, exc, extra=_about(record))
            return
        except SchedulerError as exc:
            self._unsubmitted.discard(record.id)
            self.apply([Change(record.id, TaskState.SYSTEM_ERROR, f"could not submit: {exc}", finished=now())])
            return
        self._unsubmitted.discard(record.id)
        self.submitted(record.id, native)


def _answer_all(written: Future[Any], waiters: list[Future[Any]]) -> None:
    """Each of `waiters` still waiting answers what `written` answered."""
    failure = written.exception()
    result = failure if failure is not None else written.result()
    for waiter in waiters:
        answer(waiter, result)


def _ignore(*_: object) -> None:
    """No observer."""


def _never(*_: object) -> bool:
    """No staging."""
    return False


def _keep(record: Record) -> bool:
    """A single gateway submits every task itself."""
    return False


def _rank(state: TaskState) -> int:
    """How far along a task in `state` is: a replica's active set never goes back."""
    return 2 if state.terminal else 1 if state in (TaskState.RUNNING, TaskState.PAUSED) else 0


def _about(record: Record) -> dict[str, str]:
    """The `extra=` of a log line about one task: its id and user (fields of a JSON log line)."""
    return {"task_id": record.id, "user": record.task.user}


def _change(record: Record, status: JobStatus | None) -> Change | None:
    if status is None:
        return None
    if (status.state, status.description, status.exit_code) == (record.state, record.description, record.exit_code):
        return None
    started = status.started or (now() if status.state in (TaskState.RUNNING, TaskState.PAUSED) else None)
    finished = status.finished or (now() if status.state.terminal else None)
    return Change(record.id, status.state, status.description, status.exit_code, started, finished)
