"""The v1 API through the aiohttp test client, on the local scheduler; every answer is checked
against the OpenAPI document."""
from __future__ import annotations

import asyncio
import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import xmltodict
from aiohttp import web

from gateway import folders, retention, service
from gateway.app import create_app
from gateway.keys import STORE
from gateway.model import task_from_document

from .conftest import Hold, final, make_config, wait_state, writable_by_jobs
from .openapi_check import check

JSON = {"Content-Type": "application/json"}
XML = {"Content-Type": "application/xml"}


async def call(client: Any, method: str, path: str, **kwargs: Any) -> tuple[int, Any, str]:
    """One request; answers status, parsed body (JSON or XML dict, or text) and the content type."""
    response = await client.request(method, path, **kwargs)
    raw = await response.read()
    check(method, path, response.status, response.headers.get("Content-Type", ""), raw)
    kind = response.content_type
    if not raw:
        return response.status, None, kind
    if kind == "application/json":
        return response.status, json.loads(raw), kind
    if kind == "application/xml":
        return response.status, xmltodict.parse(raw), kind
    return response.status, raw.decode(), kind


async def submit(client: Any, task: dict[str, Any]) -> str:
    status, body, _ = await call(client, "POST", "/v1/jobproxy/submit", data=json.dumps(task), headers=JSON)
    assert status == 200, body
    return str(body["id"])


async def test_submit_json_then_state(client: Any) -> None:
    task_id = await submit(client, {"user": "alice", "cmd": "echo hello"})
    state = await wait_state(client, task_id, final)
    assert state["code"] == "COMPLETE" and state["exit_code"] == 0
    assert state["user"] == "alice" and state["scheduler"] == "local"
    assert state["created"] <= state["started"] <= state["finished"]
    assert Path(state["stdout"]).read_text() == "hello\n"
    status, body, _ = await call(client, "GET", f"/v1/jobproxy/state/{task_id}")
    assert status == 200 and body == state


async def test_submit_xml_answers_by_accept(client: Any) -> None:
    xml = "<task><user>bob</user><cmd><arg>/bin/echo</arg><arg>a b</arg></cmd><cores>1</cores></task>"
    status, _, kind = await call(client, "POST", "/v1/jobproxy/submit", data=xml, headers=XML)
    assert status == 200 and kind == "application/json"
    status, text, kind = await call(client, "POST", "/v1/jobproxy/submit", data=xml,
                                    headers={**XML, "Accept": "text/plain"})
    assert status == 200 and kind == "text/plain" and len(text) == 19
    status, doc, kind = await call(client, "POST", "/v1/jobproxy/submit", data=xml,
                                   headers={**XML, "Accept": "application/xml"})
    assert status == 200 and kind == "application/xml"
    task_id = doc["task"]["id"]
    await wait_state(client, task_id, final)
    status, doc, _ = await call(client, "GET", f"/v1/jobproxy/state/{task_id}", headers={"Accept": "application/xml"})
    assert doc["state"]["code"] == "COMPLETE" and doc["state"]["exit_code"] == "0"
    assert Path(doc["state"]["stdout"]).read_text() == "a b\n"


async def test_invalid_task_lists_every_problem(client: Any) -> None:
    bad = {"user": "alice", "cmd": "x", "cores": 0, "memory": "1G", "colour": "red"}
    status, body, _ = await call(client, "POST", "/v1/jobproxy/submit", data=json.dumps(bad), headers=JSON)
    assert status == 400
    assert {(d["path"], d["message"]) for d in body["details"]} >= {
        ("$.cores", "must be >= 1 (got 0)"),
        ("$.memory", "must be of type integer, not str"),
        ("$", "unknown field(s): 'colour'"),
    }


async def test_invalid_xml_errors_answer_in_xml(client: Any) -> None:
    xml = "<task><user>a</user><cmd>x</cmd><cores>many</cores></task>"
    status, doc, kind = await call(client, "POST", "/v1/jobproxy/submit", data=xml,
                                   headers={**XML, "Accept": "application/xml"})
    assert status == 400 and kind == "application/xml"
    assert doc["error"]["details"]["detail"]["path"] == "$.cores"


