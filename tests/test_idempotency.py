"""Exactly-once submits with the Idempotency-Key header, in the v1 and TES APIs."""
from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from gateway import config as configuration
from gateway.app import create_app
from gateway.keys import STORE
from gateway.model import now
from gateway.taskstore import TaskStore

from .conftest import final, wait_state

JSON = {"Content-Type": "application/json"}


@pytest.fixture
def config(tmp_path: Path, store_section: dict[str, str]) -> configuration.Config:
    """A local-scheduler gateway on each store (SQLite, PostgreSQL)."""
    document = {"gateway": {"state_dir": str(tmp_path / "state")}, "store": store_section,
                "scheduler": {"type": "local", "poll_interval": 0.1}}
    return configuration.from_document(document, tmp_path, "test config")


def _headers(key: str) -> dict[str, str]:
    return {**JSON, "Idempotency-Key": key}


async def test_a_retried_submit_answers_the_first_task(aiohttp_client: Callable[..., Any], config: Any,
                                                       tmp_path: Path) -> None:
    client = await aiohttp_client(create_app(config))
    body = json.dumps({"user": "a", "cmd": "echo once >> ran"})  # in the task's own folder
    first = await client.post("/v1/jobproxy/submit", data=body, headers=_headers("k-1"))
    again = await client.post("/v1/jobproxy/submit", data=body, headers=_headers("k-1"))
    assert first.status == again.status == 200
    task_id = (await first.json())["id"]
    assert (await again.json())["id"] == task_id
    await wait_state(client, task_id, final)
    assert client.server.app[STORE].count() == 1
    other = await client.post("/v1/jobproxy/submit", data=body, headers=_headers("k-2"))
    other_id = (await other.json())["id"]
    assert other_id != task_id  # another key is another task
    await wait_state(client, other_id, final)
    task_root = Path(config.task_root).resolve()
    assert [(task_root / t / "ran").read_text() for t in (task_id, other_id)] == ["once\n", "once\n"]


async def test_same_key_other_request_is_422(client: Any) -> None:
    first = await client.post("/v1/jobproxy/submit", data=json.dumps({"user": "a", "cmd": "true"}),
                              headers=_headers("dup"))
    changed = await client.post("/v1/jobproxy/submit", data=json.dumps({"user": "a", "cmd": "false"}),
                                headers=_headers("dup"))
    assert first.status == 200 and changed.status == 422
    doc = await changed.json()
    assert "already used" in doc["error"] and (await first.json())["id"] in doc["error"]
    assert doc["details"][0]["path"] == "Idempotency-Key"
    assert client.server.app[STORE].count() == 1


async def test_keys_are_per_user(client: Any) -> None:
    ids = set()
    for user in ("a", "b"):
        response = await client.post("/v1/jobproxy/submit", data=json.dumps({"user": user, "cmd": "true"}),
                                     headers=_headers("shared"))
        assert response.status == 200
        ids.add((await response.json())["id"])
    assert len(ids) == 2


async def test_concurrent_retries_make_one_task(client: Any) -> None:
    body = json.dumps({"user": "a", "cmd": "true"})
    answers = await asyncio.gather(*(client.post("/v1/jobproxy/submit", data=body, headers=_headers("race"))
                                     for _ in range(20)))
    ids = {(await a.json())["id"] for a in answers}
    assert [a.status for a in answers] == [200] * 20 and len(ids) == 1
    assert client.server.app[STORE].count() == 1


async def test_a_bad_key_is_refused(client: Any) -> None:
    for key in ("", "with space", "x" * 256, "naïve"):
        response = await client.post("/v1/jobproxy/submit", data=json.dumps({"user": "a", "cmd": "true"}),
                                     headers={**JSON, "Idempotency-Key": key})
        assert response.status == 400, key
        assert (await response.json())["details"][0]["path"] == "Idempotency-Key"
    assert client.server.app[STORE].count() == 0


async def test_a_key_survives_a_restart(aiohttp_client: Callable[..., Any], config: Any) -> None:
    body = json.dumps({"user": "a", "cmd": "true"})
    first = await aiohttp_client(create_app(config))
    task_id = (await (await first.post("/v1/jobproxy/submit", data=body, headers=_headers("k"))).json())["id"]
    await first.close()
    second = await aiohttp_client(create_app(config))
    response = await second.post("/v1/jobproxy/submit", data=body, headers=_headers("k"))
    assert response.status == 200 and (await response.json())["id"] == task_id
    assert second.server.app[STORE].count() == 1


async def test_tes_create_takes_a_key(aiohttp_client: Callable[..., Any], tmp_path: Path) -> None:
    from .test_tes import shell, tes_config

    client = await aiohttp_client(create_app(tes_config(tmp_path)))
    task = {"executors": [shell("true")]}
    answers = [await client.post("/ga4gh/tes/v1/tasks", data=json.dumps(task), headers=_headers("tes-1"))
               for _ in range(2)]
    bodies = [await a.json() for a in answers]
    assert [a.status for a in answers] == [200, 200]
    assert bodies[0]["id"] == bodies[1]["id"] and client.server.app[STORE].count() == 1
    changed = await client.post("/ga4gh/tes/v1/tasks", data=json.dumps({"executors": [shell("false")]}),
                                headers=_headers("tes-1"))
    assert changed.status == 422


async def test_keys_expire(store_factory: Callable[[], TaskStore]) -> None:
    from gateway.store import IdempotencyKey
    from schedulers.base import Task

    store = store_factory()
    await store.add(Task(id="t1", user="u", workdir="/w", stdout="/o", stderr="/e"), "local",
                    IdempotencyKey("u", "k", "d"))
    assert store.keyed("u", "k") == ("d", "t1")
    assert await store.expire_keys(now() - timedelta(hours=1)) == 0
    assert await store.expire_keys(now() + timedelta(seconds=1)) == 1
    assert store.keyed("u", "k") is None and store.get("t1") is not None
    store.close()
