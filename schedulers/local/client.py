"""The gateway's side of the job launcher (launcher.py): start it once, send it job requests, hand
its answers to the plugin as they arrive, and start a new one if it dies.

Requests made while no launcher runs wait in a buffer and go to the next one. When a launcher dies,
the plugin is told which requests it never answered; the jobs it had started are no longer anyone's
children, so the plugin watches them by pidfd from then on.
"""
from __future__ import annotations

import asyncio
import json
import logging
import sys
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

    def exited(self, task_id: str, pid: int, status: int) -> None:
        """The job of `task_id` (`pid`) ended with wait status `status`."""

    def launcher_lost(self, unanswered: list[str]) -> None:
        """A new launcher replaced one that died without answering the requests of `unanswered`."""


class LauncherClient:
    """One launcher process at a time, restarted when it dies."""

    #: Seconds to wait before starting a launcher again when the last one lived less than this.
    RESTART_DELAY = 1.0

    def __init__(self, events: Events) -> None:
        self.events = events
        self._process: asyncio.subprocess.Process | None = None
        self._buffer: list[tuple[str, bytes]] = []
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

    def _write(self, task_id: str, line: bytes) -> None:
        if self._process is not None and self._process.stdin is not None and not self._process.stdin.is_closing():
            self._process.stdin.write(line)
            self._unanswered.add(task_id)
        else:
            self._buffer.append((task_id, line))

    async def close(self) -> None:
        """Stop the launcher (its jobs keep running) and stop restarting it."""
        self._closing = True
        process = self._process
        if process is not None and process.stdin is not None:
            process.stdin.close()
        if self._supervisor is not None:
            try:
                await asyncio.wait_for(self._supervisor, 10)
            except asyncio.TimeoutError:
                log.warning("the local job launcher (pid %s) did not stop when told", self.pid)
                if process is not None and process.returncode is None:
                    process.kill()

    async def _spawn(self) -> asyncio.subprocess.Process:
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-I", "-S", launcher.__file__, "--serve", stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE, start_new_session=True, close_fds=True, limit=1 << 20)
        log.info("local job launcher started as pid %d", process.pid)
        self._process = process
        buffered, self._buffer = self._buffer, []
        for task_id, line in buffered:
            self._write(task_id, line)
        return process

    async def _supervise(self, process: asyncio.subprocess.Process) -> None:
        loop = asyncio.get_running_loop()
        while True:
            born = loop.time()
            await self._read(process)
            code = await process.wait()
            self._process = None
            if self._closing:
                return
            log.warning("the local job launcher (pid %d) ended (%s); starting a new one", process.pid, code)
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
            if self._closing:  # close() came while there was no launcher to tell
                if self._process is not None and self._process.stdin is not None:
                    self._process.stdin.close()
                else:
                    return
            self.events.launcher_lost(lost)

    async def _read(self, process: asyncio.subprocess.Process) -> None:
        assert process.stdout is not None
        while True:
            try:
                line = await process.stdout.readline()
            except (ValueError, asyncio.LimitOverrunError) as exc:
                log.error("the local job launcher sent an unreadable line: %s", exc)
                continue
            if not line:
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
            self.events.exited(task_id, int(message["pid"]), int(message["status"]))
        else:
            log.warning("the local job launcher sent an unknown message %r", message)
