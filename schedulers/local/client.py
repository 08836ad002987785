"""The gateway's side of a job launcher (launcher.py): start it once, send it job requests, hand
its answers to the plugin as they arrive, and start a new one if it dies. The local scheduler runs
several, each with its own client, so that jobs start side by side on a machine with more cores.

Requests made while no launcher runs wait in a buffer and go to the next one. When a launcher dies,
the plugin is told which requests it never answered; the jobs it had started are no longer anyone's
children, so the plugin watches them by pidfd from then on.

The launcher is a plain child process with two pipes, not an asyncio subprocess (whose transport
kills its process when closed): `close()` only closes its stdin, and the launcher stays until its
jobs ended, to write their exit-code files, while the gateway stops or restarts.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import subprocess
import sys
from collections.abc import Callable
from typing import Any, Protocol

from ..base import SchedulerConfigError
from . import launcher

log = logging.getLogger(__name__)


class Events(Protocol):
    """What the launcher tells the plugin; called on the event loop's thread."""

    def launched(self, task_id: str, pid: int, start_time: int | None) -> None:
        """The job of `task_id` runs as `pid`."""

    def launch_failed(self, task_id: str, error: str) -> None:
        """The job of `task_id` could not be started, for the reason `error`."""

    def exited(self, task_id: str, pid: int, status: int, code: int | None, busy: bool | None) -> None:
        """The job of `task_id` (`pid`) ended with wait status `status`; `code` is the exit status
        the launcher wrote to its exit-code file (a direct job), if it did; `busy` whether a process
        was still in the job's cgroup once it was reaped (None: no cgroup, or not known)."""

    def launcher_lost(self, index: int, unanswered: list[str]) -> None:
        """A new launcher replaced launcher `index`, which died without answering the requests of
        `unanswered`."""


#: Launchers of closed clients that still wait for their jobs, kept (and reaped) until they end.
_LINGERING: list[subprocess.Popen[bytes]] = []


class _Answers(asyncio.Protocol):
    """The launcher's answers, one JSON line each, handed to `handle` as they arrive: no stream
    and no coroutine woken per line. `ended` is done once the launcher closed its end."""

    #: The longest line kept whole; a longer one (never sent by the launcher) is dropped.
    LIMIT = 1 << 20

    def __init__(self, handle: Callable[[bytes], None]) -> None:
        self.handle = handle
        self.ended: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._partial = b""

    def data_received(self, data: bytes) -> None:
        lines = (self._partial + data).split(b"\n") if self._partial else data.split(b"\n")
        self._partial = lines.pop()
        if len(self._partial) > self.LIMIT:
            log.error("the local job launcher sent a line longer than %d bytes: dropped", self.LIMIT)
            self._partial = b""
        for line in lines:
            self.handle(line)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.ended.done():
            self.ended.set_result(None)


class _Process:
    """A running launcher: the process and the event loop's ends of its pipes."""

    def __init__(self, popen: subprocess.Popen[bytes], answers: _Answers,
                 writer: asyncio.WriteTransport, reading: asyncio.ReadTransport) -> None:
        self.popen = popen
        self.answers = answers
        self.writer = writer
        self.reading = reading

    @property
    def pid(self) -> int:
        return self.popen.pid


