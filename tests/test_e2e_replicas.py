"""Three `jobproxy serve` replicas on one PostgreSQL store (etc/dev/postgresql.sh), with the local
scheduler and then with Slurm: submits spread over all three answer the same everywhere; kill -9 of
the replica holding the lease during 300 keyed submits loses no acknowledged task, submits no job
twice, and another replica takes the lease within two poll intervals."""
from __future__ import annotations

import itertools
import json
import subprocess
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from . import backend_slurm
from .conftest import Gateway, final
from .test_client_e2e import Collector

pytestmark = pytest.mark.e2e

INTERVAL = 0.5
TASKS, KILL_AFTER = 300, 100
LEASE = "holds the lease of scheduler"


def _config(state_dir: Path, database: tuple[str, Path], scheduler: str) -> str:
    url, password_file = database
    options = "[scheduler.options]\ncommand_timeout = 30\n" if scheduler == "slurm" else ""  # a busy shared Slurm
    return (f'[gateway]\nstate_dir = "{state_dir}"\n'
            f'[store]\nurl = "{url}"\npassword_file = "{password_file}"\n'
            f'[scheduler]\ntype = "{scheduler}"\npoll_interval = {INTERVAL}\n{options}')


@pytest.fixture
def replicas(tmp_path: Path, database: tuple[str, Path], request: pytest.FixtureRequest) -> Iterator[list[Gateway]]:
    """Three replicas of one gateway: one database, one state folder (the local scheduler's
    spool and the task folders are on this one machine), each its own port and log."""
    scheduler = getattr(request, "param", "local")
    if scheduler == "slurm":
        backend_slurm.prepare()
    state_dir = tmp_path / "state"
    started = []
    for n in range(3):
        workdir = tmp_path / f"replica-{n}"
        workdir.mkdir()
        started.append(Gateway(workdir, _config(state_dir, database, scheduler)))
    for gateway in started:
        gateway.start()
    yield started
    for gateway in started:
        gateway.stop()


def _leaders(gateways: list[Gateway]) -> list[Gateway]:
    return [g for g in gateways if g.process is not None and g.process.poll() is None
            and g.log.read_text().count(LEASE) > g.log.read_text().count("lost the lease")]


def _submit(gateway: Gateway, n: int, cmd: str = "echo ran >> ran") -> str | None:
    body = json.dumps({"user": f"u{n % 3}", "cmd": ["/bin/sh", "-c", cmd]}).encode()
    try:
        status, _, answer = gateway.request("POST", "/v1/jobproxy/submit", body,
                                            {"Content-Type": "application/json", "Idempotency-Key": f"r-{n}"})
    except OSError:
        return None
    return str(json.loads(answer)["id"]) if status == 200 else None


def _states(gateway: Gateway) -> dict[str, str]:
    status, _, body = gateway.request("GET", "/v1/jobproxy/state?page_size=1000")
    assert status == 200, body
    return {s["id"]: s["code"] for s in json.loads(body)["state"]}


def _settle(gateways: list[Gateway], ids: set[str], timeout: float = 300) -> None:
    """Every task final and COMPLETE on every living replica (through each one's own active set)."""
    deadline = time.monotonic() + timeout
    for gateway in gateways:
        for task_id in ids:
            state = gateway.wait(task_id, final, timeout=max(1.0, deadline - time.monotonic()))
            assert state["code"] == "COMPLETE", (gateway.url, state)


def _ran_once(state_dir: Path, ids: set[str]) -> None:
    runs = {t: (state_dir / "tasks" / t / "ran").read_text() for t in ids}
    assert [t for t, text in runs.items() if text != "ran\n"] == [], "a command ran twice (or not at all)"


def _spread_and_agree(gateways: list[Gateway], state_dir: Path) -> None:
    assert len(_leaders(gateways)) == 1, "not exactly one replica holds the lease"
    ids_ = {gateways[n % 3].submit({"user": f"u{n % 3}", "cmd": ["/bin/sh", "-c", "echo ran >> ran"]})
            for n in range(30)}
    assert len(ids_) == 30
    _settle(gateways, ids_)
    listed = [_states(g) for g in gateways]
    assert listed[0] == listed[1] == listed[2] and set(listed[0]) == ids_
    # an idempotency key answers the same task whichever replica gets the retry
    assert {_submit(g, 7) for g in gateways} == {_submit(gateways[1], 7)}
    _ran_once(state_dir, ids_)


