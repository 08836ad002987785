"""Task folders made ahead of time, so that a submit renames an empty folder instead of making one.

A `mkdir` under the task root costs from about 30 us to over 500 us of CPU on this project's ext4
test machines (it grows with the kernel's dentry cache), and far more on a network file system; a
`rename` within the root costs about 15 us. A thread of its own keeps up to `size` empty folders
ready under the root, named `.ready-<random>` (no task id starts with a dot), and makes more
whenever fewer than half are left. A submit takes one (`make`); when none is ready it makes the
folder itself, as it always did.

Ready folders are empty and belong to the gateway's user, mode 0700, as a folder made at submit
does. The gateway removes its own at shutdown; those a crash left behind are removed, if empty, by
the next start. Replicas sharing a task root may remove each other's that way at their start: a
submit whose ready folder is gone takes the next one, or makes its own.
"""
from __future__ import annotations

import collections
import contextlib
import logging
import os
import secrets
import threading
from pathlib import Path

log = logging.getLogger(__name__)

PREFIX = ".ready-"


class FolderPool:
    """Empty folders ready under `root` for the next tasks."""

    def __init__(self, root: Path, size: int = 256) -> None:
        self.root, self.size = root, size
        self._ready: collections.deque[str] = collections.deque()  # appended by the thread, taken by submits
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
            os.mkdir(folder, 0o700)
        finally:
            if len(self._ready) < self.size // 2:
                self._wanted.set()

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
            while not self._stopping and len(self._ready) < self.size:
                path = os.path.join(self.root, PREFIX + secrets.token_hex(8))
                try:
                    os.mkdir(path, 0o700)
                except OSError as exc:  # the root is gone or full: submits make their own until asked again
                    log.warning("cannot make task folders ahead under %s: %s", self.root, exc)
                    break
                self._ready.append(path)
            if self._stopping:
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
