"""The GA4GH TES API through the aiohttp test client, on the local scheduler with executors run on
the host in bubblewrap sandboxes; every answer is checked against the OpenAPI document, whose TES
schemas allow only the fields of the TES schema."""
from __future__ import annotations

import asyncio
import http.server
import json
import os
import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from gateway import auth, output
from gateway import config as configuration
from gateway.app import create_app
from gateway.keys import STORE
from gateway.staging.stager import Stager
from gateway.tes import documents

from .conftest import IN_CI, Hold, final, wait_state, writable_by_jobs
from .openapi_check import check

TES = "/ga4gh/tes/v1"
TERMINAL = ("COMPLETE", "EXECUTOR_ERROR", "SYSTEM_ERROR", "CANCELED")
TOKENS = {"alice": "jp_alice-token", "bob": "jp_bob-token"}


def need_bwrap() -> None:
    if shutil.which("bwrap") is None:
        reason = "TES executors on the host need bubblewrap (bwrap); tests/run.sh installs it"
        if IN_CI:
            pytest.fail(reason)
        pytest.skip(reason)


def tes_config(tmp_path: Path, tes: dict[str, Any] | None = None, **sections: Any) -> configuration.Config:
    need_bwrap()
    document = {"gateway": {"state_dir": str(tmp_path / "state")},
                "scheduler": {"type": "local", "poll_interval": 0.1},
                "tes": tes if tes is not None else {"images": [{"match": "*", "run": "host"}]}, **sections}
    return configuration.from_document(document, tmp_path, "test config")


@pytest.fixture
async def tes_client(aiohttp_client: Any, tmp_path: Path) -> Any:
    """Auth off, jobs as `nobody` (when root); file:// outputs may go anywhere that account may write."""
    return await aiohttp_client(create_app(tes_config(tmp_path, {
        "images": [{"match": "ubuntu*", "run": "host"}, {"match": "python:*", "run": "host"}],
        "backend_parameters": ["cputime", "partition"]}, paths={"roots": ["/"]})))


async def call(client: Any, method: str, path: str, body: Any = None,
               headers: dict[str, str] | None = None) -> tuple[int, Any]:
    data = json.dumps(body) if body is not None else None
    response = await client.request(method, path, data=data,
                                    headers={"Content-Type": "application/json", **(headers or {})})
    raw = await response.read()
    check(method, path, response.status, response.headers.get("Content-Type", ""), raw)
    return response.status, json.loads(raw) if raw else None


async def create(client: Any, task: dict[str, Any], headers: dict[str, str] | None = None) -> str:
    status, body = await call(client, "POST", f"{TES}/tasks", task, headers)
    assert status == 200, body
    return str(body["id"])


async def wait(client: Any, task_id: str, view: str = "FULL", headers: dict[str, str] | None = None,
               timeout: float = 30) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status, body = await call(client, "GET", f"{TES}/tasks/{task_id}?view={view}", headers=headers)
        assert status == 200, body
        if body["state"] in TERMINAL:
            return dict(body)
        await asyncio.sleep(0.1)
    raise AssertionError(f"task {task_id} did not end in {timeout} s: {body}")


def shell(script: str, image: str = "ubuntu:22.04", **executor: Any) -> dict[str, Any]:
    return {"image": image, "command": ["/bin/bash", "-c", script], **executor}


# ---- service-info, validation --------------------------------------------------------------------


async def test_service_info_under_both_prefixes(tes_client: Any) -> None:
    for prefix in (TES, "/v1"):
        status, info = await call(tes_client, "GET", f"{prefix}/service-info")
        assert status == 200
        assert info["type"] == {"group": "org.ga4gh", "artifact": "tes", "version": "1.1.0"}
        assert info["storage"] == ["file:///"] and info["tesResources_backend_parameters"] == ["cputime", "partition"]
        assert {"id", "name", "organization", "version"} <= set(info)
    status, legacy = await call(tes_client, "GET", "/v1/tasks/service-info")
    assert status == 200 and legacy == {"name": "JobProxy", "doc": info["description"], "storage": ["file:///"]}


