"""What a poller tells its listeners (the event stream) of changes other replicas made
(`Poller.observed`): each change once, also when a new lease holder reads every active task again."""
from __future__ import annotations

import asyncio
from collections.abc import Iterable, Iterator
from concurrent.futures import Future
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from gateway.active import ActiveSet
from gateway.model import now, task_from_document
from gateway.poller import Poller
from gateway.store import Change, Record, Store
from gateway.validation import SchemaValidator
from schedulers.base import TaskState
from schedulers.local.plugin import LocalScheduler


@pytest.fixture
def observing(tmp_path: Path) -> Iterator[tuple[Poller, list[Record], Record]]:
    """A local scheduler's poller, what its listeners heard, and the record of a running task."""
    store = Store(tmp_path / "jobproxy.db")
    scheduler = LocalScheduler("local", SchemaValidator(LocalScheduler.options_schema).with_defaults({}),
                               tmp_path / "local")
    poller = Poller(store, scheduler, ActiveSet([]), 1.0)
    heard: list[Record] = []
    poller.listeners.append(heard.append)
    task = task_from_document({"user": "u", "cmd": "true"}, "t1", str(tmp_path / "t1"))
    try:
        yield poller, heard, Record(1, task, "local", "t1", TaskState.RUNNING, "started", None, now(), now(), None)
    finally:
        store.close()


def _ended(running: Record) -> Record:
    return replace(running, state=TaskState.COMPLETE, description="exit code 0", exit_code=0, finished=now())


def test_a_change_is_told_once_however_often_it_is_read(observing: tuple[Poller, list[Record], Record]) -> None:
    poller, heard, running = observing
    poller.observed(running)
    poller.observed(replace(running, state=TaskState.QUEUED))  # older than what is known: ignored
    poller.observed(running)  # read again (a new lease holder's refresh): nothing new
    poller.observed(replace(running, native_id=None))  # a notification without the job id: the same
    assert heard == [running]
    ended = _ended(running)
    poller.observed(ended)
    assert heard == [running, ended]
    assert poller.active.get("t1") is None  # final: out of the active set


def test_an_older_record_arriving_after_the_end_is_ignored(observing: tuple[Poller, list[Record], Record]) -> None:
    """A notification read late (a new lease holder's refresh, read before the task ended, handled
    after): the task stays out of the active set, and nobody hears it run again."""
    poller, heard, running = observing
    ended = _ended(running)
    poller.observed(running)
    poller.observed(ended)
    poller.observed(running)  # late
    assert poller.active.get("t1") is None
    assert heard == [running, ended]


def test_a_new_task_read_late_is_told_queued_first(observing: tuple[Poller, list[Record], Record]) -> None:
    """Another replica's new task, whose record this replica read only after its job started
    (`Replication._heard` observes the record as added first): QUEUED, then RUNNING, each once."""
    poller, heard, running = observing
    added = running.as_added()
    assert (added.state, added.native_id, added.description, added.started) == (TaskState.QUEUED, None, "", None)
    poller.observed(added)
    assert heard == []  # held: its submit may yet be refused
    poller.observed(running)
    assert heard == [added, running]


def test_a_new_task_with_its_job_is_told_queued_once(observing: tuple[Poller, list[Record], Record]) -> None:
    poller, heard, running = observing
    queued = replace(running, state=TaskState.QUEUED, description="", started=None)
    poller.observed(queued.as_added())
    poller.observed(queued)  # its job id arrived: nothing new to tell
    poller.observed(running)
    assert [r.state for r in heard] == [TaskState.QUEUED, TaskState.RUNNING]


async def test_the_changes_of_one_turn_of_the_event_loop_are_one_write(tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """Changes applied in one turn of the event loop (a job's end, the next start, the reports of
    several submits) go to the store as one write; each caller's future answers once that write is
    on disk, and a caller that gives up on its own leaves the others theirs."""
    store = Store(tmp_path / "jobproxy.db")
    scheduler = LocalScheduler("local", SchemaValidator(LocalScheduler.options_schema).with_defaults({}),
                               tmp_path / "local")
    records = []
    for n in range(3):
        task = task_from_document({"user": "u", "cmd": "true"}, f"t{n}", str(tmp_path / f"t{n}"))
        records.append(await store.add(task, "local"))
    poller = Poller(store, scheduler, ActiveSet(records), 1.0)
    await store.flush()
    before, writes = store.commits, []
    apply = store.apply

    def counted(changes: Iterable[Change]) -> Future[Any]:  # the real store's write, counted
        writes.append(list(changes))
        return apply(writes[-1])

    monkeypatch.setattr(store, "apply", counted)
    running = poller.apply([Change("t0", TaskState.RUNNING, "running", started=now())])
    given_up = poller.apply([Change("t1", TaskState.RUNNING, "running", started=now())])
    ended = poller.apply([Change("t2", TaskState.COMPLETE, "exit code 0", 0, now(), now())])
    assert poller.active.get("t0").state == TaskState.RUNNING, "the active set has it at once"  # type: ignore[union-attr]
    assert given_up.cancel()
    await asyncio.gather(asyncio.wrap_future(running), asyncio.wrap_future(ended))
    assert [[c.task_id for c in write] for write in writes] == [["t0", "t1", "t2"]]
    assert store.commits - before == 1
    assert [store.get(f"t{n}").state for n in range(3)] == [  # type: ignore[union-attr]
        TaskState.RUNNING, TaskState.RUNNING, TaskState.COMPLETE]
    await asyncio.sleep(0.05)  # the final task leaves the active set once its state is on disk
    assert "t2" not in poller.active
    store.close()
