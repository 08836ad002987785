"""The task store: SQLite in WAL mode, with versioned schema migrations.

A task is written here before it is handed to a scheduler, so that nothing accepted is lost; the
states answered by the HTTP API are read from here only, and the poller writes the changes it sees.
"""
from __future__ import annotations

import json
import sqlite3
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Iterable, Sequence

from schedulers.base import ACTIVE, Task, TaskState
from .model import now, parse_rfc3339, rfc3339

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

    @property
    def id(self) -> str:
        return self.task.id

    def as_state(self) -> dict[str, object]:
        """The public State document (schemas/state.schema.json)."""
        return {
            "id": self.task.id,
            "code": self.state.value,
            "description": self.description,
            "stdout": self.task.stdout,
            "stderr": self.task.stderr,
            "exit_code": self.exit_code,
            "user": self.task.user,
            "scheduler": self.scheduler,
            "created": rfc3339(self.created),
            "started": rfc3339(self.started),
            "finished": rfc3339(self.finished),
        }


@dataclass(frozen=True)
class Change:
    """A state change seen by a scheduler, to be written by `Store.apply`."""

    task_id: str
    state: TaskState
    description: str = ""
    exit_code: int | None = None
    started: datetime | None = None
    finished: datetime | None = None


class Store:
    """All reads and writes of task records. One instance per process; not thread-safe."""

    def __init__(self, path: str | Path) -> None:
        self.path = str(path)
        if self.path != ":memory:":
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(self.path, isolation_level=None)
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute("PRAGMA busy_timeout=5000")
        self._migrate()

    def close(self) -> None:
        self._db.close()

    def _migrate(self) -> None:
        version = self._db.execute("PRAGMA user_version").fetchone()[0]
        if version > len(MIGRATIONS):
            raise RuntimeError(
                f"the task store {self.path} has schema version {version}, newer than this "
                f"JobProxy knows ({len(MIGRATIONS)}): upgrade JobProxy"
            )
        for number, script in enumerate(MIGRATIONS[version:], start=version + 1):
            self._db.executescript(f"BEGIN; {script}; PRAGMA user_version = {number}; COMMIT;")

    @property
    def schema_version(self) -> int:
        return int(self._db.execute("PRAGMA user_version").fetchone()[0])

    # ---- writes ----

    def add(self, task: Task, scheduler: str) -> Record:
        """Record a new task, QUEUED and not yet handed to its scheduler."""
        created = now()
        cur = self._db.execute(
            "INSERT INTO tasks (id, user, scheduler, spec, state, stdout, stderr, created)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (task.id, task.user, scheduler, json.dumps(task.to_json()), TaskState.QUEUED.value,
             task.stdout, task.stderr, rfc3339(created)),
        )
        return Record(int(cur.lastrowid or 0), task, scheduler, None, TaskState.QUEUED, "", None, created, None, None)

    def set_native_id(self, task_id: str, native_id: str) -> None:
        self._db.execute("UPDATE tasks SET native_id = ? WHERE id = ?", (native_id, task_id))

    def apply(self, changes: Iterable[Change]) -> int:
        """Write state changes in one transaction; answers how many tasks changed."""
        count = 0
        with self._transaction():
            for c in changes:
                cur = self._db.execute(
                    "UPDATE tasks SET state = ?, description = ?, exit_code = ?,"
                    " started = COALESCE(started, ?), finished = COALESCE(finished, ?) WHERE id = ?",
                    (c.state.value, c.description, c.exit_code, rfc3339(c.started), rfc3339(c.finished), c.task_id),
                )
                count += cur.rowcount
        return count

    def delete(self, task_id: str) -> bool:
        return self._db.execute("DELETE FROM tasks WHERE id = ?", (task_id,)).rowcount > 0

    # ---- reads ----

    def get(self, task_id: str) -> Record | None:
        row = self._db.execute("SELECT * FROM tasks WHERE id = ?", (task_id,)).fetchone()
        return _record(row) if row else None

    def page(
        self,
        *,
        user: str | None = None,
        states: Sequence[TaskState] = (),
        after: int = 0,
        limit: int = 1000,
        newest_first: bool = False,
        before: int | None = None,
        spec_prefix: tuple[str, str] | None = None,
        spec_entries: Sequence[tuple[str, str, str | None]] = (),
    ) -> list[Record]:
        """Tasks in submission order, after the cursor `after` (a `seq`), at most `limit`.

        `newest_first` reverses the order; `before` (a `seq`) is then the cursor. Filters on the
        task's stored spec (JSON paths such as `$.extra.tes.name`): `spec_prefix = (path, prefix)`
        keeps tasks whose string at `path` starts with `prefix` (case-sensitive); each
        `(path, key, value)` of `spec_entries` keeps tasks whose object at `path` has `key`, with
        that `value` unless it is None.
        """
        sql = ["SELECT * FROM tasks WHERE seq > ?"]
        args: list[object] = [after]
        if before is not None:
            sql.append("AND seq < ?")
            args.append(before)
        if user is not None:
            sql.append("AND user = ?")
            args.append(user)
        if states:
            sql.append(f"AND state IN ({','.join('?' * len(states))})")
            args.extend(s.value for s in states)
        if spec_prefix is not None:
            path, prefix = spec_prefix
            sql.append("AND substr(json_extract(spec, ?), 1, ?) = ?")
            args.extend([path, len(prefix), prefix])
        for path, key, value in spec_entries:
            sql.append("AND EXISTS (SELECT 1 FROM json_each(spec, ?) AS e WHERE e.key = ?"
                       + (" AND e.type = 'text' AND e.value = ?)" if value is not None else ")"))
            args.extend([path, key] + ([value] if value is not None else []))
        sql.append(f"ORDER BY seq {'DESC' if newest_first else ''} LIMIT ?")
        args.append(limit)
        return [_record(r) for r in self._db.execute(" ".join(sql), args)]

    def active(self, scheduler: str) -> list[Record]:
        """Every task of `scheduler` that has not reached a final state, oldest first."""
        marks = ",".join("?" * len(ACTIVE))
        rows = self._db.execute(
            f"SELECT * FROM tasks WHERE scheduler = ? AND state IN ({marks}) ORDER BY seq",
            (scheduler, *(s.value for s in ACTIVE)),
        )
        return [_record(r) for r in rows]

    def count(self) -> int:
        return int(self._db.execute("SELECT COUNT(*) FROM tasks").fetchone()[0])

    def _transaction(self) -> "_Tx":
        return _Tx(self._db)


class _Tx:
    def __init__(self, db: sqlite3.Connection) -> None:
        self.db = db

    def __enter__(self) -> None:
        self.db.execute("BEGIN IMMEDIATE")

    def __exit__(self, kind: object, *_: object) -> None:
        self.db.execute("ROLLBACK" if kind else "COMMIT")


def _record(row: sqlite3.Row) -> Record:
    return Record(
        seq=row["seq"],
        task=Task.from_json(json.loads(row["spec"])),
        scheduler=row["scheduler"],
        native_id=row["native_id"],
        state=TaskState(row["state"]),
        description=row["description"],
        exit_code=row["exit_code"],
        created=parse_rfc3339(row["created"]) or now(),
        started=parse_rfc3339(row["started"]),
        finished=parse_rfc3339(row["finished"]),
    )

