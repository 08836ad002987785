"""A plugin's `report` sink for tests: what a scheduler that `reports_changes` said, and when."""
from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable

from schedulers.base import JobStatus, TaskState


class Reports:
    """The plugin's `report` sink: every report kept, the latest per task, and a wake-up for waiters."""

    def __init__(self) -> None:
        self.history: list[tuple[str, JobStatus]] = []
        self.latest: dict[str, JobStatus] = {}
        self.changed = asyncio.Event()

    def __call__(self, task_id: str, status: JobStatus) -> None:
        self.history.append((task_id, status))
        self.latest[task_id] = status
        self.changed.set()

    async def wait(self, done: Callable[[], bool], timeout: float) -> None:
        """Until `done()` holds after some report; AssertionError after `timeout` seconds."""
        deadline = time.monotonic() + timeout
        while not done():
            self.changed.clear()
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"not reported in {timeout} s: {self.latest}")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.changed.wait(), left)

    def of(self, task_id: str) -> list[JobStatus]:
        """Everything reported for `task_id`, in order."""
        return [status for reported, status in self.history if reported == task_id]

    def position(self, task_id: str, state: TaskState) -> int:
        """Where in the history `task_id` was first reported in `state` (ValueError if never)."""
        for index, (reported, status) in enumerate(self.history):
            if reported == task_id and status.state == state:
                return index
        raise ValueError(f"task {task_id} was never reported {state.value}")

    def state(self, task_id: str) -> TaskState | None:
        """The latest state reported for `task_id`, None before any."""
        status = self.latest.get(task_id)
        return status.state if status is not None else None
