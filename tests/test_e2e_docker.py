"""End to end with a real Docker engine (etc/dev/docker.sh) on the local scheduler."""
from __future__ import annotations

import json
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Callable

import pytest

from .conftest import Gateway, cluster_env, free_port

pytestmark = [pytest.mark.docker, pytest.mark.e2e]
IMAGE = "jobproxy-test/busybox:latest"


@pytest.fixture
def docker_host() -> str:
    return cluster_env("docker")["DOCKER_HOST"]


@pytest.fixture
def gateway(gateway_factory: Callable[..., Gateway], docker_host: str, tmp_path: Path) -> Gateway:
    config = f"""
[scheduler]
type = "local"
poll_interval = 0.2
[scheduler.options]
kill_grace = 2
[scheduler.container]
runtime = "docker"
host = "{docker_host}"
pull = "never"
allowed_images = ["jobproxy-test/*"]
allowed_mounts = ["{tmp_path}"]
publish_address = "127.0.0.1"
"""
    return gateway_factory(config).start()


def containers(docker_host: str, task_id: str) -> list[str]:
    listed = subprocess.run(["docker", "-H", docker_host, "ps", "--all", "--quiet", "--filter", f"name=jobproxy-{task_id}"],
                            capture_output=True, text=True, check=True)
    return listed.stdout.split()


def test_volumes_read_only_and_writable(gateway: Gateway, tmp_path: Path) -> None:
    inputs, outputs = tmp_path / "in", tmp_path / "out"
    inputs.mkdir()
    outputs.mkdir()
    (inputs / "data.txt").write_text("input data\n")
    task_id = gateway.submit({"user": "a", "cmd": "cat /in/data.txt; echo x > /in/new || echo refused; echo result > /out/r.txt",
                              "container": {"image": IMAGE, "volumes": [
                                  {"host": str(inputs), "container": "/in", "mode": "RO"},
                                  {"host": str(outputs), "container": "/out", "mode": "RW"}]}})
    state = gateway.wait(task_id)
    assert state["code"] == "COMPLETE", state
    assert Path(state["stdout"]).read_text() == "input data\nrefused\n"
    assert "Read-only file system" in Path(state["stderr"]).read_text()
    assert (outputs / "r.txt").read_text() == "result\n" and not (inputs / "new").exists()


def test_exit_code_propagates(gateway: Gateway, docker_host: str) -> None:
    task_id = gateway.submit({"user": "a", "cmd": ["sh", "-c", "exit 3"], "container": {"image": IMAGE}})
    state = gateway.wait(task_id)
    assert (state["code"], state["exit_code"], state["description"]) == ("EXECUTOR_ERROR", 3, "exit code 3")
    assert containers(docker_host, task_id) == []  # removed once it ended


def test_memory_over_use_is_killed(gateway: Gateway) -> None:
    task_id = gateway.submit({"user": "a", "cmd": "dd if=/dev/zero of=/dev/null bs=200M count=1", "memory": 64,
                              "container": {"image": IMAGE}})
    state = gateway.wait(task_id)
    assert (state["code"], state["description"]) == ("EXECUTOR_ERROR", "killed: memory limit of 64 MiB exceeded")


def test_cputime_limit_inside_the_container(gateway: Gateway) -> None:
    task_id = gateway.submit({"user": "a", "cmd": "while :; do :; done", "cputime": 2, "container": {"image": IMAGE}})
    state = gateway.wait(task_id)
    assert (state["code"], state["description"]) == ("EXECUTOR_ERROR", "killed: CPU time limit of 2 s exceeded")


def test_mapped_port_then_delete_leaves_no_container(gateway: Gateway, docker_host: str, tmp_path: Path) -> None:
    site = tmp_path / "www"
    site.mkdir()
    (site / "index.html").write_text("served by a task\n")
    port = free_port()
    task_id = gateway.submit({"user": "a", "cmd": ["httpd", "-f", "-p", "8080", "-h", "/www"],
                              "container": {"image": IMAGE, "ports": [{"host": port, "container": 8080}],
                                            "volumes": [{"host": str(site), "container": "/www", "mode": "RO"}]}})
    gateway.wait(task_id, lambda s: s["code"] == "RUNNING")
    body, deadline = b"", time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/index.html", timeout=5) as response:
                body = response.read()
                break
        except OSError:
            time.sleep(0.2)
    assert body == b"served by a task\n"
    assert containers(docker_host, task_id)
    status, _, _ = gateway.request("DELETE", f"/v1/jobproxy/delete/{task_id}")
    assert status == 204
    assert containers(docker_host, task_id) == []


def test_policy_refusals_name_what_was_wrong(gateway: Gateway) -> None:
    for container, words in [
        ({"image": "busybox"}, b"the image 'busybox' is not allowed here"),
        ({"image": IMAGE, "volumes": [{"host": "/etc", "container": "/etc2"}]}, b"'/etc' is outside"),
        ({"image": "Bad Image"}, b"$.container.image"),
    ]:
        status, _, body = gateway.request("POST", "/v1/jobproxy/submit", json.dumps(
            {"user": "a", "cmd": "true", "container": container}).encode(), {"Content-Type": "application/json"})
        assert status == 400 and words in body, body
