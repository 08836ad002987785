"""The GA4GH TES 1.1 API, under /ga4gh/tes/v1 and under /v1 (where clients also look).

`GET /service-info`, `POST /tasks` (answers `{"id"}`), `GET /tasks` (views MINIMAL, the default,
BASIC and FULL; `page_size` 1..2047, default 256; an opaque `page_token`; filters `name_prefix`,
`state`, `tag_key`/`tag_value` (paired in order; a key without a value, or with an empty one,
matches any value); newest first), `GET /tasks/{id}?view=` and `POST /tasks/{id}:cancel` (200,
also for a task that has already ended). Like every API of the gateway, these only parse,
authorise and answer: `gateway.tes` builds the task, `gateway.service` accepts and cancels it.

Every task of the store is a TES task too: the list shows the caller's tasks of both APIs. Users
see their own tasks only (another user's task answers 404, like an unknown one); admins, and
everyone when auth is off, see all.

`GET /v1/tasks/service-info` answers the older shape (`name`, `doc`, `storage`) that py-tes 0.4,
the version Snakemake's TES plugin requires, asks for at that path.
"""
from __future__ import annotations

import asyncio
import base64
import binascii
import re
from collections.abc import Sequence
from importlib.metadata import PackageNotFoundError, version
from typing import Any

from aiohttp import web

from schedulers.base import TaskState

from .. import audit, auth, codec, idempotency, output, paging, service
from ..config import StagingSettings
from ..keys import CONFIG, KEYS, SCHEDULERS
from ..responses import ApiError
from ..store import Record
from ..validation import SchemaValidator
from . import documents
from . import request as tes

PREFIXES = ("/ga4gh/tes/v1", "/v1")
DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE = 256, 2047
VALIDATOR = SchemaValidator.named("tes.task")


def _page_token_pattern() -> str:
    """The tokens `_encode_token` gives out, exactly: `tes:<seq>` (seq of 1 to 18 digits) in
    base64url without padding. "tes" is `dGVz`; `:` and two digits make `Oj` and two characters;
    three more digits make four characters, fewer digits at the end fewer characters."""
    first, second, last = "[MN][DTjz]|O[DT]", "[AEIMQUYcgk]", "[w-z0-5]"
    three = f"(?:{first}){second}{last}"  # the 6 bits of each character of 3 ASCII digits
    one, two = "(?:[MN][AQgw]|O[AQ])", f"(?:{first}){second}"
    rest = f"(?:(?:{three}){{0,4}}(?:{one}|{two})?|(?:{three}){{5}}{one}?)"
    return f"^dGVzOj{second}(?:{last}{rest})?$"


#: What `page_token` must be (the OpenAPI document says so too).
PAGE_TOKEN_PATTERN = _page_token_pattern()
routes = web.RouteTableDef()


def _version() -> str:
    try:
        return version("jobproxy")
    except PackageNotFoundError:
        return "0"


def service_info(request: web.Request) -> dict[str, Any]:
    config = request.app[CONFIG]
    roots = config.path_roots if config.path_roots is not None else ("/",)
    body: dict[str, Any] = {
        "id": "org.jobproxy.tes",
        "name": "JobProxy",
        "type": {"group": "org.ga4gh", "artifact": "tes", "version": tes.TES_VERSION},
        "description": "GA4GH TES in front of HPC batch schedulers. " + _staging_note(config.sections.staging),
        "organization": {"name": "JobProxy", "url": str(request.url.origin())},
        "version": _version(),
        "storage": [f"file://{root}" for root in roots],
        "tesResources_backend_parameters": list(config.sections.tes.backend_parameters),
    }
    if len(request.app[SCHEDULERS]) > 1:  # a task may ask for one by name (the routing rules decide)
        body["tesResources_backend_parameters"].append("scheduler")
    body.update(config.sections.tes.service_info)
    return body


def _staging_note(staging: StagingSettings) -> str:
    """What service-info says about staging (TES has no field for it)."""
    schemes = ", ".join(f"{name}://" for name in staging.schemes) or "none"
    put = "" if staging.http.allow_put or not {"http", "https"} & set(staging.schemes) else \
        " (http(s):// for inputs only)"
    return (f"Inputs and outputs: file:// (copied by the job), and staged by the gateway before and after the job: "
            f"{schemes}{put}. Streamable inputs are accepted and staged like the others, before the job starts.")


async def get_service_info(request: web.Request) -> web.Response:
    return web.json_response(service_info(request))


async def get_legacy_service_info(request: web.Request) -> web.Response:
    info = service_info(request)
    return web.json_response({"name": info["name"], "doc": info["description"], "storage": info["storage"]})


async def create_task(request: web.Request) -> web.Response:
    kind = codec.media_type(request.headers.get("Content-Type")) or codec.JSON
    if kind != codec.JSON and not kind.endswith("+json"):
        raise ApiError(415, f"a TES task is JSON ({codec.JSON}), not {kind}")
    try:
        document, _ = codec.decode(await request.read(), codec.JSON, {})
    except codec.DecodeError as exc:
        raise ApiError(exc.status, str(exc)) from None
    problems = VALIDATOR.problems(document)
    if problems:
        raise ApiError(400, f"invalid TES task: {len(problems)} problem(s)", [p.as_dict() for p in problems])
    try:
        task, files, chosen = tes.to_task(request.app, document, auth.identity(request))
    except ApiError as err:
        raise _in_tes_terms(err) from None
    key = idempotency.key_of(request, task.user, document)

    async def make() -> str:
        try:
            await service.accept(request.app, task, files=files, key=key, scheduler_name=chosen)
        except ApiError as err:
            raise _in_tes_terms(err) from None
        return task.id

    task_id, created = await request.app[KEYS].once(key, make)
    audit.submitted(request, task_id, task.user, "tes", created)
    return web.json_response({"id": task_id})


