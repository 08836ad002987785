"""The local scheduler's spool: a few flat files per task in the plugin's state folder, which is
how a restarted gateway finds its jobs again.

- `submitted`: a journal of the tasks whose job may start, one task id a line, appended at submit
  time before the job may start (one write to an open file, not a file made per task); a direct
  job (see launcher.py) needs no script, since a task still queued after a restart comes back with
  its Task and is started again from it. When it has grown past `JOURNAL_LINES` lines (and twice
  what it must keep), it is written again with only the ids the plugin still needs;
- `<task>.sh` (a job script, written atomically) at submit time for a job that needs bash;
  `<task>.job` (empty) is how older versions marked a direct job: still read, and removed;
- `<task>.pid`: `PID START_TIME CPUS MEMORY CGROUP OOM_BASE` once the job runs (start time in clock
  ticks, against pid reuse; CPUs comma-separated or `-`; memory in MiB; the cgroup it runs in, or
  `-`, and that group's OOM-kill counter when the job took it);
- `<task>.cancelled`: a cancel was asked (its mtime is when).

Older versions kept a folder per task (`<task>/job.sh`, `<task>/pid`, `<task>/cancelled`): it is
still read, and removed with the task.
"""
from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from ..files import mtime
from . import proc

log = logging.getLogger(__name__)

#: The spool's files of a task, by suffix.
SUFFIXES = (".job", ".sh", ".sh.part", ".pid", ".pid.part", ".cancelled")
#: Every file an older version's task folder may hold.
LEGACY_FILES = ("job.sh", "pid", "cancelled", "job.sh.part", "pid.part", "launch.log")


@dataclass(frozen=True)
class PidRecord:
    """What the pid file says about a running job."""

    pid: int
    started_at: int | None
    cpus: tuple[int, ...]
    memory: int
    cgroup: str | None = None
    oom_base: int = 0
    gpus: tuple[str, ...] = ()


#: The name of the journal of submitted tasks, in the spool.
JOURNAL = "submitted"
#: Lines the journal may hold before it is written again with only the ids still needed.
JOURNAL_LINES = 50_000


