"""The local scheduler's spool journal of submitted tasks: what a restarted gateway finds in it,
a line cut short, and compaction keeping every id still needed."""
from __future__ import annotations

from pathlib import Path

import pytest

from schedulers.local import spool as spool_module
from schedulers.local.spool import Spool


def test_a_restarted_spool_knows_what_was_submitted(tmp_path: Path) -> None:
    first = Spool(tmp_path)
    first.write_marker("a1")
    first.write_marker("b2")
    # no close: a crash leaves the journal as written
    again = Spool(tmp_path)
    assert again.known("a1") and again.known("b2") and not again.known("c3")
    assert (tmp_path / "submitted").read_text() == "a1\nb2\n"


def test_a_torn_last_line_is_ignored_and_ended(tmp_path: Path) -> None:
    (tmp_path / "submitted").write_text("a1\nb2")  # power loss in the middle of a line
    spool = Spool(tmp_path)
    assert spool.known("a1") and not spool.known("b2")
    spool.write_marker("c3")
    assert Spool(tmp_path).known("c3")
    assert (tmp_path / "submitted").read_text() == "a1\nb2\nc3\n"


def test_older_marker_files_still_count(tmp_path: Path) -> None:
    (tmp_path / "old.job").touch()
    assert Spool(tmp_path).known("old")


def test_compaction_keeps_what_is_needed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(spool_module, "JOURNAL_LINES", 10)
    (tmp_path / "submitted").write_text("inherited\n")
    spool = Spool(tmp_path)
    for number in range(20):
        spool.write_marker(f"t{number}")
    spool.compact(lambda: ["t19", "t3", "never-submitted"])
    # before the plugin reconciled, what a crash left is kept too
    assert sorted((tmp_path / "submitted").read_text().split()) == ["inherited", "t19", "t3"]
    assert spool.known("t3") and not spool.known("t4") and not spool.known("never-submitted")
    spool.inherited = None
    for number in range(20, 40):
        spool.write_marker(f"t{number}")
    spool.compact(lambda: ["t39"])
    assert (tmp_path / "submitted").read_text() == "t39\n"
    spool.write_marker("t40")  # appended to the new journal
    assert sorted(Spool(tmp_path).inherited or ()) == ["t39", "t40"]


def test_no_compaction_while_most_lines_are_needed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(spool_module, "JOURNAL_LINES", 10)
    spool = Spool(tmp_path)
    ids = [f"t{number}" for number in range(20)]
    for task_id in ids:
        spool.write_marker(task_id)
    spool.compact(lambda: ids[5:])
    assert len((tmp_path / "submitted").read_text().split()) == 20


def test_a_deep_queue_does_not_make_every_submit_read_the_journal(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """Past the line limit with most ids still needed, the journal is looked at again only once as
    many lines more arrived as it had to keep, not at each submit; then it is compacted."""
    monkeypatch.setattr(spool_module, "JOURNAL_LINES", 10)
    spool, needed, looks = Spool(tmp_path), [f"t{number}" for number in range(8)], []

    def keep() -> list[str]:
        looks.append(spool._lines)
        return needed

    spool.inherited = None
    for number in range(30):
        spool.write_marker(f"t{number}")
        spool.compact(keep)
    # 11 lines, 8 needed: not yet, and not again before 8 more (at 20 > 2 x 8: compacted to 8);
    # then past 2 x 8 again
    assert looks == [11, 20, 17]
    assert sorted((tmp_path / "submitted").read_text().split()) == sorted([*needed, "t29"])
    assert spool.known("t29") and not spool.known("t10")


def test_replicas_sharing_a_spool_see_each_others_submits(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Replicas on one machine share the spool: a new lease holder knows what the old one
    submitted after both started, and a journal written again by one is the one the other appends to."""
    monkeypatch.setattr(spool_module, "JOURNAL_LINES", 2)
    old, new = Spool(tmp_path), Spool(tmp_path)
    new.write_marker("n1")  # `new` holds the journal open for appending
    for n in range(1, 6):
        old.write_marker(f"o{n}")
    assert new.known("o1") and new.known("o5") and not new.known("x9")
    old.compact(lambda: ["n1", "o5"])  # over the limit: written again, a new file at the path
    assert sorted((tmp_path / "submitted").read_text().split()) == ["n1", "o5"]  # n1 too, which `old` never wrote
    new.write_marker("n2")
    assert Spool(tmp_path).known("n2"), (tmp_path / "submitted").read_text()


def test_one_listing_names_the_tasks_with_a_pid_file_a_cancel_mark_or_an_older_folder(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    spool.write_marker("queued")
    for name in ("running.pid", "asked.cancelled", "starting.pid.part", "scripted.sh", "old.job"):
        (tmp_path / name).touch()
    (tmp_path / "older").mkdir()
    assert spool.marked() == {"running", "asked", "older"}
    assert Spool(tmp_path / "gone").marked() == set()
