"""End to end: `jobproxy serve` as a real process on the local scheduler, driven over HTTP."""
from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from schedulers.local import proc

from .conftest import Gateway

pytestmark = pytest.mark.e2e

CONFIG = """
[scheduler]
type = "local"
poll_interval = 0.2
[scheduler.options]
cores = {cores}
kill_grace = 2
"""


@pytest.fixture
def gateway(gateway_factory: Callable[..., Gateway]) -> Gateway:
    return gateway_factory(CONFIG.format(cores=2)).start()


def test_json_and_xml_submissions_and_listing(gateway: Gateway) -> None:
    first = gateway.submit({"user": "alice", "cmd": ["/bin/echo", "from json"]})
    xml = b"<task><user>bob</user><cmd>echo from xml; exit 3</cmd><memory>64</memory></task>"
    status, _, body = gateway.request("POST", "/v1/jobproxy/submit", xml,
                                      {"Content-Type": "application/xml", "Accept": "text/plain"})
    assert status == 200
    second = body.decode()
    done = gateway.wait(first)
    assert done["code"] == "COMPLETE" and Path(done["stdout"]).read_text() == "from json\n"
    failed = gateway.wait(second)
    assert (failed["code"], failed["exit_code"], failed["description"]) == ("EXECUTOR_ERROR", 3, "exit code 3")
    status, _, body = gateway.request("GET", "/v1/jobproxy/state")
    assert [s["id"] for s in json.loads(body)["state"]] == [first, second]
    status, headers, body = gateway.request("GET", "/v1/jobproxy/state?user=bob", headers={"Accept": "application/xml"})
    assert headers["Content-Type"].startswith("application/xml")
    assert body.count(b"<state>") == 1 and b"<code>EXECUTOR_ERROR</code>" in body


def test_delete_running_task_kills_its_process_tree(gateway: Gateway) -> None:
    script = "echo $$ > pids; sleep 300 & echo $! >> pids; setsid sleep 301 & echo $! >> pids; wait"
    task_id = gateway.submit({"user": "alice", "cmd": script})
    pids = Path(gateway.wait(task_id, lambda s: s["code"] == "RUNNING")["stdout"]).parent / "pids"  # its own folder
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and len(pids.read_text().split() if pids.exists() else []) < 3:
        time.sleep(0.1)
    started = [int(p) for p in pids.read_text().split()]
    assert all(proc.alive(p, None) for p in started)
    status, _, _ = gateway.request("DELETE", f"/v1/jobproxy/delete/{task_id}")
    assert status == 204
    assert not any(proc.alive(p, None) for p in started), "processes of the deleted task survived"
    status, _, _ = gateway.request("GET", f"/v1/jobproxy/state/{task_id}")
    assert status == 404


def test_cputime_limit(gateway: Gateway) -> None:
    task_id = gateway.submit({"user": "alice", "cmd": "while :; do :; done", "cputime": 2})
    state = gateway.wait(task_id)
    assert state["code"] == "EXECUTOR_ERROR"
    assert state["description"] == "killed: CPU time limit of 2 s exceeded"


def test_memory_limit(gateway: Gateway) -> None:
    hog = "b = bytearray(300 * 1024 * 1024)"
    task_id = gateway.submit({"user": "alice", "cmd": ["python3", "-c", hog], "memory": 100})
    state = gateway.wait(task_id)
    assert state["code"] == "EXECUTOR_ERROR"
    if "memory limit" not in state["description"]:  # RLIMIT_AS fallback: the allocation fails
        assert "MemoryError" in Path(state["stderr"]).read_text()
    else:
        assert state["description"] == "killed: memory limit of 100 MiB exceeded"


def test_one_core_is_pinned_to_one_cpu(gateway: Gateway) -> None:
    task_id = gateway.submit({"user": "alice", "cmd": "grep Cpus_allowed_list /proc/self/status; nproc", "cores": 1})
    state = gateway.wait(task_id)
    allowed, count = Path(state["stdout"]).read_text().split("\n")[:2]
    assert allowed.split()[-1].isdigit() and count == "1"


def test_restart_keeps_every_task_and_picks_up_outcomes(gateway_factory: Callable[..., Gateway],
                                                        tmp_path: Path) -> None:
    gateway = gateway_factory(CONFIG.format(cores=2)).start()
    flag = tmp_path / "go"
    done = gateway.submit({"user": "a", "cmd": "exit 4"})
    gateway.wait(done)
    finishing = gateway.submit({"user": "a", "cmd": f"while [ ! -e {flag} ]; do sleep 0.1; done; echo finished",
                                "cores": 1})
    long = gateway.submit({"user": "a", "cmd": "sleep 300", "cores": 1})
    gateway.wait(finishing, lambda s: s["code"] == "RUNNING")
    gateway.wait(long, lambda s: s["code"] == "RUNNING")
    queued = gateway.submit({"user": "a", "cmd": "echo late", "cores": 2})
    gateway.stop(kill=True)  # a crash: no clean shutdown

    flag.touch()  # the first task finishes while the gateway is down
    time.sleep(1)
    gateway.start()
    assert gateway.wait(finishing)["code"] == "COMPLETE"
    assert Path(gateway.state(finishing)["stdout"]).read_text() == "finished\n"
    assert gateway.state(long)["code"] == "RUNNING"
    assert gateway.state(done)["exit_code"] == 4
    assert gateway.state(queued)["code"] == "QUEUED"  # 2 cores do not fit while `long` holds one
    status, _, _ = gateway.request("DELETE", f"/v1/jobproxy/delete/{long}")
    assert status == 204
    late = gateway.wait(queued)
    assert late["code"] == "COMPLETE" and Path(late["stdout"]).read_text() == "late\n"
    status, _, body = gateway.request("GET", "/v1/jobproxy/state")
    assert {s["id"] for s in json.loads(body)["state"]} == {finishing, done, queued}


def test_bad_config_stops_the_start(gateway_factory: Callable[..., Gateway]) -> None:
    gateway = gateway_factory('[scheduler]\ntype = "local"\n[scheduler.options]\ncores = "two"\n')
    with pytest.raises(AssertionError, match=r"\$\.scheduler\.options\.cores"):
        gateway.start()


def test_unknown_plugin_names_the_installed_ones(gateway_factory: Callable[..., Gateway]) -> None:
    gateway = gateway_factory('[scheduler]\ntype = "pbs"\n')
    with pytest.raises(AssertionError, match=r"no scheduler plugin named 'pbs'.*installed: .*local"):
        gateway.start()


def test_serve_without_config_uses_embedded_defaults(gateway_factory: Callable[..., Gateway], tmp_path: Path) -> None:
    """No config file: local scheduler, SQLite state under ./jobproxy-state, 127.0.0.1."""
    gateway = gateway_factory(None).start()
    task_id = gateway.submit({"user": "a", "cmd": "echo default"})
    assert gateway.wait(task_id)["code"] == "COMPLETE"
    assert (tmp_path / "jobproxy-state" / "jobproxy.db").exists()
    assert gateway.state(task_id)["scheduler"] == "local"
