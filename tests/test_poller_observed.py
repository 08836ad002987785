"""What a poller tells its listeners (the event stream) of changes other replicas made
(`Poller.observed`): each change once, also when a new lease holder reads every active task again."""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from gateway.active import ActiveSet
from gateway.model import now, task_from_document
from gateway.poller import Poller
from gateway.store import Record, Store
from gateway.validation import SchemaValidator
from schedulers.base import TaskState
from schedulers.local.plugin import LocalScheduler


def test_a_change_is_told_once_however_often_it_is_read(tmp_path: Path) -> None:
    store = Store(tmp_path / "jobproxy.db")
    scheduler = LocalScheduler("local", SchemaValidator(LocalScheduler.options_schema).with_defaults({}),
                               tmp_path / "local")
    poller = Poller(store, scheduler, ActiveSet([]), 1.0)
    heard: list[Record] = []
    poller.listeners.append(heard.append)
    try:
        task = task_from_document({"user": "u", "cmd": "true"}, "t1", str(tmp_path / "t1"))
        running = Record(1, task, "local", "t1", TaskState.RUNNING, "started", None, now(), now(), None)
        poller.observed(running)
        poller.observed(replace(running, state=TaskState.QUEUED))  # older than what is known: ignored
        poller.observed(running)  # read again (a new lease holder's refresh): nothing new
        poller.observed(replace(running, native_id=None))  # a notification without the job id: the same
        assert heard == [running]
        ended = replace(running, state=TaskState.COMPLETE, description="exit code 0", exit_code=0, finished=now())
        poller.observed(ended)
        assert heard == [running, ended]
        assert poller.active.get("t1") is None  # final: out of the active set
    finally:
        store.close()


def test_an_older_record_arriving_after_the_end_is_ignored(tmp_path: Path) -> None:
    """A notification read late (a new lease holder's refresh, read before the task ended, handled
    after): the task stays out of the active set, and nobody hears it run again."""
    store = Store(tmp_path / "jobproxy.db")
    scheduler = LocalScheduler("local", SchemaValidator(LocalScheduler.options_schema).with_defaults({}),
                               tmp_path / "local")
    poller = Poller(store, scheduler, ActiveSet([]), 1.0)
    heard: list[Record] = []
    poller.listeners.append(heard.append)
    try:
        task = task_from_document({"user": "u", "cmd": "true"}, "t1", str(tmp_path / "t1"))
        running = Record(1, task, "local", "t1", TaskState.RUNNING, "started", None, now(), now(), None)
        ended = replace(running, state=TaskState.COMPLETE, description="exit code 0", exit_code=0, finished=now())
        poller.observed(running)
        poller.observed(ended)
        poller.observed(running)  # late
        assert poller.active.get("t1") is None
        assert heard == [running, ended]
    finally:
        store.close()
