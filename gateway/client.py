"""A small synchronous Python client of the JobProxy v1 API, for scripts and the `jobproxy` command.

    from gateway.client import Client
    jp = Client("http://gateway:8080", token="jp_...")      # or $JOBPROXY_URL / $JOBPROXY_TOKEN
    task_id = jp.submit({"user": "alice", "cmd": ["hostname"]})
    state = jp.wait([task_id])[task_id]                     # the event stream, else polling
    print(state["code"], jp.logs(task_id).decode())

`url` is `http(s)://host:port` or `unix:/path/to.sock` (the gateway's `[gateway] socket`, where
the kernel says who is asking and no token is needed). Every failure is a `ClientError` with one
line to show: the server's message (and the paths of an invalid request), or which URL could not
be reached. Standard library only (http.client), so the command starts fast on any node.
"""
from __future__ import annotations

import http.client
import json
import os
import socket
import ssl
import time
import urllib.parse
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

DEFAULT_URL = "http://127.0.0.1:8080"
#: States after which a task never changes again (the TES final states).
FINAL = frozenset({"COMPLETE", "EXECUTOR_ERROR", "SYSTEM_ERROR", "CANCELED", "PREEMPTED"})


class ClientError(Exception):
    """A request that failed: `str()` is one line fit to show; `status` the HTTP status (None: no
    answer at all)."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(" ".join(message.split()))
        self.status = status


class WaitTimeout(ClientError):
    """`wait` gave up before every task was final."""


@dataclass(frozen=True)
class Event:
    """One Server-Sent Event: its `id` (may be empty), `event` name and JSON `data`."""

    id: str
    event: str
    data: Any


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float | None) -> None:
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(self.timeout)
        self.sock.connect(self._path)


class Client:
    """The v1 API of one gateway (`url`, default $JOBPROXY_URL or DEFAULT_URL), as `token`'s user
    (default $JOBPROXY_TOKEN; none: auth off, or the Unix socket)."""

    def __init__(self, url: str | None = None, token: str | None = None, timeout: float = 60) -> None:
        self.url = (url or os.environ.get("JOBPROXY_URL") or DEFAULT_URL).rstrip("/")
        self.token = token if token is not None else os.environ.get("JOBPROXY_TOKEN") or None
        self.timeout = timeout
        if self.url.startswith("unix:"):
            self._socket: str | None = urllib.parse.unquote(self.url[len("unix:"):].removeprefix("//"))
            self._parts = urllib.parse.urlsplit("http://localhost")
        else:
            self._socket, self._parts = None, urllib.parse.urlsplit(self.url)
            if self._parts.scheme not in ("http", "https") or not self._parts.hostname:
                raise ClientError(f"{self.url}: not a gateway URL (http://HOST:PORT, https://..., or unix:/PATH)")

    # ---- the API ----

    def submit(self, task: Mapping[str, Any] | bytes, content_type: str = "application/json") -> str:
        """Submit a task (a v1 document, or its JSON or XML text); answers the new task's id."""
        body = task if isinstance(task, bytes) else json.dumps(task).encode()
        answer = self._json("POST", "/v1/jobproxy/submit", body, {"Content-Type": content_type})
        return str(answer["id"])

    def state(self, task_id: str) -> dict[str, Any]:
        """The State document of one task."""
        return dict(self._json("GET", f"/v1/jobproxy/state/{_quote(task_id)}"))

    def states(self, user: str | None = None, states: Iterable[str] = ()) -> Iterator[dict[str, Any]]:
        """The caller's tasks (an admin's: every user's, or `user`'s), oldest first, paged transparently."""
        query: dict[str, str] = {}
        if user:
            query["user"] = user
        if states:
            query["state"] = ",".join(states)
        while True:
            page = self._json("GET", "/v1/jobproxy/state?" + urllib.parse.urlencode(query))
            yield from page["state"]
            if not page.get("next_page_token"):
                return
            query["page_token"] = page["next_page_token"]

    def cancel(self, task_id: str) -> dict[str, Any]:
        """Stop the task's job; the task stays, CANCELED (or as it ended). Answers its state."""
        return dict(self._json("POST", f"/v1/jobproxy/cancel/{_quote(task_id)}"))

    def delete(self, task_id: str) -> None:
        """Stop the task's job if it runs and forget the task."""
        self._close(self._open("DELETE", f"/v1/jobproxy/delete/{_quote(task_id)}"))

    def logs(self, task_id: str, stream: str = "stdout", tail: int | None = None) -> bytes:
        """The task's output as it is now: all of it (paged), or its last `tail` bytes."""
        out, offset = bytearray(), 0
        while True:
            query = {"stream": stream, **({"tail": str(tail)} if tail is not None else {"offset": str(offset)})}
            response = self._open("GET", f"/v1/jobproxy/logs/{_quote(task_id)}?" + urllib.parse.urlencode(query))
            with response:
                out += self._guarded(response.read)
                offset, size = (int(response.headers[f"JobProxy-Output-{name}"]) for name in ("Next", "Size"))
            if tail is not None or offset >= size:
                return bytes(out)

    def follow(self, task_id: str, stream: str = "stdout", tail: int | None = None) -> Iterator[bytes]:
        """The task's output as it is written, until the task is final."""
        query = {"stream": stream, "follow": "true", **({"tail": str(tail)} if tail is not None else {})}
        response = self._open("GET", f"/v1/jobproxy/logs/{_quote(task_id)}?" + urllib.parse.urlencode(query),
                              timeout=None)
        with response:
            while chunk := self._guarded(lambda: response.read1(65536)):
                yield chunk

    def events(self, task_ids: Iterable[str] = (), last_event_id: str | None = None,
               timeout: float | None = None) -> Iterator[Event]:
        """The gateway's event stream (state changes of the tasks the caller may see; of `task_ids`
        only, if given), from after `last_event_id` on: subscribed when this returns, so that no
        later change is missed. The iterator ends only on an error (ClientError), e.g. a socket
        timeout after `timeout` seconds without a byte (heartbeats come every few seconds)."""
        query = urllib.parse.urlencode([("id", task_id) for task_id in task_ids])
        headers = {"Accept": "text/event-stream", **({"Last-Event-ID": last_event_id} if last_event_id else {})}
        response = self._open("GET", "/v1/jobproxy/events" + (f"?{query}" if query else ""), headers=headers,
                              timeout=timeout)
        if not response.headers.get("Content-Type", "").startswith("text/event-stream"):
            response.close()
            raise ClientError(f"{self.url}: the gateway sent no event stream")
        return self._read_events(response)

    def _read_events(self, response: http.client.HTTPResponse) -> Iterator[Event]:
        with response:
            yield from parse_events(lambda: self._guarded(response.readline))

    def wait(self, task_ids: Iterable[str], timeout: float | None = None, poll: float = 1.0,
             on_change: Callable[[dict[str, Any]], None] | None = None) -> dict[str, dict[str, Any]]:
        """Wait until every task is final; answers their final State documents. Uses the event
        stream (resuming with Last-Event-ID when it breaks), else polls every `poll` seconds; a
        gateway that answered once and then goes away (a restart) is waited for. `on_change` sees
        each state as it changes. WaitTimeout after `timeout` seconds."""
        waiter = _Waiter(self, list(dict.fromkeys(task_ids)), timeout, on_change)
        try:
            waiter.with_events()
        except ClientError as exc:
            if isinstance(exc, WaitTimeout) or exc.status in (401, 403):
                raise
            waiter.polling(poll)
        return waiter.done

    # ---- HTTP ----

    def _connection(self, timeout: float | None) -> http.client.HTTPConnection:
        if self._socket is not None:
            return _UnixConnection(self._socket, timeout)
        host, port = self._parts.hostname or "", self._parts.port
        if self._parts.scheme == "https":
            return http.client.HTTPSConnection(host, port, timeout=timeout, context=ssl.create_default_context())
        return http.client.HTTPConnection(host, port, timeout=timeout)

    def _open(self, method: str, path: str, body: bytes | None = None, headers: Mapping[str, str] | None = None,
              timeout: float | None = -1.0) -> http.client.HTTPResponse:
        """Send one request; answers the response (status < 400) to read and close."""
        sent = {"Accept": "application/json", **(headers or {})}
        if self.token:
            sent["Authorization"] = f"Bearer {self.token}"
        connection = self._connection(self.timeout if timeout == -1.0 else timeout)
        prefix = self._parts.path.rstrip("/") if self._socket is None else ""
        try:
            connection.request(method, prefix + path, body=body, headers=sent)
            response = connection.getresponse()
        except (OSError, http.client.HTTPException) as exc:
            connection.close()
            raise ClientError(f"cannot reach the gateway at {self.url}: {_reason(exc)}") from None
        if response.status >= 400:
            with response:
                raise ClientError(_server_message(response.status, self._guarded(response.read)), response.status)
        return response

    def _json(self, method: str, path: str, body: bytes | None = None,
              headers: Mapping[str, str] | None = None) -> Any:
        response = self._open(method, path, body, headers)
        with response:
            raw = self._guarded(response.read)
        try:
            return json.loads(raw)
        except ValueError:
            raise ClientError(f"{self.url}: the gateway's answer is not JSON: {raw[:200]!r}") from None

    def _close(self, response: http.client.HTTPResponse) -> None:
        with response:
            self._guarded(response.read)

    def _guarded(self, read: Callable[[], bytes]) -> bytes:
        try:
            return read()
        except (OSError, http.client.HTTPException) as exc:
            raise ClientError(f"the connection to {self.url} broke: {_reason(exc)}") from None


