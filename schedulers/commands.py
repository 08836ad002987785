"""Running a batch system's command: one helper, with a timeout, for every plugin.

`run(argv, timeout)` starts `argv` (a list, never a shell line) without a terminal, with nothing on
stdin (or the bytes `input`, written by the event loop as the pipe takes them), collects its output
and answers its exit status with both streams as text. A command that cannot be started, or that
does not end within `timeout` seconds, is a `SchedulerUnavailable` whose message an end user can
read; on a timeout (or when the caller is cancelled) the process is killed and reaped first. A
command that ran and failed is not an error here: the caller reads its exit status and its words.

The event loop watches the command without a thread: its pipes through `add_reader`, its exit
through a pidfd (Linux >= 5.3), which becomes readable when the process ends. That halves the
gateway's CPU per command against asyncio's subprocess support, which starts a thread per child
to wait for it (measured here: about 550 µs against 260 µs per `/bin/true`). Where pidfds are
missing (older kernels, some sandboxes) one worker thread of the loop's executor waits instead.

The command is started by one of a few threads kept for that (`_starter`), not by the event loop:
starting a process returns only once the child has exec'd, and on two cores busy with sbatch and
slurmctld that took 3-4 ms per command, a third of a Slurm burst with the loop doing nothing else.

A command dies with the gateway: it starts in the process group of a watchdog, a shell that reads
a pipe from the gateway and, once the pipe ends (the gateway is gone, however it went), kills its
whole group. Else an `sbatch` of a gateway killed during its submit would go on without anyone to
time it out, and submit after a replica that took over (`gateway.replicas.grace`, the command
timeout and a second) found no job by the task's name and submitted it again. One watchdog serves
every command of the process, so a command is one exec (running each through util-linux's
`setpriv --pdeathsig KILL` cost a second exec, about a tenth of the machine's CPU in a Slurm
burst). A watchdog that ended is replaced before the next command starts, in the same group while
commands still run there.
"""
from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from .base import SchedulerUnavailable

__all__ = ["CommandTimeout", "Finished", "run"]

#: os.pidfd_open where the platform has it (tests replace it to exercise the fallback).
pidfd_open: Callable[[int], int] | None = getattr(os, "pidfd_open", None)
_CHUNK = 65536
#: The watchdog: waits for the end of its stdin (the gateway's pipe), then kills its process group.
WATCHDOG = ["/bin/sh", "-c", "read -r _; kill -9 0"]
#: How many commands may be starting at once (each start takes a starter thread for its moment).
STARTERS = 4
_starters: ThreadPoolExecutor | None = None
_starters_lock = threading.Lock()
_watchdog: subprocess.Popen[bytes] | None = None
_group: int | None = None  # the watchdog's process group, which every command joins
_watchdog_lock = threading.Lock()


class CommandTimeout(SchedulerUnavailable):
    """The command did not end in time; it was killed, but it may have done its work already."""


@dataclass(frozen=True)
class Finished:
    """A command that ran to its end: its exit status (negative: killed by that signal) and output."""

    status: int
    stdout: str
    stderr: str


async def run(argv: Sequence[str], timeout: float, *, service: str = "the scheduler",
              input: bytes | None = None) -> Finished:
    """Run `argv`, give it `timeout` seconds, answer how it ended. `service` names what answers
    through the command in messages ("Slurm", "Grid Engine"); `input`, if given, is what the
    command reads on stdin (then end of file). Raises SchedulerUnavailable if the command cannot be
    started and CommandTimeout (a SchedulerUnavailable) if it takes longer."""
    name = Path(argv[0]).name if argv else "(nothing)"
    loop = asyncio.get_running_loop()
    starting = loop.run_in_executor(_starter(), _start, argv, input is not None)
    try:
        process = await asyncio.shield(starting)
    except asyncio.CancelledError:  # the command may start all the same: it is killed and reaped
        with contextlib.suppress(OSError, ValueError, IndexError):
            started = await starting
            started.kill()
            watch = _Watch(loop, started)
            await asyncio.shield(watch.exited)
            watch.close()
        raise
    except (OSError, ValueError, IndexError) as exc:
        reason = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
        raise SchedulerUnavailable(f"cannot run the {service} command {name}: {reason}") from None
    watch = _Watch(loop, process, input)
    try:
        await asyncio.wait_for(asyncio.shield(watch.finished), timeout)
    except TimeoutError:
        raise CommandTimeout(f"{service} did not answer within {timeout:g} s ({name})") from None
    finally:
        if not watch.exited.done():  # timed out, or the caller was cancelled
            with contextlib.suppress(ProcessLookupError):
                process.kill()
            await asyncio.shield(watch.exited)
        watch.close()
    return Finished(watch.exited.result(), *watch.output())


def _after_fork() -> None:
    """In a forked child the starter threads are gone, and the watchdog is its parent's: the child
    makes its own on first use, and lets go of the parent's watchdog pipe."""
    global _starters, _watchdog, _group
    _starters = None
    if _watchdog is not None and _watchdog.stdin is not None:
        with contextlib.suppress(OSError):
            _watchdog.stdin.close()
    _watchdog, _group = None, None


