"""TES executors in images, through the scheduler's container runtime (the Apptainer stand-in over
bubblewrap, as in test_containers.py), and the pure parts of the steps script."""
from __future__ import annotations

import doctest
import subprocess
from pathlib import Path
from typing import Any

import pytest

from gateway import config as configuration
from gateway.app import create_app
from gateway.tes import request as tes
from gateway.tes import steps as tes_steps

from .conftest import cluster_env, writable_by_jobs
from .test_tes import call, create, shell, wait

STANDIN = Path(__file__).parent / "standin" / "apptainer"


def test_doctests() -> None:
    for module in (tes, tes_steps):
        failures, tried = doctest.testmod(module)
        assert tried > 0 and failures == 0, module.__name__


def test_steps_script_quotes_every_value(tmp_path: Path) -> None:
    """Values full of shell syntax reach the executor, the logs and the copies verbatim, unrun."""
    marker = tmp_path / "pwned"
    nasty = f"a'b\"c $(touch {marker}) `touch {marker}`; touch {marker}"
    argv = tes_steps.wrapper_argv(["/bin/sh", "-c", 'printf "%s|%s" "$1" "$V"', "sh", nasty], None, None, None, None,
                                  {"V": nasty})
    tes_dir = tmp_path / "tes"
    script = tes_steps.render("t1", str(tes_dir), str(tes_dir / "root"), ["/tmp", f"/data/{nasty}"], [],
                              [tes_steps.Step(nasty, argv, False)],
                              [tes_steps.Transfer(f"outputs[0] {nasty}", str(tmp_path / nasty), f"/data/{nasty}/out")],
                              ["/tmp", "/data"])
    (tmp_path / "steps.sh").write_text(script)
    result = subprocess.run(["bash", str(tmp_path / "steps.sh")], capture_output=True, text=True)
    assert result.returncode == 1, result.stderr  # the output is missing: that fails the task
    assert (tes_dir / "exec" / "0.stdout").read_text() == f"{nasty}|{nasty}"
    assert (tes_dir / "root" / "data" / nasty).is_dir()
    assert f"outputs[0] {nasty}: {tes_dir}/root/data/{nasty}/out does not exist" in (tes_dir / "system.log").read_text()
    assert not marker.exists()


@pytest.fixture
async def image_client(aiohttp_client: Any, tmp_path: Path, rootfs: Path) -> Any:
    document = {
        "gateway": {"state_dir": str(tmp_path / "state")},
        "scheduler": {"type": "local", "poll_interval": 0.1, "container": {
            "runtime": "apptainer", "command": str(STANDIN), "allowed_images": ["local/busybox"],
            "image_rules": [{"match": "local/busybox", "image": str(rootfs)}]}},
        "tes": {"images": [{"match": "busybox*", "image": "local/busybox"},
                           {"match": "ubuntu", "image": "local/ubuntu"},
                           {"match": "python:*", "run": "host"}]},
        "paths": {"roots": [str(tmp_path)]},  # file:// outputs may go to the test's folder (jobs: nobody, as root)
    }
    return await aiohttp_client(create_app(configuration.from_document(document, tmp_path, "test config")))


async def test_executors_in_an_image_see_their_private_paths(image_client: Any, tmp_path: Path) -> None:
    (tmp_path / "input.txt").write_text("from the host\n")
    script = ('cat /tmp/in/input.txt; echo "$GREETING from $(pwd)"; test -e /etc/debian_version || echo image;'
              ' echo result > /data/r.txt; env | grep -c JOBPROXY_TASK_ID; exit 0')
    writable_by_jobs(tmp_path / "out")
    task_id = await create(image_client, {
        "inputs": [{"url": f"file://{tmp_path}/input.txt", "path": "/tmp/in/input.txt"}],
        "outputs": [{"url": f"file://{tmp_path}/out/r.txt", "path": "/data/r.txt"}],
        "executors": [{"image": "busybox:1.36", "command": ["/bin/sh", "-c", script], "workdir": "/tmp/in",
                       "env": {"GREETING": "hello"}},
                      {"image": "python:3.12",
                       "command": ["/bin/sh", "-c",
                                   "cat /tmp/in/input.txt; test -e /etc/debian_version && echo host"]}]})
    full = await wait(image_client, task_id)
    assert full["state"] == "COMPLETE", full
    first, second = full["logs"][0]["logs"]
    assert first["stdout"] == "from the host\nhello from /tmp/in\nimage\n0\n", first  # clean environment inside
    assert second["stdout"] == "from the host\nhost\n"  # /tmp is shared between the executors of one task
    assert (tmp_path / "out" / "r.txt").read_text() == "result\n"


async def test_the_runtime_policy_still_applies(image_client: Any) -> None:
    status, body = await call(image_client, "POST", "/ga4gh/tes/v1/tasks",
                              {"executors": [shell("true", image="ubuntu")]})
    assert status == 400 and body["details"][0]["path"] == "$.executors[0].image"
    assert "the image 'local/ubuntu' (for 'ubuntu') is refused" in body["error"] and "not allowed here" in body["error"]


@pytest.mark.docker
async def test_executors_in_docker(aiohttp_client: Any, tmp_path: Path) -> None:
    """The real Docker engine of etc/dev/docker.sh: binds, workdir, env, exit codes, no leftovers."""
    docker_host = cluster_env("docker")["DOCKER_HOST"]
    document = {
        "gateway": {"state_dir": str(tmp_path / "state")},
        "scheduler": {"type": "local", "poll_interval": 0.1, "container": {
            "runtime": "docker", "host": docker_host, "pull": "never", "allowed_images": ["jobproxy-test/*"]}},
        "tes": {"images": [{"match": "busybox*", "image": "jobproxy-test/busybox:latest"}]},
        # nobody may not use the engine: this site runs container jobs as root; outputs go to the test's folder
        "run_as": {"allow_root_jobs": True}, "paths": {"roots": [str(tmp_path)]},
    }
    client = await aiohttp_client(create_app(configuration.from_document(document, tmp_path, "test config")))
    (tmp_path / "in.txt").write_text("input\n")
    task_id = await create(client, {
        "inputs": [{"url": f"file://{tmp_path}/in.txt", "path": "/data/in.txt"},
                   {"path": "/tmp/run.sh", "content": 'echo "$WHO in $(pwd)"; cat in.txt; echo out > /data/out.txt'}],
        "outputs": [{"url": f"file://{tmp_path}/out.txt", "path": "/data/out.txt"}],
        "executors": [{"image": "busybox", "command": ["/bin/sh", "/tmp/run.sh"], "workdir": "/data",
                       "env": {"WHO": "docker"}},
                      {"image": "busybox:latest", "command": ["/bin/sh", "-c", "exit 5"]}]})
    full = await wait(client, task_id, timeout=60)
    assert full["state"] == "EXECUTOR_ERROR", full
    first, second = full["logs"][0]["logs"]
    assert first["stdout"] == "docker in /data\ninput\n" and second["exit_code"] == 5
    assert (tmp_path / "out.txt").read_text() == "out\n"
    listed = subprocess.run(["docker", "-H", docker_host, "ps", "--all", "--quiet", "--filter",
                             f"name=jobproxy-{task_id}"],
                            capture_output=True, text=True, check=True)
    assert listed.stdout.split() == []
