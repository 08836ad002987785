"""Limits, timeouts and retries around each transfer of a staging phase."""
from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import TypeVar

from ..config import StagingSettings

log = logging.getLogger(__name__)
T = TypeVar("T")


class StagingError(Exception):
    """A transfer that failed; `reason` says why in words for the task's `system_logs`.
    `passing`: a failure that may go away (connection, timeout, 5xx), worth another try."""

    def __init__(self, reason: str, passing: bool = False) -> None:
        super().__init__(reason)
        self.reason = reason
        self.passing = passing


class Budget:
    """The bytes one task may still move in one direction (`[staging] max_bytes`; 0: no limit)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0

    def check(self, size: int) -> None:
        """Refuse a transfer of `size` more bytes that would exceed the limit (before it starts)."""
        if self.limit and self.used + size > self.limit:
            raise StagingError(f"exceeds the staging limit of {self.limit} bytes per task "
                               f"([staging] max_bytes; {self.used} used before this file, {size} more)")

    def take(self, size: int) -> None:
        """Count `size` bytes moved (as they stream); past the limit the transfer stops."""
        self.check(size)
        self.used += size


class Runner:
    """Runs transfers with the site's timeout per try, retries with backoff, and parallelism."""

    def __init__(self, settings: StagingSettings) -> None:
        self.settings = settings
        self._slots = asyncio.Semaphore(settings.parallel)

    async def run(self, what: str, budget: Budget, transfer: Callable[[Budget], Awaitable[T]]) -> T:
        """`transfer(budget)` until it succeeds, fails for good or has used up its retries. Each try
        counts its bytes afresh: what a failed try moved is given back to `budget`."""
        delay = self.settings.backoff
        for attempt in range(self.settings.retries + 1):
            used = budget.used
            try:
                async with self._slots, asyncio.timeout(self.settings.timeout):
                    return await transfer(budget)
            except TimeoutError:
                error = StagingError(f"timed out after {self.settings.timeout:g} s ([staging] timeout)", passing=True)
            except StagingError as exc:
                error = exc
            budget.used = used
            if not error.passing or attempt == self.settings.retries:
                tries = f" (after {attempt + 1} tries)" if attempt else ""
                raise StagingError(error.reason + tries) from None
            log.info("%s: %s; trying again in %g s", what, error.reason, delay)
            await asyncio.sleep(delay)
            delay *= 2
        raise AssertionError("unreachable")
