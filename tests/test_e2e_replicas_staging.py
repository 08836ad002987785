"""Staging across replicas (gateway/replicas.py, gateway/staging): two `jobproxy serve` replicas on
one PostgreSQL store (etc/dev/postgresql.sh), the local scheduler and a real HTTP server on loopback
whose answers stall half-way until the test lets them go on.

The lease holder is killed with kill -9 while it fetches the inputs of two tasks (one it accepted,
one the other replica handed to it) and while it sends the output of a third whose job has ended.
The replica that takes the lease over fetches the inputs again and submits each job only once they
are all in (the job sees the whole file, and runs once), and sends the output again before the
task is COMPLETE."""
from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from .conftest import Gateway, final
from .test_e2e_replicas import LEASE, _config, _leaders
from .test_staging import Web, create, finished, shell, web_server  # noqa: F401  (its fixture)
from .test_tes import need_bwrap

pytestmark = pytest.mark.e2e

STAGING = """
[tes]
images = [{ match = "*", run = "host" }]
[staging]
retries = 1
backoff = 0.1
[staging.http]
allow_put = true
allow_hosts = ["127.0.0.1"]  # the test's HTTP server
"""


@pytest.fixture
def two_replicas(tmp_path: Path, database: tuple[str, Path]) -> Iterator[list[Gateway]]:
    need_bwrap()
    started = []
    for n in range(2):
        workdir = tmp_path / f"replica-{n}"
        workdir.mkdir()
        started.append(Gateway(workdir, _config(tmp_path / "state", database, "local") + STAGING))
    for gateway in started:
        gateway.start()
    yield started
    for gateway in started:
        gateway.stop()


@pytest.fixture
def web(request: pytest.FixtureRequest) -> Web:
    """The test HTTP server of tests/test_staging.py."""
    server: Web = request.getfixturevalue("web_server")
    return server


def _lines(name: str, count: int) -> bytes:
    return "".join(f"{name} line {n:04d}\n" for n in range(count)).encode()


def _reached(web: Web, path: str, n: int) -> None:
    assert web.gate(path, n).reached.wait(60), f"request {n} to {path} never came (or never got half-way)"


def test_the_next_lease_holder_stages_again_what_a_killed_one_was_staging(
        two_replicas: list[Gateway], web: Web, tmp_path: Path) -> None:
    state_dir = tmp_path / "state"
    (leader,) = _leaders(two_replicas)
    (survivor,) = [g for g in two_replicas if g is not leader]
    inputs = {"a": _lines("a", 1000), "b": _lines("b", 1000)}
    for name, content in inputs.items():
        (web.served / f"{name}.txt").write_bytes(content)
    web.gate("/stall/c.txt", 2).opened.set()  # the second try of the output goes through
    reads = {name: {"inputs": [{"url": f"{web.url}/stall/{name}.txt", "path": "/data/in.txt"}],
                    "volumes": ["/work"], "executors": [shell("cat /data/in.txt; echo ran >> /work/ran")]}
             for name in inputs}
    a = create(leader, reads["a"])
    b = create(survivor, reads["b"])  # the local scheduler's tasks are the lease holder's to stage and run
    c = create(leader, {"outputs": [{"url": f"{web.url}/stall/c.txt", "path": "/data/out.txt"}], "volumes": ["/work"],
                        "executors": [shell("seq 1 20000 > /data/out.txt; echo ran >> /work/ran")]})
    for path in ("/stall/a.txt", "/stall/b.txt", "/stall/c.txt"):
        _reached(web, path, 1)
    assert [leader.state(t)["code"] for t in (a, b)] == ["INITIALIZING", "INITIALIZING"]
    assert "sending outputs" in leader.state(c)["description"]
    for task_id in (a, b):  # the leader shows a change at once, the other replica once it is in the database
        survivor.wait(task_id, lambda s: s["code"] == "INITIALIZING", timeout=10)

    leader.stop(kill=True)
    web.open_all()  # what the killed replica was moving: the rest of it goes nowhere
    deadline = time.monotonic() + 30
    while LEASE not in survivor.log.read_text() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert LEASE in survivor.log.read_text(), "the surviving replica never took the lease"

    # the new holder fetches the inputs again; until they are all in, no job
    for path in ("/stall/a.txt", "/stall/b.txt"):
        _reached(web, path, 2)
    time.sleep(4 * 0.5)  # a few poll intervals: a round that would submit them has had its chance
    for task_id in (a, b):
        state = survivor.state(task_id)
        assert state["code"] == "INITIALIZING", state
        assert not (state_dir / "tasks" / task_id / "tes" / "root" / "work" / "ran").exists()
    web.open_all()

    for name, task_id in (("a", a), ("b", b)):
        full = finished(survivor, task_id)
        assert full["state"] == "COMPLETE", full
        assert full["logs"][0]["logs"][0]["stdout"] == inputs[name].decode(), "the job did not see the whole input"
        assert web.hits[f"/stall/{name}.txt"] == 2
    full = finished(survivor, c)
    assert full["state"] == "COMPLETE", full
    assert (web.served / "c.txt").read_bytes() == "".join(f"{n}\n" for n in range(1, 20001)).encode()
    assert web.hits["/stall/c.txt"] == 2
    assert full["logs"][0]["outputs"] == [{"url": f"{web.url}/stall/c.txt", "path": "/data/out.txt",
                                           "size_bytes": str(len((web.served / "c.txt").read_bytes()))}]
    for task_id in (a, b, c):  # each job submitted (and run) once
        assert (state_dir / "tasks" / task_id / "tes" / "root" / "work" / "ran").read_text() == "ran\n"
        assert survivor.wait(task_id, final)["code"] == "COMPLETE"
    logs = leader.log.read_text() + survivor.log.read_text()
    for task_id in (a, b):
        assert logs.count(f"task {task_id}: inputs staged, submitted as job") == 1, logs[-3000:]
        assert f"task {task_id}: fetching its inputs again" in survivor.log.read_text()
    # the replica that accepted b handed it over at once: the lease holder fetched its inputs first
    assert any(f"task {b} recorded for " in line and "handed to the replica that runs" in line
               for line in survivor.log.read_text().splitlines())
    assert f"task {b}: fetching its inputs" in leader.log.read_text()
