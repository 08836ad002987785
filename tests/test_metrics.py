"""GET /metrics: parsed with prometheus-client's own parser; the numbers move as tasks run."""
from __future__ import annotations

import asyncio
import hashlib
import json
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from gateway import config as configuration
from gateway.app import create_app
from gateway.keys import SCHEDULERS
from gateway.metrics import METRICS
from schedulers.base import SchedulerUnavailable

from .conftest import final, wait_state

JSON = {"Content-Type": "application/json"}
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


async def scrape(client: Any, headers: dict[str, str] | None = None) -> Samples:
    response = await client.get("/metrics", headers=headers)
    assert response.status == 200, await response.text()
    assert response.headers["Content-Type"].startswith("text/plain; version=")
    samples: Samples = {}
    for family in text_string_to_metric_families(await response.text()):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def total(samples: Samples, name: str, **labels: str) -> float:
    """The sum over every series of `name` whose labels include `labels`."""
    wanted = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and wanted <= ls)


async def submit(client: Any, task: dict[str, Any]) -> str:
    response = await client.post("/v1/jobproxy/submit", data=json.dumps(task), headers=JSON)
    assert response.status == 200, await response.text()
    return str((await response.json())["id"])


async def until(check: Callable[[], Awaitable[bool]], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not await check():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.1)


async def test_numbers_move_as_tasks_run(client: Any, tmp_path: Path) -> None:
    before = await scrape(client)
    assert value(before, "jobproxy_tasks", scheduler="local", state="RUNNING") == 0
    assert value(before, "jobproxy_tasks_stored") == 0
    assert value(before, "process_open_fds") > 0

    release = tmp_path / "go"
    running = await submit(client, {"user": "alice", "cmd": f"while [ ! -e {release} ]; do sleep 0.05; done"})
    done = await submit(client, {"user": "alice", "cmd": "exit 3"})
    refused = await client.post("/v1/jobproxy/submit", data=json.dumps({"user": "alice", "cores": 0}), headers=JSON)
    assert refused.status == 400
    tes_refused = await client.post("/ga4gh/tes/v1/tasks", data=json.dumps({"executors": []}), headers=JSON)
    assert tes_refused.status == 400
    await wait_state(client, running, lambda s: s["code"] == "RUNNING")
    await wait_state(client, done, final)

    during = await scrape(client)
    assert value(during, "jobproxy_tasks", scheduler="local", state="RUNNING") == 1
    assert value(during, "jobproxy_tasks_stored") == 2
    assert value(during, "jobproxy_submits_total", api="v1", status="200") == 2
    assert value(during, "jobproxy_submits_total", api="v1", status="400") == 1
    assert value(during, "jobproxy_submits_total", api="tes", status="400") == 1
    assert value(during, "jobproxy_tasks_finished_total", scheduler="local", state="EXECUTOR_ERROR") == 1
    assert value(during, "jobproxy_scheduler_call_duration_seconds_count", scheduler="local", call="submit") == 2
    # by route template, never by task id
    assert value(during, "jobproxy_http_responses_total", method="GET", route="/v1/jobproxy/state/{id}",
                 status="200") >= 2
    assert not any(running in str(labels) for _, labels in during)
    assert value(during, "jobproxy_store_transaction_duration_seconds_count") >= 2

    release.touch()
    await wait_state(client, running, final)

    async def settled() -> bool:
        after = await scrape(client)
        return (value(after, "jobproxy_tasks", scheduler="local", state="RUNNING") == 0
                and value(after, "jobproxy_tasks_finished_total", scheduler="local", state="COMPLETE") == 1
                and value(after, "jobproxy_poll_round_duration_seconds_count", scheduler="local") > 0
                and value(after, "jobproxy_event_loop_lag_seconds_count") > 0)

    await until(settled)
    status = await client.delete(f"/v1/jobproxy/delete/{done}")
    assert status.status == 204
    after = await scrape(client)
    assert value(after, "jobproxy_tasks_stored") == 1
    assert value(after, "jobproxy_scheduler_call_duration_seconds_count", scheduler="local", call="release") == 1
    assert value(after, "jobproxy_http_responses_total", method="DELETE", route="/v1/jobproxy/delete/{id}",
                 status="204") == 1
    unknown = await client.get("/no/such/path")
    assert unknown.status == 404
    assert value(await scrape(client), "jobproxy_http_responses_total", method="GET", route="(unmatched)",
                 status="404") == 1


