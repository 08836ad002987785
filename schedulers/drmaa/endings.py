"""Waiting for terminated jobs to end, one probe at a time for all of them.

A cancel tells the DRM to terminate its job, then waits (up to the plugin's `cancel_timeout`) until
the DRM no longer has the job as active. Every DRMAA call goes through one thread, each within the
plugin's `call_timeout`: a probe per cancel every half second made twenty cancels side by side
queue past that timeout on a busy qmaster. Here the cancels under way share one probe per period,
for all their jobs.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field

from ..base import JobRef, SchedulerError

log = logging.getLogger(__name__)

#: `probe(jobs)`: the native ids of those of `jobs` the DRM still has as active.
Probe = Callable[[Sequence[JobRef]], Awaitable[set[str]]]


@dataclass
class _Ending:
    job: JobRef
    deadline: float
    ended: asyncio.Future[bool] = field(default_factory=lambda: asyncio.get_running_loop().create_future())


class Endings:
    """The terminated jobs still waited for, probed together every `period` seconds."""

    def __init__(self, probe: Probe, period: float = 0.5) -> None:
        self.probe, self.period = probe, period
        self._waiting: dict[str, _Ending] = {}  # by native id
        self._watcher: asyncio.Task[None] | None = None

    async def wait(self, job: JobRef, timeout: float) -> bool:
        """True once the DRM no longer has `job` as active; False if it still had after `timeout`
        seconds. A probe that fails (the DRM did not answer) is tried again the next period."""
        deadline = time.monotonic() + timeout
        ending = self._waiting.get(job.native_id)
        if ending is None:
            ending = self._waiting[job.native_id] = _Ending(job, deadline)
        ending.deadline = max(ending.deadline, deadline)  # a second cancel of the same job waits as long
        if self._watcher is None or self._watcher.done():
            self._watcher = asyncio.create_task(self._watch(), name="drmaa-endings")
        with contextlib.suppress(TimeoutError):
            return await asyncio.wait_for(asyncio.shield(ending.ended), max(0.0, deadline - time.monotonic()))
        return False

    async def close(self) -> None:
        """Stop probing; the cancels still waiting are answered False."""
        if self._watcher is not None:
            self._watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watcher
        self._settle(list(self._waiting), False)

    async def _watch(self) -> None:
        while self._waiting:
            await asyncio.sleep(self.period)
            now = time.monotonic()
            self._settle([native for native, e in self._waiting.items() if e.deadline <= now], False)
            waiting = list(self._waiting.values())
            if not waiting:
                return
            try:
                active = await self.probe([e.job for e in waiting])
            except SchedulerError as exc:
                log.warning("cannot learn whether %d terminated job(s) ended: %s; asking again", len(waiting), exc)
                continue
            self._settle([e.job.native_id for e in waiting if e.job.native_id not in active], True)

    def _settle(self, natives: list[str], ended: bool) -> None:
        for native in natives:
            ending = self._waiting.pop(native, None)
            if ending is not None and not ending.ended.done():
                ending.ended.set_result(ended)
