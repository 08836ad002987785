"""The DRMAA session's worker thread under a call that hangs (no libdrmaa needed): every call
answers within its timeout, a queued call whose caller gave up is dropped, and the thread serves
again once the stuck call returns (schedulers/drmaa/session.py)."""
from __future__ import annotations

import threading
import time

import pytest

from schedulers.base import SchedulerUnavailable
from schedulers.drmaa.session import DrmaaSession


async def test_a_stuck_call_answers_unavailable_and_does_not_block_later_calls_for_ever() -> None:
    session = DrmaaSession()
    release, ran = threading.Event(), list[str]()
    try:
        with pytest.raises(SchedulerUnavailable, match=r"did not answer within 0\.3 s"):
            await session.call(0.3, release.wait, 60)  # stuck in "libdrmaa"
        started = time.monotonic()
        with pytest.raises(SchedulerUnavailable):  # queued behind the stuck call: 503, not a hang
            await session.call(0.3, ran.append, "late")
        assert time.monotonic() - started < 5
    finally:
        release.set()
    assert await session.call(5, lambda: "served") == "served"
    assert ran == []  # the caller had given up on it: dropped, not run behind its back