async def test_scheduler_failures_are_counted(client: Any) -> None:
    app = client.server.app

    async def unreachable(*_: Any) -> None:
        raise SchedulerUnavailable("the batch system does not answer")

    app[SCHEDULERS]["local"].cancel = unreachable  # the plugin's own method, under the metrics' wrapper
    app[METRICS].instrument(app[SCHEDULERS]["local"])
    task_id = await submit(client, {"user": "alice", "cmd": "sleep 30"})
    await wait_state(client, task_id, lambda s: s["code"] == "RUNNING")
    response = await client.delete(f"/v1/jobproxy/delete/{task_id}")
    assert response.status == 503
    samples = await scrape(client)
    assert value(samples, "jobproxy_scheduler_call_failures_total", scheduler="local", call="cancel",
                 error="SchedulerUnavailable") == 1
    assert value(samples, "jobproxy_scheduler_call_duration_seconds_count", scheduler="local", call="cancel") == 1


async def test_event_loop_lag_is_measured(client: Any) -> None:
    await until(lambda: _lag_seen(client))
    before = total(await scrape(client), "jobproxy_event_loop_lag_seconds_sum")
    time.sleep(1.5)  # blocks the loop for longer than the watcher's 0.5 s sleep, whatever its phase
    await until(lambda: _lag_grew(client, before + 0.9))


async def _lag_seen(client: Any) -> bool:
    return value(await scrape(client), "jobproxy_event_loop_lag_seconds_count") > 0


async def _lag_grew(client: Any, at_least: float) -> bool:
    return total(await scrape(client), "jobproxy_event_loop_lag_seconds_sum") >= at_least


@pytest.fixture
def token_config(tmp_path: Path) -> configuration.Config:
    document = {
        "gateway": {"state_dir": str(tmp_path / "state")},
        "scheduler": {"type": "local", "poll_interval": 0.1},
        "auth": {"enabled": True, "tokens": [{"user": "alice", "sha256": hashlib.sha256(b"jp_alice").hexdigest()}]},
        "metrics": {"token_sha256": hashlib.sha256(b"scrape-me").hexdigest()},
    }
    return configuration.from_document(document, tmp_path, "test config")


async def test_scrape_token(aiohttp_client: Callable[..., Awaitable[Any]], token_config: configuration.Config) -> None:
    client = await aiohttp_client(create_app(token_config))
    for headers in (None, {"Authorization": "Bearer jp_alice"}, {"Authorization": "Basic c2NyYXBlLW1l"}):
        response = await client.get("/metrics", headers=headers)
        assert response.status == 401 and "WWW-Authenticate" in response.headers
        assert "scrape token" in (await response.json())["error"]
    samples = await scrape(client, {"Authorization": "Bearer scrape-me"})
    assert value(samples, "jobproxy_http_responses_total", method="GET", route="/metrics", status="401") == 3


async def test_metrics_can_be_disabled(aiohttp_client: Callable[..., Awaitable[Any]], tmp_path: Path) -> None:
    document = {"gateway": {"state_dir": str(tmp_path / "state")}, "metrics": {"enabled": False}}
    config = configuration.from_document(document, tmp_path, "test config")
    client = await aiohttp_client(create_app(config))
    response = await client.get("/metrics")
    assert response.status == 404 and (await response.json())["error"] == "no such resource: /metrics"