#: Where the fields of a Task (named in the site policy's refusals) came from in a TES request.
TES_FIELDS = {"$.cores": "$.resources.cpu_cores", "$.memory": "$.resources.ram_gb",
              "$.cputime": "$.resources.backend_parameters.cputime", "$.user": "$.tags.user",
              "$.scheduler": "$.resources.backend_parameters.scheduler", "$.container.image": "$.executors",
              "$.gpus": "$.resources.backend_parameters.gpus"}


def _in_tes_terms(err: ApiError) -> ApiError:
    """A refusal of the task's policy checks, with the paths of the TES request."""
    message = err.message
    for field, path in TES_FIELDS.items():
        if message.startswith(field + ":"):
            message = path + message[len(field):]
        message = message.replace(f"({field})", f"({path})")  # the routing rules' reasons
    details = [{**d, "path": TES_FIELDS.get(d.get("path", ""), d.get("path", ""))} for d in err.details]
    return ApiError(err.status, message, details, err.headers)


async def list_tasks(request: web.Request) -> web.Response:
    query = request.query
    view = _view(request)
    size = _page_size(query.get("page_size"))
    before = _decode_token(query["page_token"]) if query.get("page_token") else None
    states = []
    if query.get("state"):
        if query["state"] not in TaskState.__members__:
            raise tes.refuse("state", f"unknown state {query['state']!r}; one of {', '.join(TaskState.__members__)}")
        states.append(TaskState[query["state"]])
    keys, values = query.getall("tag_key", []), query.getall("tag_value", [])
    if len(values) > len(keys):
        raise tes.refuse("tag_value", "every tag_value needs a tag_key before it")
    tags = [(key, (values[i] or None) if i < len(values) else None) for i, key in enumerate(keys)]
    caller = auth.identity(request)
    records = await service.page(
        request.app, user=None if caller.admin else caller.user, states=states, limit=size + 1, newest_first=True,
        before=before, tags=tags, name_prefix=query.get("name_prefix") or None)
    body: dict[str, Any] = {"tasks": await _documents(request.app, records[:size], view)}
    if len(records) > size:
        body["next_page_token"] = _encode_token(records[size - 1].seq)
    return web.json_response(body)


async def get_task(request: web.Request) -> web.Response:
    return web.json_response((await _documents(request.app, [_record(request)], _view(request)))[0])


async def _documents(app: web.Application, records: Sequence[Record], view: str) -> list[dict[str, Any]]:
    """`records` as TES tasks in `view`. A view past MINIMAL reads the tasks' files (exit codes,
    times, the tails of outputs), maybe on a slow, shared file system: off the event loop."""
    tail = app[CONFIG].sections.tes.log_tail_bytes
    if view == "MINIMAL":  # id and state: no file, so no owner to look up either
        return [documents.document(r, view, tail) for r in records]

    def make() -> list[dict[str, Any]]:
        return [documents.document(r, view, tail, output.job_owner(app, r.task)) for r in records]

    return await asyncio.to_thread(make)


async def cancel_task(request: web.Request) -> web.Response:
    record = _record(request)
    await service.cancel(request.app, record)
    audit.write(request, "cancel", record, "tes")
    return web.json_response({})


routes.get("/v1/tasks/service-info")(get_legacy_service_info)  # before /v1/tasks/{id}
for _prefix in PREFIXES:
    routes.get(f"{_prefix}/service-info")(get_service_info)
    routes.post(f"{_prefix}/tasks")(create_task)
    routes.get(f"{_prefix}/tasks")(list_tasks)
    routes.post(_prefix + "/tasks/{id:[^/:]+}:cancel")(cancel_task)
    routes.get(_prefix + "/tasks/{id:[^/:]+}")(get_task)


def _record(request: web.Request) -> Record:
    return service.visible(request, request.match_info["id"])


def _view(request: web.Request) -> str:
    view = request.query.get("view") or "MINIMAL"
    if view not in documents.VIEWS:
        raise tes.refuse("view", f"must be one of {', '.join(documents.VIEWS)}, not {view!r}")
    return view


def _page_size(raw: str | None) -> int:
    """The TES `page_size`: 1 to MAX_PAGE_SIZE, DEFAULT_PAGE_SIZE when not given."""
    try:
        return paging.page_size(raw, DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)
    except paging.OutOfRange as exc:
        raise tes.refuse("page_size", f"{exc.rule}, not {raw!r}") from None


def _encode_token(seq: int) -> str:
    return base64.urlsafe_b64encode(f"tes:{seq}".encode()).decode().rstrip("=")


def _decode_token(token: str) -> int:
    text = ""
    if re.fullmatch(PAGE_TOKEN_PATTERN, token):
        try:
            text = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)).decode()
        except (binascii.Error, UnicodeDecodeError, ValueError):
            text = ""
    kind, _, seq = text.partition(":")
    if kind != "tes" or not (seq.isascii() and seq.isdigit()):
        raise tes.refuse("page_token", "is not a page token this gateway gave out")
    return int(seq)
