"""Reading what a job leaves on disk: its exit-code file, the tail of its output, mtimes.

One home for each, used by every scheduler and by the APIs that show a task's output.
"""
from __future__ import annotations

import os
from datetime import UTC, datetime
from pathlib import Path

from .script import EXIT_FILE
from .task import Task


def mtime(path: Path | str) -> datetime | None:
    """When `path` was last written (UTC), or None if it does not exist."""
    try:
        return datetime.fromtimestamp(os.stat(path).st_mtime, UTC)
    except OSError:
        return None


def recorded_exit(task: Task) -> tuple[int | None, datetime | None]:
    """The exit code the job script wrote into the task's folder, and when; (None, None) while
    there is none (or it cannot be read)."""
    try:  # no Path: a restart with a deep queue looks for the file of every task
        with open(f"{task.workdir}/{EXIT_FILE}", "rb") as f:
            return int(f.read().strip()), datetime.fromtimestamp(os.fstat(f.fileno()).st_mtime, UTC)
    except (OSError, ValueError):
        return None, None


def tail(path: Path | str, limit: int) -> str:
    """The last `limit` bytes of a file as text ('' if it cannot be read)."""
    try:
        with open(path, "rb") as stream:
            size = stream.seek(0, os.SEEK_END)
            stream.seek(max(0, size - limit))
            return stream.read(limit).decode("utf-8", errors="replace")
    except OSError:
        return ""
