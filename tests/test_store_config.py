"""The task stores (SQLite and PostgreSQL, the same tests for both) and the configuration loader."""
from __future__ import annotations

import asyncio
import json
import sqlite3
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path

import psycopg
import pytest

from gateway import config as configuration
from gateway import pgstore, storecommon
from gateway.model import task_from_document
from gateway.plugins import create_scheduler
from gateway.store import MIGRATIONS, Change, Store
from gateway.taskstore import TaskStore
from schedulers.base import Task, TaskState


def _task(n: int, user: str = "u") -> Task:
    return task_from_document({"user": user, "cmd": "true"}, f"t{n:03d}", f"/w/t{n}")


Opener = Callable[[], TaskStore]


async def test_store_round_trip_and_changes(store_factory: Opener) -> None:
    store = store_factory()
    assert store.schema_version == len(MIGRATIONS)
    await store.add(_task(1), "local")
    store.set_native_id("t001", "42")
    assert await asyncio.wrap_future(store.apply([Change("t001", TaskState.EXECUTOR_ERROR, "exit code 3", 3)])) == 1
    record = store.get("t001")
    assert record is not None and record.native_id == "42" and record.exit_code == 3
    assert record.state == TaskState.EXECUTOR_ERROR and record.task == _task(1)
    assert store.active("local") == [] and store.count() == 1
    store.close()
    reopened = store_factory()
    assert reopened.get("t001") == record and reopened.count() == 1
    assert await reopened.delete("t001") and reopened.get("t001") is None and reopened.count() == 0
    reopened.close()


async def test_writes_arriving_together_share_one_commit(store_factory: Opener, tmp_path: Path) -> None:
    """Group commit: 200 concurrent adds are all on disk when awaited, in far fewer transactions."""
    store = store_factory()
    await store.flush()
    before = store.commits
    await asyncio.gather(*(store.add(_task(n), "local") for n in range(200)))
    assert store.count() == 200 and len(store.active("local")) == 200
    assert store.commits - before < 200
    store.close()
    reopened = store_factory()  # durable: another connection sees them all
    assert reopened.count() == 200
    reopened.close()
    if isinstance(store, Store):
        with sqlite3.connect(store.path) as db:
            assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


async def test_the_writer_lingers_only_while_writes_are_awaited_side_by_side(tmp_path: Path) -> None:
    """After a commit that held two or more awaited writes, the next group waits `linger` for
    company: writes awaited one after another within it share one commit. A lone client, whose
    commits hold one awaited write each, is never held."""
    store = Store(tmp_path / "tasks.db", linger=0.5)
    loop = asyncio.get_running_loop()
    for n in range(3):  # a lone client: each add is answered at once
        started = loop.time()
        await store.add(_task(n), "local")
        assert loop.time() - started < 0.4
    await asyncio.gather(*(store.add(_task(n), "local") for n in range(100, 150)))  # side by side
    before = store.commits
    started = loop.time()
    first = asyncio.ensure_future(store.add(_task(30), "local"))
    await asyncio.sleep(0.1)  # within the linger: joins the first add's group
    await asyncio.gather(first, store.add(_task(31), "local"))
    assert store.commits - before == 1 and loop.time() - started >= 0.45
    assert store.count() == 55
    store.close()


async def test_writes_nobody_awaits_wait_for_company_until_an_awaited_one_comes(tmp_path: Path) -> None:
    """A group that starts with a write nobody awaits (a state change) waits `linger` for the
    writes that follow: changes made one after another within it share one commit. A write that
    is awaited ends the wait at once."""
    store = Store(tmp_path / "tasks.db", linger=1.0)
    for n in range(3):
        await store.add(_task(n), "local")
    before = store.commits
    first = store.apply([Change("t000", TaskState.RUNNING, "")])
    await asyncio.sleep(0.1)
    second = store.apply([Change("t001", TaskState.RUNNING, "")])
    assert await asyncio.wrap_future(first) == 1 and await asyncio.wrap_future(second) == 1
    assert store.commits - before == 1
    loop = asyncio.get_running_loop()
    store.apply([Change("t000", TaskState.COMPLETE, "", 0)])
    started = loop.time()
    await store.add(_task(3), "local")  # committed with the change, without waiting out the linger
    assert loop.time() - started < 0.9 and store.commits - before == 2
    record = store.get("t000")
    assert record is not None and record.state == TaskState.COMPLETE
    store.close()


async def test_a_failing_write_fails_alone(store_factory: Opener) -> None:
    store = store_factory()
    await store.add(_task(1), "local")
    duplicate, fresh = await asyncio.gather(store.add(_task(1), "local"), store.add(_task(2), "local"),
                                            return_exceptions=True)
    assert isinstance(duplicate, sqlite3.IntegrityError | psycopg.errors.UniqueViolation), duplicate
    assert not isinstance(fresh, BaseException)
    assert [r.id for r in store.page()] == ["t001", "t002"]
    store.close()


