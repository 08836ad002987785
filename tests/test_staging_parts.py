"""The pieces of gateway/staging on their own: the runner's retries, timeouts and byte limit, and the
task-root side (symbolic links never followed, downloads that appear only whole)."""
from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

import pytest

from gateway import config as configuration
from gateway.staging import local
from gateway.staging.runner import Budget, Runner, StagingError
from gateway.staging.s3 import split


def runner(tmp_path: Path, **staging: object) -> Runner:
    return Runner(configuration.from_document({"staging": staging}, tmp_path, "t").sections.staging)


async def test_passing_failures_are_retried_with_doubling_backoff(tmp_path: Path) -> None:
    tries: list[float] = []

    async def flaky(budget: Budget) -> str:
        tries.append(time.monotonic())
        budget.take(5)
        if len(tries) < 3:
            raise StagingError("HTTP 503", passing=True)
        return "done"

    budget = Budget(0)
    assert await runner(tmp_path, retries=3, backoff=0.05).run("t", budget, flaky) == "done"
    assert len(tries) == 3 and budget.used == 5  # the failed tries' bytes were given back
    assert tries[1] - tries[0] >= 0.05 and tries[2] - tries[1] >= 0.1


async def test_final_failures_and_used_up_retries(tmp_path: Path) -> None:
    calls = 0

    async def not_found(_: Budget) -> None:
        nonlocal calls
        calls += 1
        raise StagingError("HTTP 404 Not Found")

    with pytest.raises(StagingError, match=r"^HTTP 404 Not Found$"):
        await runner(tmp_path, retries=3, backoff=0).run("t", Budget(0), not_found)
    assert calls == 1

    async def slow(_: Budget) -> None:
        await asyncio.sleep(10)

    with pytest.raises(StagingError, match=r"timed out after 0.1 s \(\[staging\] timeout\) \(after 2 tries\)"):
        await runner(tmp_path, retries=1, backoff=0, timeout=0.1).run("t", Budget(0), slow)


def test_budget() -> None:
    budget = Budget(10)
    budget.take(6)
    with pytest.raises(StagingError, match="exceeds the staging limit of 10 bytes per task"):
        budget.check(5)
    budget.take(4)
    Budget(0).take(10**15)  # 0: no limit


def test_outputs_are_never_read_through_links(tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "out" / "sub").mkdir(parents=True)
    secret = tmp_path / "secret.txt"
    secret.write_text("not yours")
    (root / "out" / "a.txt").write_text("A")
    (root / "out" / "sub" / "b.log").write_text("BB")
    (root / "out" / "link.txt").symlink_to(secret)
    (root / "away").symlink_to(tmp_path)
    assert local.regular_file(root, root / "out" / "a.txt") == 1
    assert local.regular_file(root, root / "out" / "none.txt") is None
    with pytest.raises(StagingError, match="symbolic link"):
        local.regular_file(root, root / "out" / "link.txt")
    with pytest.raises(StagingError, match="outside the task's folder"):
        local.regular_file(root, root / "away" / "secret.txt")
    assert [(r, s) for r, _, s in local.files_below(root, root / "out")] == [("a.txt", 1), ("sub/b.log", 2)]
    with pytest.raises(StagingError, match="not a folder of the task"):
        list(local.files_below(root, root / "away"))
    assert [(p, s) for p, _, s in local.matches(root, "/out/*.txt")] == [("/out/a.txt", 1)]
    assert [p for p, _, _ in local.matches(root, "/*/*/*.log")] == ["/out/sub/b.log"]
    assert local.matches(root, "/away/*.txt") == []
    with pytest.raises(StagingError, match="cannot read"):
        local.open_file(root / "out" / "link.txt")


async def test_downloads_appear_only_whole(tmp_path: Path) -> None:
    target = tmp_path / "deep" / "file.bin"
    with pytest.raises(RuntimeError):
        async with local.writing(target) as out:
            await out.write(b"half")
            raise RuntimeError("connection lost")
    assert not target.exists() and os.listdir(target.parent) == []
    async with local.writing(target) as out:
        await out.write(b"whole")
    assert target.read_bytes() == b"whole" and os.listdir(target.parent) == ["file.bin"]


def test_wildcard_folders_and_s3_urls() -> None:
    assert local.static_part("/data/out/*.txt") == "/data/out" and local.static_part("/x*") == "/"
    assert split("s3://my-bucket/a/b") == ("my-bucket", "a/b")
    for bad in ("s3://ab/x", "s3://Upper/x", "http://bucket/x"):
        with pytest.raises(ValueError):
            split(bad)
