"""What the two task stores (`gateway.store` on SQLite, `gateway.pgstore` on PostgreSQL) share,
written once: their scans, each in its database's dialect, and the group commit's batching of
queued writes.

A scan is described once here (which conditions, in which order, with which parameters); a
`Dialect` says how its database spells the few conditions that differ (a list of states, JSON
fields) and which parameter mark it uses (`?` or `%s`). Each `*_query` function answers
`(sql, args)`; `Scans` gives a store its scan methods from them.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any, ClassVar, Generic, TypeVar

from schedulers.base import ACTIVE, TaskState

from .model import rfc3339

if TYPE_CHECKING:
    from .store import Change, Record

T = TypeVar("T")
Db = TypeVar("Db")  # a store's connection

#: The values of the states a task ends in, and of those it has not ended in.
FINAL = [s.value for s in TaskState if s not in ACTIVE]
ACTIVE_STATES = [s.value for s in ACTIVE]

Clause = tuple[str, list[object]]
#: Who waits for a queued write: a thread (a concurrent Future) or a coroutine (an asyncio future,
#: answered through its loop).
Waiter = Future[Any] | asyncio.Future[Any]


@dataclass(frozen=True)
class Dialect:
    """How one database spells the parts of a scan that differ."""

    mark: str  # the parameter placeholder
    user: str  # the `user` column, quoted where the word is reserved
    in_states: Callable[[Sequence[str]], Clause]  # the state is one of these values
    name_prefix: Callable[[str], Clause]  # the task's name starts with this
    tag: Callable[[str, str | None], Clause]  # the task has this tag (with this value unless None)


def page_query(dialect: Dialect, *, user: str | None = None, states: Sequence[TaskState] = (), after: int = 0,
               limit: int = 1000, newest_first: bool = False, before: int | None = None,
               name_prefix: str | None = None, tags: Sequence[tuple[str, str | None]] = ()) -> Clause:
    """The listing of `TaskStore.page`: tasks after the cursor `after` (or before `before`), of
    `user`, in `states`, whose name starts with `name_prefix`, with each of `tags`, in submission
    order (newest first if asked), at most `limit`."""
    m = dialect.mark
    conditions: list[Clause] = [(f"seq > {m}", [after])]
    if before is not None:
        conditions.append((f"seq < {m}", [before]))
    if user is not None:
        conditions.append((f"{dialect.user} = {m}", [user]))
    if states:
        conditions.append(dialect.in_states([s.value for s in states]))
    if name_prefix is not None:
        conditions.append(dialect.name_prefix(name_prefix))
    conditions += [dialect.tag(key, value) for key, value in tags]
    return _select(conditions, f"ORDER BY seq {'DESC' if newest_first else ''} LIMIT {m}", [limit])


def active_query(dialect: Dialect, scheduler: str | None = None) -> Clause:
    """Every task (of `scheduler`) that has not reached a final state, oldest first."""
    conditions = [dialect.in_states(ACTIVE_STATES)]
    if scheduler is not None:
        conditions.append((f"scheduler = {dialect.mark}", [scheduler]))
    return _select(conditions, "ORDER BY seq", [])


def ended_query(dialect: Dialect, moment: datetime, limit: int, offset: int) -> Clause:
    """At most `limit` tasks in a final state that ended (finished, or were made if they never
    ran) before `moment`, oldest first, past the first `offset` of them."""
    m = dialect.mark
    return _select([(f"COALESCE(finished, created) < {m}", [rfc3339(moment)]), dialect.in_states(FINAL)],
                   f"ORDER BY COALESCE(finished, created), seq LIMIT {m} OFFSET {m}", [limit, offset])


def _select(conditions: list[Clause], tail: str, tail_args: list[object]) -> Clause:
    sql = "SELECT * FROM tasks WHERE " + " AND ".join(condition for condition, _ in conditions) + " " + tail
    return sql, [arg for _, args in conditions for arg in args] + tail_args


class Scans(Generic[Db]):
    """A task store's scans, written once over its `dialect`. The store supplies `_scan` (the
    records a query selects, on a given connection or else on the caller's thread) and
    `_on_reader` (a read on its reader thread)."""

    dialect: ClassVar[Dialect]

    def _scan(self, query: Clause, db: Db | None = None) -> list[Record]:
        raise NotImplementedError

    async def _on_reader(self, read: Callable[[Db], T]) -> T:
        raise NotImplementedError

    def page(
        self,
        *,
        user: str | None = None,
        states: Sequence[TaskState] = (),
        after: int = 0,
        limit: int = 1000,
        newest_first: bool = False,
        before: int | None = None,
        name_prefix: str | None = None,
        tags: Sequence[tuple[str, str | None]] = (),
        db: Db | None = None,
    ) -> list[Record]:
        """Tasks in submission order, after the cursor `after` (a `seq`), at most `limit`.

        `newest_first` reverses the order; `before` (a `seq`) is then the cursor. `name_prefix`
        keeps tasks whose name starts with it (case-sensitive, no wildcards); each `(key, value)`
        of `tags` keeps tasks with that tag, with that value unless it is None.
        """
        return self._scan(page_query(self.dialect, user=user, states=states, after=after, limit=limit,
                                     newest_first=newest_first, before=before, name_prefix=name_prefix, tags=tags), db)

    async def page_async(self, **query: Any) -> list[Record]:
        """`page`, run on the reader thread so that a long scan never holds the event loop."""
        return await self._on_reader(lambda db: self.page(db=db, **query))

    def active(self, scheduler: str | None = None, db: Db | None = None) -> list[Record]:
        """Every task (of `scheduler`) that has not reached a final state, oldest first."""
        return self._scan(active_query(self.dialect, scheduler), db)

    async def active_async(self, scheduler: str | None = None) -> list[Record]:
        """`active`, on the reader thread."""
        return await self._on_reader(lambda db: self.active(scheduler, db))

    def ended_before(self, moment: datetime, limit: int, offset: int = 0, db: Db | None = None) -> list[Record]:
        """At most `limit` tasks in a final state that ended (finished, or were made if they never
        ran) before `moment`, oldest first, past the first `offset` of them."""
        return self._scan(ended_query(self.dialect, moment, limit, offset), db)

    async def ended_before_async(self, moment: datetime, limit: int, offset: int = 0) -> list[Record]:
        """`ended_before`, on the reader thread."""
        return await self._on_reader(lambda db: self.ended_before(moment, limit, offset, db))


# ---- the writer thread's group commit ----

STOP = object()  # queued by `close`: the writer finishes what came before it, then ends


def top_up(waiting: queue.SimpleQueue[Any], batch: list[Any], most: int) -> tuple[list[Any], bool]:
    """`batch` with whatever else is queued in `waiting` right now, up to `most` items, without
    `STOP`; and whether `STOP` was among them."""
    while len(batch) < most:
        try:
            batch.append(waiting.get_nowait())
        except queue.Empty:
            break
    if any(item is STOP for item in batch):
        return [item for item in batch if item is not STOP], True
    return batch, False


def linger(waiting: queue.SimpleQueue[Any], batch: list[Any], seconds: float,
           awaited: Callable[[Any], bool]) -> None:
    """If `batch` starts with a write nobody awaits, add to it what comes into `waiting` within
    `seconds`, until an item that a caller awaits (`awaited`) or `STOP` comes, which ends the wait
    at once."""
    deadline = time.monotonic() + seconds
    item = batch[-1]
    while item is not STOP and not awaited(item) and (left := deadline - time.monotonic()) > 0:
        try:
            item = waiting.get(timeout=left)
        except queue.Empty:
            return
        batch.append(item)


def run_group(transaction: Callable[[list[T]], list[Any]], items: list[T], log: logging.Logger,
              fatal: tuple[type[BaseException], ...] = ()) -> list[Any]:
    """The results of `items`, run in one `transaction`. If a write fails (with anything but one
    of `fatal`, which goes to the caller), the transaction was rolled back and each item runs
    again in a transaction of its own, so that the bad one fails alone: its exception is its
    result (and a line in `log`)."""
    try:
        return transaction(items)
    except fatal:
        raise
    except Exception:
        results: list[Any] = []
        for item in items:
            try:
                results.append(transaction([item])[0])
            except fatal:
                raise
            except Exception as exc:
                log.error("task store: a write failed: %s", exc)
                results.append(exc)
        return results


def settle(outcomes: Iterable[tuple[Waiter, Any]]) -> None:
    """Answer each waiter with its write's result (an exception is raised to it). Called by the
    writer thread: the asyncio futures of a batch are answered by one call on their loop, so a
    batch wakes the event loop once, not once per write."""
    by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Future[Any], Any]]] = {}
    for done, result in outcomes:
        if isinstance(done, asyncio.Future):
            by_loop.setdefault(done.get_loop(), []).append((done, result))
        else:
            answer(done, result)
    for loop, answers in by_loop.items():
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits any more
            loop.call_soon_threadsafe(_answer_all, answers)


def _answer_all(answers: list[tuple[asyncio.Future[Any], Any]]) -> None:
    for done, result in answers:
        answer(done, result)


def answer(done: Waiter, result: Any) -> None:
    """Answer `done` with `result` (an exception is raised to its waiter), unless its waiter gave
    up on it (cancelled it: e.g. at shutdown); the write stands either way. An asyncio future is
    answered on its loop, where nothing cancels it meanwhile; a concurrent one may be cancelled by
    another thread at any moment, so it is first marked running, which it then stays."""
    if isinstance(done, asyncio.Future):
        if done.done():
            return
    elif done.done() or not done.set_running_or_notify_cancel():
        return
    if isinstance(result, BaseException):
        done.set_exception(result)
    else:
        done.set_result(result)


def change_rows(changes: Iterable[Change]) -> list[tuple[Any, ...]]:
    """The parameters of `apply`'s UPDATE for each `Change`: state, description, exit code,
    started, finished, task id."""
    return [(c.state.value, c.description, c.exit_code, rfc3339(c.started), rfc3339(c.finished), c.task_id)
            for c in changes]


def ignore(seconds: float) -> None:
    """No observer of the store's transactions."""