async def test_a_cancelled_waiter_leaves_its_write_and_the_others(store_factory: Opener) -> None:
    """A coroutine that stops waiting for its add (a client gone): the task is still recorded, and
    the writes of the same batch are answered as ever."""
    store = store_factory()
    await store.flush()
    waits = [asyncio.ensure_future(store.add(_task(n), "local")) for n in range(50)]
    await asyncio.sleep(0)  # all queued
    waits[7].cancel()
    results = await asyncio.gather(*waits, return_exceptions=True)
    assert isinstance(results[7], asyncio.CancelledError)
    assert [r.id for r in results if not isinstance(r, BaseException)] == [_task(n).id for n in range(50) if n != 7]
    await store.flush()
    assert store.get("t007") is not None and len(store.page()) == 50 and store.count() == 50
    store.close()


class _GivesUpWhenAsked(Future):  # type: ignore[type-arg]
    """A waiter in another thread that gives up right after the writer looked whether it still
    waits: the moment between the writer's check and its answer."""

    def done(self) -> bool:
        answer = super().done()
        self.cancel()
        return answer


def test_a_waiter_giving_up_while_its_write_is_answered_stops_nothing() -> None:
    """The writer thread answers a batch's waiters; one that is cancelled from another thread at
    that very moment is skipped, and the writer goes on to answer the others."""
    gives_up, waits, fails = _GivesUpWhenAsked(), Future(), Future()  # type: ignore[var-annotated]
    failure = ValueError("a bad row")
    storecommon.settle([(gives_up, 1), (waits, 2), (fails, failure)])
    assert gives_up.cancelled() and waits.result() == 2 and fails.exception() is failure


async def test_pages_and_filters(store_factory: Opener) -> None:
    store = store_factory()
    for n in range(10):
        await store.add(_task(n, "a" if n % 2 else "b"), "local")
    page = store.page(limit=4)
    assert [r.id for r in page] == ["t000", "t001", "t002", "t003"]
    assert store.page(after=page[-1].seq, limit=100)[0].id == "t004"
    assert len(store.page(user="a")) == 5
    assert store.page(states=[TaskState.COMPLETE]) == []
    assert len(store.active("local")) == 10 and store.active("slurm") == []
    assert [r.id for r in await store.page_async(user="a", limit=2)] == ["t001", "t003"]
    store.close()


def test_newer_store_is_refused(store_factory: Opener) -> None:
    store = store_factory()
    assert store.schema_version == len(MIGRATIONS) == len(pgstore.MIGRATIONS)
    if isinstance(store, Store):
        with sqlite3.connect(store.path) as db:
            db.execute(f"PRAGMA user_version = {len(MIGRATIONS) + 1}")
    else:
        assert isinstance(store, pgstore.PgStore)
        with psycopg.connect(store.dsn, autocommit=True) as db:
            db.execute("UPDATE jobproxy_schema SET version = %s", (len(MIGRATIONS) + 1,))
    store.close()
    with pytest.raises(RuntimeError, match="newer than this JobProxy knows"):
        store_factory()


