"""Per-user quotas: active tasks per user and requests per second per caller, answered 429."""
from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from gateway import auth
from gateway import config as configuration
from gateway.active import ActiveSet
from gateway.app import create_app
from gateway.config import QuotaSettings
from gateway.quota import Quotas

JSON = {"Content-Type": "application/json"}
SLEEP = json.dumps({"user": "a", "cmd": ["sleep", "30"]})


def _config(tmp_path: Path, **quotas: Any) -> configuration.Config:
    return configuration.from_document({
        "gateway": {"state_dir": str(tmp_path / "state")},
        "scheduler": {"poll_interval": 0.1, "options": {"cores": 1}},
        "quotas": quotas,
    }, tmp_path, "test config")


async def test_active_tasks_per_user(aiohttp_client: Callable[..., Any], tmp_path: Path) -> None:
    client = await aiohttp_client(create_app(_config(tmp_path, active_tasks=2)))
    first = [await client.post("/v1/jobproxy/submit", data=SLEEP, headers=JSON) for _ in range(2)]
    assert [r.status for r in first] == [200, 200]
    over = await client.post("/v1/jobproxy/submit", data=SLEEP, headers=JSON)
    assert over.status == 429 and over.headers["Retry-After"].isdigit()
    assert "a has 2 tasks" in (await over.json())["error"]
    other = await client.post("/v1/jobproxy/submit", data=SLEEP.replace('"a"', '"b"'), headers=JSON)
    assert other.status == 200  # another user's quota is their own
    done = (await first[0].json())["id"]
    assert (await client.delete(f"/v1/jobproxy/delete/{done}")).status == 204
    again = await client.post("/v1/jobproxy/submit", data=SLEEP, headers=JSON)
    assert again.status == 200
    for response in [first[1], other, again]:
        await client.delete(f"/v1/jobproxy/delete/{(await response.json())['id']}")


async def test_concurrent_submits_cannot_exceed_the_quota(aiohttp_client: Callable[..., Any], tmp_path: Path) -> None:
    client = await aiohttp_client(create_app(_config(tmp_path, active_tasks=3)))
    answers = await asyncio.gather(*(client.post("/v1/jobproxy/submit", data=SLEEP, headers=JSON) for _ in range(12)))
    statuses = sorted(a.status for a in answers)
    assert statuses == [200] * 3 + [429] * 9
    for answer in answers:
        if answer.status == 200:
            await client.delete(f"/v1/jobproxy/delete/{(await answer.json())['id']}")


async def test_request_rate_per_caller(aiohttp_client: Callable[..., Any], tmp_path: Path) -> None:
    tokens = {"alice": "jp_alice-token", "bob": "jp_bob-token"}
    document = {"gateway": {"state_dir": str(tmp_path / "state")},
                "auth": {"enabled": True,
                         "tokens": [{"user": u, "sha256": auth.hash_token(t)} for u, t in tokens.items()]},
                "quotas": {"requests_per_second": 0.5, "burst": 3}}
    client = await aiohttp_client(create_app(configuration.from_document(document, tmp_path, "t")))

    async def get(user: str) -> Any:
        return await client.get("/v1/jobproxy/state", headers={"Authorization": f"Bearer {tokens[user]}"})

    assert [(await get("alice")).status for _ in range(3)] == [200, 200, 200]
    refused = await get("alice")
    assert refused.status == 429 and int(refused.headers["Retry-After"]) >= 1
    assert "too many requests" in (await refused.json())["error"]
    assert (await get("bob")).status == 200  # each caller has a bucket of its own
    assert (await client.get("/v1/jobproxy/ping")).status == 200  # health checks are never limited


def test_bucket_refills_at_the_rate() -> None:
    quotas = Quotas(QuotaSettings(active_tasks=0, requests_per_second=2, burst=2), ActiveSet([]))
    assert quotas.wait_for("c", now=100.0) == 0 and quotas.wait_for("c", now=100.0) == 0
    assert quotas.wait_for("c", now=100.0) == 0.5
    assert quotas.wait_for("c", now=100.25) == 0.25  # half a token back, half still missing
    assert quotas.wait_for("c", now=100.5) == 0
    unlimited = Quotas(QuotaSettings(active_tasks=0, requests_per_second=0, burst=1), ActiveSet([]))
    assert all(unlimited.wait_for("c", now=1.0) == 0 for _ in range(1000))
