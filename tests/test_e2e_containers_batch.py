"""Containers under the batch schedulers: the Slurm or DRMAA job script runs `docker run` on the
node (here the same machine), with the private engine of etc/dev/docker.sh."""
from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from . import backends
from .conftest import Gateway, cluster_env

pytestmark = [pytest.mark.docker, pytest.mark.e2e]
IMAGE = "jobproxy-test/busybox:latest"


def _toml(value: object) -> str:
    """A plugin option's value in TOML: a table inline, anything else as JSON writes it (the same)."""
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{key} = {_toml(item)}" for key, item in value.items()) + " }"
    return json.dumps(value)


@pytest.fixture(params=[name for name in backends.NAMES if name != "local"])
def gateway(request: pytest.FixtureRequest, gateway_factory: Callable[..., Gateway], tmp_path: Path) -> Gateway:
    docker_host = cluster_env("docker")["DOCKER_HOST"]
    kind, options = backends.prepare(request.param)
    option_lines = "".join(f"{key} = {_toml(value)}\n" for key, value in options.items())
    gateway = gateway_factory(f"""
[run_as]
allow_root_jobs = true   # the engine is root's, and DRMAA cannot run jobs as another account
[paths]
roots = ["{tmp_path}"]   # volume hosts in the test's folder
[scheduler]
type = "{kind}"
poll_interval = 0.5
[scheduler.options]
{option_lines}
[scheduler.container]
runtime = "docker"
host = "{docker_host}"
pull = "never"
allowed_mounts = ["{tmp_path}"]
""").start()
    gateway.docker_host = docker_host  # type: ignore[attr-defined]
    return gateway


def test_volumes_exit_code_and_memory(gateway: Gateway, tmp_path: Path) -> None:
    inputs, outputs = tmp_path / "in", tmp_path / "out"
    inputs.mkdir()
    outputs.mkdir()
    (inputs / "data.txt").write_text("on the node\n")
    volumes = [{"host": str(inputs), "container": "/in", "mode": "RO"}, {"host": str(outputs), "container": "/out"}]
    reader = gateway.submit({"user": "a",
                             "cmd": "cat /in/data.txt; touch /in/x || echo refused; echo ok > /out/r; exit 3",
                             "container": {"image": IMAGE, "volumes": volumes}})
    # after a second: containerd may report no OOM kill for a container killed in its first moments
    # (containerd#8180), and the engine then says only that it died of SIGKILL
    hog = gateway.submit({"user": "a", "cmd": "sleep 1; dd if=/dev/zero of=/dev/null bs=200M count=1", "memory": 64,
                          "container": {"image": IMAGE}})
    state = gateway.wait(reader, timeout=120)
    assert (state["code"], state["exit_code"]) == ("EXECUTOR_ERROR", 3), state
    assert Path(state["stdout"]).read_text() == "on the node\nrefused\n"
    assert (outputs / "r").read_text() == "ok\n"
    killed = gateway.wait(hog, timeout=120)
    assert (killed["code"], killed["description"]) == ("EXECUTOR_ERROR",
                                                        "killed: memory limit of 64 MiB exceeded"), killed


def test_delete_running_container_leaves_none(gateway: Gateway) -> None:
    task_id = gateway.submit({"user": "a", "cmd": "sleep 300", "container": {"image": IMAGE}})
    host = gateway.docker_host  # type: ignore[attr-defined]

    def listed() -> list[str]:
        return subprocess.run(["docker", "-H", host, "ps", "-aq", "--filter", f"name=jobproxy-{task_id}"],
                              capture_output=True, text=True, check=True).stdout.split()

    gateway.wait(task_id, lambda s: s["code"] == "RUNNING", timeout=120)
    for _ in range(300):
        if listed():
            break
        time.sleep(0.1)
    assert listed(), "the container never started"
    status, _, _ = gateway.request("DELETE", f"/v1/jobproxy/delete/{task_id}")
    assert status == 204
    assert listed() == []
