"""Per-user quotas (`[quotas]`): how many active tasks one user may hold, and how fast one caller
may send requests. Both answer 429 with `Retry-After`, so a runaway workflow slows down instead
of starving the others; 0 means no limit.
"""
from __future__ import annotations

import collections
import contextlib
import math
import time
from collections.abc import Awaitable, Callable, Iterator

from aiohttp import web

from . import auth
from .active import ActiveSet
from .config import QuotaSettings
from .errors import ApiError
from .taskstore import QuotaExceeded


class Quotas:
    def __init__(self, settings: QuotaSettings, active: ActiveSet) -> None:
        self.settings = settings
        self.active = active
        self._admitting: collections.Counter[str] = collections.Counter()
        self._buckets: dict[str, tuple[float, float]] = {}  # caller -> (tokens, when)

    @contextlib.contextmanager
    def admitting(self, user: str) -> Iterator[None]:
        """Around accepting one task of `user`: refuse it (429) if the user already holds
        `active_tasks` tasks, counting those being accepted right now.

        This is the fast path, and on SQLite (one writer) the whole check. Replicas learn of each
        other's tasks a moment late, so on PostgreSQL the store's `add` checks again, exactly, with
        `active_limit` (see `limit`)."""
        limit = self.settings.active_tasks
        if limit and self.active.count_of(user) + self._admitting[user] >= limit:
            raise QuotaExceeded(user, limit)
        self._admitting[user] += 1
        try:
            yield
        finally:
            self._admitting[user] -= 1
            if not self._admitting[user]:
                del self._admitting[user]

    @property
    def limit(self) -> int | None:
        """The active tasks one user may hold, for the store's `add` (None: no limit)."""
        return self.settings.active_tasks or None

    def wait_for(self, caller: str, now: float | None = None) -> float:
        """Take one request from `caller`'s bucket: 0 if it may go ahead, else the seconds until it
        may (the request is not counted then)."""
        rate = self.settings.requests_per_second
        if not rate:
            return 0.0
        now = time.monotonic() if now is None else now
        tokens, then = self._buckets.get(caller, (float(self.settings.burst), now))
        tokens = min(float(self.settings.burst), tokens + (now - then) * rate)
        if tokens < 1:
            self._buckets[caller] = (tokens, now)
            return (1 - tokens) / rate
        self._buckets[caller] = (tokens - 1, now)
        if len(self._buckets) > 100_000:  # forget the callers whose buckets have refilled
            full = [c for c, (t, w) in self._buckets.items() if t + (now - w) * rate >= self.settings.burst]
            for name in full:
                del self._buckets[name]
        return 0.0


def caller_of(request: web.Request) -> str:
    """Whom a request is counted against: the authenticated user, else the client's address."""
    user = auth.identity(request).user
    if user is not None:
        return f"user:{user}"
    return f"address:{request.remote or 'unix'}"


def middleware(quotas: Callable[[web.Request], Quotas | None]) -> Callable[..., Awaitable[web.StreamResponse]]:
    """Refuse requests over the caller's rate with 429; `quotas` finds the app's Quotas."""

    @web.middleware
    async def limit_rate(request: web.Request,
                         handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> web.StreamResponse:
        found = quotas(request)
        if found is not None and request.path not in auth.PUBLIC_PATHS:
            wait = found.wait_for(caller_of(request))
            if wait:
                raise ApiError(429, f"too many requests: at most {found.settings.requests_per_second:g} a second "
                                    f"(bursts of {found.settings.burst}); try again in {math.ceil(wait)} s",
                               headers={"Retry-After": str(math.ceil(wait))})
        return await handler(request)

    return limit_rate
