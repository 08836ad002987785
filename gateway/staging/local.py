"""The task-root side of staging: private paths, safe reads, wildcard matches, whole writes.

A task's private path `/data/x` lives at `<task folder>/tes/root/data/x`. What the job left there
is read only when it is a regular file reached without any symbolic link and inside the task's
root: the gateway (often root) must not send a file the job pointed a link at. What the gateway
fetches appears under its name only once complete (written beside it, then renamed).
"""
from __future__ import annotations

import asyncio
import contextlib
import glob
import os
import stat
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import BinaryIO

from .runner import StagingError

#: Characters that make an output path a wildcard pattern.
WILDCARDS = "*?["
PART_SUFFIX = ".jobproxy-part"


def private(root: Path, path: str) -> Path:
    """Where the private path `path` (absolute, as the task sees it) lives on the host."""
    return root / path.lstrip("/")


def is_pattern(path: str) -> bool:
    return any(c in path for c in WILDCARDS)


def static_part(pattern: str) -> str:
    """The folder of `pattern` before its first wildcard.

    >>> static_part("/data/out/*.txt"), static_part("/data/*/x"), static_part("/data/a?")
    ('/data/out', '/data', '/data')
    """
    first = min(pattern.index(c) for c in WILDCARDS if c in pattern)
    return pattern[:first].rsplit("/", 1)[0] or "/"


def _inside(root: Path, path: Path) -> bool:
    real_root = os.path.realpath(root)
    return os.path.realpath(path).startswith(real_root + os.sep)


def regular_file(root: Path, path: Path) -> int | None:
    """The size of `path` if it is a regular file inside `root` reached without symbolic links;
    None if nothing is there. Raises StagingError for anything else (a link, a device...)."""
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise StagingError(f"cannot read {path}: {exc.strerror}") from None
    if stat.S_ISLNK(info.st_mode):
        raise StagingError("is a symbolic link; outputs must be files or folders")
    if not stat.S_ISREG(info.st_mode):
        raise StagingError("is not a regular file")
    if not _inside(root, path):
        raise StagingError("lies outside the task's folder (through a symbolic link)")
    return info.st_size


def files_below(root: Path, folder: Path) -> Iterator[tuple[str, Path, int]]:
    """(relative path, path, size) of the regular files below `folder`, never following links
    (links are left out), sorted. Raises StagingError when `folder` is no folder of the task."""
    if folder.is_symlink() or not folder.is_dir() or not (_inside(root, folder) or folder == root):
        raise StagingError("is not a folder of the task (missing, or a symbolic link)")
    found = []
    for here, dirs, names in os.walk(folder, followlinks=False):
        dirs.sort()
        for name in names:
            path = Path(here) / name
            info = os.lstat(path)
            if stat.S_ISREG(info.st_mode):
                found.append((str(path.relative_to(folder)), path, info.st_size))
    return iter(sorted(found))


def matches(root: Path, pattern: str) -> list[tuple[str, Path, int]]:
    """(private path, path, size) of the regular files matching the wildcard `pattern` (a private
    path), sorted; links and folders are left out."""
    found = []
    for relative in glob.glob(pattern.lstrip("/"), root_dir=root):
        path = root / relative
        info = os.lstat(path)
        if stat.S_ISREG(info.st_mode) and _inside(root, path):
            found.append(("/" + relative, path, info.st_size))
    return sorted(found)


def open_file(path: Path) -> BinaryIO:
    """Open a file the job left for reading, refusing a symbolic link put there meanwhile."""
    try:
        descriptor = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError as exc:
        raise StagingError(f"cannot read {path}: {exc.strerror}") from None
    return os.fdopen(descriptor, "rb")


class Writer:
    """A file being fetched: written in chunks off the event loop."""

    def __init__(self, handle: BinaryIO) -> None:
        self._handle = handle

    async def write(self, chunk: bytes) -> None:
        await asyncio.to_thread(self._handle.write, chunk)


@contextlib.asynccontextmanager
async def writing(target: Path) -> AsyncIterator[Writer]:
    """Write `target` whole or not at all: into a part file beside it, renamed at the end."""
    part = target.with_name(target.name + PART_SUFFIX)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        handle = open(part, "wb")  # noqa: SIM115 - closed below, before the rename
    except OSError as exc:
        raise StagingError(f"cannot write {target}: {exc.strerror}") from None
    try:
        with handle:
            yield Writer(handle)
        os.replace(part, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(part)
        raise
