"""What every API does with tasks, in one place: accept, cancel, delete. The HTTP layers (v1, TES)
parse, authorise and answer; they call these for the work."""
from __future__ import annotations

import logging
import os
import pwd
import shutil
from pathlib import Path
from typing import Any, Mapping

from aiohttp import web

from schedulers.base import JobRef, SchedulerError, SchedulerUnavailable
from schedulers.outcome import CANCELED_ON_REQUEST

from . import auth, policy
from .keys import CONFIG, POLLER, SCHEDULER, STORE
from schedulers.base import Task, TaskState
from .model import new_task_id, now, task_from_document
from .responses import ApiError
from .store import Change, Record

log = logging.getLogger(__name__)
RETRY = {"Retry-After": "30"}


def visible(request: web.Request, task_id: str) -> Record:
    """The task `task_id` if the caller may see it; 404 otherwise, the same as for an unknown id."""
    record = request.app[STORE].get(task_id)
    if record is None or not auth.identity(request).may_see(record.task.user):
        raise ApiError(404, f"no task with id {task_id!r}")
    return record


def new_task(app: web.Application, document: dict[str, Any]) -> Task:
    """A Task with a fresh id and its own folder under the task root, from a validated document."""
    task_id = new_task_id()
    return task_from_document(document, task_id, str(Path(app[CONFIG].task_root).resolve() / task_id))


async def accept(app: web.Application, task: Task, files: Mapping[str, str | bytes] | None = None) -> None:
    """Admit `task`, record it, hand it to the scheduler. On refusal nothing is kept (400 / 503).

    `files` (relative path -> content) are written into the task's folder before the job starts.
    """
    store, scheduler, poller = app[STORE], app[SCHEDULER], app[POLLER]
    policy.check(app[CONFIG], task)
    try:
        scheduler.admit_task(task)
    except SchedulerError as exc:
        raise ApiError(400, str(exc)) from None
    try:
        Path(task.workdir).mkdir(mode=0o700, parents=True)
        for relative, content in (files or {}).items():
            target = Path(task.workdir) / relative
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(content.encode() if isinstance(content, str) else content)
        account = scheduler.job_account(task)
        if account:
            _give_to(account, Path(task.workdir))
    except OSError as exc:
        shutil.rmtree(task.workdir, ignore_errors=True)
        log.error("cannot create the folder of task %s: %s", task.id, exc)
        raise ApiError(503, f"the gateway cannot create the task's folder right now: {exc.strerror}", headers=RETRY) from None
    store.add(task, scheduler.name)
    poller.inflight.add(task.id)
    try:
        native_id = await scheduler.submit(task)
    except SchedulerError as exc:
        store.delete(task.id)
        shutil.rmtree(task.workdir, ignore_errors=True)
        if isinstance(exc, SchedulerUnavailable):
            raise ApiError(503, str(exc), headers=RETRY) from None
        raise ApiError(400, str(exc)) from None
    finally:
        poller.inflight.discard(task.id)
    store.set_native_id(task.id, native_id)
    poller.wake()
    log.info("task %s submitted for %s as %s job %s", task.id, task.user, scheduler.name, native_id)


def _give_to(user: str, folder: Path) -> None:
    """Make the task's folder and what it holds belong to the user the job runs as."""
    entry = pwd.getpwnam(user)
    for path in [folder, *folder.rglob("*")]:
        os.chown(path, entry.pw_uid, entry.pw_gid, follow_symlinks=False)


async def cancel(app: web.Application, record: Record) -> None:
    """Stop the task's job (and its container) if it is still active; the task stays, CANCELED."""
    if record.state.terminal:
        return
    scheduler = app[SCHEDULER]
    if record.native_id is not None:
        try:
            await scheduler.cancel(JobRef(record.task, record.native_id))
        except SchedulerError as exc:
            raise ApiError(503, f"could not stop task {record.id}: {exc}", headers=RETRY) from None
        if record.task.container is not None and scheduler.runtime is not None:
            await scheduler.runtime.stop(record.task)
    app[STORE].apply([Change(record.id, TaskState.CANCELED, CANCELED_ON_REQUEST, record.exit_code, finished=now())])
    log.info("task %s canceled", record.id)


async def delete(app: web.Application, record: Record) -> None:
    """Cancel the task if active, then forget it: its record, its job's files, its own folder."""
    await cancel(app, record)
    if record.native_id is not None:
        try:
            await app[SCHEDULER].release(JobRef(record.task, record.native_id))
        except SchedulerError as exc:
            raise ApiError(503, f"could not remove task {record.id}: {exc}", headers=RETRY) from None
    app[STORE].delete(record.id)
    if Path(record.task.workdir).parent == Path(app[CONFIG].task_root).resolve():
        shutil.rmtree(record.task.workdir, ignore_errors=True)
    log.info("task %s deleted", record.id)
