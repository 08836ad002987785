"""`GET /v1/jobproxy/events`: every state change of the tasks the caller may see, as Server-Sent
Events (text/event-stream), for both APIs' tasks.

Each change is one event named `state` whose data is `{id, code, description, exit_code, user,
time}` (the task's id, its new state and when the gateway saw it), the same visibility as the
state (users see their own tasks, admins all); `id=` (repeatable) narrows the stream to some tasks.

A task's events begin once it is accepted: QUEUED when its scheduler has taken it (INITIALIZING
for a TES task whose inputs the gateway fetches first), and they end with its final state. A task
refused at submit (answered 400 or 503, nothing kept: e.g. sbatch refused it after the gateway
recorded it) sends no event at all, on any replica, so no client waits on an id that never was a
task. Deleting a task sends no event (an active one is canceled first: CANCELED).

Event ids are `<epoch>-<n>`: `n` counts the changes of this gateway process, `epoch` names the
process. The last `[streams] event_history` changes stay in memory: a client reconnecting with
`Last-Event-ID` (or `?last_event_id=`) gets every change after that one. When they are gone (too
old, or the gateway restarted), the stream says so with an event named `gap` before going on, and
the client should read the states again (GET /v1/jobproxy/state) to learn what it missed.

An idle stream gets a comment line every `[streams] heartbeat_seconds`, so that proxies keep it
open; all streams end when the gateway shuts down.
"""
from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import itertools
import json
import logging
import secrets
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime

from aiohttp import web

from . import auth
from .keys import CONFIG, POLLERS
from .model import rfc3339
from .responses import ApiError
from .store import Record

log = logging.getLogger(__name__)
routes = web.RouteTableDef()

#: What the answer of an event stream says about itself (no caching, no proxy buffering).
STREAM_HEADERS = {"Content-Type": "text/event-stream; charset=utf-8", "Cache-Control": "no-cache",
                  "X-Accel-Buffering": "no"}


@dataclass(frozen=True)
class Event:
    """One state change: its number in this process, whose task it is, what it changed to and
    when (seconds since the epoch). Its JSON is made when a stream first sends it: a gateway
    nobody listens to spends nothing on it."""

    seq: int
    task_id: str
    user: str
    code: str
    description: str
    exit_code: int | None
    seen: float

    @functools.cached_property
    def data(self) -> str:
        """The event's data: one line of JSON."""
        return json.dumps({"id": self.task_id, "code": self.code, "description": self.description,
                           "exit_code": self.exit_code, "user": self.user,
                           "time": rfc3339(datetime.fromtimestamp(self.seen, UTC))})