class _Waiter:
    """The state of one `Client.wait`."""

    def __init__(self, client: Client, task_ids: list[str], timeout: float | None,
                 on_change: Callable[[dict[str, Any]], None] | None) -> None:
        self.client, self.pending = client, list(task_ids)
        self.deadline = None if timeout is None else time.monotonic() + timeout
        self.on_change = on_change
        self.done: dict[str, dict[str, Any]] = {}
        self.seen: dict[str, str] = {}
        self.reached = False  # the gateway answered once: later, a refused connection is a restart

    def remaining(self) -> float | None:
        if self.deadline is None:
            return None
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise WaitTimeout(f"timed out waiting for {', '.join(self.pending)}")
        return left

    def record(self, state: dict[str, Any]) -> None:
        task_id = state["id"]
        if task_id not in self.pending:
            return
        if self.seen.get(task_id) != state["code"] and self.on_change is not None:
            self.on_change(state)
        self.seen[task_id] = state["code"]
        if state["code"] in FINAL:
            self.pending.remove(task_id)
            self.done[task_id] = state

    def refresh(self) -> None:
        for task_id in list(self.pending):
            self.record(self.client.state(task_id))
        self.reached = True

    def with_events(self) -> None:
        last: str | None = None
        broken = 0
        while self.pending:
            remaining = self.remaining()
            try:
                stream = self.client.events(self.pending, last, timeout=min(60.0, remaining or 60.0))
            except ClientError as exc:
                if exc.status is not None or last is None or broken >= 3:
                    raise  # no stream here (the caller polls), or the gateway is gone
                broken += 1
                time.sleep(1)
                continue
            try:
                self.refresh()  # subscribed: what happened before is in the states, nothing after is missed
                if not self.pending:
                    return
                for event in stream:
                    broken = 0
                    if event.event == "gap":
                        self.refresh()
                    elif event.event == "state" and isinstance(event.data, dict):
                        last = event.id or last
                        final = event.data.get("code") in FINAL
                        self.record(self.client.state(event.data["id"]) if final else event.data)
                    if not self.pending:
                        return
                    self.remaining()
            except ClientError as exc:
                if exc.status is not None or isinstance(exc, WaitTimeout):
                    raise
                self.remaining()  # the stream broke or timed out: give up only if the wait's time is over
                last = last or ""
            finally:
                stream.close()  # type: ignore[attr-defined]

    def polling(self, interval: float) -> None:
        while True:
            try:
                self.refresh()
            except ClientError as exc:
                if exc.status is not None or not self.reached:
                    raise
            if not self.pending:
                return
            remaining = self.remaining()
            time.sleep(interval if remaining is None else min(interval, remaining))


