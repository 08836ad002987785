"""The event stream's history (gateway/events.py): what a reconnecting client gets, and when it is
told that some changes are gone."""
from __future__ import annotations

import json

import pytest

from gateway.events import EventHub
from gateway.model import now, task_from_document
from gateway.responses import ApiError
from gateway.store import Record
from schedulers.base import TaskState


def record(n: int, state: TaskState = TaskState.RUNNING) -> Record:
    task = task_from_document({"user": f"user{n % 2}", "cmd": "true"}, f"task{n}", f"/tasks/task{n}")
    return Record(n, task, "local", None, state, "", None, now(), None, None)


def test_resume_gets_every_later_change_until_the_history_overflows() -> None:
    hub = EventHub(100)
    for n in range(1, 151):
        hub.publish(record(n))
    assert hub.last == 150
    lost, changes = hub.since(140)
    assert not lost and [e.seq for e in changes] == list(range(141, 151))
    assert [json.loads(e.data)["id"] for e in hub.since(149)[1]] == ["task150"]
    assert list(hub.since(150)[1]) == []
    lost, changes = hub.since(10)  # 11..50 are gone: the client is told, and gets what is left
    assert lost and [e.seq for e in changes] == list(range(51, 151))
    assert not hub.since(50)[0]


def test_resume_points() -> None:
    hub = EventHub(100)
    hub.publish(record(1, TaskState.QUEUED))
    assert hub.resume_point(None) == (1, None)
    assert hub.resume_point(f"{hub.epoch}-0") == (0, None)
    seq, gap = hub.resume_point("0badcafe-1" if hub.epoch != "0badcafe" else "1badcafe-1")
    assert seq == 0 and gap is not None and "restarted" in gap
    for bad in ("x", f"{hub.epoch}-", f"{hub.epoch}-2", "a b-1", f"{hub.epoch}-{'9' * 19}"):
        with pytest.raises(ApiError) as caught:
            hub.resume_point(bad)
        assert caught.value.status == 400 and caught.value.details[0]["path"] == "Last-Event-ID"


def test_publish_never_raises() -> None:
    hub = EventHub(100)
    hub.publish(object())  # type: ignore[arg-type]  # a listener must not break the poller
    assert hub.last == 0 and hub.since(0)[0] is False
