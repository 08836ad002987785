"""`[quotas] active_tasks` held exactly across replicas: the PostgreSQL store counts the user's
tasks under a per-user lock in the transaction that adds one (issue 16)."""
from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from gateway import config as configuration
from gateway.app import create_app
from gateway.keys import STORE
from gateway.model import task_from_document
from gateway.pgstore import PgStore
from gateway.store import Change, Store
from gateway.taskstore import QuotaExceeded
from schedulers.base import Task, TaskState

from .pg import admin

JSON = {"Content-Type": "application/json"}


def _task(n: int, user: str = "u") -> Task:
    return task_from_document({"user": user, "cmd": "true"}, f"{user}{n:03d}", f"/w/{user}{n}")


def _stored(database: tuple[str, Path], user: str) -> int:
    with admin(*database) as db:
        row = db.execute('SELECT COUNT(*) FROM tasks WHERE "user" = %s', (user,)).fetchone()
    assert row is not None
    return int(str(row[0]))


async def _outcomes(adds: list[Any]) -> tuple[int, list[QuotaExceeded]]:
    results = await asyncio.gather(*adds, return_exceptions=True)
    refused = [r for r in results if isinstance(r, QuotaExceeded)]
    assert all(not isinstance(r, BaseException) or isinstance(r, QuotaExceeded) for r in results), results
    return len(results) - len(refused), refused


async def test_adds_in_one_batch_count_each_other(database: tuple[str, Path]) -> None:
    store = PgStore(database[0], password_file=database[1])
    try:
        entered, release = threading.Event(), threading.Event()

        def hold(db: object) -> None:
            entered.set()
            release.wait(10)
        store._submit(hold)  # the writer waits in this write: every add below joins the next batch
        assert await asyncio.to_thread(entered.wait, 10)
        before = store.commits
        adds = [store.add(_task(n, user), "local", active_limit=3) for n in range(8) for user in ("u", "v")]
        tasks = [asyncio.ensure_future(add) for add in adds]
        await asyncio.sleep(0.2)
        release.set()
        accepted, refused = await _outcomes(tasks)
        assert store.commits - before == 2, "the adds were not committed in one transaction"
        assert accepted == 6 and len(refused) == 10
        assert {e.user for e in refused} == {"u", "v"} and {e.limit for e in refused} == {3}
        assert refused[0].status == 429 and refused[0].headers["Retry-After"] == "30"
        assert _stored(database, "u") == _stored(database, "v") == 3
        assert store.get("u000") is not None and store.get("u003") is None  # the first ones, in order
    finally:
        store.close()


async def test_two_stores_on_one_database_hold_the_limit(database: tuple[str, Path]) -> None:
    first = PgStore(database[0], password_file=database[1])
    second = PgStore(database[0], password_file=database[1])
    try:
        # each store's batches mix two users, so their locks are taken by both at once
        adds = [(first if n % 2 else second).add(_task(n, user), "local", active_limit=4)
                for n in range(20) for user in (("u", "v") if n % 2 else ("v", "u"))]
        accepted, refused = await _outcomes(adds)
        assert accepted == 8 and len(refused) == 32
        assert _stored(database, "u") == _stored(database, "v") == 4
        # a task that has ended no longer counts; nor does any task without a limit asked
        done = first.active()[0]
        await asyncio.wrap_future(second.apply([Change(done.id, TaskState.COMPLETE)]))
        await first.add(_task(100, done.task.user), "local", active_limit=4)
        with pytest.raises(QuotaExceeded):
            await second.add(_task(101, done.task.user), "local", active_limit=4)
        await second.add(_task(102, done.task.user), "local")
        assert _stored(database, done.task.user) == 6
    finally:
        first.close()
        second.close()


async def test_the_sqlite_store_takes_the_limit_and_leaves_it_to_the_active_set(tmp_path: Path) -> None:
    """One writer: the in-memory count (`gateway.quota`) is exact, so the store does not count."""
    store = Store(tmp_path / "s.db")
    try:
        for n in range(3):
            await store.add(_task(n), "local", active_limit=1)
        assert store.count() == 3
    finally:
        store.close()


def _config(tmp_path: Path, database: tuple[str, Path]) -> configuration.Config:
    url, password_file = database
    return configuration.from_document({
        "gateway": {"state_dir": str(tmp_path / "one")},
        "store": {"url": url, "password_file": str(password_file)},
        "scheduler": {"type": "local", "poll_interval": 0.2},
        "quotas": {"active_tasks": 5},
    }, tmp_path, "test config")


async def test_twenty_submits_over_two_replicas_accept_exactly_five(aiohttp_client: Callable[..., Any],
                                                                    tmp_path: Path,
                                                                    database: tuple[str, Path]) -> None:
    first = await aiohttp_client(create_app(_config(tmp_path, database)))
    second = await aiohttp_client(create_app(_config(tmp_path, database)))
    body = json.dumps({"user": "q", "cmd": ["sleep", "60"]})
    answers = await asyncio.gather(*((first, second)[n % 2].post("/v1/jobproxy/submit", data=body, headers=JSON)
                                     for n in range(20)))
    statuses = sorted(a.status for a in answers)
    assert statuses == [200] * 5 + [429] * 15, statuses
    for answer in answers:
        if answer.status == 429:
            assert answer.headers["Retry-After"] == "30"
            assert (await answer.json())["error"].startswith("q has 5 tasks that have not ended")
    assert _stored(database, "q") == 5 and first.server.app[STORE].count() == 5
    accepted = [(await a.json())["id"] for a in answers if a.status == 200]
    for n, task_id in enumerate(accepted):
        deleted = await (first, second)[n % 2].delete(f"/v1/jobproxy/delete/{task_id}")
        assert deleted.status in (200, 204), await deleted.text()
