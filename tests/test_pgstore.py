"""What only the PostgreSQL store has: the URL without a password, the database going away (503,
nothing acknowledged lost), and two replicas in one process seeing each other's changes."""
from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from gateway import config as configuration
from gateway.app import create_app
from gateway.keys import ACTIVE, STORE
from gateway.pgstore import PgStore

from .conftest import final, wait_state
from .pg import admin, server

JSON = {"Content-Type": "application/json"}


def pg_config(tmp_path: Path, database: tuple[str, Path], name: str = "state") -> configuration.Config:
    url, password_file = database
    document = {"gateway": {"state_dir": str(tmp_path / name)},
                "store": {"url": url, "password_file": str(password_file)},
                "scheduler": {"type": "local", "poll_interval": 0.2}}
    return configuration.from_document(document, tmp_path, "test config")


@pytest.mark.parametrize("url, message", [
    ("postgresql://u:secret@db/jobproxy", "$.store.url: must be postgresql://user@host:port/db, without a password"),
    ("postgresql://u@db/jobproxy?password=secret", "$.store.url: must not hold a password"),
    ("mysql://u@db/x", "$.store.url: must be postgresql://"),
])
def test_a_password_never_sits_in_the_config(tmp_path: Path, url: str, message: str) -> None:
    path = tmp_path / "j.toml"
    path.write_text(f'[store]\nurl = "{url}"\n')
    with pytest.raises(configuration.ConfigError) as caught:
        configuration.load(path)
    assert message in str(caught.value)


async def test_an_unreachable_database_stops_the_start_in_one_line(tmp_path: Path) -> None:
    document = {"gateway": {"state_dir": str(tmp_path / "s")}, "store": {"url": "postgresql://u@127.0.0.1:1/x"}}
    app = create_app(configuration.from_document(document, tmp_path, "test config"))
    with pytest.raises(configuration.ConfigError, match=r"cannot open the task store .*\(\[store\] url\)"):
        async with app_lifecycle(app):
            pass


def app_lifecycle(app: Any) -> Any:
    from aiohttp.test_utils import TestServer
    return TestServer(app)


async def test_the_database_gone_answers_503_and_loses_nothing(aiohttp_client: Callable[..., Any], tmp_path: Path,
                                                               database: tuple[str, Path]) -> None:
    client = await aiohttp_client(create_app(pg_config(tmp_path, database)))
    store = client.server.app[STORE]
    assert isinstance(store, PgStore)
    body = json.dumps({"user": "a", "cmd": "sleep 1; echo done > out"})
    response = await client.post("/v1/jobproxy/submit", data=body, headers=JSON)
    assert response.status == 200
    task_id = (await response.json())["id"]
    name = database[0].rsplit("/", 1)[1]
    with admin(*server()) as db:  # the database refuses everyone, and drops the gateway's sessions
        db.execute(f"ALTER DATABASE {name} ALLOW_CONNECTIONS false")
        db.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s", (name,))
    try:
        refused = await client.post("/v1/jobproxy/submit", data=body, headers=JSON)
        answer = await refused.json()
        assert refused.status == 503 and "task store is unavailable" in answer["error"], answer
        assert refused.headers["Retry-After"]
        keyed = await client.post("/v1/jobproxy/submit", data=body, headers={**JSON, "Idempotency-Key": "k"})
        assert keyed.status == 503
        # the acknowledged task goes on: its job ends while the database is away
        state = await wait_state(client, task_id, final, timeout=30)
        assert state["code"] == "COMPLETE"
    finally:
        with admin(*server()) as db:
            db.execute(f"ALTER DATABASE {name} ALLOW_CONNECTIONS true")
    deadline = time.monotonic() + 30  # the change kept meanwhile is written once the database is back
    while time.monotonic() < deadline:
        with admin(*database) as db:
            row = db.execute("SELECT state, COUNT(*) OVER () FROM tasks WHERE id = %s", (task_id,)).fetchone()
        if row is not None and row[0] == "COMPLETE":
            break
        await asyncio.sleep(0.2)
    assert row is not None and row[0] == "COMPLETE" and row[1] == 1
    with admin(*database) as db:
        assert db.execute("SELECT COUNT(*) FROM tasks").fetchone() == (1,), "a refused submit was kept"
    again = await client.post("/v1/jobproxy/submit", data=body, headers=JSON)
    assert again.status == 200


