"""Running a batch system's command: one helper, with a timeout, for every plugin.

`run(argv, timeout)` starts `argv` (a list, never a shell line) without a terminal or stdin,
collects its output and answers its exit status with both streams as text. A command that cannot
be started, or that does not end within `timeout` seconds, is a `SchedulerUnavailable` whose
message an end user can read; on a timeout the process is killed (and reaped) first. A command
that ran and failed is not an error here: the caller reads its exit status and its words.
"""
from __future__ import annotations

import asyncio
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from .base import SchedulerUnavailable

__all__ = ["CommandTimeout", "Finished", "run"]


class CommandTimeout(SchedulerUnavailable):
    """The command did not end in time; it was killed, but it may have done its work already."""


@dataclass(frozen=True)
class Finished:
    """A command that ran to its end: its exit status (negative: killed by that signal) and output."""

    status: int
    stdout: str
    stderr: str


async def run(argv: Sequence[str], timeout: float, *, service: str = "the scheduler",
              stdin: bytes | None = None) -> Finished:
    """Run `argv`, give it `timeout` seconds, answer how it ended. `service` names what answers
    through the command in messages ("Slurm", "Grid Engine"); `stdin` is fed to the command (by
    default it reads nothing). Raises SchedulerUnavailable if the command cannot be started and
    CommandTimeout (a SchedulerUnavailable) if it takes longer than `timeout`."""
    name = Path(argv[0]).name if argv else "(nothing)"
    try:
        process = await asyncio.create_subprocess_exec(
            *argv, stdin=asyncio.subprocess.PIPE if stdin is not None else asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    except (OSError, ValueError, IndexError) as exc:
        reason = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
        raise SchedulerUnavailable(f"cannot run the {service} command {name}: {reason}") from None
    try:
        out, err = await asyncio.wait_for(process.communicate(stdin), timeout)
    except asyncio.TimeoutError:
        raise CommandTimeout(f"{service} did not answer within {timeout:g} s ({name})") from None
    finally:
        if process.returncode is None:  # timed out, or the caller was cancelled
            try:
                process.kill()
            except ProcessLookupError:
                pass
            await process.wait()
    assert process.returncode is not None
    return Finished(process.returncode, out.decode(errors="replace"), err.decode(errors="replace"))