@pytest.mark.parametrize(("task", "path", "message"), [
    ({}, "$", "'executors' is required"),
    ({"executors": []}, "$.executors", "must not be empty"),
    ({"executors": [{"image": "ubuntu", "command": "echo"}]}, "$.executors[0].command", "must be of type array"),
    ({"executors": [shell("true", workdir="tmp")]}, "$.executors[0].workdir", "must be an absolute path"),
    ({"executors": [shell("true", env={"1X": "y"})]}, "$.executors[0].env", "must be a variable name"),
    ({"executors": [shell("true")], "inputs": [{"path": "/a:b", "content": "x"}]}, "$.inputs[0].path", "without ':'"),
    ({"executors": [shell("true")], "resources": {"ram_gb": 0}}, "$.resources.ram_gb", "must be > 0"),
    ({"executors": [shell("true")], "colour": "blue"}, "$", "unknown field(s): 'colour'"),
    ({"executors": [shell("true")], "tags": {"x": 1}}, "$.tags.x", "must be of type string"),
])
async def test_invalid_tasks_name_the_json_path(tes_client: Any, task: dict[str, Any], path: str, message: str) -> None:
    status, body = await call(tes_client, "POST", f"{TES}/tasks", task)
    assert status == 400, body
    assert any(d["path"] == path and message in d["message"] for d in body["details"]), body


RUN = [shell("true")]


@pytest.mark.parametrize(("task", "path", "message"), [
    ({"executors": [shell("true", image="centos:7")]}, "$.executors[0].image",
     "the image 'centos:7' is not allowed here (allowed: ubuntu*, python:*)"),
    ({"executors": RUN, "inputs": [{"path": "/data/x", "url": "gs://bucket/x"}]}, "$.inputs[0].url",
     "'gs://bucket/x': this gateway supports these URL schemes here: file, http, https, s3"),
    ({"executors": RUN, "inputs": [{"path": "/data/x", "url": "file://otherhost/x"}]}, "$.inputs[0].url",
     "not a file:// URL of this machine"),
    ({"executors": RUN, "inputs": [{"path": "/data/x", "url": "file:///no/such/file"}]}, "$.inputs[0].url",
     "'/no/such/file' does not exist"),
    ({"executors": RUN, "inputs": [{"path": "/data/x"}]}, "$.inputs[0]", "needs a url or content"),
    ({"executors": RUN, "inputs": [{"path": "/data/x", "url": "file:///usr", "type": "FILE"}]}, "$.inputs[0].type",
     "is FILE, but '/usr' is a folder"),
    ({"executors": RUN, "outputs": [{"path": "/data/*.txt", "url": "file:///tmp/x"}]}, "$.outputs[0].path_prefix",
     "is required for a path with wildcards"),
    ({"executors": RUN, "outputs": [{"path": "/proc/x", "url": "file:///tmp/x"}]}, "$.outputs[0].path",
     "cannot be a task's own path"),
    ({"executors": [shell("true", stdout="/etc/out")]}, "$.executors[0].stdout", "must lie in /tmp"),
    ({"executors": RUN, "resources": {"backend_parameters": {"queue": "x"}, "backend_parameters_strict": True}},
     "$.resources.backend_parameters.queue", "not supported here (supported: cputime, partition)"),
    ({"executors": RUN, "tags": {"user": " "}}, "$.tags.user", "must name a user"),
    ({"executors": RUN, "resources": {"backend_parameters": {"cputime": "soon"}}},
     "$.resources.backend_parameters.cputime", "whole number of CPU seconds"),
])
async def test_refusals_name_the_json_path(tes_client: Any, task: dict[str, Any], path: str, message: str) -> None:
    status, body = await call(tes_client, "POST", f"{TES}/tasks", task)
    assert status == 400, body
    assert body["details"][0]["path"] == path and message in body["details"][0]["message"], body
    assert tes_client.server.app[STORE].count() == 0


