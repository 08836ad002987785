"""Scheduler options and GPUs through both APIs, and live executor logs, on the local scheduler
with a fake list of GPU ids (aiohttp test client; every answer checked against the OpenAPI
document)."""
from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import pytest

from gateway.app import create_app
from gateway.keys import STORE

from .conftest import final, wait_state
from .test_tes import TES, call, create, shell, tes_config, wait

DEFAULTS = ["cputime", "gpus", "slurm.partition", "slurm.account", "slurm.qos", "slurm.constraint",
            "slurm.reservation", "sge.queue", "sge.project"]


@pytest.fixture
async def gpu_client(aiohttp_client: Any, tmp_path: Path) -> Any:
    """The site's default backend parameters; the local scheduler has two fake GPUs."""
    config = tes_config(tmp_path, {"images": [{"match": "*", "run": "host"}]},
                        scheduler={"type": "local", "poll_interval": 0.1, "options": {"gpus": ["3", "5"]}})
    return await aiohttp_client(create_app(config))


async def test_service_info_advertises_the_sites_parameters(gpu_client: Any) -> None:
    _, info = await call(gpu_client, "GET", f"{TES}/service-info")
    assert info["tesResources_backend_parameters"] == DEFAULTS


async def test_backend_parameters_reach_the_task(gpu_client: Any) -> None:
    task_id = await create(gpu_client, {
        "resources": {"backend_parameters": {"gpus": "2", "slurm.partition": "long", "sge.queue": "gpu.q",
                                             "nodes": "4"}},
        "executors": [shell('echo "$CUDA_VISIBLE_DEVICES"')]})
    full = await wait(gpu_client, task_id)
    assert full["state"] == "COMPLETE", full
    log = full["logs"][0]
    assert log["logs"][0]["stdout"] == "3,5\n"
    assert log["system_logs"] == ["backend parameter 'nodes' ignored: not supported here"]
    assert full["resources"]["backend_parameters"]["nodes"] == "4"  # the request as received
    stored = gpu_client.server.app[STORE].get(task_id).task
    assert stored.gpus == 2 and stored.backend_parameters == {"slurm.partition": "long", "sge.queue": "gpu.q"}


@pytest.mark.parametrize("parameters, strict, path, words", [
    ({"nodes": "4"}, True, "$.resources.backend_parameters.nodes", "not supported here"),
    ({"slurm.partition": "a b"}, False, "$.resources.backend_parameters.slurm.partition", "separated by commas"),
    ({"sge.project": "$(id)"}, False, "$.resources.backend_parameters.sge.project", "a name of"),
    ({"gpus": "-1"}, False, "$.resources.backend_parameters.gpus", "whole number of GPUs"),
    ({"gpus": "3"}, False, "$.resources.backend_parameters.gpus", "this scheduler has 2 in all"),
])
async def test_bad_backend_parameters(gpu_client: Any, parameters: dict[str, str], strict: bool, path: str,
                                      words: str) -> None:
    status, body = await call(gpu_client, "POST", f"{TES}/tasks", {
        "resources": {"backend_parameters": parameters, "backend_parameters_strict": strict},
        "executors": [shell("true")]})
    assert status == 400 and body["details"][0]["path"] == path and words in body["error"], body


async def test_v1_options_and_gpus_json_and_xml(gpu_client: Any) -> None:
    response = await gpu_client.post("/v1/jobproxy/submit", json={
        "user": "u", "cmd": 'echo "$CUDA_VISIBLE_DEVICES"', "gpus": 1, "options": {"slurm.qos": "high"}})
    assert response.status == 200, await response.text()
    task_id = (await response.json())["id"]
    state = await wait_state(gpu_client, task_id, final)
    assert state["code"] == "COMPLETE" and Path(state["stdout"]).read_text() in ("3\n", "5\n")
    xml = ("<task><user>u</user><cmd>true</cmd><gpus>2</gpus>"
           "<options><slurm.partition>long</slurm.partition><sge.queue>all.q@n1</sge.queue></options></task>")
    response = await gpu_client.post("/v1/jobproxy/submit", data=xml, headers={"Content-Type": "application/xml"})
    assert response.status == 200, await response.text()
    xml_id = (await response.json())["id"]
    stored = gpu_client.server.app[STORE].get(xml_id).task
    assert stored.gpus == 2 and stored.backend_parameters == {"slurm.partition": "long", "sge.queue": "all.q@n1"}
    shown = await (await gpu_client.get(f"/v1/jobproxy/task/{xml_id}")).json()
    assert (shown["gpus"], shown["options"]) == (2, {"slurm.partition": "long", "sge.queue": "all.q@n1"})
    for document, path in (({"gpus": 3}, "$.gpus"), ({"options": {"slurm.qos": "a;b"}}, "$.options"),
                           ({"options": {"slurm.nodes": "2"}}, "$.options")):
        response = await gpu_client.post("/v1/jobproxy/submit", json={"user": "u", "cmd": "true", **document})
        body = await response.json()
        assert response.status == 400 and body["details"][0]["path"].startswith(path), body


