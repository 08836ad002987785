"""What every API does with tasks, in one place: accept, cancel, delete. The HTTP layers (v1, TES)
parse, authorise and answer; they call these for the work."""
from __future__ import annotations

import asyncio
import logging
import shutil
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from aiohttp import web

from schedulers import accounts
from schedulers.base import JobRef, Scheduler, SchedulerError, SchedulerUnavailable, Task, TaskRefused, TaskState
from schedulers.outcome import CANCELED_ON_REQUEST

from . import auth, policy, reload, routing
from .folders import FolderPool, give_away
from .keys import ACTIVE, FOLDERS, POLLERS, QUOTAS, ROUTER, SCHEDULERS, STAGER, STORE, TASK_ROOT
from .model import new_task_id, now, task_from_document
from .poller import Poller
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
    active set has it now. A page by state first waits until the changes made so far are
    committed: the store selects by the states it holds, which lag the active set by up to one
    group commit, and a task must not be missing from the state its GET already answered."""
    active, store = app[ACTIVE], app[STORE]
    if query.get("states"):
        await store.flush()
    return [active.get(r.id) or r for r in await store.page_async(**query)]


def visible(request: web.Request, task_id: str) -> Record:
    """The task `task_id` if the caller may see it; 404 otherwise, the same as for an unknown id."""
    record = current(request.app, task_id)
    if record is None or not auth.identity(request).may_see(record.task.user):
        raise ApiError(404, f"no task with id {task_id!r}")
    return record


def new_task(app: web.Application, document: dict[str, Any]) -> Task:
    """A Task with a fresh id and its own folder under the task root, from a validated document."""
    task_id = new_task_id()
    return task_from_document(document, task_id, f"{app[TASK_ROOT]}/{task_id}")  # no PurePath parsing per submit


def route(app: web.Application, task: Task, requested: str | None = None,
          images: Iterable[str] | None = None) -> str:
    """The scheduler instance `task` goes to (`gateway.routing`): `requested` is the instance the
    client asked for by name, `images` the images it names (default: its container's). A 400
    naming, rule by rule, why none takes it."""
    try:
        return app[ROUTER].choose(routing.Request.of(task, requested, images)).scheduler
    except routing.NoRoute as exc:
        raise ApiError(400, exc.message, exc.details) from None


async def accept(app: web.Application, task: Task, files: Mapping[str, str | bytes] | None = None,
                 key: IdempotencyKey | None = None, scheduler_name: str | None = None) -> None:
    """Admit `task`, record it, hand it to its scheduler instance. On refusal nothing is kept
    (400 / 503).

    `files` (relative path -> content) are written into the task's folder before the job starts;
    `key`, the request's idempotency key, is recorded with the task; `scheduler_name` is the
    instance `route` chose (None: route it now).
    """
    name = scheduler_name if scheduler_name is not None else route(app, task)
    scheduler = app[SCHEDULERS][name]
    policy.check(app[reload.LIVE].config, task)  # the [limits] of the last reload
    try:
        scheduler.admit_task(task)
    except TaskRefused as exc:
        raise refused(exc) from None
    except SchedulerError as exc:
        raise ApiError(400, str(exc)) from None
    with app[QUOTAS].admitting(task.user):
        await _keep(app, task, files, key, name)


async def _keep(app: web.Application, task: Task, files: Mapping[str, str | bytes] | None,
                key: IdempotencyKey | None, name: str) -> None:
    """Make the task's folder (unless its scheduler makes it when the job starts), record the task,
    hand it to its scheduler (or keep nothing)."""
    store, scheduler, poller = app[STORE], app[SCHEDULERS][name], app[POLLERS][name]
    stager = app.get(STAGER)
    stager = stager if stager is not None and stager.needs_inputs(task) else None  # if it fetches inputs
    try:
        if files or stager is not None or not scheduler.makes_task_folders:
            await _make_folder(app[FOLDERS], task, files or {}, scheduler.job_account(task))
    except OSError as exc:
        shutil.rmtree(task.workdir, ignore_errors=True)
        log.error("cannot create the folder of task %s: %s", task.id, exc)
        raise ApiError(503, f"the gateway cannot create the task's folder right now: {exc.strerror}",
                       headers=RETRY) from None
    try:
        # on disk before the scheduler hears of it; replicas: the user's quota checked again, exactly
        record = await store.add(task, scheduler.name, key, active_limit=app[QUOTAS].limit)
    except Exception:  # e.g. the database away (503), another replica took the key, over the quota (429):
        # no folder kept
        shutil.rmtree(task.workdir, ignore_errors=True)
        raise
    if poller.to_leader(record):  # replicas: the holder of the scheduler's lease stages and submits it
        log.info("task %s recorded for %s, handed to the replica that runs %s jobs", task.id, task.user,
                 scheduler.name, extra={"task_id": task.id, "user": task.user})
        return
    if stager is not None:  # submitted once its inputs are in (gateway/staging)
        stager.begin(record)
        log.info("task %s accepted for %s: fetching its inputs", task.id, task.user,
                 extra={"task_id": task.id, "user": task.user})
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


async def _make_folder(folders: FolderPool, task: Task, files: Mapping[str, str | bytes],
                       account: str | None) -> None:
    """The task's own folder with the files it brings, owned by the account its job runs as. The
    folder is made, filled and given away by the pool's thread."""
    contents = {relative: content.encode() if isinstance(content, str) else content
                for relative, content in files.items()}
    await folders.make_for(task.workdir, None if account is None else _ids(account), contents)


def refused(exc: TaskRefused) -> ApiError:
    """A scheduler's refusal as a 400 answer whose details name the refused part of the task."""
    return ApiError(400, str(exc), [{"path": exc.path, "message": str(exc)}])


def give_to(user: str, folder: str | Path) -> None:
    """Make the task's folder and what it holds belong to the user the job runs as."""
    give_away(folder, _ids(user))


def _ids(user: str) -> tuple[int, int]:
    """The uid and gid of `user`'s account (KeyError if there is none)."""
    account = accounts.entry(user)
    return account.pw_uid, account.pw_gid


def instance(app: web.Application, record: Record) -> tuple[Scheduler, Poller]:
    """The scheduler instance of `record`, and its poller; 503 when that instance is no longer
    configured (its tasks stay as they are until it is again)."""
    pollers: dict[str, Poller] = app[POLLERS]
    poller = pollers.get(record.scheduler)
    if poller is None:
        raise ApiError(503, f"task {record.id} belongs to the scheduler instance {record.scheduler!r}, which this "
                            f"gateway does not have now (configured: {', '.join(pollers)})", headers=RETRY)
    return poller.scheduler, poller


async def cancel(app: web.Application, record: Record) -> None:
    """Stop the task's job (and its container) if it is still active; the task stays, CANCELED."""
    if record.state.terminal:
        return
    scheduler, poller = instance(app, record)
    if record.native_id is not None:
        try:
            await scheduler.cancel(JobRef(record.task, record.native_id))
        except SchedulerError as exc:
            raise ApiError(503, f"could not stop task {record.id}: {exc}", headers=RETRY) from None
        if record.task.container is not None and scheduler.runtime is not None:
            await scheduler.runtime.stop(record.task)
    await asyncio.wrap_future(poller.apply(
        [Change(record.id, TaskState.CANCELED, CANCELED_ON_REQUEST, record.exit_code, finished=now())]))
    log.info("task %s canceled", record.id, extra={"task_id": record.id, "user": record.task.user})


async def delete(app: web.Application, record: Record) -> None:
    """Cancel the task if active, then forget it: its record, its job's files, its own folder."""
    await cancel(app, record)
    scheduler = app[SCHEDULERS].get(record.scheduler)
    if record.native_id is not None and scheduler is not None:
        try:
            await scheduler.release(JobRef(record.task, record.native_id))
        except SchedulerError as exc:
            raise ApiError(503, f"could not remove task {record.id}: {exc}", headers=RETRY) from None
    elif record.native_id is not None:
        log.warning("task %s: its scheduler instance %r is not configured: its job's files stay", record.id,
                    record.scheduler, extra={"task_id": record.id, "user": record.task.user})
    app[ACTIVE].discard(record.id)
    await app[STORE].delete(record.id)
    # off the event loop, as the purge does: a task's folder may hold many files, on a slow file system
    await asyncio.to_thread(remove_task_folder, record.task.workdir, app[TASK_ROOT])
    log.info("task %s deleted", record.id, extra={"task_id": record.id, "user": record.task.user})
