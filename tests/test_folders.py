"""Task folders made ahead of time (gateway/folders.py), on the real file system."""
from __future__ import annotations

import asyncio
import os
import stat
import threading
from pathlib import Path
from typing import Any

import pytest

from gateway.folders import PREFIX, FolderPool

from .test_e2e_slurm import eventually


def _ready(root: Path) -> list[Path]:
    return sorted(p for p in root.iterdir() if p.name.startswith(PREFIX))


def test_a_task_takes_a_ready_folder_and_more_are_made(tmp_path: Path) -> None:
    pool = FolderPool(tmp_path, size=8)
    pool.start()
    try:
        eventually(lambda: len(_ready(tmp_path)) == 8, 10, "8 folders ready")
        ready = _ready(tmp_path)
        inode = {p.stat().st_ino: p for p in ready}
        for n in range(6):
            pool.make(str(tmp_path / f"task{n}"))
        made = [tmp_path / f"task{n}" for n in range(6)]
        assert all(p.is_dir() and not any(p.iterdir()) for p in made)
        assert {p.stat().st_ino for p in made} <= inode.keys()  # renamed, not made
        assert all(stat.S_IMODE(p.stat().st_mode) == 0o700 and p.stat().st_uid == os.getuid() for p in made)
        eventually(lambda: len(_ready(tmp_path)) == 8, 10, "the folders made again")  # fewer than half were left
    finally:
        pool.close()
    assert _ready(tmp_path) == []  # removed at shutdown
    assert all((tmp_path / f"task{n}").is_dir() for n in range(6))  # the tasks' stay


def test_without_a_ready_folder_the_task_makes_its_own(tmp_path: Path) -> None:
    pool = FolderPool(tmp_path)  # not started: nothing ready
    pool.make(str(tmp_path / "task"))
    assert (tmp_path / "task").is_dir()
    pool.close()


def test_a_gone_root_raises_as_mkdir_does_and_is_filled_again(tmp_path: Path) -> None:
    root = tmp_path / "tasks"
    root.mkdir()
    pool = FolderPool(root, size=4)
    pool.start()
    try:
        eventually(lambda: len(_ready(root)) == 4, 10, "4 folders ready")
        for path in _ready(root):
            path.rmdir()
        root.rmdir()
        try:
            pool.make(str(root / "task"))
        except FileNotFoundError:
            pass
        else:
            raise AssertionError("made a folder under a root that is gone")
        root.mkdir()  # what the gateway does then (service._make_folder)
        pool.make(str(root / "task"))
        assert (root / "task").is_dir()
        eventually(lambda: len(_ready(root)) == 4, 10, "4 folders ready")
    finally:
        pool.close()


def test_leftovers_of_a_crash_are_removed_at_start(tmp_path: Path) -> None:
    (tmp_path / f"{PREFIX}0123456789abcdef").mkdir()
    (tmp_path / f"{PREFIX}notempty").mkdir()
    (tmp_path / f"{PREFIX}notempty" / "file").write_text("x")
    (tmp_path / "task").mkdir()
    pool = FolderPool(tmp_path, size=2)
    pool.start()
    try:
        eventually(lambda: not (tmp_path / f"{PREFIX}0123456789abcdef").exists(), 10, "the leftover removed")
        assert (tmp_path / f"{PREFIX}notempty" / "file").exists() and (tmp_path / "task").is_dir()
    finally:
        pool.close()


async def test_a_submit_has_its_folder_made_and_given_away_by_the_pools_thread(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`make_for` takes a ready folder and changes its owner on the pool's thread; the event
    loop's thread makes no file-system call for it."""
    calls: list[tuple[str, str]] = []
    for name in ("rename", "mkdir", "chown"):
        real = getattr(os, name)

        def spied(*args: Any, _real: Any = real, _name: str = name, **kwargs: Any) -> Any:
            calls.append((_name, threading.current_thread().name))
            return _real(*args, **kwargs)

        monkeypatch.setattr(os, name, spied)
    owner = (65534, 65534) if os.getuid() == 0 else (os.getuid(), os.getgid())
    pool = FolderPool(tmp_path, size=4)
    pool.start()
    try:
        eventually(lambda: len(_ready(tmp_path)) == 4, 10, "4 folders ready")
        inodes = {p.stat().st_ino for p in _ready(tmp_path)}
        calls.clear()
        await asyncio.gather(*(pool.make_for(str(tmp_path / f"task{n}"), owner) for n in range(3)))
        made = [tmp_path / f"task{n}" for n in range(3)]
        assert {p.stat().st_ino for p in made} <= inodes  # ready ones, renamed
        assert all((p.stat().st_uid, p.stat().st_gid) == owner and stat.S_IMODE(p.stat().st_mode) == 0o700
                   for p in made)
        assert calls and {thread for _, thread in calls} == {"task-folders"}  # mkdir: ready ones made again
        assert sorted(name for name, _ in calls if name != "mkdir") == ["chown"] * 3 + ["rename"] * 3
    finally:
        pool.close()


async def test_the_files_a_task_brings_are_written_and_given_away_by_the_pools_thread(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """TES inputs given by content can be large: they are written on the pool's thread, not the
    event loop's, in folders made on the way, and belong to the job's account with the folder."""
    writers: list[str] = []
    real_write = Path.write_bytes

    def spied(self: Path, data: Any) -> int:
        writers.append(threading.current_thread().name)
        return real_write(self, data)

    monkeypatch.setattr(Path, "write_bytes", spied)
    owner = (65534, 65534) if os.getuid() == 0 else (os.getuid(), os.getgid())
    files = {"tes/root/data/in.txt": b"x" * 3_000_000, "tes/steps.sh": b"#!/bin/sh\n"}
    pool = FolderPool(tmp_path, size=2)
    pool.start()
    try:
        await pool.make_for(str(tmp_path / "task"), owner, files)
    finally:
        pool.close()
    assert writers == ["task-folders", "task-folders"]
    made = [tmp_path / "task", *(tmp_path / "task").rglob("*")]
    assert sorted(str(p.relative_to(tmp_path)) for p in made) == [
        "task", "task/tes", "task/tes/root", "task/tes/root/data", "task/tes/root/data/in.txt", "task/tes/steps.sh"]
    assert all((p.stat().st_uid, p.stat().st_gid) == owner for p in made)
    assert (tmp_path / "task/tes/root/data/in.txt").read_bytes() == files["tes/root/data/in.txt"]
    await pool.make_for(str(tmp_path / "after"), owner, {"a/b": b"y"})  # a closed pool writes them here
    assert (tmp_path / "after/a/b").read_bytes() == b"y" and (tmp_path / "after/a").stat().st_uid == owner[0]


async def test_make_for_raises_what_the_file_system_says_and_works_without_the_thread(tmp_path: Path) -> None:
    root = tmp_path / "tasks"
    root.mkdir()
    pool = FolderPool(root, size=2)
    pool.start()
    try:
        (root / "file").write_text("x")
        eventually(lambda: len(_ready(root)) == 2, 10, "2 folders ready")
        with pytest.raises(NotADirectoryError):
            await pool.make_for(str(root / "file" / "task"))
        assert len(_ready(root)) == 2  # the one it tried stays ready
        for path in _ready(root):
            path.rmdir()
        root.joinpath("file").unlink()
        root.rmdir()
        await pool.make_for(str(root / "task"))  # the root gone: made again
        assert (root / "task").is_dir()
    finally:
        pool.close()
    await pool.make_for(str(root / "after"))  # a closed pool makes it here
    assert (root / "after").is_dir()
