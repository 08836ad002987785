"""The audit log: one line per accepted submit, cancel and delete through both APIs, as JSON lines
in a file, as JSON lines on stderr, or as text with the other log lines."""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import pytest

from gateway import audit, auth
from gateway import config as configuration
from gateway.app import create_app
from gateway.idempotency import HEADER

from .conftest import final, make_config, wait_state
from .test_tes import TES, shell, tes_config

TOKENS = {"alice": "jp_alice-token", "bob": "jp_bob-token"}
ALICE, BOB = ({"Authorization": f"Bearer {TOKENS[u]}", "Content-Type": "application/json"} for u in ("alice", "bob"))


def auth_section() -> dict[str, Any]:
    return {"enabled": True, "tokens": [{"user": "alice", "sha256": auth.hash_token(TOKENS["alice"]), "admin": True},
                                        {"user": "bob", "sha256": auth.hash_token(TOKENS["bob"])}]}


async def post(client: Any, path: str, body: Any, headers: dict[str, str]) -> tuple[int, Any]:
    response = await client.post(path, data=json.dumps(body), headers=headers)
    return response.status, await response.json()


def lines(path: Path) -> list[dict[str, Any]]:
    entries = [json.loads(line) for line in path.read_text().splitlines()]
    for entry in entries:
        assert tuple(entry) == audit.KEYS, f"an audit line's keys are not the documented ones: {entry}"
    return entries


def without_time(entries: list[dict[str, Any]]) -> list[dict[str, Any]]:
    for entry in entries:
        assert entry["time"].endswith("Z") and len(entry["time"]) == len("2026-12-01T08:00:00.123Z")
    return [{k: v for k, v in entry.items() if k != "time"} for entry in entries]


async def test_json_lines_for_submit_cancel_and_delete_through_both_apis(aiohttp_client: Any, tmp_path: Path) -> None:
    log_file = tmp_path / "logs" / "audit.jsonl"
    config = tes_config(tmp_path, auth=auth_section(), log={"audit": "json", "audit_file": "logs/audit.jsonl"})
    client = await aiohttp_client(create_app(config))

    status, body = await post(client, "/v1/jobproxy/submit", {"user": "bob", "cmd": "sleep 300"}, ALICE)
    assert status == 200
    v1_task = body["id"]
    response = await client.delete(f"/v1/jobproxy/delete/{v1_task}", headers=ALICE)
    assert response.status == 204
    keyed = {**BOB, HEADER: "key-1"}
    first = await post(client, "/v1/jobproxy/submit", {"user": "bob", "cmd": "true"}, keyed)
    again = await post(client, "/v1/jobproxy/submit", {"user": "bob", "cmd": "true"}, keyed)
    assert first[0] == again[0] == 200 and first[1]["id"] == again[1]["id"]
    keyed_task = first[1]["id"]
    status, body = await post(client, "/v1/jobproxy/submit", {"user": "alice", "cmd": "true"}, BOB)
    assert status == 403  # refused: not audited
    status, body = await post(client, f"{TES}/tasks", {"executors": [shell("sleep 300")]}, BOB)
    assert status == 200
    tes_task = body["id"]
    status, _ = await post(client, f"{TES}/tasks/{tes_task}:cancel", {}, BOB)
    assert status == 200

    local = {"source": "127.0.0.1", "replayed": False}
    assert without_time(lines(log_file)) == [
        {"action": "submit", "caller": "alice", "user": "bob", "task": v1_task, "api": "v1", **local},
        {"action": "cancel", "caller": "alice", "user": "bob", "task": v1_task, "api": "v1", **local},
        {"action": "delete", "caller": "alice", "user": "bob", "task": v1_task, "api": "v1", **local},
        {"action": "submit", "caller": "bob", "user": "bob", "task": keyed_task, "api": "v1", **local},
        {"action": "submit", "caller": "bob", "user": "bob", "task": keyed_task, "api": "v1",
         "source": "127.0.0.1", "replayed": True},
        {"action": "submit", "caller": "bob", "user": "bob", "task": tes_task, "api": "tes", **local},
        {"action": "cancel", "caller": "bob", "user": "bob", "task": tes_task, "api": "tes", **local},
    ]


async def test_deleting_a_finished_task_is_one_delete_line(aiohttp_client: Any, tmp_path: Path,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    """JSON lines without a file: on stderr, one object a line; auth off: no caller."""
    document = {"gateway": {"state_dir": "state"}, "scheduler": {"type": "local", "poll_interval": 0.1},
                "log": {"audit": "json"}}
    client = await aiohttp_client(create_app(configuration.from_document(document, tmp_path, "test config")))
    status, body = await post(client, "/v1/jobproxy/submit", {"user": "carol", "cmd": "true"},
                              {"Content-Type": "application/json"})
    assert status == 200
    await wait_state(client, body["id"], final)
    assert (await client.delete(f"/v1/jobproxy/delete/{body['id']}")).status == 204
    printed = [json.loads(line) for line in capsys.readouterr().err.splitlines() if line.startswith("{")]
    assert [(e["action"], e["caller"], e["user"], e["task"]) for e in printed] == [
        ("submit", None, "carol", body["id"]), ("delete", None, "carol", body["id"])]


class Kept(logging.Handler):
    """Keeps the records it is given."""

    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


async def test_text_lines_go_with_the_other_log_lines(aiohttp_client: Any, tmp_path: Path) -> None:
    """By default the audit lines reach the root logger's handlers, at INFO even if the root is at WARNING."""
    root, kept = logging.getLogger(), Kept()
    root.addHandler(kept)
    try:
        client = await aiohttp_client(create_app(make_config(tmp_path)))
        status, body = await post(client, "/v1/jobproxy/submit", {"user": "dave", "cmd": "true"},
                                  {"Content-Type": "application/json"})
    finally:
        root.removeHandler(kept)
    assert status == 200
    messages = [r.getMessage() for r in kept.records if r.name == "jobproxy.audit"]
    assert messages == [f"submit task {body['id']} for user dave by anyone (auth off) via v1 from 127.0.0.1"]