def _kill_the_leader_during_submits(gateways: list[Gateway]) -> dict[str, Any]:
    leader = _leaders(gateways)[0]
    others = [g for g in gateways if g is not leader]
    answered: dict[int, str] = {}
    lock = threading.Lock()
    killed: list[float] = []
    round_robin = itertools.cycle(gateways)

    def one(n: int) -> None:
        with lock:
            gateway = next(round_robin)
        task_id = _submit(gateway, n)
        if task_id is None:  # the killed replica: a load balancer sends the request again elsewhere
            task_id = _submit(others[n % 2], n)
        assert task_id is not None, f"request {n} failed on a living replica"
        with lock:
            answered[n] = task_id
            if len(answered) == KILL_AFTER and not killed:
                leader.stop(kill=True)
                killed.append(time.monotonic())

    took_over: list[float] = []

    def watch() -> None:
        while not killed:
            time.sleep(0.01)
        while time.monotonic() - killed[0] < 30:
            if any(LEASE in g.log.read_text() for g in others):
                took_over.append(time.monotonic())
                return
            time.sleep(0.02)

    watcher = threading.Thread(target=watch)
    watcher.start()
    with ThreadPoolExecutor(32) as pool:
        list(pool.map(one, range(TASKS)))
    watcher.join()
    assert killed, "the kill never happened"
    assert took_over, "no replica took the lease within 30 s"
    takeover = took_over[0] - killed[0]
    assert takeover <= 2 * INTERVAL + 0.5, f"the lease changed hands after {takeover:.2f} s"
    for n in range(TASKS):  # every request again, to a living replica: the same task each time
        assert _submit(others[n % 2], n) == answered[n], f"request {n}: a retry made a second task"
    ids = set(answered.values())
    assert len(ids) == TASKS
    return {"acknowledged": len(answered), "lost": TASKS - len(ids), "takeover_s": round(takeover, 2),
            "others": others}


def test_local(replicas: list[Gateway], tmp_path: Path) -> None:
    state_dir = tmp_path / "state"
    _spread_and_agree(replicas, state_dir)
    figures = _kill_the_leader_during_submits(replicas)
    others = figures.pop("others")
    ids = set(_states(others[0]))
    _settle(others, ids)
    assert _states(others[0]) == _states(others[1])
    _ran_once(state_dir, ids)
    print("local replicas:", figures, "tasks:", len(ids))


@pytest.mark.slurm
@pytest.mark.parametrize("replicas", ["slurm"], indirect=True)
def test_slurm(replicas: list[Gateway], tmp_path: Path) -> None:
    state_dir = tmp_path / "state"
    _spread_and_agree(replicas, state_dir)
    figures = _kill_the_leader_during_submits(replicas)
    others = figures.pop("others")
    ids = set(_states(others[0]))
    _settle(others, ids, timeout=600)  # a shared Slurm may take its time to run 300 jobs
    assert _states(others[0]) == _states(others[1])
    _ran_once(state_dir, ids)
    listed = subprocess.run(["squeue", "--noheader", "--states=all", "--format=%j|%Z"], capture_output=True,
                            text=True, timeout=60, check=True).stdout.split()
    ours = [line.split("|")[0] for line in listed if line.split("|")[-1].startswith(str(state_dir / "tasks"))]
    assert sorted(ours) == sorted(ids), "a task has no Slurm job, or more than one"
    print("slurm replicas:", figures, "tasks:", len(ids), "jobs:", len(ours))


@pytest.mark.slurm
@pytest.mark.parametrize("replicas", ["slurm"], indirect=True)
def test_a_task_slurm_refuses_sends_no_event_on_any_replica(replicas: list[Gateway]) -> None:
    """The other replicas hear of the refused task's record before its submit fails (and of its
    deletion after): no replica's stream says anything of it; an accepted task's tells each change once."""
    from .test_e2e_slurm import node
    collectors = [Collector(g) for g in replicas]
    too_many = {"user": "u0", "cmd": ["true"], "cores": int(node()["CPUTot"]) + 1}
    for gateway in replicas:
        status, _, body = gateway.request("POST", "/v1/jobproxy/submit", json.dumps(too_many).encode(),
                                          {"Content-Type": "application/json"})
        assert status == 400 and json.loads(body)["error"].startswith("Slurm refused the task: "), body
    accepted = replicas[1].submit({"user": "u0", "cmd": ["true"]})
    for collector in collectors:
        seen = [(e["code"], e["description"]) for e in collector.wait_for(accepted, "COMPLETE", timeout=120)]
        collector.stop.set()
        assert seen[0][0] == "QUEUED" and all(a != b for a, b in itertools.pairwise(seen)), seen  # each change once
        assert {json.loads(e.data)["id"] for e in collector.events if e.event == "state"} == {accepted}