class LauncherClient:
    """One launcher process at a time, restarted when it dies; `index` names it among the
    scheduler's launchers."""

    #: Seconds to wait before starting a launcher again when the last one lived less than this.
    RESTART_DELAY = 1.0

    def __init__(self, events: Events, index: int = 0) -> None:
        self.events = events
        self.index = index
        self._process: _Process | None = None
        self._buffer: list[tuple[str, bytes]] = []
        self._unsent: list[bytes] = []  # this turn of the event loop's requests, written at its end
        self._unanswered: set[str] = set()
        self._supervisor: asyncio.Task[None] | None = None
        self._closing = False

    @property
    def pid(self) -> int | None:
        """The pid of the running launcher, if one runs."""
        return self._process.pid if self._process is not None else None

    async def start(self) -> None:
        """Start the launcher; SchedulerConfigError if it cannot run at all."""
        try:
            process = await self._spawn()
        except OSError as exc:
            raise SchedulerConfigError(f"cannot start the local job launcher {launcher.__file__}: {exc}") from None
        self._supervisor = asyncio.create_task(self._supervise(process), name="local-launcher")

    def send(self, request: dict[str, Any]) -> None:
        """Ask for a job (`launcher.py` documents the request); the answer comes as an event."""
        self._write(str(request["id"]), (json.dumps(request, separators=(",", ":")) + "\n").encode())

    @property
    def running(self) -> bool:
        """Whether a launcher runs and takes requests now (else they wait for the next one)."""
        return self._process is not None and not self._process.writer.is_closing()

    def drop(self, task_id: str) -> None:
        """Take back the request of `task_id` if its job has not started: the launcher holds a
        request that waits for another job's end (`after`) and answers it with an error. A job
        already started is not touched: its start is answered as usual."""
        if self.running:
            self._queue(b'{"op":"drop","id":%s}\n' % json.dumps(task_id).encode())

    def _write(self, task_id: str, line: bytes) -> None:
        if self.running:
            self._queue(line)
            self._unanswered.add(task_id)
        else:
            self._buffer.append((task_id, line))

    def _queue(self, line: bytes) -> None:
        """Send `line` with the others of this turn of the event loop, in order: one write to the
        pipe (and one wake-up of the launcher) for the jobs a batch of submits or of job ends
        starts, not one each."""
        self._unsent.append(line)
        if len(self._unsent) == 1:
            asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        lines, self._unsent = self._unsent, []
        if lines and self.running:
            assert self._process is not None
            self._process.writer.write(b"".join(lines))
        # else the launcher died meanwhile: its replacement is told of the unanswered requests

    async def close(self) -> None:
        """Stop talking to the launcher and stop restarting it. It ends once its jobs did (they
        keep running); it is not waited for."""
        self._flush()  # what this turn asked for still goes
        self._closing = True
        process, self._process = self._process, None
        if self._supervisor is not None:
            self._supervisor.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._supervisor
        if process is not None:
            process.writer.close()
            process.reading.close()
            if process.popen.poll() is None:
                _LINGERING.append(process.popen)

    async def _spawn(self) -> _Process:
        for lingering in list(_LINGERING):
            if lingering.poll() is not None:
                _LINGERING.remove(lingering)
        popen = subprocess.Popen([sys.executable, "-I", "-S", launcher.__file__, "--serve"], stdin=subprocess.PIPE,
                                 stdout=subprocess.PIPE, start_new_session=True, close_fds=True)
        assert popen.stdin is not None and popen.stdout is not None
        loop = asyncio.get_running_loop()
        reading, answers = await loop.connect_read_pipe(lambda: _Answers(self._answer), popen.stdout)
        writer, _ = await loop.connect_write_pipe(asyncio.Protocol, popen.stdin)
        log.info("local job launcher %d started as pid %d", self.index, popen.pid)
        process = _Process(popen, answers, writer, reading)
        self._process = process
        buffered, self._buffer = self._buffer, []
        for task_id, line in buffered:
            self._write(task_id, line)
        return process

    async def _supervise(self, process: _Process) -> None:
        loop = asyncio.get_running_loop()
        while True:
            born = loop.time()
            await process.answers.ended
            process.writer.close()
            process.reading.close()
            while process.popen.poll() is None:  # it closed its stdout: it is on its way out
                await asyncio.sleep(0.02)
            code = process.popen.returncode
            self._process = None
            if self._closing:
                return
            log.warning("local job launcher %d (pid %d) ended (%s); starting a new one", self.index, process.pid, code)
            if loop.time() - born < self.RESTART_DELAY:
                await asyncio.sleep(self.RESTART_DELAY)
            lost, self._unanswered = sorted(self._unanswered), set()
            while not self._closing:
                try:
                    process = await self._spawn()
                    break
                except OSError as exc:
                    log.error("cannot start the local job launcher, will retry: %s", exc)
                    await asyncio.sleep(self.RESTART_DELAY)
            if self._closing:
                return
            self.events.launcher_lost(self.index, lost)

    def _answer(self, line: bytes) -> None:
        if not line.strip():
            return
        try:
            self._dispatch(json.loads(line))
        except Exception:  # one bad answer must not stop the reading
            log.exception("cannot handle the local job launcher's answer %r", line[:500])

    def _dispatch(self, message: dict[str, Any]) -> None:
        op, task_id = message["op"], message["id"]
        if op == "started":
            self._unanswered.discard(task_id)
            self.events.launched(task_id, int(message["pid"]), message["start_time"])
        elif op == "error":
            self._unanswered.discard(task_id)
            self.events.launch_failed(task_id, str(message["error"]))
        elif op == "exit":
            code, busy = message.get("code"), message.get("busy")
            self.events.exited(task_id, int(message["pid"]), int(message["status"]),
                               None if code is None else int(code), None if busy is None else bool(busy))
        else:
            log.warning("the local job launcher sent an unknown message %r", message)
