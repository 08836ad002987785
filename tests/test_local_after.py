"""A job request sent ahead: the local launcher holds a `run` request with `after` until the job
it names ended, then starts it as it reaps that job; `drop` takes such a request back; a request
still held when the gateway goes away never starts. A real launcher process, real jobs."""
from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from schedulers.base import Task
from schedulers.local import launcher
from schedulers.local.admission import Admission


class _Launcher:
    """launcher.py as the plugin starts it, spoken to over its pipes."""

    def __init__(self) -> None:
        self.process = subprocess.Popen([sys.executable, "-I", "-S", launcher.__file__, "--serve"],
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE, start_new_session=True)
        self.answers: list[dict[str, Any]] = []

    def send(self, **request: Any) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write((json.dumps(request) + "\n").encode())
        self.process.stdin.flush()

    def until(self, op: str, task_id: str, timeout: float = 30) -> list[dict[str, Any]]:
        """Read answers until `op` of `task_id` came; answers all read so far."""
        assert self.process.stdout is not None
        deadline = time.monotonic() + timeout
        while not any(a["op"] == op and a["id"] == task_id for a in self.answers):
            assert time.monotonic() < deadline, f"no {op} of {task_id}: {self.answers}"
            line = self.process.stdout.readline()
            assert line, f"the launcher ended before the {op} of {task_id}: {self.answers}"
            self.answers.append(json.loads(line))
        return self.answers

    def order(self) -> list[tuple[str, str]]:
        return [(a["op"], a["id"]) for a in self.answers]


@pytest.fixture
def served() -> Iterator[_Launcher]:
    serving = _Launcher()
    yield serving
    if serving.process.poll() is None:
        serving.process.kill()
    serving.process.wait(10)


def _job(folder: Path, task_id: str, argv: list[str], **more: Any) -> dict[str, Any]:
    """A direct job's request (launcher.py documents it), run as the launcher's own user."""
    return {"op": "run", "id": task_id, "join": [], "cpus": [], "rlimit_as": 0, "user": None,
            "stdout": str(folder / f"{task_id}.out"), "stderr": str(folder / f"{task_id}.err"), "env": None,
            "cwd": str(folder), "gpus": None, "argv": argv, "cputime": None,
            "exit_file": str(folder / f"{task_id}.exit"), "spawn": False, **more}


def _holder(folder: Path) -> list[str]:
    return ["/bin/sh", "-c", f"until [ -e {folder / 'go'} ]; do sleep 0.02; done"]


def test_a_request_after_a_running_job_starts_as_that_job_is_reaped(served: _Launcher, tmp_path: Path) -> None:
    served.send(**_job(tmp_path, "a", _holder(tmp_path)))
    served.send(**_job(tmp_path, "b", ["/bin/echo", "b ran"], after="a"))
    served.until("started", "a")
    time.sleep(0.3)
    assert not (tmp_path / "b.out").exists(), "b started before the job it waits for ended"
    (tmp_path / "go").touch()
    served.until("exit", "b")
    assert served.order() == [("started", "a"), ("exit", "a"), ("started", "b"), ("exit", "b")]
    assert (tmp_path / "b.out").read_text() == "b ran\n"
    assert (tmp_path / "b.exit").read_text().strip() == "0"


def test_a_request_after_a_job_that_is_not_the_launchers_starts_at_once(served: _Launcher, tmp_path: Path) -> None:
    served.send(**_job(tmp_path, "a", ["/bin/true"]))
    served.until("exit", "a")
    served.send(**_job(tmp_path, "b", ["/bin/true"], after="a"))  # a ended already
    served.send(**_job(tmp_path, "c", ["/bin/true"], after="never-sent"))
    served.until("exit", "b")
    served.until("exit", "c")


def test_a_dropped_request_is_answered_and_never_runs(served: _Launcher, tmp_path: Path) -> None:
    served.send(**_job(tmp_path, "a", _holder(tmp_path)))
    served.send(**_job(tmp_path, "b", ["/bin/echo", "b ran"], after="a"))
    served.send(op="drop", id="b")
    answers = served.until("error", "b")
    assert {"op": "error", "id": "b", "error": launcher.DROPPED} in answers
    served.send(op="drop", id="a")  # a job that runs is not touched by a drop
    (tmp_path / "go").touch()
    served.until("exit", "a")
    assert next(a for a in served.answers if a["op"] == "exit")["code"] == 0
    assert not (tmp_path / "b.out").exists()


def test_held_requests_chain_and_one_dropped_from_the_middle_passes_its_place_on(
        served: _Launcher, tmp_path: Path) -> None:
    served.send(**_job(tmp_path, "a", _holder(tmp_path)))
    served.send(**_job(tmp_path, "b", ["/bin/echo", "b"], after="a"))
    served.send(**_job(tmp_path, "c", ["/bin/echo", "c"], after="b"))  # b is held itself: c waits too
    served.send(**_job(tmp_path, "d", ["/bin/echo", "d"], after="c"))
    served.send(op="drop", id="c")
    served.until("error", "c")
    time.sleep(0.3)
    assert not any((tmp_path / f"{name}.out").exists() for name in "bcd"), served.answers
    (tmp_path / "go").touch()
    served.until("exit", "d")
    assert [step for step in served.order() if step[0] != "error"] == [
        ("started", "a"), ("exit", "a"), ("started", "b"), ("exit", "b"), ("started", "d"), ("exit", "d")]
    assert not (tmp_path / "c.out").exists()