async def test_not_json_is_refused(tes_client: Any) -> None:
    response = await tes_client.post(f"{TES}/tasks", data="{", headers={"Content-Type": "application/json"})
    assert response.status == 400 and "not valid JSON" in (await response.json())["error"]
    response = await tes_client.post(f"{TES}/tasks", data="[" * 40 + "]" * 40,
                                     headers={"Content-Type": "application/json"})
    assert response.status == 400 and "nests deeper" in (await response.json())["error"]
    response = await tes_client.post(f"{TES}/tasks", data="<task/>", headers={"Content-Type": "application/xml"})
    assert response.status == 415


# ---- running tasks -------------------------------------------------------------------------------


async def test_views_logs_and_the_same_state_in_both_apis(tes_client: Any) -> None:
    script = 'read line; echo "got $line in $(pwd) with $GREETING"; echo oops >&2'
    task_id = await create(tes_client, {
        "name": "views", "description": "d", "tags": {"project": "p1"},
        "inputs": [{"path": "/tmp/in/stdin.txt", "content": "one line\n"}],
        "resources": {"cpu_cores": 1, "ram_gb": 0.5, "disk_gb": 1.5, "preemptible": False, "zones": ["z"]},
        "executors": [shell(script, workdir="/tmp/in", stdin="/tmp/in/stdin.txt", env={"GREETING": "hi"}),
                      shell("echo to-file; echo err-file >&2", stdout="/tmp/logs/out.txt", stderr="/tmp/err.txt")]})
    full = await wait(tes_client, task_id)
    assert full["state"] == "COMPLETE", full
    log = full["logs"][0]
    assert [e["exit_code"] for e in log["logs"]] == [0, 0]
    assert log["logs"][0]["stdout"] == "got one line in /tmp/in with hi\n" and log["logs"][0]["stderr"] == "oops\n"
    assert (log["logs"][1]["stdout"], log["logs"][1]["stderr"]) == ("to-file\n", "err-file\n")
    assert log["start_time"] <= log["logs"][0]["start_time"] <= log["logs"][1]["end_time"] <= log["end_time"]
    assert log["metadata"] == {"user": "anonymous", "scheduler": "local", "description": "exit code 0",
                               "exit_code": "0"}
    assert full["tags"] == {"project": "p1"} and full["inputs"][0]["content"] == "one line\n"
    assert full["resources"]["zones"] == ["z"] and log["system_logs"] == []

    _, basic = await call(tes_client, "GET", f"{TES}/tasks/{task_id}?view=BASIC")
    assert "content" not in basic["inputs"][0] and "system_logs" not in basic["logs"][0]
    assert "stdout" not in basic["logs"][0]["logs"][0] and basic["logs"][0]["logs"][0]["exit_code"] == 0
    _, minimal = await call(tes_client, "GET", f"/v1/tasks/{task_id}")
    assert minimal == {"id": task_id, "state": "COMPLETE"}

    state = await wait_state(tes_client, task_id, final)
    assert (state["code"], state["user"], state["exit_code"]) == ("COMPLETE", "anonymous", 0)
    stored = tes_client.server.app[STORE].get(task_id).task
    assert (stored.cores, stored.memory, stored.cputime) == (1, 477, None)


