"""GET /v1/jobproxy/task/{id} and /v1/jobproxy/output/{id}: what the dashboard shows of a task, with
the state's visibility rules, and output files read without following a swapped-in link."""
from __future__ import annotations

import json
import os
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import xmltodict

from gateway import auth
from gateway import config as configuration
from gateway.app import create_app
from gateway.output import read_tail

from .conftest import final, wait_state
from .openapi_check import check

JSON = {"Content-Type": "application/json"}
ALICE, BOB, ADMIN = ({"Authorization": f"Bearer jp_{name}"} for name in ("alice", "bob", "admin"))


@pytest.fixture
async def authed(aiohttp_client: Callable[..., Awaitable[Any]], tmp_path: Path) -> Any:
    tokens = [{"user": name, "sha256": auth.hash_token(f"jp_{name}"), "admin": name == "admin"}
              for name in ("alice", "bob", "admin")]
    document = {"gateway": {"state_dir": str(tmp_path / "state")},
                "scheduler": {"type": "local", "poll_interval": 0.1},
                "auth": {"enabled": True, "tokens": tokens}}
    return await aiohttp_client(create_app(configuration.from_document(document, tmp_path, "test config")))


async def get(client: Any, path: str, headers: dict[str, str]) -> tuple[int, bytes]:
    """One GET, its answer checked against the OpenAPI document."""
    response = await client.get(path, headers=headers)
    raw = await response.read()
    check("GET", path, response.status, response.headers.get("Content-Type", ""), raw)
    return response.status, raw


async def submit(client: Any, task: dict[str, Any], headers: dict[str, str]) -> str:
    response = await client.post("/v1/jobproxy/submit", data=json.dumps(task), headers={**JSON, **headers})
    assert response.status == 200, await response.text()
    return str((await response.json())["id"])


async def test_task_and_output_of_ones_own_task(authed: Any) -> None:
    task = {"user": "alice", "cmd": "seq 1 3000; echo oops >&2; exit 2", "cores": 1, "memory": 64, "cputime": 30}
    task_id = await submit(authed, task, ALICE)
    state = await wait_state(authed, task_id, final, headers=ALICE)
    assert state["code"] == "EXECUTOR_ERROR"

    status, raw = await get(authed, f"/v1/jobproxy/task/{task_id}", ALICE)
    assert status == 200
    assert json.loads(raw) == {"id": task_id, **task, "stdout": state["stdout"], "stderr": state["stderr"]}

    status, raw = await get(authed, f"/v1/jobproxy/output/{task_id}", ALICE)
    body = json.loads(raw)
    everything = "".join(f"{n}\n" for n in range(1, 3001))
    assert body["bytes"] == 65536
    assert body["stdout"] == {"path": state["stdout"], "size": len(everything), "tail": everything, "truncated": False}
    assert body["stderr"]["tail"] == "oops\n"

    status, raw = await get(authed, f"/v1/jobproxy/output/{task_id}?bytes=10", ALICE)
    body = json.loads(raw)
    assert body["stdout"]["tail"] == "2999\n3000\n" and body["stdout"]["truncated"] is True

    response = await authed.get(f"/v1/jobproxy/output/{task_id}", headers={**ALICE, "Accept": "application/xml"})
    assert xmltodict.parse(await response.text())["output"]["stderr"]["tail"].startswith("oops")


async def test_same_visibility_as_the_state(authed: Any) -> None:
    task_id = await submit(authed, {"user": "alice", "cmd": "echo secret"}, ALICE)
    await wait_state(authed, task_id, final, headers=ALICE)
    for path in (f"/v1/jobproxy/task/{task_id}", f"/v1/jobproxy/output/{task_id}", "/v1/jobproxy/output/nope"):
        status, raw = await get(authed, path, BOB)
        assert status == 404
        assert json.loads(raw)["error"].startswith("no task with id")
        assert (await authed.get(path)).status == 401
    response = await authed.get(f"/v1/jobproxy/output/{task_id}", headers=ADMIN)
    assert (await response.json())["stdout"]["tail"] == "secret\n"


@pytest.mark.parametrize("raw", ["0", "1048577", "x", "-1"])
async def test_bytes_must_be_in_range(authed: Any, raw: str) -> None:
    task_id = await submit(authed, {"user": "alice", "cmd": "true"}, ALICE)
    status, answer = await get(authed, f"/v1/jobproxy/output/{task_id}?bytes={raw}", ALICE)
    assert status == 400
    body = json.loads(answer)
    assert body["details"] == [{"path": "bytes", "message": "must be a whole number from 1 to 1048576"}]


def test_read_tail_refuses_links_and_special_files(tmp_path: Path) -> None:
    secret = tmp_path / "secret"
    secret.write_text("only the gateway may read this")
    link = tmp_path / "stdout"
    link.symlink_to(secret)
    assert read_tail(str(link), 100) == {"path": str(link), "size": None, "tail": "", "truncated": False,
                                         "note": "not a regular file"}
    assert read_tail(str(tmp_path), 100)["note"] == "not a regular file"
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    assert read_tail(str(fifo), 100)["note"] == "not a regular file"
    assert read_tail(str(tmp_path / "missing"), 100)["note"] == "not written yet"
    assert read_tail(str(secret), 100, owner=os.geteuid() + 1)["note"] == "not written by the task's account"
    assert read_tail(str(secret), 4, owner=os.geteuid())["tail"] == "this"