class Spool:
    """The task files under `root`."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._prefix = str(root) + "/"
        self._journal_path = self._prefix + JOURNAL
        self._journal: int | None = None  # the journal's file, opened for appending at the first submit
        self._submitted: set[str] = set()
        self._lines = 0
        self._compact_at = 0  # after a look that found most lines needed: the next look not before this many
        self._torn = False
        self._read_journal()
        self.inherited: set[str] | None = set(self._submitted)  # kept by `compact` until the plugin reconciled

    def _read_journal(self) -> None:
        """Take in the ids of the journal as it is on disk (it may have grown since: the journal of a
        spool shared by replicas, written by whichever of them runs the jobs)."""
        try:
            with open(self._journal_path, "rb") as f:
                text = f.read()
        except FileNotFoundError:
            text = b""
        lines = text.split(b"\n")
        self._torn = bool(lines[-1])  # a line cut short (power loss): ignored, and ended before the next
        self._submitted.update(line.decode("ascii", "replace") for line in lines[:-1] if line)
        self._lines = len(lines) - 1

    def _path(self, task_id: str, suffix: str) -> str:
        return self._prefix + task_id + suffix

    def script(self, task_id: str) -> Path:
        """The task's job script (for a job that needs bash)."""
        return Path(self._path(task_id, ".sh"))

    def legacy_script(self, task_id: str) -> Path:
        """The job script where older versions wrote it."""
        return self.root / task_id / "job.sh"

    def write_script(self, task_id: str, text: str) -> None:
        """Write the job script atomically (OSError if it cannot be written)."""
        partial = self._path(task_id, ".sh.part")
        with open(partial, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(partial, self._path(task_id, ".sh"))

    def write_marker(self, task_id: str) -> None:
        """Say that a job for the task may start (one that needs no script), in the journal: there
        for a gateway restarted after a crash once this returns (OSError on failure)."""
        if self._journal is not None and not self._journal_is_current():
            os.close(self._journal)  # another process (a replica) wrote the journal again meanwhile
            self._journal = None
        if self._journal is None:
            self._journal = os.open(self._journal_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
        line = task_id.encode("ascii") + b"\n"
        if self._torn:
            line = b"\n" + line
        if os.write(self._journal, line) != len(line):  # a short write: the journal must not hold half a line
            raise OSError(28, "the spool journal took only part of a line", self._journal_path)
        self._torn = False
        self._submitted.add(task_id)
        self._lines += 1

    def compact(self, keep: Callable[[], Iterable[str]]) -> None:
        """Write the journal again with only the ids `keep()` answers (among those it holds), once it
        has grown past `JOURNAL_LINES` lines and twice what it keeps; atomic (a `.part` renamed over
        it). `keep` names every task the plugin may still be asked about: queued, running, ended
        lately; until the plugin reconciled (`inherited` set to None), the ids found at start-up
        are kept too. Only the replica that runs the jobs writes the journal, but one that ran them
        before may have left ids in it that this one has not read yet: they are read first.

        A look that finds most lines still needed (a deep queue) sets the next look back until as
        many lines again as it had to keep were written: each line is read a bounded number of
        times, however long the queue, rather than the whole journal at every submit."""
        if self._lines <= max(JOURNAL_LINES, self._compact_at):
            return
        self._read_journal()  # with what another replica sharing the spool wrote
        kept = self._submitted.intersection(keep())
        if self.inherited is not None:
            kept |= self._submitted & self.inherited
        if self._lines <= 2 * len(kept):
            self._compact_at = self._lines + len(kept)
            return
        partial = self._journal_path + ".part"
        with open(partial, "wb") as f:
            f.write(b"".join(task_id.encode("ascii") + b"\n" for task_id in kept))
        os.replace(partial, self._journal_path)
        if self._journal is not None:
            os.close(self._journal)
            self._journal = None
        self._submitted, self._lines, self._torn = kept, len(kept), False
        self._compact_at = 2 * len(kept)

    def close(self) -> None:
        """Close the journal (it opens again at the next submit)."""
        if self._journal is not None:
            os.close(self._journal)
            self._journal = None

    def _journal_is_current(self) -> bool:
        """Whether the journal open for appending is still the one at its path: a journal written
        again (`compact`, by any process) is renamed over the old one, which then has no name left.
        One `fstat` per submit, no path look-up."""
        assert self._journal is not None
        return os.fstat(self._journal).st_nlink > 0

    def known(self, task_id: str) -> bool:
        """Whether a job for the task was submitted here: it may have started. An id not seen yet
        is looked for again in the journal on disk (another replica may have written it)."""
        if task_id in self._submitted:
            return True
        if os.path.exists(self._path(task_id, ".job")) or os.path.exists(self._path(task_id, ".sh")) \
                or self.legacy_script(task_id).exists():
            return True
        self._read_journal()
        return task_id in self._submitted

    def write_pid(self, task_id: str, record: PidRecord) -> None:
        """Record the running job's pid atomically."""
        partial = self._path(task_id, ".pid.part")
        with open(partial, "w", encoding="ascii") as f:
            f.write(f"{record.pid} {record.started_at} {','.join(map(str, record.cpus)) or '-'} {record.memory} "
                    f"{record.cgroup or '-'} {record.oom_base} {','.join(record.gpus) or '-'}\n")
        os.replace(partial, self._path(task_id, ".pid"))

    def read_pid(self, task_id: str) -> PidRecord | None:
        """The pid file's record, or None if there is none (or it cannot be read)."""
        for path in (self._path(task_id, ".pid"), self.root / task_id / "pid"):
            try:
                with open(path, encoding="ascii") as f:
                    fields = f.read().split()
            except OSError:
                continue
            try:
                pid, started, cpus, memory = fields[:4]
                cgroup, oom_base = fields[4:6] if len(fields) >= 6 else (task_id, "0")  # older: one group per task
                gpus = fields[6] if len(fields) >= 7 else "-"  # older: no GPUs
                return PidRecord(int(pid), None if started == "None" else int(started),
                                 tuple(int(c) for c in cpus.split(",") if c.isdigit()), int(memory),
                                 None if cgroup == "-" else cgroup, int(oom_base),
                                 tuple(g for g in gpus.split(",") if g and gpus != "-"))
            except ValueError:
                return None
        return None

    def marked(self) -> set[str]:
        """The tasks that have a pid file, a cancel mark or an older version's folder in the spool:
        one listing of the spool, where a restart with a deep queue would look for each task's."""
        found: set[str] = set()
        try:
            entries = os.scandir(self.root)
        except FileNotFoundError:  # the state folder removed under a running gateway: nothing in it
            return found
        with entries:
            for entry in entries:
                name = entry.name
                if name.endswith(".pid"):
                    found.add(name[:-4])
                elif name.endswith(".cancelled"):
                    found.add(name[:-10])
                elif "." not in name and entry.is_dir(follow_symlinks=False):
                    found.add(name)
        return found

    def has_pid(self, task_id: str) -> bool:
        return os.path.exists(self._path(task_id, ".pid")) or (self.root / task_id / "pid").exists()

    def pid_written(self, task_id: str) -> datetime | None:
        """When the pid file was written: when the job started."""
        return mtime(self._path(task_id, ".pid")) or mtime(self.root / task_id / "pid")

    def mark_cancelled(self, task_id: str) -> None:
        """Remember that a cancel was asked, for a gateway that restarts before it is recorded."""
        if self.known(task_id):
            Path(self._path(task_id, ".cancelled")).touch()

    def cancelled(self, task_id: str) -> datetime | None:
        """When a cancel was asked, or None."""
        return mtime(self._path(task_id, ".cancelled")) or mtime(self.root / task_id / "cancelled")

    def remove(self, task_id: str) -> None:
        """Remove what the spool holds for the task (its journal line goes at the next compaction)."""
        self._submitted.discard(task_id)
        for suffix in SUFFIXES:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._path(task_id, suffix))
        folder = self.root / task_id
        if folder.is_dir():
            for name in LEGACY_FILES:
                (folder / name).unlink(missing_ok=True)
            folder.rmdir()

    def adopt(self, task_ids: Sequence[str], memory: dict[str, int], cgroup: Callable[[int], str | None],
              oom_kills: Callable[[str], int], marked: set[str] | None = None) -> list[str]:
        """Jobs started just before a crash, whose pid was never recorded: found by the task id in
        their environment (one scan of /proc), their pid files written with the CPUs they are
        pinned to, their cgroup (`cgroup(pid)`), its OOM-kill counter now (`oom_kills`) and their GPUs.
        `memory` gives each task's MiB; `marked`, what `marked()` answered, if the caller has it.
        Answers the tasks whose pid file it wrote."""
        lost = [task_id for task_id in task_ids if self.known(task_id)
                and not ((marked is None or task_id in marked) and self.has_pid(task_id))]
        running = proc.by_task() if lost else {}
        found = []
        for task_id in lost:
            leaders = sorted(pid for pid in running.get(task_id, ()) if pid == proc.pgid(pid))
            if leaders:
                pid = leaders[0]
                log.warning("task %s: found its job running as pid %d", task_id, pid)
                try:
                    cpus = tuple(sorted(os.sched_getaffinity(pid)))
                except OSError:
                    cpus = ()
                group = cgroup(pid)
                self.write_pid(task_id, PidRecord(pid, proc.start_time(pid), cpus, memory.get(task_id, 0), group,
                                                  oom_kills(group) if group else 0, proc.visible_gpus(pid)))
                found.append(task_id)
        return found