async def test_views_that_read_files_do_so_off_the_event_loop(tes_client: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """BASIC and FULL read each task's files, maybe on a slow, shared file system: meanwhile the
    gateway answers other requests (`Hold`)."""
    task_id = await create(tes_client, {"executors": [shell("true")]})
    assert (await wait(tes_client, task_id))["state"] == "COMPLETE"
    for path in (f"{TES}/tasks/{task_id}?view=BASIC", f"{TES}/tasks?view=FULL"):
        hold = Hold("the task's files were being read")
        monkeypatch.setattr(documents, "read_tail", hold.wrap(output.read_tail))
        getting = asyncio.create_task(call(tes_client, "GET", path))
        assert await hold.ping_meanwhile(tes_client) == 200 and not getting.done()
        status, body = await getting
        assert status == 200 and "logs" in (body if "tasks" not in body else body["tasks"][0]), body


async def test_executors_stop_at_the_first_failure_unless_ignore_error(tes_client: Any) -> None:
    task_id = await create(tes_client, {"executors": [
        shell("exit 2", ignore_error=True), shell("echo second"), shell("exit 3"), shell("echo never")]})
    full = await wait(tes_client, task_id)
    assert full["state"] == "EXECUTOR_ERROR"
    assert [e["exit_code"] for e in full["logs"][0]["logs"]] == [2, 0, 3]
    assert (await wait_state(tes_client, task_id, final))["exit_code"] == 3
    only_ignored = await create(tes_client, {"executors": [shell("exit 4", ignore_error=True), shell("true")]})
    full = await wait(tes_client, only_ignored)
    assert full["state"] == "EXECUTOR_ERROR" and full["logs"][0]["metadata"]["exit_code"] == "4"


async def test_two_tasks_using_the_same_paths_do_not_collide(tes_client: Any) -> None:
    script = 'echo "$1" > /tmp/run.sh; sleep 1; cat /tmp/run.sh; ls /data'
    ids = [await create(tes_client, {"volumes": ["/data"], "executors": [
        {"image": "ubuntu", "command": ["/bin/bash", "-c", script, "sh", f"task {n}"]}]}) for n in (1, 2)]
    for n, task_id in enumerate(ids, start=1):
        full = await wait(tes_client, task_id)
        assert full["state"] == "COMPLETE" and full["logs"][0]["logs"][0]["stdout"] == f"task {n}\n", full
    assert not Path("/tmp/run.sh").exists() or "task" not in Path("/tmp/run.sh").read_text()


async def test_the_host_is_read_only_inside_the_sandbox(tes_client: Any, tmp_path: Path) -> None:
    script = f"touch {tmp_path}/x /usr/x || echo refused; test -x /bin/sh && echo has-sh"
    task_id = await create(tes_client, {"executors": [shell(script)]})
    full = await wait(tes_client, task_id)
    assert full["logs"][0]["logs"][0]["stdout"] == "refused\nhas-sh\n", full
    assert not (tmp_path / "x").exists()


async def test_file_inputs_and_outputs_with_folders(tes_client: Any, tmp_path: Path) -> None:
    (tmp_path / "in" / "sub").mkdir(parents=True)
    (tmp_path / "in" / "sub" / "a.txt").write_text("A\n")
    (tmp_path / "single.txt").write_text("S\n")
    out = writable_by_jobs(tmp_path / "results")
    task_id = await create(tes_client, {
        "inputs": [{"url": f"file://{tmp_path}/in", "path": "/data/in", "type": "DIRECTORY"},
                   {"url": f"file://{tmp_path}/single.txt", "path": "/tmp/single.txt"}],
        "outputs": [{"url": f"file://{out}/sum.txt", "path": "/data/out/sum.txt"},
                    {"url": f"file://{out}/folder", "path": "/data/outdir", "type": "DIRECTORY"}],
        "executors": [shell("cat /data/in/sub/a.txt /tmp/single.txt > /data/out/sum.txt; "
                            "mkdir -p /data/outdir/deep; echo D > /data/outdir/deep/d.txt")]})
    full = await wait(tes_client, task_id)
    assert full["state"] == "COMPLETE", full
    assert (out / "sum.txt").read_text() == "A\nS\n" and (out / "folder" / "deep" / "d.txt").read_text() == "D\n"
    assert full["logs"][0]["outputs"] == [
        {"url": f"file://{out}/sum.txt", "path": "/data/out/sum.txt", "size_bytes": "4"},
        {"url": f"file://{out}/folder", "path": "/data/outdir", "size_bytes": "2"}]
    assert (tmp_path / "in" / "sub" / "a.txt").read_text() == "A\n"


async def test_a_missing_output_fails_the_task_and_says_why(tes_client: Any, tmp_path: Path) -> None:
    task_id = await create(tes_client, {"outputs": [{"url": f"file://{tmp_path}/never.txt", "path": "/tmp/never.txt"}],
                                        "executors": [shell("true")]})
    full = await wait(tes_client, task_id)
    assert full["state"] == "EXECUTOR_ERROR" and full["logs"][0]["outputs"] == []
    assert any("outputs[0]" in line and "does not exist" in line for line in full["logs"][0]["system_logs"]), full


async def test_backend_parameters(tes_client: Any) -> None:
    task_id = await create(tes_client, {"executors": [shell("true")], "resources": {
        "backend_parameters": {"cputime": "30", "partition": "long", "gpu": "1"}}})
    full = await wait(tes_client, task_id)
    assert full["state"] == "COMPLETE"
    assert full["logs"][0]["system_logs"] == ["backend parameter 'gpu' ignored: not supported here"]
    task = tes_client.server.app[STORE].get(task_id).task
    assert task.cputime == 30 and task.backend_parameters == {"partition": "long"}


async def test_cancel_running_and_ended_tasks(tes_client: Any) -> None:
    task_id = await create(tes_client, {"executors": [shell("sleep 60")]})
    await wait_state(tes_client, task_id, lambda s: s["code"] == "RUNNING")
    status, body = await call(tes_client, "POST", f"{TES}/tasks/{task_id}:cancel")
    assert (status, body) == (200, {})
    assert (await wait(tes_client, task_id, "MINIMAL"))["state"] == "CANCELED"
    assert (await wait_state(tes_client, task_id, final))["code"] == "CANCELED"
    status, _ = await call(tes_client, "POST", f"/v1/tasks/{task_id}:cancel")
    assert status == 200
    status, body = await call(tes_client, "POST", f"{TES}/tasks/nosuchtask:cancel")
    assert status == 404


async def test_v1_tasks_are_visible_through_tes(tes_client: Any) -> None:
    response = await tes_client.post("/v1/jobproxy/submit",
                                     json={"user": "carol", "cmd": ["/bin/echo", "v1"], "cores": 1})
    task_id = (await response.json())["id"]
    state = await wait_state(tes_client, task_id, final)
    full = await wait(tes_client, task_id)
    assert full["state"] == state["code"] == "COMPLETE"
    assert full["executors"] == [{"image": "", "command": ["/bin/echo", "v1"]}] and "tags" not in full
    assert full["logs"][0]["logs"] == [{"exit_code": 0, "start_time": state["started"], "end_time": state["finished"],
                                        "stdout": "v1\n", "stderr": ""}]


# ---- listing -------------------------------------------------------------------------------------


async def test_list_pages_newest_first_with_filters(tes_client: Any) -> None:
    ids = []
    for n in range(5):
        ids.append(await create(tes_client, {"name": f"{'even' if n % 2 == 0 else 'odd'}-{n}",
                                             "tags": {"n": str(n), **({"flag": ""} if n == 4 else {})},
                                             "executors": [shell("exit 1" if n == 3 else "true")]}))
    for task_id in ids:
        await wait(tes_client, task_id, "MINIMAL")
    walked, token = [], ""
    while True:
        status, page = await call(tes_client, "GET", f"{TES}/tasks?page_size=2&page_token={token}")
        assert status == 200 and all(set(t) == {"id", "state"} for t in page["tasks"])
        walked += [t["id"] for t in page["tasks"]]
        if "next_page_token" not in page:
            break
        token = page["next_page_token"]
        assert str(int(ids[0], 16))[:3] not in token  # opaque: not the seq or the id
    assert walked == ids[::-1]

    async def listed(query: str) -> list[str]:
        status, page = await call(tes_client, "GET", f"/v1/tasks?{query}")
        assert status == 200, page
        return [t["id"] for t in page["tasks"]]

    assert await listed("name_prefix=even") == [ids[4], ids[2], ids[0]]
    assert await listed("name_prefix=EVEN") == []
    assert await listed("state=EXECUTOR_ERROR") == [ids[3]]
    assert await listed("tag_key=n&tag_value=1") == [ids[1]]
    assert await listed("tag_key=flag") == [ids[4]]
    assert await listed("tag_key=n&tag_value=2&tag_key=flag") == []
    assert await listed("tag_key=n&name_prefix=odd") == [ids[3], ids[1]]
    assert await listed("tag_key=user") == []  # the owner is no tag: tags are the client's own
    status, page = await call(tes_client, "GET", f"{TES}/tasks?view=BASIC&page_size=1")
    assert page["tasks"][0]["name"] == "even-4" and "logs" in page["tasks"][0]


@pytest.mark.parametrize(("query", "path"), [
    ("page_size=2048", "page_size"), ("page_size=0", "page_size"), ("page_token=abc", "page_token"),
    ("state=DONE", "state"), ("view=ALL", "view"), ("tag_value=x", "tag_value"),
])
async def test_bad_list_queries(tes_client: Any, query: str, path: str) -> None:
    status, body = await call(tes_client, "GET", f"{TES}/tasks?{query}")
    assert status == 400 and body["details"][0]["path"] == path, body


# ---- users ---------------------------------------------------------------------------------------


async def test_owners_with_auth(aiohttp_client: Any, tmp_path: Path) -> None:
    tokens = [{"user": user, "sha256": auth.hash_token(token)} for user, token in TOKENS.items()]
    client = await aiohttp_client(create_app(tes_config(tmp_path, auth={"enabled": True, "tokens": tokens})))
    alice, bob = ({"Authorization": f"Bearer {TOKENS[u]}"} for u in ("alice", "bob"))
    task_id = await create(client, {"executors": [shell("true")]}, alice)
    alices = await wait(client, task_id, headers=alice)
    assert "tags" not in alices and alices["logs"][0]["metadata"]["user"] == "alice"
    for method, path in (("GET", f"{TES}/tasks/{task_id}"), ("POST", f"{TES}/tasks/{task_id}:cancel")):
        status, _ = await call(client, method, path, headers=bob)
        assert status == 404
    status, page = await call(client, "GET", f"{TES}/tasks", headers=bob)
    assert page == {"tasks": []}
    status, body = await call(client, "POST", f"{TES}/tasks",
                              {"tags": {"user": "alice"}, "executors": [shell("true")]}, bob)
    assert status == 403 and "only for yourself" in body["error"]
    status, _ = await call(client, "GET", f"{TES}/tasks")
    assert status == 401
    status, _ = await call(client, "GET", f"{TES}/service-info")
    assert status == 200


async def test_auth_off_user_from_tags(tes_client: Any) -> None:
    tags = {"user": "dave", "a": "1", "b": "2", "c": "3"}
    task_id = await create(tes_client, {"tags": tags, "executors": [shell("true")]})
    assert (await wait_state(tes_client, task_id, final))["user"] == "dave"
    assert (await wait(tes_client, task_id))["tags"] == tags  # four tags stay four


# ---- configuration -------------------------------------------------------------------------------


@pytest.mark.parametrize(("tes", "message"), [
    ({"images": [{"match": "*"}]}, r"\$\.tes\.images\[0\]: give exactly one of"),
    ({"images": [{"match": "*", "run": "host", "image": "x"}]}, r"\$\.tes\.images\[0\]: give exactly one of"),
    ({"images": [{"match": "*", "image": "busybox"}]}, r"\$\.tes\.images\[0\]: image rules need a container runtime"),
    ({"images": [{"match": "*", "run": "docker"}]}, r"\$\.tes\.images\[0\]\.run: must be one of 'host'"),
    ({"host_writable": ["relative"]}, r"\$\.tes\.host_writable\[0\]: must be an absolute path"),
    ({"url_schemes": {"file": {"get": ["cp", "{url}", "{path}"]}}}, r"\$\.tes\.url_schemes: file:// is built in"),
    ({"url_schemes": {"https": {}}}, r"\$\.tes\.url_schemes\.https: "),
])
def test_tes_config_mistakes_stop_the_start(tmp_path: Path, tes: dict[str, Any], message: str) -> None:
    with pytest.raises(configuration.ConfigError, match=message):
        tes_config(tmp_path, tes)


async def test_outputs_never_follow_links_out_of_the_task(tes_client: Any, tmp_path: Path) -> None:
    secret = tmp_path / "secret.txt"
    secret.write_text("not yours\n")
    drop = writable_by_jobs(tmp_path / "drop")
    task_id = await create(tes_client, {
        "inputs": [{"url": f"file://{secret}", "path": "/tmp/in/secret.txt"}],
        "outputs": [{"url": f"file://{drop}/leak.txt", "path": "/tmp/out/leak.txt"},
                    {"url": f"file://{drop}/leakdir", "path": "/tmp/outdir", "type": "DIRECTORY"}],
        "executors": [shell(f"ln -s {secret} /tmp/out/leak.txt; mkdir /tmp/outdir; ln -s {secret} /tmp/outdir/link")]})
    full = await wait(tes_client, task_id)
    assert full["state"] == "EXECUTOR_ERROR"
    assert any("is a symbolic link" in line for line in full["logs"][0]["system_logs"]), full
    assert not (drop / "leak.txt").exists()
    assert (drop / "leakdir" / "link").is_symlink()  # copied as the link it is, not its target's content


async def test_store_name_and_tag_filters_are_exact(tmp_path: Path) -> None:
    """name_prefix is a plain, case-sensitive prefix (no LIKE wildcards); tags match key and value."""
    from gateway.store import Store
    from schedulers.base import Task

    store = Store(tmp_path / "s.db")
    names = ["a%b", "abc", "a_c", "Ä-x", "b"]
    for n, name in enumerate(names):
        await store.add(Task(id=f"t{n}", user="u", workdir="/w", stdout="/o", stderr="/e", name=name,
                             tags={"k": name}), "local")
    await store.add(Task(id="v1", user="u", workdir="/w", stdout="/o", stderr="/e"), "local")

    def ids(**filters: Any) -> list[str]:
        return [r.id for r in store.page(newest_first=True, **filters)]

    assert ids(name_prefix="a%") == ["t0"]
    assert ids(name_prefix="a_") == ["t2"]
    assert ids(name_prefix="Ä") == ["t3"]
    assert ids(tags=[("k", "abc")]) == ["t1"]
    assert ids(tags=[("k", None)]) == ["t4", "t3", "t2", "t1", "t0"]
    assert ids(before=store.get("t2").seq) == ["t1", "t0"]  # type: ignore[union-attr]
    assert [r.id for r in store.page()] == ["t0", "t1", "t2", "t3", "t4", "v1"]  # the default order is unchanged
    store.close()


def test_host_rules_need_bubblewrap_on_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # a PATH on which there is no bwrap
    with pytest.raises(configuration.ConfigError,
                       match=r"\$\.tes\.images\[1\]: running images on the host needs bubblewrap"):
        configuration.from_document({"scheduler": {"container": {"runtime": "docker"}}, "tes": {"images": [
            {"match": "a", "image": "b"}, {"match": "*", "run": "host"}]}}, tmp_path, "t")


async def test_the_sandbox_has_what_programs_expect(tes_client: Any) -> None:
    script = ("touch /dev/shm/x && echo shm; echo x > /dev/null && echo null; "
              "test -r /proc/self/status && echo proc; echo $PATH")
    task_id = await create(tes_client, {"executors": [shell(script)]})
    full = await wait(tes_client, task_id)
    assert full["logs"][0]["logs"][0]["stdout"].split("\n")[:3] == ["shm", "null", "proc"], full


@pytest.fixture
def web_folder(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """A real HTTP server on loopback: GET serves a folder, PUT stores the body there."""
    served = tmp_path / "served"
    served.mkdir()

    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, directory=str(served), **kwargs)

        def do_PUT(self) -> None:
            (served / self.path.lstrip("/")).write_bytes(self.rfile.read(int(self.headers["Content-Length"])))
            self.send_response(201)
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}", served
    server.shutdown()