@pytest.mark.parametrize("text, message", [
    ("[gateway]\nport = 70000\n", "$.gateway.port: must be <= 65535"),
    ("[gateway]\nprot = 1\n", "$.gateway: unknown field(s): 'prot'"),
    ("[scheduler]\npoll_interval = 0\n", "$.scheduler.poll_interval: must be > 0"),
    ("[scheduler\n", "not valid TOML"),
    ("[log]\nlevel = \"LOUD\"\n", "$.log.level: must be one of"),
])
def test_config_mistakes_name_their_path(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "j.toml"
    path.write_text(text)
    with pytest.raises(configuration.ConfigError) as caught:
        configuration.load(path)
    assert message in str(caught.value) and str(path) in str(caught.value)


def test_missing_config_file(tmp_path: Path) -> None:
    with pytest.raises(configuration.ConfigError, match="cannot read config file"):
        configuration.load(tmp_path / "nope.toml")


def test_relative_paths_follow_the_config_file(tmp_path: Path) -> None:
    path = tmp_path / "etc" / "j.toml"
    path.parent.mkdir()
    path.write_text('[gateway]\nstate_dir = "var"\n[store]\npath = "db/x.db"\n')
    loaded = configuration.load(path, port=9000)
    assert loaded.state_dir == tmp_path / "etc" / "var"
    assert loaded.store_path == tmp_path / "etc" / "db" / "x.db"
    assert loaded.task_root == tmp_path / "etc" / "var" / "tasks" and loaded.port == 9000


def test_example_config_is_valid() -> None:
    example = Path(__file__).resolve().parent.parent / "etc" / "jobproxy.toml"
    loaded = configuration.load(example)
    assert list(loaded.instances) == ["local"]
    create_scheduler(loaded)


def test_plugin_options_are_validated(tmp_path: Path) -> None:
    document = {"scheduler": {"options": {"cores": 0, "colour": 1}}}
    with pytest.raises(configuration.ConfigError, match=r"\$\.scheduler\.options"):
        create_scheduler(configuration.from_document(document, tmp_path, "t"))
    too_many = {"scheduler": {"options": {"cores": 4096}}}
    with pytest.raises(configuration.ConfigError, match="lets the gateway use"):
        create_scheduler(configuration.from_document(too_many, tmp_path, "t"))


async def test_a_waiter_that_gives_up_leaves_the_writer_working(store_factory: Opener) -> None:
    """A write whose waiter was cancelled (e.g. at shutdown) still commits, and the writer goes on."""
    import threading

    store = store_factory()
    hold = threading.Event()
    store._submit(lambda db: hold.wait(10))  # type: ignore[attr-defined]  # keeps the writer busy while the next write is queued
    adding = asyncio.ensure_future(store.add(_task(1), "local"))
    await asyncio.sleep(0.05)
    adding.cancel()
    hold.set()
    with pytest.raises(asyncio.CancelledError):
        await adding
    await asyncio.wait_for(store.add(_task(2), "local"), 10)
    assert store.get("t001") is not None and store.get("t002") is not None
    store.close()


def test_migration_drops_the_owner_from_stored_tes_tags(tmp_path: Path) -> None:
    """A store written before tags became the client's own: the owner the gateway added goes."""
    path = tmp_path / "old.db"
    with sqlite3.connect(path) as db:
        for number, script in enumerate(MIGRATIONS[:4], start=1):
            db.executescript(f"BEGIN; {script}; PRAGMA user_version = {number}; COMMIT;")
        for task_id, user, tags in (("t1", "ann", {"user": "ann", "p": "1"}), ("t2", "root", {"user": "bob"})):
            task = Task(id=task_id, user=user, workdir="/w", stdout="/o", stderr="/e", tags=tags,
                        extra={"tes": {"request": {"executors": [], "tags": tags}, "notes": []}})
            db.execute("INSERT INTO tasks (id, user, scheduler, spec, state, stdout, stderr, created) "
                       "VALUES (?, ?, 'local', ?, 'COMPLETE', '/o', '/e', '2026-01-01T00:00:00Z')",
                       (task_id, user, json.dumps(task.to_json())))
    store = Store(path)
    first, second = store.get("t1"), store.get("t2")
    assert first is not None and second is not None
    assert first.task.tags == {"p": "1"} and first.task.extra["tes"]["request"]["tags"] == {"p": "1"}
    assert second.task.tags == {"user": "bob"}  # not the owner (an admin's task for another): kept
    store.close()


def test_postgresql_migration_drops_the_owner_from_stored_tes_tags(database: tuple[str, Path]) -> None:
    """The same migration in the PostgreSQL store: a database at version 4 is brought up to date."""
    url, password_file = database
    with psycopg.connect(pgstore.conninfo(url, password_file), autocommit=True) as db:
        db.execute("CREATE TABLE jobproxy_schema (version INTEGER NOT NULL)")
        db.execute("INSERT INTO jobproxy_schema VALUES (4)")
        for script in pgstore.MIGRATIONS[:4]:
            db.execute(script.encode())
        for task_id, user, tags in (("t1", "ann", {"user": "ann", "p": "1"}), ("t2", "root", {"user": "bob"})):
            task = Task(id=task_id, user=user, workdir="/w", stdout="/o", stderr="/e", tags=tags,
                        extra={"tes": {"request": {"executors": [], "tags": tags}, "notes": []}})
            db.execute('INSERT INTO tasks (id, "user", scheduler, spec, state, stdout, stderr, created) '
                       "VALUES (%s, %s, 'local', %s, 'COMPLETE', '/o', '/e', '2026-01-01T00:00:00Z')",
                       (task_id, user, json.dumps(task.to_json())))
    store = pgstore.PgStore(url, password_file=password_file)
    first, second = store.get("t1"), store.get("t2")
    assert store.schema_version == len(pgstore.MIGRATIONS) == len(MIGRATIONS)
    assert first is not None and second is not None
    assert first.task.tags == {"p": "1"} and first.task.extra["tes"]["request"]["tags"] == {"p": "1"}
    assert second.task.tags == {"user": "bob"}
    store.close()