async def test_options_the_site_does_not_allow(aiohttp_client: Any, tmp_path: Path) -> None:
    client = await aiohttp_client(create_app(tes_config(
        tmp_path, {"images": [{"match": "*", "run": "host"}], "backend_parameters": ["cputime", "slurm.partition"]},
        limits={"gpus": 0})))
    response = await client.post("/v1/jobproxy/submit", json={"user": "u", "cmd": "true",
                                                               "options": {"slurm.qos": "high"}})
    body = await response.json()
    assert response.status == 400 and body["details"][0]["path"] == "$.options.slurm.qos", body
    assert "allowed: slurm.partition" in body["error"]
    response = await client.post("/v1/jobproxy/submit", json={"user": "u", "cmd": "true", "gpus": 1})
    body = await response.json()
    assert response.status == 400 and body["details"][0]["path"] == "$.gpus" and "limit of 0 GPUs" in body["error"]
    _, info = await call(client, "GET", f"{TES}/service-info")
    assert info["tesResources_backend_parameters"] == ["cputime", "slurm.partition"]


# ---- live executor logs --------------------------------------------------------------------------


async def _until(client: Any, path: str, check: Any, timeout: float = 30) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        status, body = await call(client, "GET", path)
        assert status == 200, body
        if check(body):
            return dict(body)
        assert time.monotonic() < deadline, body
        await asyncio.sleep(0.1)


async def test_a_running_executor_has_its_log_and_output_so_far(gpu_client: Any) -> None:
    # (the sandbox shows the host read-only, and /tmp is the task's own: no file can tell it to go on)
    task_id = await create(gpu_client, {"executors": [shell("echo first; echo oops >&2; sleep 6; echo done"),
                                                      shell("echo second")]})
    running = await _until(gpu_client, f"{TES}/tasks/{task_id}?view=FULL",
                           lambda b: b["logs"][0]["logs"] and b["logs"][0]["logs"][0].get("stdout"))
    [entry] = running["logs"][0]["logs"]  # the second executor has not started: no entry
    assert running["state"] == "RUNNING" and entry["start_time"] and "exit_code" not in entry
    assert "end_time" not in entry and (entry["stdout"], entry["stderr"]) == ("first\n", "oops\n")
    _, basic = await call(gpu_client, "GET", f"{TES}/tasks/{task_id}?view=BASIC")
    assert basic["logs"][0]["logs"] == [{"start_time": entry["start_time"]}]
    full = await wait(gpu_client, task_id)
    first, second = full["logs"][0]["logs"]
    assert (first["exit_code"], first["stdout"], second["exit_code"], second["stdout"]) == (0, "first\ndone\n", 0,
                                                                                           "second\n")
    assert first["start_time"] == entry["start_time"] <= first["end_time"] <= second["start_time"]


async def test_a_running_v1_task_shows_its_output_so_far(gpu_client: Any, tmp_path: Path) -> None:
    go = tmp_path / "go"
    response = await gpu_client.post("/v1/jobproxy/submit", json={
        "user": "u", "cmd": f"echo early; while [ ! -e {go} ]; do sleep 0.1; done"})
    task_id = (await response.json())["id"]
    running = await _until(gpu_client, f"{TES}/tasks/{task_id}?view=FULL",
                           lambda b: b["logs"][0]["logs"] and b["logs"][0]["logs"][0].get("stdout"))
    [entry] = running["logs"][0]["logs"]
    assert entry["stdout"] == "early\n" and entry["start_time"] and "exit_code" not in entry
    go.write_text("")
    done = await wait(gpu_client, task_id)
    assert done["logs"][0]["logs"][0]["exit_code"] == 0 and done["logs"][0]["logs"][0]["end_time"]


async def test_output_replaced_by_a_symlink_is_not_followed(gpu_client: Any, tmp_path: Path) -> None:
    secret = tmp_path / "secret.txt"
    secret.write_text("not for the task's owner\n")
    task_id = await create(gpu_client, {"executors": [shell(
        f"echo mine; rm /tmp/out.txt; ln -s {secret} /tmp/out.txt", stdout="/tmp/out.txt")]})
    full = await wait(gpu_client, task_id)
    assert full["state"] == "COMPLETE" and full["logs"][0]["logs"][0]["stdout"] == "", full