@pytest.mark.parametrize("body, headers, status, message", [
    ("{", JSON, 400, "not valid JSON"),
    ("<task><user>", XML, 400, "not valid XML"),
    ('<!DOCTYPE x [<!ENTITY a "b">]><task/>', XML, 400, "DOCTYPE"),
    ("<job><user>a</user></job>", XML, 400, "root element must be <task>"),
    ("user=alice", {"Content-Type": "application/x-www-form-urlencoded"}, 415, "unsupported Content-Type"),
    ("{}", {}, 415, "unsupported Content-Type"),
    (b"\xff\xfe", JSON, 400, "not UTF-8"),
])
async def test_unreadable_bodies(client: Any, body: Any, headers: dict[str, str], status: int, message: str) -> None:
    got, doc, _ = await call(client, "POST", "/v1/jobproxy/submit", data=body, headers=headers)
    assert got == status and message in doc["error"]


async def test_body_over_the_limit_is_413(aiohttp_client: Any, tmp_path: Path) -> None:
    client = await aiohttp_client(create_app(make_config(tmp_path, max_body_bytes=2048)))
    big = json.dumps({"user": "a", "cmd": "x" * 4096})
    status, doc, _ = await call(client, "POST", "/v1/jobproxy/submit", data=big, headers=JSON)
    assert status == 413 and "at most 2048 bytes" in doc["error"]


async def test_container_refused_without_runtime(client: Any) -> None:
    task = {"user": "a", "cmd": "true", "container": {"image": "busybox"}}
    status, doc, _ = await call(client, "POST", "/v1/jobproxy/submit", data=json.dumps(task), headers=JSON)
    assert status == 400 and "no container runtime" in doc["error"]
    _, listed, _ = await call(client, "GET", "/v1/jobproxy/state")
    assert listed["state"] == []


async def test_admission_refuses_more_than_the_total(aiohttp_client: Any, tmp_path: Path) -> None:
    client = await aiohttp_client(create_app(make_config(tmp_path, options={"cores": 1, "memory": 100})))
    for task, words in [({"cores": 2}, "2 cores"), ({"memory": 101}, "101 MiB")]:
        status, doc, _ = await call(client, "POST", "/v1/jobproxy/submit",
                                    data=json.dumps({"user": "a", "cmd": "true", **task}), headers=JSON)
        assert status == 400 and words in doc["error"]


async def test_missing_output_directory_is_refused(client: Any) -> None:
    task = {"user": "a", "cmd": "true", "stdout": "/nonexistent-dir/out"}
    status, doc, _ = await call(client, "POST", "/v1/jobproxy/submit", data=json.dumps(task), headers=JSON)
    assert status == 400 and "/nonexistent-dir" in doc["error"]


async def test_unknown_ids_and_routes(client: Any) -> None:
    status, doc, _ = await call(client, "GET", "/v1/jobproxy/state/nope")
    assert status == 404 and "nope" in doc["error"]
    status, doc, _ = await call(client, "DELETE", "/v1/jobproxy/delete/nope")
    assert status == 404
    response = await client.get("/v1/jobproxy/submit")
    assert response.status == 405 and "POST" in response.headers["Allow"]
    assert "not allowed" in (await response.json())["error"]
    response = await client.get("/v2/anything")
    assert response.status == 404 and (await response.json())["error"].startswith("no such resource")


async def test_delete_finished_task(client: Any) -> None:
    task_id = await submit(client, {"user": "a", "cmd": "true"})
    state = await wait_state(client, task_id, final)
    status, _, _ = await call(client, "DELETE", f"/v1/jobproxy/delete/{task_id}")
    assert status == 204
    status, _, _ = await call(client, "GET", f"/v1/jobproxy/state/{task_id}")
    assert status == 404
    assert not Path(state["stdout"]).parent.exists()


