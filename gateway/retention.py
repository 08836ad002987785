"""Retention: finished tasks are forgotten once they are older than `[store] retain_days`.

A purge removes, for each task in a final state that ended before a moment (by `finished`, or by
`created` for a task that never ran): the scheduler plugin's files for its job (`release`), the
task's own folder (only when it lies directly under the task root, as a delete does), then its
record. Tasks go in batches of `BATCH`, each batch one write transaction, so that the first purge
of a big store never holds the store's writer for long. An active task is never purged: the store
is asked only for tasks in a final state, the delete itself re-checks the state in its
transaction, and the gateway's active set is consulted as well.

The gateway purges shortly after it starts and then every hour (`periodic`); an admin can purge
on demand with `jobproxy purge --older-than DAYS` (`command`), whether the gateway runs or not:
SQLite in WAL mode lets a second process write, and the command never starts the scheduler plugin
(no launcher, no DRMAA session): `release` of the built-in plugins only removes files and
in-memory bookkeeping.
"""
from __future__ import annotations

import asyncio
import logging
import shutil
import sys
from collections.abc import Container
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path

from aiohttp import web

from schedulers.base import JobRef, Scheduler, SchedulerError

from .active import ActiveSet
from .config import Config
from .keys import ACTIVE, CONFIG, SCHEDULERS, STORE, TASK_ROOT
from .model import now, rfc3339
from .plugins import create_schedulers
from .store import Record
from .taskstore import TaskStore, open_store

log = logging.getLogger(__name__)

#: How many tasks one purge batch removes (one write transaction).
BATCH = 500
#: Seconds after the gateway's start before its first purge, then between two purges.
FIRST_DELAY = 60.0
EVERY = 3600.0


def remove_task_folder(workdir: str | Path, task_root: Path) -> None:
    """Remove a task's folder if it lies directly under the task root (a task may name its own
    working folder elsewhere: that one is the user's, never removed)."""
    if Path(workdir).parent == task_root:
        shutil.rmtree(workdir, ignore_errors=True)


@dataclass
class Purged:
    """What a purge removed (or, dry, would remove), and the tasks it had to leave."""

    removed: list[Record] = field(default_factory=list)
    kept: list[tuple[Record, str]] = field(default_factory=list)  # (task, why)


async def purge(store: TaskStore, schedulers: dict[str, Scheduler], task_root: Path, before: datetime, *,
                active: Container[str] = (), dry_run: bool = False, batch: int = BATCH) -> Purged:
    """Forget every finished task that ended before `before`, `batch` at a time; never one whose
    id is in `active`, nor one whose scheduler instance (in `schedulers`, by name) is not
    configured: its job's files could not be released. `dry_run`: only answer what would go."""
    result = Purged()
    skipped = 0  # tasks the store answers again (kept, or listed by a dry run): read past them
    while True:
        records = await store.ended_before_async(before, batch, offset=skipped)
        if not records:
            return result
        doomed = []
        for record in records:
            scheduler = schedulers.get(record.scheduler)
            if record.id in active:
                result.kept.append((record, "active in the gateway"))
            elif scheduler is None:
                result.kept.append((record, f"its scheduler instance {record.scheduler!r} is not configured"))
            elif dry_run:
                result.removed.append(record)
            else:
                try:
                    if record.native_id is not None:
                        await scheduler.release(JobRef(record.task, record.native_id))
                except SchedulerError as exc:
                    result.kept.append((record, f"the scheduler could not release its job: {exc}"))
                    continue
                doomed.append(record)
        if dry_run:
            skipped += len(records)
            continue
        await asyncio.to_thread(_remove_folders, [r.task.workdir for r in doomed], task_root)
        gone = set(await store.delete_finished([r.id for r in doomed]))
        result.removed.extend(r for r in doomed if r.id in gone)
        skipped += len(records) - len(gone)


def _remove_folders(workdirs: list[str], task_root: Path) -> None:
    for workdir in workdirs:
        remove_task_folder(workdir, task_root)


async def periodic(app: web.Application) -> None:
    """The gateway's purge: `FIRST_DELAY` seconds after the start, then every `EVERY` seconds;
    nothing with `[store] retain_days = 0`."""
    days = app[CONFIG].sections.store.retain_days
    if not days:
        return
    await asyncio.sleep(FIRST_DELAY)
    active: ActiveSet = app[ACTIVE]
    while True:
        before = now() - timedelta(days=days)
        try:
            done = await purge(app[STORE], app[SCHEDULERS], app[TASK_ROOT], before, active=active)
            if done.removed or done.kept:
                log.info("retention: purged %d finished tasks that ended before %s (%d kept)",
                         len(done.removed), rfc3339(before), len(done.kept))
        except Exception:  # the next round tries again
            log.exception("retention: the purge failed")
        await asyncio.sleep(EVERY)


async def _command(config: Config, days: float, dry_run: bool) -> int:
    store_path, settings = Path(config.store_path), config.sections.store
    if settings.url is None and not store_path.exists():
        print(f"no task store at {store_path}: nothing to purge")
        return 0
    schedulers = create_schedulers(config)  # never started: release() only removes their files
    store = open_store(settings.url, store_path, settings.password_file)
    try:
        before = now() - timedelta(days=days)
        done = await purge(store, schedulers, Path(config.task_root).resolve(), before, dry_run=dry_run)
    finally:
        store.close()
    verb = "would remove" if dry_run else "removed"
    for record in done.removed:
        print(f"{verb} task {record.id} (user {record.task.user}, {record.state.value}, "
              f"ended {rfc3339(record.finished or record.created)})")
    for record, why in done.kept:
        print(f"kept task {record.id}: {why}")
    print(f"{verb} {len(done.removed)} finished tasks that ended before {rfc3339(before)}"
          + (f"; kept {len(done.kept)}" if done.kept else ""))
    return 1 if done.kept else 0


def command(config: Config, days: float, dry_run: bool = False) -> int:
    """`jobproxy purge --older-than DAYS`: purge now, print what went; exit status 1 if some task
    could not be purged (its scheduler refused to release it)."""
    if not 0 <= days <= 36500:
        print("jobproxy purge: --older-than takes a number of days from 0 to 36500", file=sys.stderr)
        return 2
    return asyncio.run(_command(config, days, dry_run))