def test_a_held_request_whose_job_ahead_cannot_start_at_all_starts_at_once(served: _Launcher, tmp_path: Path) -> None:
    served.send(**_job(tmp_path, "a", _holder(tmp_path)))
    served.send(**_job(tmp_path, "b", ["/no/such/command"], after="a"))
    served.send(**_job(tmp_path, "c", ["/bin/echo", "c"], after="b"))
    (tmp_path / "go").touch()
    served.until("exit", "c")
    assert (tmp_path / "c.out").read_text() == "c\n"


def test_a_request_still_held_when_the_gateway_goes_away_never_starts(served: _Launcher, tmp_path: Path) -> None:
    served.send(**_job(tmp_path, "a", _holder(tmp_path)))
    served.send(**_job(tmp_path, "b", ["/bin/echo", "b ran"], after="a"))
    served.until("started", "a")
    assert served.process.stdin is not None
    served.process.stdin.close()  # as when the gateway stops or crashes: a restarted one queues b again
    (tmp_path / "go").touch()
    assert served.process.wait(30) == 0  # it stayed for a, then left
    assert (tmp_path / "a.exit").read_text().strip() == "0"
    assert not (tmp_path / "b.out").exists()


def _task(task_id: str, cores: int = 1, memory: int = 0, gpus: int = 0) -> Task:
    return Task(id=task_id, user="u", workdir=f"/w/{task_id}", stdout="/o", stderr="/e", cores=cores, memory=memory,
                gpus=gpus)


def test_the_head_of_the_queue_waits_behind_a_job_that_holds_its_cores() -> None:
    admission = Admission((0, 1), 1000, ("g0",))
    running = admission.take(_task("r", memory=300))
    assert running is not None
    for task in (_task("n1", memory=400), _task("n2", memory=400), _task("big", cores=2)):
        admission.enqueue(task)
    behind = admission.take_behind(running)
    assert behind is not None and (behind.task_id, behind.cpus, behind.after) == ("n1", running.cpus, "r")
    assert running.behind == "n1"
    assert admission.take_behind(running) is None, "one at most behind a job"
    assert admission.take_behind(behind) is None, "nothing behind one that waits itself"
    other = admission.take(_task("o"))
    assert other is not None and other.cpus == (1,)
    assert admission.take_behind(other) is None, "n2's 400 MiB are not free beside 300 + 400"
    assert admission.waiting(_task("x")).description.startswith("waiting for 1 core, 0 free, and 0 MiB, 300 MiB free")
    admission.free("r")  # its CPUs pass to n1, not to the free list
    assert behind.after is None and admission.take(_task("y")) is None
    admission.free("o")
    second = admission.take_behind(behind)  # n1 runs on r's CPUs now, and n2's memory is free
    assert second is not None and (second.task_id, second.cpus, second.after) == ("n2", running.cpus, "n1")
    admission.free("n1")
    assert admission.take_behind(second) is None, "big, the head now, asks for 2 cores"
    admission.free("n2")
    assert sorted(admission._free) == [0, 1] and admission._used_memory == 0
    assert [slot.task_id for slot in admission.admissible()] == ["big"]


def test_a_request_that_leaves_before_it_started_gives_the_cpus_back_to_the_job_ahead() -> None:
    admission = Admission((0,), 1000, ("g0",))
    running = admission.take(_task("r"))
    assert running is not None
    admission.enqueue(_task("n"))
    admission.enqueue(_task("gpu", gpus=1))
    assert admission.take_behind(running) is not None
    admission.free("n")  # canceled, or its launcher died
    assert running.behind is None and admission.take(_task("y")) is None
    assert admission.take_behind(running) is None, "a task that asks for a GPU is never sent ahead"
    admission.free("r")
    assert admission._free == [0]


def test_tasks_waiting_behind_jobs_are_movable_to_free_cpus_as_many_as_they_take() -> None:
    admission = Admission((0, 1, 2, 3), 1000)
    first, second = admission.take(_task("r1")), admission.take(_task("r2", cores=2))
    assert first is not None and second is not None
    for task in (_task("n1"), _task("n2", cores=2)):
        admission.enqueue(task)
    held = [admission.take_behind(first), admission.take_behind(second)]
    assert [slot.task_id for slot in held if slot is not None] == ["n1", "n2"]
    assert [slot.task_id for slot in admission.movable()] == ["n1"], "one CPU is free: n2 asks for two"
    assert held[0] is not None
    held[0].recalled = True
    assert admission.movable() == [], "the free CPU is n1's, which is on its way back"
    admission.free("n1")  # the launcher answered the drop: n1 leaves, r1 keeps its CPU
    assert first.behind is None and sorted(admission._free) == [3]
    admission.free("r1")
    assert [slot.task_id for slot in admission.movable()] == ["n2"]
    assert held[1] is not None
    held[1].canceling = True
    assert admission.movable() == [], "a task being canceled is not moved"


def test_a_job_with_a_gpu_has_nothing_sent_behind_it() -> None:
    admission = Admission((0,), 1000, ("g0",))
    running = admission.take(_task("r", gpus=1))
    assert running is not None and running.gpus == ("g0",)
    admission.enqueue(_task("n"))
    assert admission.take_behind(running) is None
