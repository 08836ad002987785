"""The task store: SQLite in WAL mode, with versioned schema migrations and group commit.

A task is written here before it is handed to a scheduler, so that nothing accepted is lost. All
writes go to one writer thread, which commits whatever arrived together (up to `max_batch`
writes) in one transaction and one fsync (`synchronous=FULL`), then resolves each waiter: an
awaited write is on disk, surviving power loss, when the await returns. While writes are awaited
side by side (a commit held two or more), the writer lingers `linger` seconds after the first
write of the next group, so that the others join it: fewer, larger commits, each one fsync. A
lone client is never held so. A group that starts with a write nobody awaits (a state change, a
job's id) waits up to `linger` for the writes that follow, until one that is awaited comes: 3,000
short tasks through the local scheduler took some 920 commits instead of 2,400. Reads use their own
connection: WAL readers never block the writer, nor it them. Point reads (`get`) are cheap and run
on the caller's thread; scans (`page`, `active`) run on a reader thread when awaited through
`page_async`.

The store answers records; each API renders its own documents from them.
"""
from __future__ import annotations

import asyncio
import json
import logging
import queue
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, replace
from datetime import datetime
from pathlib import Path
from typing import Any, Protocol, TypeVar

from schedulers.base import Task, TaskState

from . import storecommon as common
from .model import now, parse_rfc3339, rfc3339

log = logging.getLogger(__name__)
T = TypeVar("T")

# Each entry moves the database from version i to i+1 (PRAGMA user_version).
MIGRATIONS: tuple[str, ...] = (
    """
    CREATE TABLE tasks (
        seq         INTEGER PRIMARY KEY AUTOINCREMENT,
        id          TEXT NOT NULL UNIQUE,
        user        TEXT NOT NULL,
        scheduler   TEXT NOT NULL,
        native_id   TEXT,
        spec        TEXT NOT NULL,
        state       TEXT NOT NULL,
        description TEXT NOT NULL DEFAULT '',
        exit_code   INTEGER,
        stdout      TEXT NOT NULL,
        stderr      TEXT NOT NULL,
        created     TEXT NOT NULL,
        started     TEXT,
        finished    TEXT
    );
    CREATE INDEX tasks_by_user ON tasks (user, seq);
    CREATE INDEX tasks_by_state ON tasks (state, seq);
    """,
    # the TES name and tags become the task's own `name` and `tags`
    """
    UPDATE tasks SET spec = json_set(spec,
        '$.name', json_extract(spec, '$.extra.tes.request.name'),
        '$.tags', json(COALESCE(json_extract(spec, '$.extra.tes.request.tags'), '{}')))
    WHERE json_extract(spec, '$.extra.tes.request') IS NOT NULL;
    """,
    # idempotency keys: which task a user's key made, and a digest of the request that made it
    """
    CREATE TABLE idempotency (
        user        TEXT NOT NULL,
        key         TEXT NOT NULL,
        digest      TEXT NOT NULL,
        task_id     TEXT NOT NULL,
        created     TEXT NOT NULL,
        PRIMARY KEY (user, key)
    );
    CREATE INDEX idempotency_by_created ON idempotency (created);
    """,
    # retention: finished tasks by when they ended (a task that never ran ends when it was made)
    """
    CREATE INDEX tasks_by_end ON tasks (COALESCE(finished, created));
    """,
    # TES tags are the client's own: the owner, which the gateway used to add as `tags.user`, goes
    # (a client's own `user` tag naming the owner looked the same, and goes too)
    """
    UPDATE tasks SET spec = json_remove(spec, '$.tags.user', '$.extra.tes.request.tags.user')
    WHERE json_extract(spec, '$.extra.tes.request') IS NOT NULL
      AND json_extract(spec, '$.extra.tes.request.tags.user') = user;
    """,
)


@dataclass(frozen=True)
class Record:
    """A task as stored, with its current state."""

    seq: int
    task: Task
    scheduler: str
    native_id: str | None
    state: TaskState
    description: str
    exit_code: int | None
    created: datetime
    started: datetime | None
    finished: datetime | None

    def as_added(self) -> Record:
        """This task as `add` recorded it: QUEUED, without a job."""
        return replace(self, native_id=None, state=TaskState.QUEUED, description="", exit_code=None, started=None,
                       finished=None)

    @property
    def id(self) -> str:
        return self.task.id


@dataclass(frozen=True)
class Change:
    """A state change seen by a scheduler, to be written by `Store.apply`."""

    task_id: str
    state: TaskState
    description: str = ""
    exit_code: int | None = None
    started: datetime | None = None
    finished: datetime | None = None


@dataclass(frozen=True)
class IdempotencyKey:
    """A client's `Idempotency-Key` for one request: its user, the key, a digest of the request."""

    user: str
    key: str
    digest: str


_Write = Callable[[sqlite3.Connection], Any]


def _marks(count: int) -> str:
    return ",".join("?" * count)


