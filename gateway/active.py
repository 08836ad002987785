"""The active set: every task not yet in a final state, in memory.

Loaded from the store once at start-up and kept current by the code that changes a task (accept,
the poller, a scheduler's reports, cancel), so that nothing reloads the store to learn what is
active. A task that reaches a final state leaves the set once that state is on disk, so a reader
who misses it here finds it in the store.
"""
from __future__ import annotations

import collections
from collections.abc import Iterator
from dataclasses import replace
from typing import Any

from .store import Record


class ActiveSet:
    """Active tasks by id, and by scheduler instance."""

    def __init__(self, records: list[Record]) -> None:
        self._by_id: dict[str, Record] = {}
        self._by_scheduler: dict[str, dict[str, Record]] = {}
        self._per_user: collections.Counter[str] = collections.Counter()
        for record in records:
            self.put(record)

    def __len__(self) -> int:
        return len(self._by_id)

    def __contains__(self, task_id: object) -> bool:
        return task_id in self._by_id

    def get(self, task_id: str) -> Record | None:
        return self._by_id.get(task_id)

    def all(self) -> Iterator[Record]:
        """Every active task."""
        return iter(list(self._by_id.values()))

    def of(self, scheduler: str) -> Iterator[Record]:
        """The active tasks of one scheduler instance, oldest first."""
        return iter(list(self._by_scheduler.get(scheduler, {}).values()))

    def count_of(self, user: str) -> int:
        """How many active tasks `user` has."""
        return self._per_user[user]

    def put(self, record: Record) -> None:
        if record.id not in self._by_id:
            self._per_user[record.task.user] += 1
        self._by_id[record.id] = record
        self._by_scheduler.setdefault(record.scheduler, {})[record.id] = record

    def update(self, task_id: str, **fields: Any) -> Record | None:
        """Replace fields of an active task's record; None if the task is not active."""
        record = self._by_id.get(task_id)
        if record is None:
            return None
        changed = replace(record, **fields)
        self.put(changed)
        return changed

    def discard(self, task_id: str) -> None:
        record = self._by_id.pop(task_id, None)
        if record is not None:
            self._by_scheduler.get(record.scheduler, {}).pop(task_id, None)
            self._per_user[record.task.user] -= 1
            if not self._per_user[record.task.user]:
                del self._per_user[record.task.user]
