"""Retention: purging finished tasks (record, task folder, the scheduler's files), never active ones;
the gateway's periodic purge and `jobproxy purge` (real store, real tasks on the local scheduler)."""
from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from gateway import config as configuration
from gateway import retention
from gateway.active import ActiveSet
from gateway.app import create_app
from gateway.keys import ACTIVE, SCHEDULERS, STORE, TASK_ROOT
from gateway.model import now, rfc3339

from .conftest import ROOT, Gateway, final, wait_state
from .pg import execute

JSON = {"Content-Type": "application/json"}
OLD = now() - timedelta(days=40)


def retention_config(tmp_path: Path, **store: Any) -> configuration.Config:
    document = {"gateway": {"state_dir": "state"}, "scheduler": {"type": "local", "poll_interval": 0.1},
                "store": store}
    return configuration.from_document(document, tmp_path, "test config")


async def submit(client: Any, cmd: str, user: str = "alice") -> str:
    response = await client.post("/v1/jobproxy/submit", data=json.dumps({"user": user, "cmd": cmd}), headers=JSON)
    body = await response.json()
    assert response.status == 200, body
    return str(body["id"])


def age(config: configuration.Config, task_id: str, *, finished: bool = True) -> None:
    """Make a task look as if it was made (and, if `finished`, ended) 40 days ago: a second
    connection, as an admin's sqlite3 (or psql) would."""
    settings = config.sections.store
    store = {"url": settings.url, "password_file": str(settings.password_file)} if settings.url else None
    execute(store, config.store_path,
            "UPDATE tasks SET created = ?" + (", finished = ?" if finished else "") + " WHERE id = ?",
            (rfc3339(OLD), *([rfc3339(OLD)] if finished else []), task_id))


async def committed(client: Any) -> None:
    """Until the states the API answered (from memory) are in the store too: the store commits
    state changes in groups, a moment later."""
    await client.server.app[STORE].flush()


def job_files(config: configuration.Config, task_id: str) -> list[Path]:
    """The local scheduler's files for a task (a direct job that ended before its pid file was
    due has none: its id is a line of the spool's journal)."""
    return sorted((config.state_dir / "schedulers" / "local").glob(task_id + "*"))


async def exists(client: Any, task_id: str) -> bool:
    response = await client.get(f"/v1/jobproxy/state/{task_id}")
    assert response.status in (200, 404)
    return bool(response.status == 200)


async def test_purge_takes_old_finished_tasks_only(aiohttp_client: Any, tmp_path: Path,
        store_section: dict[str, str]) -> None:
    config = retention_config(tmp_path, **store_section)
    app = create_app(config)
    client = await aiohttp_client(app)
    old, recent = await submit(client, "echo old"), await submit(client, "echo recent")
    running = await submit(client, "sleep 300")  # an old active task: never purged
    for task_id in (old, recent):
        await wait_state(client, task_id, final)
    await wait_state(client, running, lambda s: s["code"] == "RUNNING")
    await committed(client)
    age(config, old)
    age(config, running, finished=False)
    old_folder = config.task_root / old
    assert old_folder.is_dir(), "the task left no folder to purge"  # a short direct job: its id in the spool's journal

    active: ActiveSet = app[ACTIVE]
    done = await retention.purge(app[STORE], app[SCHEDULERS], app[TASK_ROOT], now() - timedelta(days=30),
                                 active=active)

    assert [r.id for r in done.removed] == [old] and done.kept == []
    assert not await exists(client, old)
    assert not old_folder.exists() and job_files(config, old) == []
    assert await exists(client, recent) and (config.task_root / recent).is_dir()
    state = await wait_state(client, running, lambda s: True)
    assert state["code"] == "RUNNING" and (config.task_root / running).is_dir()
    for _ in range(50):  # its pid file, written a moment after it started
        if job_files(config, running):
            break
        await asyncio.sleep(0.1)
    assert job_files(config, running), "the running task's pid file is gone"
    assert app[STORE].count() == 2
    await client.delete(f"/v1/jobproxy/delete/{running}")


async def test_purge_works_in_batches_and_spares_the_active_set(aiohttp_client: Any, tmp_path: Path,
        store_section: dict[str, str]) -> None:
    config = retention_config(tmp_path, **store_section)
    app = create_app(config)
    client = await aiohttp_client(app)
    ids = [await submit(client, f"echo {n}") for n in range(5)]
    for task_id in ids:
        await wait_state(client, task_id, final)
        await committed(client)
        age(config, task_id)
    before = now() - timedelta(days=30)

    listed = await retention.purge(app[STORE], app[SCHEDULERS], app[TASK_ROOT], before, dry_run=True, batch=2)
    assert sorted(r.id for r in listed.removed) == sorted(ids)
    assert all([await exists(client, task_id) for task_id in ids]), "a dry run removed a task"

    done = await retention.purge(app[STORE], app[SCHEDULERS], app[TASK_ROOT], before, active={ids[0]}, batch=2)
    assert sorted(r.id for r in done.removed) == sorted(ids[1:])
    assert [(r.id, why) for r, why in done.kept] == [(ids[0], "active in the gateway")]
    assert await exists(client, ids[0]) and not any([await exists(client, task_id) for task_id in ids[1:]])


