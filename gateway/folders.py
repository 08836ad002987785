"""Task folders made ahead of time, so that a submit renames an empty folder instead of making one.

A `mkdir` under the task root costs from about 30 us to over 500 us of CPU on this project's ext4
test machines (it grows with the kernel's dentry cache), and far more on a network file system; a
`rename` within the root costs about 15 us. A thread of its own keeps up to `size` empty folders
ready under the root, named `.ready-<random>` (no task id starts with a dot), and makes more
whenever fewer than half are left. A submit takes one (`make`); when none is ready it makes the
folder itself, as it always did. A submit on the event loop asks the thread to do it (`make_for`,
with the files the task brings, TES inputs given by content, and the change of owner to the job's
account): the loop's thread then makes no file-system call for a task's folder, however large those
files, and the submits of one moment are answered with one wake-up of the loop. A task without
files whose scheduler `makes_task_folders` (local) gets its folder from the scheduler instead, as
its job starts.

Ready folders are empty and belong to the gateway's user, mode 0700, as a folder made at submit
does. The gateway removes its own at shutdown; those a crash left behind are removed, if empty, by
the next start. Replicas sharing a task root may remove each other's that way at their start: a
submit whose ready folder is gone takes the next one, or makes its own.
"""
from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import os
import secrets
import threading
from collections.abc import Mapping
from pathlib import Path

from . import storecommon

log = logging.getLogger(__name__)

PREFIX = ".ready-"


def give_away(folder: str | Path, owner: tuple[int, int], *, with_contents: bool = True) -> None:
    """Make `folder` (and, `with_contents`, all it holds) belong to `owner` (uid, gid)."""
    for path in [folder, *Path(folder).rglob("*")] if with_contents else [folder]:
        os.chown(path, *owner, follow_symlinks=False)


class FolderPool:
    """Empty folders ready under `root` for the next tasks."""

    def __init__(self, root: Path, size: int = 256) -> None:
        self.root, self.size = root, size
        self._ready: collections.deque[str] = collections.deque()  # appended by the thread, taken by submits
        # what `make_for` asked the thread to make: the folder, its owner, its files, the waiter
        self._asked: collections.deque[tuple[str, tuple[int, int] | None, Mapping[str, bytes], asyncio.Future[None]]] \
            = collections.deque()
        self._wanted = threading.Event()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="task-folders", daemon=True)

    def start(self) -> None:
        self._wanted.set()
        self._thread.start()

    def make(self, folder: str) -> None:
        """Make the task folder `folder` (under the root): a ready one renamed, else a new one.
        OSError as `os.mkdir` raises it (FileNotFoundError: the root itself is gone)."""
        try:
            while self._ready:
                ready = self._ready.popleft()
                try:
                    os.rename(ready, folder)
                    return
                except FileNotFoundError:  # removed meanwhile (the root made again, say): the next
                    continue
                except OSError:  # `folder` cannot be made there: the ready one stays ready
                    self._ready.appendleft(ready)
                    raise
            os.mkdir(folder, 0o700)
        finally:
            if len(self._ready) < self.size // 2:
                self._wanted.set()

    async def make_for(self, folder: str, owner: tuple[int, int] | None = None,
                       files: Mapping[str, bytes] | None = None) -> None:
        """`make` the task folder `folder`, write `files` into it (relative path -> content, the
        folders on the way made), and give the folder and all it holds to `owner` (uid, gid) if
        one is given: by the pool's thread while it runs, else here. A task root that is gone is
        made again. OSError as `os.mkdir`, writing or `os.chown` raise it."""
        if self._stopping or not self._thread.is_alive():
            self._make_owned(folder, owner, files or {})
            return
        done = asyncio.get_running_loop().create_future()
        self._asked.append((folder, owner, files or {}, done))
        self._wanted.set()
        await done

    def _make_owned(self, folder: str, owner: tuple[int, int] | None, files: Mapping[str, bytes]) -> None:
        try:
            self.make(folder)
        except FileNotFoundError:  # the task root itself is gone: make it again
            Path(folder).mkdir(mode=0o700, parents=True)
        for relative, content in files.items():
            target = Path(folder, relative)
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(content)
        if owner is not None:
            give_away(folder, owner, with_contents=bool(files))

    def _serve(self) -> None:
        """Make the folders asked for so far; their waiters are answered by one call on their loop."""
        answers: list[tuple[storecommon.Waiter, Exception | None]] = []
        while self._asked:
            folder, owner, files, done = self._asked.popleft()
            try:
                self._make_owned(folder, owner, files)
                answers.append((done, None))
            except Exception as exc:  # raised to its waiter, as if made there; the thread goes on
                answers.append((done, exc))
        storecommon.settle(answers)

    def close(self) -> None:
        """Stop making folders and remove those still ready."""
        self._stopping = True
        self._wanted.set()
        if self._thread.is_alive():
            self._thread.join()
        while self._ready:
            with contextlib.suppress(OSError):
                os.rmdir(self._ready.popleft())

    def _run(self) -> None:
        self._remove_leftovers()
        while True:
            self._wanted.wait()
            self._wanted.clear()
            self._serve()
            while not self._stopping and len(self._ready) < self.size:
                self._serve()  # a submit waits for its folder: before the next ready one
                path = os.path.join(self.root, PREFIX + secrets.token_hex(8))
                try:
                    os.mkdir(path, 0o700)
                except OSError as exc:  # the root is gone or full: submits make their own until asked again
                    log.warning("cannot make task folders ahead under %s: %s", self.root, exc)
                    break
                self._ready.append(path)
            if self._stopping:
                self._serve()  # `make_for` asks nothing more of a stopping pool
                return

    def _remove_leftovers(self) -> None:
        """The ready folders of an earlier run that did not stop cleanly."""
        try:
            with os.scandir(self.root) as entries:
                leftovers = [entry.path for entry in entries if entry.name.startswith(PREFIX)]
        except OSError:
            return
        for path in leftovers:
            with contextlib.suppress(OSError):  # not empty, or taken meanwhile: not ours to remove
                os.rmdir(path)