async def test_url_schemes_the_site_enables(aiohttp_client: Any, tmp_path: Path, web_folder: tuple[str, Path]) -> None:
    if shutil.which("curl") is None:
        pytest.skip("needs curl")
    url, served = web_folder
    (served / "in.txt").write_text("over http\n")
    client = await aiohttp_client(create_app(tes_config(tmp_path, {
        "images": [{"match": "*", "run": "host"}],
        "url_schemes": {"http": {"get": ["curl", "-fsS", "-o", "{path}", "{url}"],
                                 "put": ["curl", "-fsS", "-T", "{path}", "{url}"]}}})))
    task_id = await create(client, {
        "inputs": [{"url": f"{url}/in.txt", "path": "/data/in/in.txt"}],
        "outputs": [{"url": f"{url}/out.txt", "path": "/data/out.txt"}],
        "executors": [shell("tr a-z A-Z < /data/in/in.txt > /data/out.txt")]})
    full = await wait(client, task_id)
    assert full["state"] == "COMPLETE", full
    assert (served / "out.txt").read_text() == "OVER HTTP\n"
    assert full["logs"][0]["outputs"] == [{"url": f"{url}/out.txt", "path": "/data/out.txt", "size_bytes": "10"}]

    missing = await create(client, {"inputs": [{"url": f"{url}/nothing.txt", "path": "/data/x"}],
                                    "executors": [shell("true")]})
    full = await wait(client, missing)
    assert full["state"] == "EXECUTOR_ERROR" and full["logs"][0]["logs"] == []
    assert any(f"fetching {url}/nothing.txt failed" in line for line in full["logs"][0]["system_logs"]), full
    status, body = await call(client, "POST", f"{TES}/tasks",
                              {"inputs": [{"url": "gs://b/k", "path": "/x"}], "executors": RUN})
    assert status == 400 and body["details"][0] == {
        "path": "$.inputs[0].url",
        "message": "'gs://b/k': this gateway supports these URL schemes here: file, http, https, s3"}


