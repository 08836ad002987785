"""kill -9 during 300 concurrent keyed submits, then a restart and a resend of every request that got
no answer: exactly 300 tasks, each command run once, no scheduler job without its task."""
from __future__ import annotations

import json
import subprocess
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from . import backend_slurm
from .conftest import Gateway, final

pytestmark = pytest.mark.e2e

TASKS, KILL_AFTER = 300, 100


def _submit(gateway: Gateway, n: int) -> str | None:
    """Submit request `n` with its key; the task id, or None when no answer came."""
    body = json.dumps({"user": "crash", "cmd": ["/bin/sh", "-c", "echo ran >> ran"]}).encode()
    try:
        status, _, answer = gateway.request("POST", "/v1/jobproxy/submit", body,
                                            {"Content-Type": "application/json", "Idempotency-Key": f"crash-{n}"})
    except OSError:  # the gateway died under this request, or before it was sent
        return None
    return str(json.loads(answer)["id"]) if status == 200 else None


def _crash_and_retry(gateway: Gateway) -> dict[str, int]:
    answered: dict[int, str] = {}
    lock = threading.Lock()

    def one(n: int) -> None:
        task_id = _submit(gateway, n)
        if task_id is not None:
            with lock:
                answered[n] = task_id
                if len(answered) == KILL_AFTER:
                    gateway.stop(kill=True)

    with ThreadPoolExecutor(32) as pool:
        list(pool.map(one, range(TASKS)))
    acknowledged = dict(answered)
    assert KILL_AFTER <= len(acknowledged) < TASKS, "the kill came too late to test anything"
    restarted = time.time()
    gateway.start()
    retried = 0
    for n in range(TASKS):  # every request again: the unanswered ones must make their task now, the
        task_id = _submit(gateway, n)  # answered ones must answer the same id as before
        assert task_id is not None, f"request {n} failed after the restart"
        if n in acknowledged:
            assert task_id == acknowledged[n], f"request {n}: a retry made a second task"
        else:
            retried += 1
        answered[n] = task_id
    ids = set(answered.values())
    assert len(ids) == TASKS
    deadline = time.monotonic() + 300
    for task_id in ids:
        state = gateway.wait(task_id, final, timeout=max(1.0, deadline - time.monotonic()))
        assert state["code"] == "COMPLETE", state
    status, _, body = gateway.request("GET", "/v1/jobproxy/state?page_size=1000")
    assert status == 200 and {s["id"] for s in json.loads(body)["state"]} == ids
    made_before = [n for n in answered if n not in acknowledged
                   and _created(gateway.state(answered[n])["created"]) < restarted]
    runs = {task_id: (gateway.workdir / "jobproxy-state" / "tasks" / task_id / "ran").read_text() for task_id in ids}
    assert [t for t, text in runs.items() if text != "ran\n"] == [], "a command ran twice (or not at all)"
    return {"acknowledged": len(acknowledged), "retried": retried,
            "recorded but not acknowledged before the kill": len(made_before), "tasks": len(ids)}


def _created(stamp: str) -> float:
    from datetime import datetime

    return datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()


def test_local(gateway_factory: Callable[..., Gateway]) -> None:
    gateway = gateway_factory('[scheduler]\npoll_interval = 0.5\n').start()
    figures = _crash_and_retry(gateway)
    spool = gateway.workdir / "jobproxy-state" / "schedulers" / "local"
    leftovers = [p.name for p in spool.iterdir() if p.name != "submitted"] if spool.is_dir() else []
    journal = (spool / "submitted").read_text().split() if (spool / "submitted").exists() else []
    tasks = {p.name for p in (gateway.workdir / "jobproxy-state" / "tasks").iterdir()}
    assert {name.split(".")[0] for name in leftovers} | set(journal) <= tasks, \
        "a job of the local scheduler has no task"
    print("local:", figures)


@pytest.mark.slurm
def test_slurm(gateway_factory: Callable[..., Gateway], tmp_path: Path) -> None:
    backend_slurm.prepare()
    gateway = gateway_factory('[scheduler]\ntype = "slurm"\npoll_interval = 1\n').start()
    figures = _crash_and_retry(gateway)
    task_root = str(gateway.workdir / "jobproxy-state" / "tasks")
    listed = subprocess.run(["squeue", "--noheader", "--states=all", "--format=%j|%Z"], capture_output=True,
                            text=True, timeout=60, check=True).stdout.split()
    ours = [line.split("|")[0] for line in listed if line.split("|")[-1].startswith(task_root)]
    _, _, body = gateway.request("GET", "/v1/jobproxy/state?page_size=1000")
    ids = {s["id"] for s in json.loads(body)["state"]}
    orphans = [name for name in ours if name not in ids]
    assert orphans == [], f"Slurm jobs without a task: {orphans}"
    assert sorted(ours) == sorted(ids), "a task has no job, or more than one"
    print("slurm:", figures, "jobs:", len(ours))
