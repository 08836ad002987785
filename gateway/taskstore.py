"""The task store's contract, which both stores implement: SQLite (`gateway.store.Store`, the
embedded default) and PostgreSQL (`gateway.pgstore.PgStore`, shared by several gateways).

Gateway code holds a `TaskStore` and never asks which one it is. `open_store` picks the store the
config names: `[store] url` (PostgreSQL) or `[store] path` (SQLite).
"""
from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Future
from datetime import datetime
from pathlib import Path
from typing import Any, Protocol

from schedulers.base import Task, TaskState

from .errors import ApiError
from .store import Change, IdempotencyKey, Record

RETRY = {"Retry-After": "5"}


class StoreUnavailable(ApiError):
    """The database cannot be reached: the request answers 503, and nothing was acknowledged."""

    def __init__(self, reason: str) -> None:
        super().__init__(503, f"the task store is unavailable right now: {reason}", headers=RETRY)
        self.reason = reason


class KeyTaken(Exception):
    """`add` with an idempotency key another gateway recorded meanwhile (replicas): nothing was
    added; the key's task is the answer."""


#: Seconds a client is told to wait when it holds too many active tasks.
ACTIVE_RETRY = 30


class QuotaExceeded(ApiError):
    """`user` already holds `limit` tasks that have not ended (`[quotas] active_tasks`): the task
    is refused with 429 and nothing was added. Raised by the in-memory check (`gateway.quota`) and,
    on PostgreSQL, by `add` itself, which counts every replica's tasks under a per-user lock."""

    def __init__(self, user: str, limit: int) -> None:
        super().__init__(429, f"{user} has {limit} tasks that have not ended, the most this site allows one "
                              "user; submit again when some have ended", headers={"Retry-After": str(ACTIVE_RETRY)})
        self.user = user
        self.limit = limit


class TaskStore(Protocol):
    """All reads and writes of task records (one instance per process).

    Awaited writes are durable when the await returns; `set_native_id` and `apply` are queued and
    committed with the next group (their future answers when they are). Point reads (`get`,
    `keyed`, `active`) run on the caller's thread; `*_async` scans run off the event loop.
    """

    commits: int
    on_commit: Callable[[float], None]

    @property
    def schema_version(self) -> int: ...

    def close(self) -> None: ...

    async def add(self, task: Task, scheduler: str, key: IdempotencyKey | None = None, *,
                  active_limit: int | None = None) -> Record:
        """Record a new task (and its idempotency `key`) durably. With `active_limit`, a store
        shared by several writers refuses it with `QuotaExceeded` when its user already holds that
        many tasks that have not ended; a store with one writer may ignore it."""
        ...

    def set_native_id(self, task_id: str, native_id: str) -> Future[Any]: ...

    def apply(self, changes: Iterable[Change]) -> Future[Any]: ...

    async def delete(self, task_id: str) -> bool: ...

    async def delete_finished(self, task_ids: Sequence[str]) -> list[str]: ...

    def keyed(self, user: str, key: str) -> tuple[str, str] | None: ...

    async def expire_keys(self, before: datetime) -> int: ...

    async def flush(self) -> None: ...

    def get(self, task_id: str) -> Record | None: ...

    def page(self, *, user: str | None = None, states: Sequence[TaskState] = (), after: int = 0,
             limit: int = 1000, newest_first: bool = False, before: int | None = None,
             name_prefix: str | None = None, tags: Sequence[tuple[str, str | None]] = ()) -> list[Record]: ...

    async def page_async(self, **query: Any) -> list[Record]: ...

    def active(self, scheduler: str | None = None) -> list[Record]: ...

    async def active_async(self, scheduler: str | None = None) -> list[Record]: ...

    def ended_before(self, moment: datetime, limit: int, offset: int = 0) -> list[Record]: ...

    async def ended_before_async(self, moment: datetime, limit: int, offset: int = 0) -> list[Record]: ...

    def count(self) -> int: ...


def open_store(url: str | None, path: Path, password_file: Path | None = None) -> TaskStore:
    """The store the config names: PostgreSQL at `url` if given, else SQLite at `path`."""
    if url is None:
        from .store import Store
        return Store(path)
    from .pgstore import PgStore
    return PgStore(url, password_file=password_file)