os.register_at_fork(after_in_child=_after_fork)


def _starter() -> ThreadPoolExecutor:
    """The threads that start commands, made on first use and kept until the process ends."""
    global _starters
    with _starters_lock:
        if _starters is None:
            _starters = ThreadPoolExecutor(STARTERS, thread_name_prefix="command-start")
        return _starters


def _start(argv: Sequence[str], with_input: bool) -> subprocess.Popen[bytes]:
    """Start `argv` (in a starter thread) with its output on pipes, stdin a pipe or nothing, in the
    watchdog's process group."""
    return subprocess.Popen(argv, stdin=subprocess.PIPE if with_input else subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, process_group=_watchdog_group())


def _watchdog_group() -> int:
    """The process group of the running watchdog, which is started first if need be. A watchdog
    that ended (someone killed it) is reaped and replaced here. The new one joins the group of
    the old one while commands still run in it, so that those too die with the gateway; else it
    leads a group of its own."""
    global _watchdog, _group
    with _watchdog_lock:
        if _watchdog is None or _watchdog.poll() is not None:
            if _watchdog is not None and _watchdog.stdin is not None:
                _watchdog.stdin.close()
            _watchdog = None
            if _group is not None:
                with contextlib.suppress(PermissionError):  # no process left in that group
                    _watchdog = _start_watchdog(_group)
            if _watchdog is None:
                _watchdog = _start_watchdog(0)
                _group = _watchdog.pid
        assert _group is not None
        return _group


def _start_watchdog(group: int) -> subprocess.Popen[bytes]:
    """A watchdog in the process group `group` (0: a new group that it leads)."""
    return subprocess.Popen(WATCHDOG, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, process_group=group)


class _Watch:
    """The loop's watch over one child: its two pipes until EOF, and its exit."""

    def __init__(self, loop: asyncio.AbstractEventLoop, process: subprocess.Popen[bytes],
                 input: bytes | None = None) -> None:
        self.loop, self.process = loop, process
        self.unwritten = memoryview(input or b"")
        if process.stdin is not None:
            os.set_blocking(process.stdin.fileno(), False)
            self._write()
        assert process.stdout is not None and process.stderr is not None
        self.fds = (process.stdout.fileno(), process.stderr.fileno())
        self.chunks: dict[int, list[bytes]] = {fd: [] for fd in self.fds}
        self.pipes_closed: asyncio.Future[None] = loop.create_future()
        self.exited: asyncio.Future[int] = loop.create_future()
        for fd in self.fds:
            os.set_blocking(fd, False)
            loop.add_reader(fd, self._read, fd)
        self.open = set(self.fds)
        self.finished = asyncio.gather(self.pipes_closed, self.exited)
        self.pidfd: int | None = None
        try:
            if pidfd_open is None:
                raise OSError("no pidfd_open")
            self.pidfd = pidfd_open(process.pid)
        except OSError:
            loop.run_in_executor(None, process.wait).add_done_callback(lambda _: self._ended())
        else:
            loop.add_reader(self.pidfd, self._ended)

    def _write(self) -> None:
        """Write what the stdin pipe takes of the input now; the rest when it is writable again."""
        stdin = self.process.stdin
        assert stdin is not None
        fd = stdin.fileno()
        try:
            while self.unwritten:
                self.unwritten = self.unwritten[os.write(fd, self.unwritten):]
        except BlockingIOError:
            self.loop.add_writer(fd, self._write)
            return
        except OSError:  # the command does not read it all (it ended, or closed its stdin)
            pass
        self._close_stdin()

    def _close_stdin(self) -> None:
        stdin = self.process.stdin
        if stdin is not None and not stdin.closed:
            self.loop.remove_writer(stdin.fileno())
            stdin.close()

    def _read(self, fd: int) -> None:
        try:
            data = os.read(fd, _CHUNK)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if data:
            self.chunks[fd].append(data)
            return
        self.loop.remove_reader(fd)
        self.open.discard(fd)
        if not self.open and not self.pipes_closed.done():
            self.pipes_closed.set_result(None)

    def _ended(self) -> None:
        """The child has ended (its pidfd is readable, or the executor's wait returned): reap it."""
        if self.pidfd is not None:
            self.loop.remove_reader(self.pidfd)
            os.close(self.pidfd)
            self.pidfd = None
        status = self.process.wait()  # at once: the child is a zombie, or already reaped
        if not self.exited.done():
            self.exited.set_result(status)

    def output(self) -> tuple[str, str]:
        """What the child wrote to stdout and stderr, as text."""
        out, err = (b"".join(self.chunks[fd]).decode(errors="replace") for fd in self.fds)
        return out, err

    def close(self) -> None:
        """Stop reading the pipes (the exit watch ends by itself once the child has ended)."""
        self._close_stdin()
        for fd in self.open:
            self.loop.remove_reader(fd)
        self.open.clear()
        if not self.pipes_closed.done():
            self.pipes_closed.set_result(None)
        for stream in (self.process.stdout, self.process.stderr):
            if stream is not None:
                stream.close()
