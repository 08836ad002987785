"""The JobProxy v1 API: submit, state, delete, ping, under /v1."""
from __future__ import annotations

import logging
import shutil
from pathlib import Path

from aiohttp import web
from multidict import MultiDictProxy

import schemas
from schedulers.base import JobRef, SchedulerError, SchedulerUnavailable, TaskRefused

from . import codec
from .keys import CONFIG, POLLER, SCHEDULER, STORE, TASK_VALIDATOR
from .model import Task, TaskState, new_task_id
from .responses import ApiError, answer
from .store import Record

log = logging.getLogger(__name__)
routes = web.RouteTableDef()

@routes.post("/v1/jobproxy/submit")
async def submit(request: web.Request) -> web.Response:
    body = await request.read()
    try:
        document, _ = codec.decode(body, request.headers.get("Content-Type"), schemas.load("task"))
    except codec.DecodeError as exc:
        raise ApiError(exc.status, str(exc)) from None
    problems = request.app[TASK_VALIDATOR].problems(document)
    if problems:
        raise ApiError(400, f"invalid task: {len(problems)} problem(s)", [p.as_dict() for p in problems])
    config, store, scheduler = request.app[CONFIG], request.app[STORE], request.app[SCHEDULER]
    task_id = new_task_id()
    task = Task.from_document(document, task_id, str(Path(config.task_root).resolve() / task_id))
    try:
        scheduler.admit_task(task)
    except TaskRefused as exc:
        raise ApiError(400, str(exc)) from None
    try:
        Path(task.workdir).mkdir(mode=0o700, parents=True)
    except OSError as exc:
        log.error("cannot create the folder of task %s: %s", task_id, exc)
        raise ApiError(503, f"the gateway cannot create the task's folder right now: {exc.strerror}",
                       headers={"Retry-After": "30"}) from None
    store.add(task, scheduler.name)
    poller = request.app[POLLER]
    poller.inflight.add(task_id)
    try:
        native_id = await scheduler.submit(task)
    except SchedulerError as exc:
        store.delete(task_id)
        shutil.rmtree(task.workdir, ignore_errors=True)
        status = 503 if isinstance(exc, SchedulerUnavailable) else 400
        raise ApiError(status, str(exc), headers={"Retry-After": "30"} if status == 503 else None) from None
    finally:
        poller.inflight.discard(task_id)
    store.set_native_id(task_id, native_id)
    poller.wake()
    log.info("task %s submitted for %s as %s job %s", task_id, task.user, scheduler.name, native_id)
    return answer(request, {"id": task_id}, xml_root="task", text=task_id)


@routes.get("/v1/jobproxy/state")
async def states(request: web.Request) -> web.Response:
    config, query = request.app[CONFIG], request.query
    size = _int_param(query, "page_size", config.page_size, 1, config.max_page_size)
    after = _int_param(query, "page_token", 0, 0, 2**63 - 1)
    wanted = []
    for value in query.getall("state", []):
        for name in filter(None, value.upper().split(",")):
            if name not in TaskState.__members__:
                raise ApiError(400, f"state: unknown state {name!r}; one of " + ", ".join(TaskState.__members__),
                               [{"path": "state", "message": f"unknown state {name!r}"}])
            wanted.append(TaskState[name])
    records = request.app[STORE].page(user=query.get("user"), states=wanted, after=after, limit=size + 1)
    body: dict[str, object] = {"state": [r.as_state() for r in records[:size]]}
    if len(records) > size:
        body["next_page_token"] = str(records[size - 1].seq)
    return answer(request, body, xml_root="states")


@routes.get("/v1/jobproxy/state/{id}")
async def state(request: web.Request) -> web.Response:
    return answer(request, _record(request).as_state(), xml_root="state")


@routes.delete("/v1/jobproxy/delete/{id}")
async def delete(request: web.Request) -> web.Response:
    record = _record(request)
    scheduler, store = request.app[SCHEDULER], request.app[STORE]
    if record.native_id is not None:
        job = JobRef(record.task, record.native_id)
        try:
            if not record.state.terminal:
                await scheduler.cancel(job)
                if record.task.container is not None and scheduler.runtime is not None:
                    await scheduler.runtime.stop(record.task)
            await scheduler.release(job)
        except SchedulerError as exc:
            raise ApiError(503, f"could not stop task {record.id}: {exc}", headers={"Retry-After": "30"}) from None
    store.delete(record.id)
    task_root = Path(request.app[CONFIG].task_root).resolve()
    if Path(record.task.workdir).parent == task_root:
        shutil.rmtree(record.task.workdir, ignore_errors=True)
    log.info("task %s deleted", record.id)
    return web.Response(status=204)


@routes.get("/v1/jobproxy/ping")
async def ping(request: web.Request) -> web.Response:
    return answer(request, {"status": "ok", "scheduler": request.app[SCHEDULER].name,
                            "tasks": request.app[STORE].count()}, xml_root="ping", text="pong")


@routes.get("/v1/openapi.json")
async def openapi(request: web.Request) -> web.Response:
    return web.json_response(schemas.load("openapi"))


def _record(request: web.Request) -> Record:
    task_id = request.match_info["id"]
    record = request.app[STORE].get(task_id)
    if record is None:
        raise ApiError(404, f"no task with id {task_id!r}")
    return record


def _int_param(query: MultiDictProxy[str], name: str, default: int, low: int, high: int) -> int:
    raw = query.get(name)
    if raw is None or raw == "":
        return default
    if not raw.isdigit() or not low <= int(raw) <= high:
        raise ApiError(400, f"{name}: must be a whole number from {low} to {high}, not {raw!r}",
                       [{"path": name, "message": f"must be a whole number from {low} to {high}"}])
    return int(raw)