async def test_delete_removes_the_folder_off_the_event_loop(client: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """A folder with many files, or on a slow file system, takes long to remove: the gateway goes on
    answering meanwhile (`Hold`)."""
    task_id = await submit(client, {"user": "a", "cmd": "true"})
    state = await wait_state(client, task_id, final)
    hold = Hold("the task's folder was being removed")
    monkeypatch.setattr(service, "remove_task_folder", hold.wrap(retention.remove_task_folder))
    deleting = asyncio.create_task(call(client, "DELETE", f"/v1/jobproxy/delete/{task_id}"))
    assert await hold.ping_meanwhile(client) == 200 and not deleting.done()
    assert (await deleting)[0] == 204
    assert not Path(state["stdout"]).parent.exists()


async def test_a_listing_by_state_waits_for_the_changes_not_yet_committed(client: Any,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """GET state/{id} shows a change at once, the store has it with its next group commit: a listing
    by state waits for that commit rather than leave out a task already answered in that state."""
    store = client.server.app[STORE]
    task_id = await submit(client, {"user": "alice", "cmd": "sleep 0.3"})
    await wait_state(client, task_id, lambda s: s["code"] == "RUNNING")
    await store.flush()
    hold = Hold("the store committed the task's end")
    monkeypatch.setattr(store, "_transaction", hold.wrap(store._transaction))  # the next commit waits
    assert (await wait_state(client, task_id, final))["code"] == "COMPLETE"
    assert await asyncio.to_thread(hold.reached.wait, 20)
    listing = asyncio.create_task(call(client, "GET", "/v1/jobproxy/state?state=COMPLETE"))
    await asyncio.sleep(0.2)
    try:
        assert not listing.done()
    finally:
        hold.released.set()
    status, body, _ = await listing
    assert (status, [s["id"] for s in body["state"]]) == (200, [task_id])


async def test_queued_until_cores_free(aiohttp_client: Any, tmp_path: Path) -> None:
    client = await aiohttp_client(create_app(make_config(tmp_path, options={"cores": 1})))
    first = await submit(client, {"user": "a", "cmd": "sleep 30"})
    await wait_state(client, first, lambda s: s["code"] == "RUNNING")
    second = await submit(client, {"user": "a", "cmd": "true"})
    state = await wait_state(client, second, lambda s: s["code"] == "QUEUED" and "waiting" in s["description"])
    assert state["started"] is None
    await call(client, "DELETE", f"/v1/jobproxy/delete/{first}")
    assert (await wait_state(client, second, final))["code"] == "COMPLETE"


async def test_a_queued_task_gets_its_folder_when_its_job_starts(aiohttp_client: Any, tmp_path: Path) -> None:
    """The local scheduler makes a task's folder as the job starts: a queued task costs no file."""
    client = await aiohttp_client(create_app(make_config(tmp_path, options={"cores": 1})))
    first = await submit(client, {"user": "a", "cmd": "sleep 30"})
    await wait_state(client, first, lambda s: s["code"] == "RUNNING")
    second = await submit(client, {"user": "a", "cmd": "id -u; pwd"})
    state = await wait_state(client, second, lambda s: s["code"] == "QUEUED")
    folder = Path(state["stdout"]).parent
    assert not folder.exists()
    response = await client.get(f"/v1/jobproxy/logs/{second}")
    assert (response.status, await response.read()) == (200, b"")  # nothing written yet
    await call(client, "DELETE", f"/v1/jobproxy/delete/{first}")
    assert (await wait_state(client, second, final))["code"] == "COMPLETE"
    uid, cwd = Path(state["stdout"]).read_text().split()
    assert (cwd, folder.stat().st_uid, folder.stat().st_mode & 0o777) == (str(folder), int(uid), 0o700)


async def test_listing_filters_and_pages(client: Any) -> None:
    ids = [await submit(client, {"user": user, "cmd": code})
           for user, code in [("alice", "true"), ("bob", "exit 3"), ("alice", "exit 3"), ("alice", "true")]]
    for task_id in ids:
        await wait_state(client, task_id, final)
    _, body, _ = await call(client, "GET", "/v1/jobproxy/state?user=alice")
    assert [s["id"] for s in body["state"]] == [ids[0], ids[2], ids[3]]
    _, body, _ = await call(client, "GET", "/v1/jobproxy/state?state=EXECUTOR_ERROR")
    assert [s["id"] for s in body["state"]] == [ids[1], ids[2]]
    _, body, _ = await call(client, "GET", "/v1/jobproxy/state?user=alice&state=complete,executor_error")
    assert len(body["state"]) == 3
    walked, token = [], ""
    while True:
        _, body, _ = await call(client, "GET", f"/v1/jobproxy/state?page_size=3&page_token={token}")
        walked += [s["id"] for s in body["state"]]
        if "next_page_token" not in body:
            break
        token = body["next_page_token"]
    assert walked == ids
    _, doc, _ = await call(client, "GET", "/v1/jobproxy/state?page_size=2", headers={"Accept": "application/xml"})
    assert [s["id"] for s in doc["states"]["state"]] == ids[:2] and doc["states"]["next_page_token"]


@pytest.mark.parametrize("query, message", [
    ("state=DONE", "unknown state 'DONE'"),
    ("page_size=0", "page_size"),
    ("page_size=100001", "page_size"),
    ("page_token=abc", "page_token"),
])
async def test_bad_listing_queries(client: Any, query: str, message: str) -> None:
    status, body, _ = await call(client, "GET", f"/v1/jobproxy/state?{query}")
    assert status == 400 and message in body["error"]


async def test_ping_and_openapi(client: Any) -> None:
    status, body, _ = await call(client, "GET", "/v1/jobproxy/ping")
    assert status == 200 and body["status"] == "ok"
    status, text, _ = await call(client, "GET", "/v1/jobproxy/ping", headers={"Accept": "text/plain"})
    assert text == "pong"
    status, spec, _ = await call(client, "GET", "/v1/openapi.json")
    assert spec["openapi"].startswith("3.") and "/v1/jobproxy/submit" in spec["paths"]


async def test_unexpected_errors_are_500_without_trace(aiohttp_client: Any, config: Any) -> None:
    app = create_app(config)

    async def broken(_: web.Request) -> web.Response:
        raise RuntimeError("secret internals")

    app.router.add_get("/v1/broken", broken)
    client = await aiohttp_client(app)
    response = await client.get("/v1/broken")
    body = await response.text()
    assert response.status == 500 and "secret" not in body and "Traceback" not in body


async def test_scheduler_that_cannot_take_the_task_leaves_nothing(client: Any, config: Any) -> None:
    spool = Path(config.state_dir) / "schedulers" / "local"
    shutil.rmtree(spool, ignore_errors=True)
    spool.write_text("a file where the scheduler's folder should be")
    status, doc, _ = await call(client, "POST", "/v1/jobproxy/submit",
                                data=json.dumps({"user": "a", "cmd": "true"}), headers=JSON)
    assert status == 503 and "cannot write the job script" in doc["error"]
    _, listed, _ = await call(client, "GET", "/v1/jobproxy/state")
    assert listed["state"] == []
    assert [p for p in Path(config.task_root).iterdir() if not p.name.startswith(folders.PREFIX)] == []


async def test_task_recorded_but_never_submitted_is_recovered(aiohttp_client: Any, config: Any) -> None:
    """A crash between recording a task and handing it to the scheduler: the next start submits it."""
    from gateway.store import Store

    store = Store(config.store_path)
    workdir = writable_by_jobs(Path(config.task_root).resolve() / "orphan")  # as accept() leaves it
    await store.add(task_from_document({"user": "a", "cmd": "echo recovered"}, "orphan", str(workdir)), "local")
    store.close()
    client = await aiohttp_client(create_app(config))
    state = await wait_state(client, "orphan", final)
    assert state["code"] == "COMPLETE" and Path(state["stdout"]).read_text() == "recovered\n"