class EventHub:
    """The recent state changes and the streams waiting for the next one.

    `publish` is a Poller listener: it is called in the event loop, never blocks and never raises.
    """

    def __init__(self, history: int) -> None:
        self.epoch = secrets.token_hex(4)
        self.closed = False
        self._history: collections.deque[Event] = collections.deque(maxlen=history)
        self._seq = 0
        self._waiting: set[asyncio.Event] = set()

    @property
    def last(self) -> int:
        """The number of the latest change (0: none yet)."""
        return self._seq

    def publish(self, record: Record) -> None:
        try:
            self._history.append(Event(self._seq + 1, record.id, record.task.user, record.state.value,
                                       record.description, record.exit_code, time.time()))
            self._seq += 1
            for waiting in self._waiting:
                waiting.set()
        except Exception:  # a listener must not break the poller
            log.exception("could not publish the change of task %s", getattr(record, "id", "?"))

    def close(self) -> None:
        """Shutdown: every stream ends."""
        self.closed = True
        for waiting in self._waiting:
            waiting.set()

    def since(self, seq: int) -> tuple[bool, Iterator[Event]]:
        """The changes after number `seq`, and whether some of them are gone from the history."""
        if not self._history:
            return seq < self._seq, iter(())
        if seq + 1 < self._history[0].seq:
            return True, iter(list(self._history))
        newer = list(itertools.islice(reversed(self._history), self._seq - seq))  # from the end: O(new ones)
        return False, reversed(newer)

    def resume_point(self, last_event_id: str | None) -> tuple[int, str | None]:
        """Where a stream starts: after `Last-Event-ID`, or after the latest change; and why a gap
        must be announced first (None: no gap)."""
        if not last_event_id:
            return self._seq, None
        epoch, _, number = last_event_id.strip().partition("-")
        if not (number.isascii() and number.isdigit() and len(number) <= 18 and epoch.isascii() and epoch.isalnum()):
            raise ApiError(400, f"Last-Event-ID: not an event id of this gateway: {last_event_id!r}",
                           [{"path": "Last-Event-ID", "message": "must be an id of an event this gateway sent"}])
        if epoch != self.epoch:
            return 0, "the gateway restarted since that event: read the states again"
        seq = int(number)
        if seq > self._seq:
            raise ApiError(400, f"Last-Event-ID: no event {last_event_id!r} was sent yet",
                           [{"path": "Last-Event-ID", "message": "must be an id of an event this gateway sent"}])
        return seq, None

    @contextlib.contextmanager
    def waiting(self) -> Iterator[asyncio.Event]:
        """An asyncio.Event set at each change (and at shutdown) while the caller waits."""
        event = asyncio.Event()
        self._waiting.add(event)
        try:
            yield event
        finally:
            self._waiting.discard(event)


EVENTS = web.AppKey("events", EventHub)


def setup(app: web.Application) -> None:
    """Give `app` its event stream; call after adding the lifecycle that makes the pollers."""
    app[EVENTS] = EventHub(app[CONFIG].sections.streams.event_history)
    app.add_routes(routes)
    app.cleanup_ctx.append(_listen)
    app.on_shutdown.append(_close)


async def _listen(app: web.Application) -> AsyncIterator[None]:
    for poller in app[POLLERS].values():  # one per scheduler instance
        poller.listeners.append(app[EVENTS].publish)
    yield


async def _close(app: web.Application) -> None:
    app[EVENTS].close()


def closing(app: web.Application) -> bool:
    """Whether the gateway is shutting down (long answers end then)."""
    return app[EVENTS].closed


def _message(event_id: str | None, name: str, data: str) -> bytes:
    """One SSE message (`data` is one line of JSON)."""
    head = "" if event_id is None else f"id: {event_id}\n"
    return f"{head}event: {name}\ndata: {data}\n\n".encode()


@routes.get("/v1/jobproxy/events")
async def stream(request: web.Request) -> web.StreamResponse:
    hub = request.app[EVENTS]
    caller = auth.identity(request)
    wanted = set(request.query.getall("id", []))
    after, gap = hub.resume_point(request.headers.get("Last-Event-ID") or request.query.get("last_event_id"))
    heartbeat = request.app[CONFIG].sections.streams.heartbeat_seconds
    response = web.StreamResponse(headers=STREAM_HEADERS)
    with hub.waiting() as wake:
        try:
            await response.prepare(request)
            await response.write(b": connected\n\n")
            while not hub.closed:
                wake.clear()
                lost, changes = hub.since(after)
                if gap is not None or lost:
                    reason = gap or "some changes are gone from the gateway's history: read the states again"
                    await response.write(_message(None, "gap", json.dumps({"reason": reason})))
                    gap = None
                out = bytearray()
                for event in changes:
                    after = event.seq
                    if caller.may_see(event.user) and (not wanted or event.task_id in wanted):
                        out += _message(f"{hub.epoch}-{event.seq}", "state", event.data)
                if out:
                    await response.write(bytes(out))
                try:
                    await asyncio.wait_for(wake.wait(), heartbeat)
                except TimeoutError:
                    await response.write(b": keepalive\n\n")
            await response.write_eof()
        except ConnectionError:  # the client went away
            pass
    return response
