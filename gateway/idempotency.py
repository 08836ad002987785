"""Exactly-once submits: the `Idempotency-Key` request header.

A client that sends a key with a submit (v1 `POST /v1/jobproxy/submit`, TES `POST /tasks`) may send
the same request again, e.g. after a dropped connection or a gateway crash, and gets the id of the
task the first request made: no second task, no second job. The key is recorded in the same
transaction as the task, so after a crash at any point either both exist or neither does. Keys are
per user and kept for a retention window; a key sent again with a different request answers 422.
"""
from __future__ import annotations

import asyncio
import hashlib
import json
import re
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from .errors import ApiError
from .store import IdempotencyKey
from .taskstore import KeyTaken, TaskStore

HEADER = "Idempotency-Key"
_VALID = re.compile(r"^[\x21-\x7e]{1,255}$")


def key_of(request: web.Request, user: str, document: Any) -> IdempotencyKey | None:
    """The request's idempotency key for `user`, with a digest of its (validated) `document`."""
    raw = request.headers.get(HEADER)
    if raw is None:
        return None
    if not _VALID.match(raw):
        raise ApiError(400, f"{HEADER}: must be 1 to 255 visible ASCII characters",
                       [{"path": HEADER, "message": "must be 1 to 255 visible ASCII characters"}])
    canonical = json.dumps(document, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return IdempotencyKey(user, raw, hashlib.sha256(canonical.encode()).hexdigest())


class Keys:
    """The keys of requests under way in this process, so that a retry arriving while the first
    request still runs waits for it instead of racing it."""

    def __init__(self, store: TaskStore) -> None:
        self.store = store
        self._running: dict[tuple[str, str], asyncio.Future[None]] = {}

    async def once(self, key: IdempotencyKey | None, make: Callable[[], Awaitable[str]]) -> tuple[str, bool]:
        """The task id for `key`: the one its first request made (and False), or the one `make`
        makes now (and True)."""
        if key is None:
            return await make(), True
        name = (key.user, key.key)
        while (running := self._running.get(name)) is not None:
            await asyncio.shield(running)
        known = self.store.keyed(key.user, key.key)
        if known is not None:
            digest, task_id = known
            if digest != key.digest:
                raise ApiError(422, f"{HEADER} {key.key!r} was already used by {key.user} for a different "
                                    f"request (task {task_id}); send a new key for a new task",
                               [{"path": HEADER, "message": "already used for a different request"}])
            return task_id, False
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._running[name] = done
        try:
            return await make(), True
        except KeyTaken:  # another replica recorded the same key meanwhile: its task answers
            pass
        finally:
            del self._running[name]
            done.set_result(None)
        return await self.once(key, make)