async def test_the_store_never_deletes_an_active_task(aiohttp_client: Any, tmp_path: Path,
        store_section: dict[str, str]) -> None:
    config = retention_config(tmp_path, **store_section)
    app = create_app(config)
    client = await aiohttp_client(app)
    running = await submit(client, "sleep 300")
    await wait_state(client, running, lambda s: s["code"] == "RUNNING")
    age(config, running)  # even with a `finished` time, its state is not final
    assert await app[STORE].ended_before_async(now() - timedelta(days=30), 10) == []
    assert await app[STORE].delete_finished([running]) == []
    assert await exists(client, running)
    await client.delete(f"/v1/jobproxy/delete/{running}")


async def test_retain_days_0_keeps_everything(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With retain_days = 0 the periodic purge ends at once; with days set it runs on forever."""
    monkeypatch.setattr(retention, "FIRST_DELAY", 3600.0)
    forever = create_app(retention_config(tmp_path, retain_days=0))
    await asyncio.wait_for(retention.periodic(forever), 5)
    kept = create_app(retention_config(tmp_path, retain_days=30))
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(retention.periodic(kept), 0.2)


async def test_the_gateway_purges_periodically(aiohttp_client: Any, tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(retention, "FIRST_DELAY", 0.1)
    monkeypatch.setattr(retention, "EVERY", 0.2)
    config = retention_config(tmp_path, retain_days=30)
    client = await aiohttp_client(create_app(config))
    old, recent = await submit(client, "echo old"), await submit(client, "echo recent")
    for task_id in (old, recent):
        await wait_state(client, task_id, final)
    await committed(client)
    age(config, old)
    deadline = time.monotonic() + 30
    while await exists(client, old):
        assert time.monotonic() < deadline, "the periodic purge did not remove the old task in 30 s"
        await asyncio.sleep(0.1)
    assert not (config.task_root / old).exists() and job_files(config, old) == []
    assert await exists(client, recent)


def jobproxy_purge(config_file: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "gateway.cli", "purge", "--config", str(config_file), *args],
                          capture_output=True, text=True, env=env, timeout=120)


async def test_jobproxy_purge_while_the_gateway_runs(aiohttp_client: Any, tmp_path: Path,
                                                     store_section: dict[str, str]) -> None:
    config_file = tmp_path / "jobproxy.toml"
    store = "".join(f'{key} = "{value}"\n' for key, value in store_section.items())
    config_file.write_text('[gateway]\nstate_dir = "state"\n[scheduler]\ntype = "local"\npoll_interval = 0.1\n'
                           f"[store]\n{store}")
    config = configuration.load(config_file)
    client = await aiohttp_client(create_app(config))
    old, recent = await submit(client, "echo old"), await submit(client, "echo recent")
    running = await submit(client, "sleep 300")
    for task_id in (old, recent):
        await wait_state(client, task_id, final)
    await wait_state(client, running, lambda s: s["code"] == "RUNNING")
    await committed(client)
    age(config, old)
    age(config, running, finished=False)

    listed = await asyncio.to_thread(jobproxy_purge, config_file, "--older-than", "30", "--dry-run")
    assert listed.returncode == 0, listed.stderr
    assert f"would remove task {old} (user alice, COMPLETE" in listed.stdout
    assert recent not in listed.stdout and running not in listed.stdout
    assert "would remove 1 finished tasks" in listed.stdout
    assert await exists(client, old) and (config.task_root / old).is_dir()

    purged = await asyncio.to_thread(jobproxy_purge, config_file, "--older-than", "30")
    assert purged.returncode == 0, purged.stderr
    assert f"removed task {old}" in purged.stdout and "removed 1 finished tasks" in purged.stdout
    assert not await exists(client, old)
    assert not (config.task_root / old).exists() and job_files(config, old) == []
    assert await exists(client, recent)
    assert (await wait_state(client, running, lambda s: True))["code"] == "RUNNING"
    await client.delete(f"/v1/jobproxy/delete/{running}")


def test_jobproxy_purge_of_a_stopped_gateway(tmp_path: Path) -> None:
    """No store yet: nothing to do; a bad --older-than is refused."""
    config_file = tmp_path / "jobproxy.toml"
    config_file.write_text('[gateway]\nstate_dir = "state"\n')
    nothing = jobproxy_purge(config_file, "--older-than", "1")
    assert nothing.returncode == 0 and "nothing to purge" in nothing.stdout
    assert not (tmp_path / "state" / "jobproxy.db").exists()
    refused = jobproxy_purge(config_file, "--older-than", "-1")
    assert refused.returncode == 2 and "--older-than" in refused.stderr


def test_jobproxy_purge_after_jobproxy_serve_stopped(gateway_factory: Callable[..., Gateway], tmp_path: Path) -> None:
    """A real `jobproxy serve` ran the tasks and stopped; the purge removes the old one, keeps the
    recent one, and the gateway started again serves what is left."""
    gateway = gateway_factory('[gateway]\nstate_dir = "state"\n[scheduler]\ntype = "local"\npoll_interval = 0.1\n')
    gateway.start()
    old, recent = gateway.submit({"user": "alice", "cmd": "echo old"}), gateway.submit({"user": "alice", "cmd": "true"})
    gateway.wait(old)
    gateway.wait(recent)
    gateway.stop()
    config = configuration.load(gateway.config_path)
    age(config, old)
    assert (config.task_root / old).is_dir()

    purged = jobproxy_purge(gateway.config_path, "--older-than", "30")
    assert purged.returncode == 0, purged.stderr
    assert f"removed task {old}" in purged.stdout and recent not in purged.stdout
    assert not (config.task_root / old).exists() and job_files(config, old) == []
    gateway.start()
    assert gateway.request("GET", f"/v1/jobproxy/state/{old}")[0] == 404
    assert gateway.state(recent)["code"] == "COMPLETE"
