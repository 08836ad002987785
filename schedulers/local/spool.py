"""The local scheduler's spool: one folder per task under the plugin's state folder, which is how a
restarted gateway finds its jobs again.

- `job.sh`: the job script, written atomically at submit time;
- `pid`: `PID START_TIME CPUS MEMORY` once the job runs (start time in clock ticks, against pid
  reuse; CPUs comma-separated or `-`; memory in MiB);
- `cancelled`: a cancel was asked (its mtime is when).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Sequence

from ..files import mtime
from . import proc

log = logging.getLogger(__name__)

#: Every file the spool may hold for a task (older versions wrote launch.log).
FILES = ("job.sh", "pid", "cancelled", "job.sh.part", "pid.part", "launch.log")


@dataclass(frozen=True)
class PidRecord:
    """What the pid file says about a running job."""

    pid: int
    started_at: int | None
    cpus: tuple[int, ...]
    memory: int


class Spool:
    """The task folders under `root`."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def folder(self, task_id: str) -> Path:
        """The task's own folder."""
        return self.root / task_id

    def script(self, task_id: str) -> Path:
        """The task's job script."""
        return self.root / task_id / "job.sh"

    def write_script(self, task_id: str, text: str) -> None:
        """Write the job script atomically (OSError if it cannot be written)."""
        folder = self.folder(task_id)
        folder.mkdir(parents=True, exist_ok=True)
        partial = folder / "job.sh.part"
        partial.write_text(text, encoding="utf-8")
        partial.replace(folder / "job.sh")

    def write_pid(self, task_id: str, record: PidRecord) -> None:
        """Record the running job's pid atomically."""
        folder = self.folder(task_id)
        partial = folder / "pid.part"
        partial.write_text(f"{record.pid} {record.started_at} {','.join(map(str, record.cpus)) or '-'} "
                           f"{record.memory}\n")
        partial.replace(folder / "pid")

    def read_pid(self, task_id: str) -> PidRecord | None:
        """The pid file's record, or None if there is none (or it cannot be read)."""
        try:
            pid, started, cpus, memory = (self.folder(task_id) / "pid").read_text().split()
            return PidRecord(int(pid), None if started == "None" else int(started),
                             tuple(int(c) for c in cpus.split(",") if c.isdigit()), int(memory))
        except (OSError, ValueError):
            return None

    def pid_written(self, task_id: str) -> datetime | None:
        """When the pid file was written: when the job started."""
        return mtime(self.folder(task_id) / "pid")

    def mark_cancelled(self, task_id: str) -> None:
        """Remember that a cancel was asked, for a gateway that restarts before it is recorded."""
        folder = self.folder(task_id)
        if folder.is_dir():
            (folder / "cancelled").touch()

    def cancelled(self, task_id: str) -> datetime | None:
        """When a cancel was asked, or None."""
        return mtime(self.folder(task_id) / "cancelled")

    def remove(self, task_id: str) -> None:
        """Remove the task's folder and what the spool put in it."""
        folder = self.folder(task_id)
        for name in FILES:
            (folder / name).unlink(missing_ok=True)
        if folder.is_dir():
            folder.rmdir()

    def adopt(self, task_ids: Sequence[str], memory: dict[str, int]) -> None:
        """Jobs started just before a crash, whose pid was never recorded: found by the task id in
        their environment (one scan of /proc), their pid files written. `memory` gives each task's
        MiB."""
        lost = [task_id for task_id in task_ids
                if self.script(task_id).exists() and not (self.folder(task_id) / "pid").exists()]
        running = proc.by_task() if lost else {}
        for task_id in lost:
            leaders = sorted(pid for pid in running.get(task_id, ()) if pid == proc.pgid(pid))
            if leaders:
                log.warning("task %s: found its job running as pid %d", task_id, leaders[0])
                self.write_pid(task_id, PidRecord(leaders[0], proc.start_time(leaders[0]), (), memory.get(task_id, 0)))
