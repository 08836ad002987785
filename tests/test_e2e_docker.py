"""End to end with real container engines on the local scheduler: a private Docker engine
(etc/dev/docker.sh) and Podman with its own configuration (etc/dev/podman.sh); every test runs
against both."""
from __future__ import annotations

import json
import os
import subprocess
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from .conftest import Gateway, cluster_env, free_port

pytestmark = [pytest.mark.docker, pytest.mark.e2e]
IMAGE = "jobproxy-test/busybox:latest"


@dataclass(frozen=True)
class Engine:
    """How the tests reach one runtime's containers: its CLI and the environment it needs."""

    runtime: str
    cli: list[str]
    env: dict[str, str]
    config: str  # runtime-specific lines of [scheduler.container]


@pytest.fixture(params=["docker", "podman"])
def engine(request: pytest.FixtureRequest) -> Engine:
    env = cluster_env(request.param)
    if request.param == "docker":
        host = env["DOCKER_HOST"]
        return Engine("docker", ["docker", "-H", host], {}, f'host = "{host}"')
    # The podman CLI (run by the job scripts) finds its private configuration through the environment.
    podman_env = {key: env[key] for key in ("CONTAINERS_CONF", "CONTAINERS_STORAGE_CONF")}
    # Any --ulimit replaces containers.conf's default nofile/nproc, which fit this machine's hard limits.
    ulimits = json.dumps([limit for limit in env.get("JOBPROXY_PODMAN_ULIMITS", "").split(",") if limit])
    return Engine("podman", ["podman"], podman_env, f"default_ulimits = {ulimits}")


@pytest.fixture
def gateway(gateway_factory: Callable[..., Gateway], engine: Engine, tmp_path: Path) -> Gateway:
    config = f"""
[scheduler]
type = "local"
poll_interval = 0.2
[scheduler.options]
kill_grace = 2
[scheduler.container]
runtime = "{engine.runtime}"
{engine.config}
pull = "never"
allowed_images = ["jobproxy-test/*"]
allowed_mounts = ["{tmp_path}"]
publish_address = "127.0.0.1"
[run_as]
# Jobs of a root gateway with auth off run as nobody, who cannot use the engine: this site runs
# container tasks as root (access to the engine is root's in any case).
allow_root_jobs = true
[paths]
roots = ["{tmp_path}"]   # volume hosts (and outputs) may lie in the test's folder
"""
    return gateway_factory(config, env=engine.env).start()


def containers(engine: Engine, task_id: str) -> list[str]:
    listed = subprocess.run([*engine.cli, "ps", "--all", "--quiet", "--filter", f"name=jobproxy-{task_id}"],
                            capture_output=True, text=True, check=True, env={**os.environ, **engine.env})
    return listed.stdout.split()


def test_volumes_read_only_and_writable(gateway: Gateway, tmp_path: Path) -> None:
    inputs, outputs = tmp_path / "in", tmp_path / "out"
    inputs.mkdir()
    outputs.mkdir()
    (inputs / "data.txt").write_text("input data\n")
    task_id = gateway.submit({"user": "a",
                              "cmd": "cat /in/data.txt; echo x > /in/new || echo refused; echo result > /out/r.txt",
                              "container": {"image": IMAGE, "volumes": [
                                  {"host": str(inputs), "container": "/in", "mode": "RO"},
                                  {"host": str(outputs), "container": "/out", "mode": "RW"}]}})
    state = gateway.wait(task_id)
    assert state["code"] == "COMPLETE", state
    assert Path(state["stdout"]).read_text() == "input data\nrefused\n"
    assert "Read-only file system" in Path(state["stderr"]).read_text()
    assert (outputs / "r.txt").read_text() == "result\n" and not (inputs / "new").exists()


def test_exit_code_propagates(gateway: Gateway, engine: Engine) -> None:
    task_id = gateway.submit({"user": "a", "cmd": ["sh", "-c", "exit 3"], "container": {"image": IMAGE}})
    state = gateway.wait(task_id)
    assert (state["code"], state["exit_code"], state["description"]) == ("EXECUTOR_ERROR", 3, "exit code 3")
    assert containers(engine, task_id) == []  # removed once it ended


def test_memory_over_use_is_killed(gateway: Gateway) -> None:
    # after a second: containerd may report no OOM kill for a container killed in its first moments
    # (containerd#8180), and the engine then says only that it died of SIGKILL
    task_id = gateway.submit({"user": "a", "cmd": "sleep 1; dd if=/dev/zero of=/dev/null bs=200M count=1", "memory": 64,
                              "container": {"image": IMAGE}})
    state = gateway.wait(task_id)
    assert (state["code"], state["description"]) == ("EXECUTOR_ERROR", "killed: memory limit of 64 MiB exceeded")


def test_cputime_limit_inside_the_container(gateway: Gateway) -> None:
    task_id = gateway.submit({"user": "a", "cmd": "while :; do :; done", "cputime": 2, "container": {"image": IMAGE}})
    state = gateway.wait(task_id)
    assert (state["code"], state["description"]) == ("EXECUTOR_ERROR", "killed: CPU time limit of 2 s exceeded")


def test_mapped_port_then_delete_leaves_no_container(gateway: Gateway, engine: Engine, tmp_path: Path) -> None:
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
    assert containers(engine, task_id)
    status, _, _ = gateway.request("DELETE", f"/v1/jobproxy/delete/{task_id}")
    assert status == 204
    assert containers(engine, task_id) == []


def test_policy_refusals_name_what_was_wrong(gateway: Gateway) -> None:
    for container, words in [
        ({"image": "busybox"}, b"the image 'busybox' is not allowed here"),
        ({"image": IMAGE, "volumes": [{"host": "/etc", "container": "/etc2"}]}, b"'/etc' is outside"),
        ({"image": "Bad Image"}, b"$.container.image"),
    ]:
        status, _, body = gateway.request("POST", "/v1/jobproxy/submit", json.dumps(
            {"user": "a", "cmd": "true", "container": container}).encode(), {"Content-Type": "application/json"})
        assert status == 400 and words in body, body