def parse_events(readline: Callable[[], bytes]) -> Iterator[Event]:
    """Server-Sent Events from a stream of lines (the WHATWG event-stream format: `field: value`
    lines, a blank line ends an event, lines starting with ':' are comments)."""
    fields: dict[str, str] = {}
    data: list[str] = []
    while line := readline():
        text = line.decode("utf-8", errors="replace").rstrip("\r\n")
        if not text:
            if data or "event" in fields:
                raw = "\n".join(data)
                try:
                    parsed: Any = json.loads(raw)
                except ValueError:
                    parsed = raw
                yield Event(fields.get("id", ""), fields.get("event", "message"), parsed)
            fields, data = {}, []
            continue
        if text.startswith(":"):
            continue
        name, _, value = text.partition(":")
        value = value.removeprefix(" ")
        if name == "data":
            data.append(value)
        elif name in ("id", "event", "retry"):
            fields[name] = value


def _quote(task_id: str) -> str:
    return urllib.parse.quote(task_id, safe="")


def _reason(exc: BaseException) -> str:
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused"
    if isinstance(exc, FileNotFoundError):
        return "no such socket"
    if isinstance(exc, socket.timeout | TimeoutError):
        return "timed out"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror[:1].lower() + exc.strerror[1:]
    return str(exc) or type(exc).__name__


def _server_message(status: int, raw: bytes) -> str:
    """The server's error as one line: its message and the paths of the problems it names."""
    try:
        body = json.loads(raw)
    except ValueError:
        text = raw.decode("utf-8", errors="replace").strip()
        return text or f"HTTP {status}"
    if not isinstance(body, dict) or "error" not in body:
        return f"HTTP {status}"
    details = [f"{d.get('path')}: {d.get('message')}" for d in body.get("details", []) if isinstance(d, dict)]
    message = str(body["error"])
    if details and not (len(details) == 1 and message.endswith(details[0].split(": ", 1)[-1])):
        message += ": " + "; ".join(details)
    return message
