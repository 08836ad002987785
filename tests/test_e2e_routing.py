"""End to end: one `jobproxy serve` with two scheduler instances, a local one and a Slurm one (the
real single-node cluster of etc/dev/slurm.sh), routing by cores; restarts with tasks in both; an
instance taken out of the config; and rule mistakes that stop `check-config` and `serve` with
the path of the mistake."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from schedulers.script import quote

from . import backend_slurm
from .conftest import ROOT, Gateway
from .test_e2e_slurm import job_of

pytestmark = [pytest.mark.e2e, pytest.mark.slurm]

SMALL = """
[schedulers.small]
type = "local"
poll_interval = 0.2
[schedulers.small.options]
cores = 1
kill_grace = 2
"""
HPC = """
[schedulers.hpc]
type = "slurm"
poll_interval = 0.5
[schedulers.hpc.options]
command_timeout = 30
[[routes]]
scheduler = "hpc"
cores = { min = 2 }
"""
DEFAULT = """
[[routes]]
scheduler = "small"
"""
CONFIG = SMALL + HPC + DEFAULT


@pytest.fixture(scope="module")
def cluster() -> None:
    backend_slurm.prepare()  # starts the dev cluster, puts SLURM_CONF into os.environ (skips, or fails in CI)


def _jobproxy(folder: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "gateway.cli", *args], capture_output=True, text=True, cwd=folder,
                          env=env, timeout=120)


def _waiting(flag: Path, says: str) -> str:
    return f"while [ ! -e {quote(str(flag))} ]; do sleep 0.1; done; echo {says}"


def test_tasks_go_by_cores_and_a_restart_recovers_both_instances(cluster: None, tmp_path: Path,
                                                                 gateway_factory: Callable[..., Gateway]) -> None:
    gateway = gateway_factory(CONFIG).start()
    small = gateway.submit({"user": "a", "cmd": ["/bin/echo", "on the gateway"]})
    big = gateway.submit({"user": "a", "cmd": "nproc", "cores": 2})
    done_small, done_big = gateway.wait(small), gateway.wait(big)
    assert (done_small["scheduler"], done_small["code"]) == ("small", "COMPLETE")
    assert Path(done_small["stdout"]).read_text() == "on the gateway\n"
    assert (done_big["scheduler"], done_big["code"]) == ("hpc", "COMPLETE")
    assert Path(done_big["stdout"]).read_text() == "2\n" and job_of(big)["NumCPUs"] == "2"  # Slurm ran it
    status, _, body = gateway.request("GET", "/metrics")
    metrics = body.decode()
    assert 'jobproxy_routed_total{rule="1",scheduler="hpc"} 1.0' in metrics
    assert 'jobproxy_routed_total{rule="2",scheduler="small"} 1.0' in metrics
    assert 'jobproxy_scheduler_call_duration_seconds_count{call="submit",scheduler="hpc"} 1.0' in metrics

    # a crash with a running task in each instance; both finish while the gateway is down
    flag = tmp_path / "go"
    local_task = gateway.submit({"user": "a", "cmd": _waiting(flag, "local done")})
    slurm_task = gateway.submit({"user": "a", "cmd": _waiting(flag, "slurm done"), "cores": 2})
    for task_id in (local_task, slurm_task):
        gateway.wait(task_id, lambda s: s["code"] == "RUNNING")
    gateway.stop(kill=True)
    flag.touch()
    gateway.start()
    finished = {task_id: gateway.wait(task_id) for task_id in (local_task, slurm_task)}
    assert [(s["scheduler"], s["code"], Path(s["stdout"]).read_text()) for s in finished.values()] == [
        ("small", "COMPLETE", "local done\n"), ("hpc", "COMPLETE", "slurm done\n")]

    # the Slurm instance taken out of the config: its active task stays as it was, said in the log
    held = tmp_path / "hold"
    waiting = gateway.submit({"user": "a", "cmd": _waiting(held, "back"), "cores": 2})
    gateway.wait(waiting, lambda s: s["code"] == "RUNNING")
    gateway.stop()
    gateway.config_path.write_text(SMALL)
    gateway.start()
    assert "1 active tasks belong to scheduler instance 'hpc', which is not configured" in gateway.log.read_text()
    assert (gateway.state(waiting)["code"], gateway.state(waiting)["scheduler"]) == ("RUNNING", "hpc")
    status, _, body = gateway.request("DELETE", f"/v1/jobproxy/delete/{waiting}")
    assert status == 503 and "scheduler instance 'hpc'" in json.loads(body)["error"]
    assert gateway.state(gateway.submit({"user": "a", "cmd": "true", "cores": 1}))["scheduler"] == "small"

    # configured again, its poller picks the task up where it was
    gateway.stop()
    gateway.config_path.write_text(CONFIG)
    gateway.start()
    held.touch()
    back = gateway.wait(waiting)
    assert (back["code"], Path(back["stdout"]).read_text()) == ("COMPLETE", "back\n")


def test_a_task_no_rule_takes_is_refused(cluster: None, gateway_factory: Callable[..., Gateway]) -> None:
    gateway = gateway_factory(SMALL + HPC).start()  # no default rule: one core fits nowhere
    status, _, body = gateway.request("POST", "/v1/jobproxy/submit", b'{"user": "a", "cmd": "true"}',
                                      {"Content-Type": "application/json"})
    answer = json.loads(body)
    assert status == 400 and answer["error"] == ("no scheduler takes this task: rule 1 (hpc): needs at least 2 "
                                                 "cores; the task asks for 1 ($.cores)")
    status, _, body = gateway.request("POST", "/v1/jobproxy/submit",
                                      b'{"user": "a", "cmd": "true", "scheduler": "small"}',
                                      {"Content-Type": "application/json"})
    assert status == 400 and json.loads(body)["error"].startswith("no routing rule lets this task ask for 'small'")


def test_check_config_prints_the_rules_and_explains_a_task(tmp_path: Path) -> None:
    (tmp_path / "jobproxy.toml").write_text(f'[gateway]\nstate_dir = "state"\n{CONFIG}')
    (tmp_path / "big.json").write_text('{"user": "a", "cmd": "true", "cores": 4}')
    (tmp_path / "small.xml").write_text("<task><user>a</user><cmd>true</cmd></task>")
    (tmp_path / "asks.json").write_text('{"user": "a", "cmd": "true", "scheduler": "gpu"}')
    checked = _jobproxy(tmp_path, "check-config", "jobproxy.toml")
    assert checked.returncode == 0, checked.stderr
    assert checked.stdout.splitlines() == [
        "jobproxy.toml: OK (scheduler small, hpc)",
        "scheduler small: type local, polled every 0.2 s",
        "scheduler hpc: type slurm, polled every 0.5 s",
        "route 1: 2 <= cores -> hpc",
        "route 2: any task -> small"]
    big = _jobproxy(tmp_path, "check-config", "jobproxy.toml", "--explain", "big.json")
    assert big.returncode == 0 and big.stdout.splitlines()[-2:] == ["rule 1 (2 <= cores -> hpc): takes it",
                                                                    "goes to hpc (rule 1)"]
    small = _jobproxy(tmp_path, "check-config", "jobproxy.toml", "--explain", "small.xml")
    assert small.returncode == 0 and small.stdout.splitlines()[-3:] == [
        "rule 1 (2 <= cores -> hpc): no: $.cores: needs at least 2 cores; the task asks for 1",
        "rule 2 (any task -> small): takes it", "goes to small (rule 2)"]
    asks = _jobproxy(tmp_path, "check-config", "jobproxy.toml", "--explain", "asks.json")
    assert asks.returncode == 1 and asks.stdout.splitlines()[-1] == (
        "refused (400): $.scheduler: there is no scheduler 'gpu' here (configured: small, hpc)")


def test_a_rule_naming_an_unknown_instance_stops_the_start(tmp_path: Path,
                                                           gateway_factory: Callable[..., Gateway]) -> None:
    text = SMALL + '[[routes]]\nscheduler = "small"\ncores = { max = 1 }\n[[routes]]\nscheduler = "gpu"\n'
    expected = ("jobproxy: configuration error: jobproxy.toml: $.routes[1].scheduler: scheduler 'gpu' is not "
                "configured ([[routes]] rule 2; configured: small)")
    (tmp_path / "jobproxy.toml").write_text(text)
    checked = _jobproxy(tmp_path, "check-config", "jobproxy.toml")
    assert checked.returncode == 2 and checked.stderr.strip() == expected
    served = _jobproxy(tmp_path, "serve", "--config", "jobproxy.toml")
    assert served.returncode == 2 and "Traceback" not in served.stderr
    assert [line for line in served.stderr.splitlines() if line.startswith("jobproxy:")] == [expected]
    gateway = gateway_factory(text)
    with pytest.raises(AssertionError, match=r"\$\.routes\[1\]\.scheduler: scheduler 'gpu' is not configured"):
        gateway.start()