async def test_staged_inputs_change_owner_off_the_event_loop(aiohttp_client: Any, tmp_path: Path,
                                                             web_folder: tuple[str, Path],
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """Inputs the gateway fetched are given to the job's account a file at a time: meanwhile the
    gateway answers other requests (`Hold`)."""
    if os.geteuid() != 0:
        pytest.skip("inputs change owner only when the gateway runs as root (as in CI)")
    url, served = web_folder
    (served / "in.txt").write_text("fetched by the gateway\n")
    client = await aiohttp_client(create_app(tes_config(
        tmp_path, staging={"schemes": ["http"], "http": {"allow_hosts": ["127.0.0.1"]}})))
    hold = Hold("the inputs changed owner")
    monkeypatch.setattr(Stager, "_give_to_job", hold.wrap(Stager._give_to_job))
    task_id = await create(client, {"inputs": [{"url": f"{url}/in.txt", "path": "/data/in.txt"}],
                                    "executors": [shell("cat /data/in.txt")]})
    assert await hold.ping_meanwhile(client) == 200
    full = await wait(client, task_id)
    assert full["state"] == "COMPLETE" and full["logs"][0]["logs"][0]["stdout"] == "fetched by the gateway\n", full


async def test_site_limits_name_the_tes_fields(aiohttp_client: Any, tmp_path: Path) -> None:
    client = await aiohttp_client(create_app(tes_config(tmp_path, limits={"memory": 100, "cputime": 60})))
    for resources, path in (({"ram_gb": 1}, "$.resources.ram_gb"), ({"backend_parameters": {"cputime": "61"}},
                                                                      "$.resources.backend_parameters.cputime")):
        status, body = await call(client, "POST", f"{TES}/tasks", {"resources": resources, "executors": RUN})
        assert status == 400 and body["details"][0]["path"] == path and body["error"].startswith(path), body
