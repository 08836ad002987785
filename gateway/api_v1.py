"""The JobProxy v1 API: submit, state, cancel, delete, ping, under /v1."""
from __future__ import annotations

from aiohttp import web
from multidict import MultiMapping

import schemas
from schedulers.base import Scheduler, TaskState

from . import audit, auth, codec, idempotency, paging, service
from . import openapi as openapi_document
from .keys import CONFIG, KEYS, SCHEDULERS, STORE, TASK_VALIDATOR
from .model import rfc3339
from .responses import ApiError, answer
from .store import Record

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
    auth.identity(request).submitter(document["user"])
    key = idempotency.key_of(request, document["user"], document)

    async def make() -> str:
        task = service.new_task(request.app, document)
        chosen = service.route(request.app, task, document.get("scheduler"))
        await service.accept(request.app, task, key=key, scheduler_name=chosen)
        return task.id

    task_id, created = await request.app[KEYS].once(key, make)
    audit.submitted(request, task_id, document["user"], "v1", created)
    return answer(request, {"id": task_id}, xml_root="task", text=task_id)


@routes.get("/v1/jobproxy/state")
async def states(request: web.Request) -> web.Response:
    config, query = request.app[CONFIG], request.query
    size = _int_param(query, "page_size", config.page_size, 1, config.max_page_size)
    after = _int_param(query, "page_token", 0, 0, 2**63 - 1)
    wanted = []
    for value in query.getall("state", []):
        for name in filter(None, value.split(",")):
            if not name.isascii() or name.upper() not in TaskState.__members__:  # "ı".upper() is "I"
                raise ApiError(400, f"state: unknown state {name!r}; one of " + ", ".join(TaskState.__members__),
                               [{"path": "state", "message": f"unknown state {name!r}"}])
            wanted.append(TaskState[name.upper()])
    caller, user = auth.identity(request), query.get("user")
    if not caller.admin:
        user = caller.user  # users see only their own tasks
    records = await service.page(request.app, user=user, states=wanted, after=after, limit=size + 1)
    body: dict[str, object] = {"state": [state_document(r) for r in records[:size]]}
    if len(records) > size:
        body["next_page_token"] = str(records[size - 1].seq)
    return answer(request, body, xml_root="states")


@routes.get("/v1/jobproxy/state/{id}")
async def state(request: web.Request) -> web.Response:
    return answer(request, state_document(_record(request)), xml_root="state")


@routes.delete("/v1/jobproxy/delete/{id}")
async def delete(request: web.Request) -> web.Response:
    record = _record(request)
    await service.delete(request.app, record)
    audit.deleted(request, record, "v1")
    return web.Response(status=204)


@routes.post("/v1/jobproxy/cancel/{id}")
async def cancel(request: web.Request) -> web.Response:
    """Stop the task's job if it is active; the task stays, CANCELED (TES semantics)."""
    record = _record(request)
    await service.cancel(request.app, record)
    audit.write(request, "cancel", record, "v1")
    return answer(request, state_document(service.current(request.app, record.id) or record), xml_root="state")


@routes.get("/v1/jobproxy/ping")
async def ping(request: web.Request) -> web.Response:
    schedulers: dict[str, Scheduler] = request.app[SCHEDULERS]
    return answer(request, {"status": "ok", "scheduler": ", ".join(schedulers),
                            "tasks": request.app[STORE].count()}, xml_root="ping", text="pong")


@routes.get("/v1/openapi.json")
async def openapi(request: web.Request) -> web.Response:
    """The self-contained OpenAPI document, with this gateway's configured page sizes."""
    return web.json_response(openapi_document.document(request.app[CONFIG]))


def state_document(record: Record) -> dict[str, object]:
    """The public State document of a task (schemas/state.schema.json)."""
    return {
        "id": record.task.id,
        "code": record.state.value,
        "description": record.description,
        "stdout": record.task.stdout,
        "stderr": record.task.stderr,
        "exit_code": record.exit_code,
        "user": record.task.user,
        "scheduler": record.scheduler,
        "created": rfc3339(record.created),
        "started": rfc3339(record.started),
        "finished": rfc3339(record.finished),
    }


def _record(request: web.Request) -> Record:
    return service.visible(request, request.match_info["id"])


def _int_param(query: MultiMapping[str], name: str, default: int, low: int, high: int) -> int:
    try:
        return paging.whole_number(query.get(name), name, default, low, high)
    except paging.OutOfRange as exc:
        raise ApiError(400, str(exc), [{"path": name, "message": exc.rule}]) from None
