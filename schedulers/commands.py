"""Running a batch system's command: one helper, with a timeout, for every plugin.

`run(argv, timeout)` starts `argv` (a list, never a shell line) without a terminal, with nothing on
stdin (or the bytes `input`), collects its output and answers its exit status with both streams as
text. A command that cannot be started, or that does not end within `timeout` seconds, is a
`SchedulerUnavailable` whose message an end user can read; on a timeout (or when the caller is
cancelled) the process is killed and reaped first. A command that ran and failed is not an error
here: the caller reads its exit status and its words.

Each command runs from its start to its end in one of the threads kept for that (`_runner`, up to
`RUNNERS` commands at once; more wait for a free one, their time not counted yet), which feeds its
stdin, reads its pipes and reaps it (`Popen.communicate`), while the event loop only waits for the
answer. Starting a process returns only once the child has exec'd, which on two cores busy with
sbatch and slurmctld took 3-4 ms; and watching the pipes and the exit from the loop cost the loop
350-400 us per command, mostly system calls (two pipes and a pidfd registered, read and closed,
each call on a busy machine a chance to be preempted), against 120-150 us for handing the command
to a thread and taking its answer (600 `cat` commands fed 1 kB each, 8 at a time), for no more CPU
in all (630-710 us against 650-760 us per command).

A command dies with the gateway: it starts in the process group of a watchdog, a shell that reads
a pipe from the gateway and, once the pipe ends (the gateway is gone, however it went), kills its
whole group. Else an `sbatch` of a gateway killed during its submit would go on without anyone to
time it out, and submit after a replica that took over (`gateway.replicas.grace`, the command
timeout and a second) found no job by the task's name and submitted it again. One watchdog serves
every command of the process, so a command is one exec (running each through util-linux's
`setpriv --pdeathsig KILL` cost a second exec, about a tenth of the machine's CPU in a Slurm
burst). A watchdog that ended (someone killed it) is replaced at once by the thread that waits
for it, in the same group while commands still run there, so that they too die with the gateway.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import subprocess
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from .base import SchedulerUnavailable

__all__ = ["CommandTimeout", "Finished", "run"]

log = logging.getLogger(__name__)

#: The watchdog: waits for the end of its stdin (the gateway's pipe), then kills its process group.
WATCHDOG = ["/bin/sh", "-c", "read -r _; kill -9 0"]
#: How many commands may run at once (each holds a runner thread from its start to its end; the
#: threads are made as needed). Plenty, so that many slow ones (a mass cancel's `docker stop`, each
#: waiting out its container's grace time) do not hold up a poll's squeue or qstat behind them.
RUNNERS = 128
_runners: ThreadPoolExecutor | None = None
_runners_lock = threading.Lock()
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
    command = _Command(argv, timeout, service, input)
    running = asyncio.get_running_loop().run_in_executor(_runner(), command.run)
    try:
        return await asyncio.shield(running)
    except asyncio.CancelledError:  # the command may be starting or running: it is killed and reaped
        command.cancel()
        with contextlib.suppress(Exception):
            await running
        raise


class _Command:
    """One command, run by a runner thread; `cancel` (from any thread) kills it."""

    def __init__(self, argv: Sequence[str], timeout: float, service: str, input: bytes | None) -> None:
        self.argv, self.timeout, self.service, self.input = argv, timeout, service, input
        self.process: subprocess.Popen[bytes] | None = None
        self.cancelled = False

    def run(self) -> Finished:
        name = Path(self.argv[0]).name if self.argv else "(nothing)"
        if self.cancelled:  # while it waited for a runner: not started at all
            raise SchedulerUnavailable(f"the {self.service} command {name} was cancelled before it started")
        try:
            self.process = process = _start(self.argv, self.input is not None)
        except (OSError, ValueError, IndexError, subprocess.SubprocessError) as exc:
            reason = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
            raise SchedulerUnavailable(f"cannot run the {self.service} command {name}: {reason}") from None
        if self.cancelled:  # `cancel` came before there was a process to kill
            process.kill()
        try:
            out, err = process.communicate(self.input, timeout=self.timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()  # reaped; its pipes are not read on: a child of it may hold them open
            raise CommandTimeout(f"{self.service} did not answer within {self.timeout:g} s ({name})") from None
        finally:
            for stream in (process.stdin, process.stdout, process.stderr):
                if stream is not None:
                    with contextlib.suppress(OSError):
                        stream.close()
        return Finished(process.returncode, out.decode(errors="replace"), err.decode(errors="replace"))

    def cancel(self) -> None:
        self.cancelled = True
        if self.process is not None:
            self.process.kill()  # nothing if it was reaped already


def _after_fork() -> None:
    """In a forked child the runner threads are gone, and the watchdog is its parent's: the child
    makes its own on first use, and lets go of the parent's watchdog pipe."""
    global _runners, _watchdog, _group
    _runners = None
    if _watchdog is not None and _watchdog.stdin is not None:
        with contextlib.suppress(OSError):
            _watchdog.stdin.close()
    _watchdog, _group = None, None


os.register_at_fork(after_in_child=_after_fork)


def _runner() -> ThreadPoolExecutor:
    """The threads that run commands, made on first use and kept until the process ends."""
    global _runners
    with _runners_lock:
        if _runners is None:
            _runners = ThreadPoolExecutor(RUNNERS, thread_name_prefix="command")
        return _runners


def _start(argv: Sequence[str], with_input: bool) -> subprocess.Popen[bytes]:
    """Start `argv` (in a runner thread) with its output on pipes, stdin a pipe or nothing, in the
    watchdog's process group."""
    return subprocess.Popen(argv, stdin=subprocess.PIPE if with_input else subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, process_group=_watchdog_group())


def _watchdog_group() -> int:
    """The process group of the running watchdog, which is started first if need be. A watchdog
    that ended (someone killed it) is replaced here, if its thread (`_guard`) did not replace it
    yet. The new one joins the group of the old one while commands still run in it, so that those
    too die with the gateway; else it leads a group of its own."""
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
    """A watchdog in the process group `group` (0: a new group that it leads), and the thread that
    waits for its end."""
    watchdog = subprocess.Popen(WATCHDOG, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, process_group=group)
    threading.Thread(target=_guard, args=(watchdog,), name="command-watchdog", daemon=True).start()
    return watchdog


def _guard(watchdog: subprocess.Popen[bytes]) -> None:
    """Reap `watchdog` when it ends and, if it is still the current one, replace it at once: else
    the commands running when it was killed would not die with a gateway that ends before its next
    command. (A watchdog ends by itself only with the gateway's pipe, when there is nothing left
    to guard.)"""
    watchdog.wait()
    try:
        _watchdog_group()
    except (OSError, subprocess.SubprocessError) as exc:  # e.g. no process to spare: the next command tries again
        log.warning("cannot start a new watchdog for the scheduler commands: %s", exc)
