"""What every API does with tasks, in one place: accept, cancel, delete. The HTTP layers (v1, TES)
parse, authorise and answer; they call these for the work."""
from __future__ import annotations

import asyncio
import logging
import os
import pwd
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from aiohttp import web

from schedulers.base import JobRef, SchedulerError, SchedulerUnavailable, Task, TaskRefused, TaskState
from schedulers.outcome import CANCELED_ON_REQUEST

from . import auth, policy, reload
from .keys import ACTIVE, POLLER, QUOTAS, SCHEDULER, STORE, TASK_ROOT
from .model import new_task_id, now, task_from_document
from .responses import ApiError
from .retention import remove_task_folder
from .store import Change, IdempotencyKey, Record

log = logging.getLogger(__name__)
RETRY = {"Retry-After": "30"}


def current(app: web.Application, task_id: str) -> Record | None:
    """The task's freshest record: from the active set while it is active, else from the store."""
    return app[ACTIVE].get(task_id) or app[STORE].get(task_id)


async def page(app: web.Application, **query: Any) -> list[Record]:
    """A page of tasks from the store (`Store.page`, off the event loop), each active one as the
    active set has it now."""
    active = app[ACTIVE]
    return [active.get(r.id) or r for r in await app[STORE].page_async(**query)]


def visible(request: web.Request, task_id: str) -> Record:
    """The task `task_id` if the caller may see it; 404 otherwise, the same as for an unknown id."""
    record = current(request.app, task_id)
    if record is None or not auth.identity(request).may_see(record.task.user):
        raise ApiError(404, f"no task with id {task_id!r}")
    return record


def new_task(app: web.Application, document: dict[str, Any]) -> Task:
    """A Task with a fresh id and its own folder under the task root, from a validated document."""
    task_id = new_task_id()
    return task_from_document(document, task_id, str(app[TASK_ROOT] / task_id))


async def accept(app: web.Application, task: Task, files: Mapping[str, str | bytes] | None = None,
                 key: IdempotencyKey | None = None) -> None:
    """Admit `task`, record it, hand it to the scheduler. On refusal nothing is kept (400 / 503).

    `files` (relative path -> content) are written into the task's folder before the job starts;
    `key`, the request's idempotency key, is recorded with the task.
    """
    scheduler = app[SCHEDULER]
    policy.check(app[reload.LIVE].config, task)  # the [limits] of the last reload
    try:
        scheduler.admit_task(task)
    except TaskRefused as exc:
        raise refused(exc) from None
    except SchedulerError as exc:
        raise ApiError(400, str(exc)) from None
    with app[QUOTAS].admitting(task.user):
        await _keep(app, task, files, key)


async def _keep(app: web.Application, task: Task, files: Mapping[str, str | bytes] | None,
                key: IdempotencyKey | None) -> None:
    """Make the task's folder, record the task, hand it to its scheduler (or keep nothing)."""
    store, scheduler, poller = app[STORE], app[SCHEDULER], app[POLLER]
    try:
        _make_folder(task, files or {}, scheduler.job_account(task))
    except OSError as exc:
        shutil.rmtree(task.workdir, ignore_errors=True)
        log.error("cannot create the folder of task %s: %s", task.id, exc)
        raise ApiError(503, f"the gateway cannot create the task's folder right now: {exc.strerror}",
                       headers=RETRY) from None
    try:
        record = await store.add(task, scheduler.name, key)  # on disk before the scheduler hears of it
    except Exception:  # e.g. the database away (503), or another replica took the key: no folder kept
        shutil.rmtree(task.workdir, ignore_errors=True)
        raise
    if poller.hand_over(record):  # replicas: the holder of the scheduler's lease submits it
        log.info("task %s recorded for %s, handed to the replica that runs %s jobs", task.id, task.user,
                 scheduler.name, extra={"task_id": task.id, "user": task.user})
        return
    async with poller.submitting(record):
        try:
            native_id = await scheduler.submit(task)
        except SchedulerError as exc:
            poller.withdrawn(task.id)
            await store.delete(task.id)
            shutil.rmtree(task.workdir, ignore_errors=True)
            if isinstance(exc, SchedulerUnavailable):
                raise ApiError(503, str(exc), headers=RETRY) from None
            raise refused(exc) if isinstance(exc, TaskRefused) else ApiError(400, str(exc)) from None
        poller.submitted(task.id, native_id)
    log.info("task %s submitted for %s as %s job %s", task.id, task.user, scheduler.name, native_id,
             extra={"task_id": task.id, "user": task.user})


def _make_folder(task: Task, files: Mapping[str, str | bytes], account: str | None) -> None:
    """The task's own folder with the files it brings, owned by the account its job runs as."""
    try:
        os.mkdir(task.workdir, 0o700)
    except FileNotFoundError:  # the task root itself is gone: make it again
        Path(task.workdir).mkdir(mode=0o700, parents=True)
    for relative, content in files.items():
        target = Path(task.workdir) / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(content.encode() if isinstance(content, str) else content)
    if account is not None:
        _give_to(account, Path(task.workdir))


def refused(exc: TaskRefused) -> ApiError:
    """A scheduler's refusal as a 400 answer whose details name the refused part of the task."""
    return ApiError(400, str(exc), [{"path": exc.path, "message": str(exc)}])


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
    await asyncio.wrap_future(app[POLLER].apply(
        [Change(record.id, TaskState.CANCELED, CANCELED_ON_REQUEST, record.exit_code, finished=now())]))
    log.info("task %s canceled", record.id, extra={"task_id": record.id, "user": record.task.user})


async def delete(app: web.Application, record: Record) -> None:
    """Cancel the task if active, then forget it: its record, its job's files, its own folder."""
    await cancel(app, record)
    if record.native_id is not None:
        try:
            await app[SCHEDULER].release(JobRef(record.task, record.native_id))
        except SchedulerError as exc:
            raise ApiError(503, f"could not remove task {record.id}: {exc}", headers=RETRY) from None
    app[ACTIVE].discard(record.id)
    await app[STORE].delete(record.id)
    remove_task_folder(record.task.workdir, app[TASK_ROOT])
    log.info("task %s deleted", record.id, extra={"task_id": record.id, "user": record.task.user})