def _tag(key: str, value: str | None) -> common.Clause:
    has = "EXISTS (SELECT 1 FROM json_each(spec, '$.tags') AS e WHERE e.key = ?"
    if value is None:
        return has + ")", [key]
    return has + " AND e.type = 'text' AND e.value = ?)", [key, value]


#: How SQLite spells the scans of `gateway.storecommon`.
SQLITE = common.Dialect(
    mark="?",
    user="user",
    in_states=lambda values: (f"state IN ({_marks(len(values))})", list(values)),
    name_prefix=lambda prefix: ("substr(json_extract(spec, '$.name'), 1, ?) = ?", [len(prefix), prefix]),
    tag=_tag,
)


class Store(common.Scans[sqlite3.Connection]):
    """All reads and writes of task records. One instance per process."""

    dialect = SQLITE

    def __init__(self, path: str | Path, *, max_batch: int = 1000, linger: float = 0.002) -> None:
        self.path = str(path)
        if self.path != ":memory:":
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        self.max_batch, self.linger = max_batch, linger
        self.commits = 0  # transactions the writer committed (each one fsync)
        # each group commit's seconds, on the writer thread (metrics)
        self.on_commit: Callable[[float], None] = common.ignore
        writer = self._connect()
        self._migrate(writer)
        self._db = self._connect()  # reads on the caller's thread
        self._count = int(self._db.execute("SELECT COUNT(*) FROM tasks").fetchone()[0])
        self._added = 0
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._writer = threading.Thread(target=self._write_loop, args=(writer,), name="store-writer", daemon=True)
        self._writer.start()
        self._readers = ThreadPoolExecutor(1, thread_name_prefix="store-reader", initializer=self._open_reader)
        self._reader_db: sqlite3.Connection | None = None

    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        db.row_factory = sqlite3.Row
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=FULL")
        db.execute("PRAGMA busy_timeout=5000")
        return db

    def _open_reader(self) -> None:
        self._reader_db = self._connect()

    def close(self) -> None:
        """Finish the writes already queued, then close every connection."""
        self._queue.put(common.STOP)
        self._writer.join()
        self._readers.shutdown(wait=True)
        if self._reader_db is not None:
            self._reader_db.close()
        self._db.close()

    def _migrate(self, db: sqlite3.Connection) -> None:
        version = db.execute("PRAGMA user_version").fetchone()[0]
        if version > len(MIGRATIONS):
            raise RuntimeError(
                f"the task store {self.path} has schema version {version}, newer than this "
                f"JobProxy knows ({len(MIGRATIONS)}): upgrade JobProxy"
            )
        for number, script in enumerate(MIGRATIONS[version:], start=version + 1):
            db.executescript(f"BEGIN; {script}; PRAGMA user_version = {number}; COMMIT;")

    @property
    def schema_version(self) -> int:
        return int(self._db.execute("PRAGMA user_version").fetchone()[0])

    # ---- writes: queued to the writer thread, committed in groups ----

    def _submit(self, write: _Write) -> Future[Any]:
        done: Future[Any] = Future()
        self._queue.put((write, done))
        return done

    async def _write(self, write: _Write) -> Any:
        done = asyncio.get_running_loop().create_future()
        self._queue.put((write, done))
        return await done

    def _write_loop(self, db: sqlite3.Connection) -> None:
        stopping, crowded = False, False
        while not stopping:
            batch = [self._queue.get()]
            if crowded and batch[0] is not common.STOP:
                time.sleep(self.linger)  # the GIL is free meanwhile: the awaited writes under way join
            else:
                common.linger(self._queue, batch, self.linger, lambda item: isinstance(item[1], asyncio.Future))
            batch, stopping = common.top_up(self._queue, batch, self.max_batch)
            if batch:
                started = time.perf_counter()
                self._commit(db, batch)
                self.on_commit(time.perf_counter() - started)
                crowded = sum(isinstance(done, asyncio.Future) for _, done in batch) >= 2
        db.close()

    def _commit(self, db: sqlite3.Connection, batch: list[tuple[_Write, Future[Any]]]) -> None:
        """Run `batch` in one transaction. If a write fails, the transaction is rolled back and the
        writes run again one transaction each, so that the bad one fails alone."""
        results = common.run_group(lambda writes: self._transaction(db, writes), [write for write, _ in batch], log)
        common.settle(zip([done for _, done in batch], results, strict=True))

    def _transaction(self, db: sqlite3.Connection, writes: list[_Write]) -> list[Any]:
        self._added = 0  # tasks the writes add (or remove, below 0): counted once committed
        db.execute("BEGIN IMMEDIATE")
        try:
            results = [write(db) for write in writes]
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        self.commits += 1
        self._count += self._added  # also when the waiter of a write gave up on it
        return results

    async def add(self, task: Task, scheduler: str, key: IdempotencyKey | None = None, *,
                  active_limit: int | None = None) -> Record:
        """Record a new task, QUEUED and not yet handed to its scheduler; on disk when it returns.
        With `key`, the key is recorded in the same transaction: both or neither.

        `active_limit` is accepted and ignored: this process is the store's only writer, so the
        in-memory count of the user's active tasks (`gateway.quota`) is already exact."""
        created = now()
        row = (task.id, task.user, scheduler, json.dumps(task.to_json()), TaskState.QUEUED.value,
               task.stdout, task.stderr, rfc3339(created))

        def insert(db: sqlite3.Connection) -> int:
            cur = db.execute("INSERT INTO tasks (id, user, scheduler, spec, state, stdout, stderr, created)"
                             " VALUES (?, ?, ?, ?, ?, ?, ?, ?)", row)
            if key is not None:
                db.execute("INSERT INTO idempotency (user, key, digest, task_id, created) VALUES (?, ?, ?, ?, ?)",
                           (key.user, key.key, key.digest, task.id, row[-1]))
            self._added += 1
            return int(cur.lastrowid or 0)

        seq = await self._write(insert)
        return Record(seq, task, scheduler, None, TaskState.QUEUED, "", None, created, None, None)

    def set_native_id(self, task_id: str, native_id: str) -> Future[Any]:
        """Record the scheduler's id of the task's job (committed with the next group)."""
        return self._submit(lambda db: db.execute("UPDATE tasks SET native_id = ? WHERE id = ?",
                                                  (native_id, task_id)).rowcount)

    def apply(self, changes: Iterable[Change]) -> Future[Any]:
        """Write state changes (committed with the next group); the future answers how many
        tasks changed."""
        rows = common.change_rows(changes)
        return self._submit(lambda db: db.executemany(
            "UPDATE tasks SET state = ?, description = ?, exit_code = ?,"
            " started = COALESCE(started, ?), finished = COALESCE(finished, ?) WHERE id = ?", rows).rowcount)

    async def delete(self, task_id: str) -> bool:
        def remove(db: sqlite3.Connection) -> int:
            deleted = int(db.execute("DELETE FROM tasks WHERE id = ?", (task_id,)).rowcount)
            self._added -= deleted
            return deleted

        return bool(await self._write(remove))

    async def delete_finished(self, task_ids: Sequence[str]) -> list[str]:
        """Forget those of `task_ids` that are in a final state, in one transaction; answers the
        ids deleted. An active task is never deleted, whatever the caller believed."""
        final = common.FINAL
        marks = _marks(len(final))

        def remove(db: sqlite3.Connection) -> list[str]:
            gone = []
            for task_id in task_ids:
                if db.execute(f"DELETE FROM tasks WHERE id = ? AND state IN ({marks})", (task_id, *final)).rowcount:
                    gone.append(task_id)
            self._added -= len(gone)
            return gone

        deleted: list[str] = await self._write(remove)
        return deleted

    def keyed(self, user: str, key: str) -> tuple[str, str] | None:
        """The (digest, task id) recorded for `user`'s idempotency `key`, or None."""
        row = self._db.execute("SELECT digest, task_id FROM idempotency WHERE user = ? AND key = ?",
                               (user, key)).fetchone()
        return (row["digest"], row["task_id"]) if row else None

    async def expire_keys(self, before: datetime) -> int:
        """Forget the idempotency keys recorded before `before`; answers how many."""
        return int(await self._write(lambda db: db.execute("DELETE FROM idempotency WHERE created < ?",
                                                           (rfc3339(before),)).rowcount))

    async def flush(self) -> None:
        """Wait until every write queued before this call is on disk."""
        await self._write(lambda db: None)

    # ---- reads ----

    def get(self, task_id: str) -> Record | None:
        row = self._db.execute("SELECT * FROM tasks WHERE id = ?", (task_id,)).fetchone()
        return record(row) if row else None

    def _scan(self, query: common.Clause, db: sqlite3.Connection | None = None) -> list[Record]:
        return [record(r) for r in (db or self._db).execute(*query)]

    async def _on_reader(self, read: Callable[[sqlite3.Connection], T]) -> T:
        def run() -> T:
            assert self._reader_db is not None
            return read(self._reader_db)
        return await asyncio.get_running_loop().run_in_executor(self._readers, run)

    def count(self) -> int:
        """How many tasks the store holds (kept in memory: no scan)."""
        return self._count


class Row(Protocol):
    """A row of `tasks` as either database's driver answers it: its columns by name."""

    def __getitem__(self, column: str, /) -> Any: ...


def record(row: Row) -> Record:
    """The record of a row of `tasks` (its `spec` as JSON text, SQLite, or decoded, PostgreSQL)."""
    spec = row["spec"]
    return Record(
        seq=row["seq"],
        task=Task.from_json(spec if isinstance(spec, dict) else json.loads(spec)),
        scheduler=row["scheduler"],
        native_id=row["native_id"],
        state=TaskState(row["state"]),
        description=row["description"],
        exit_code=row["exit_code"],
        created=parse_rfc3339(row["created"]) or now(),
        started=parse_rfc3339(row["started"]),
        finished=parse_rfc3339(row["finished"]),
    )