async def test_two_replicas_see_each_others_tasks(aiohttp_client: Callable[..., Any], tmp_path: Path,
                                                  database: tuple[str, Path]) -> None:
    first = await aiohttp_client(create_app(pg_config(tmp_path, database, "one")))
    second = await aiohttp_client(create_app(pg_config(tmp_path, database, "one")))
    running = await second.post("/v1/jobproxy/submit", data=json.dumps({"user": "b", "cmd": "sleep 30"}),
                                headers=JSON)
    task_id = (await running.json())["id"]
    await wait_state(first, task_id, lambda s: s["code"] == "RUNNING")  # the lease holder runs it
    deadline = time.monotonic() + 10
    while task_id not in second.server.app[ACTIVE] and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    assert first.server.app[ACTIVE].count_of("b") == second.server.app[ACTIVE].count_of("b") == 1
    canceled = await second.delete(f"/v1/jobproxy/delete/{task_id}")  # through the other replica
    assert canceled.status in (200, 204), await canceled.text()
    deadline = time.monotonic() + 10
    while task_id in first.server.app[ACTIVE] and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    assert task_id not in first.server.app[ACTIVE] and first.server.app[ACTIVE].count_of("b") == 0


async def test_one_key_sent_to_two_replicas_at_once_makes_one_task(aiohttp_client: Callable[..., Any],
                                                                    tmp_path: Path,
                                                                    database: tuple[str, Path]) -> None:
    first = await aiohttp_client(create_app(pg_config(tmp_path, database, "one")))
    second = await aiohttp_client(create_app(pg_config(tmp_path, database, "one")))
    body = json.dumps({"user": "k", "cmd": "true"})
    for n in range(20):
        headers = {**JSON, "Idempotency-Key": f"both-{n}"}
        answers = await asyncio.gather(first.post("/v1/jobproxy/submit", data=body, headers=headers),
                                       second.post("/v1/jobproxy/submit", data=body, headers=headers))
        assert [a.status for a in answers] == [200, 200]
        ids = {(await a.json())["id"] for a in answers}
        assert len(ids) == 1, f"key both-{n} made two tasks"
    assert first.server.app[STORE].count() == 20


async def test_a_tes_task_made_on_one_replica_is_read_on_the_other(aiohttp_client: Callable[..., Any],
                                                                   tmp_path: Path,
                                                                   database: tuple[str, Path]) -> None:
    from .test_tes import shell, tes_config

    url, password_file = database
    store = {"store": {"url": url, "password_file": str(password_file)}}
    first = await aiohttp_client(create_app(tes_config(tmp_path, **store)))
    second = await aiohttp_client(create_app(tes_config(tmp_path, **store)))
    made = await first.post("/ga4gh/tes/v1/tasks", data=json.dumps({"executors": [shell("echo hello")]}),
                            headers=JSON)
    assert made.status == 200, await made.text()
    task_id = (await made.json())["id"]
    deadline = time.monotonic() + 60
    state: dict[str, Any] = {}
    while time.monotonic() < deadline:
        response = await second.get(f"/ga4gh/tes/v1/tasks/{task_id}?view=FULL")
        state = await response.json()
        if response.status == 200 and state["state"] == "COMPLETE":
            break
        await asyncio.sleep(0.1)
    assert state.get("state") == "COMPLETE", state
    assert state["logs"][0]["logs"][0]["stdout"] == "hello\n"
    listed = await (await second.get("/ga4gh/tes/v1/tasks")).json()
    assert [t["id"] for t in listed["tasks"]] == [task_id]
