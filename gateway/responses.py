"""Answers in the format the client asked for (Accept): JSON by default, XML, or plain text."""
from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from aiohttp import web

from . import codec
from .errors import ApiError
from .keys import CONFIG

__all__ = ["ApiError", "answer", "error_body", "errors"]

log = logging.getLogger(__name__)

#: How lists are named in XML: a list under key K becomes <K><item/>...</K> with item = ITEMS[K];
#: other lists become repeated <K> elements (e.g. <states><state/><state/></states>).
ITEMS = {"details": "detail"}


def answer(request: web.Request, body: Mapping[str, Any], *, xml_root: str, status: int = 200,
           text: str | None = None) -> web.Response:
    """`body` as JSON or XML (`<xml_root>`), or `text` as text/plain where given and preferred."""
    offers = [codec.JSON, codec.XML] + ([codec.TEXT] if text is not None else [])
    kind = codec.negotiate(request.headers.get("Accept"), offers)
    if kind == codec.TEXT:
        return web.Response(status=status, text=text or "", content_type=codec.TEXT)
    if kind == codec.XML:
        document = codec.to_xml(xml_root, dict(body), ITEMS)
        return web.Response(status=status, text=document, content_type=codec.XML)
    return web.Response(status=status, text=json.dumps(body), content_type=codec.JSON)


def error_body(err: ApiError) -> dict[str, Any]:
    body: dict[str, Any] = {"error": err.message}
    if err.details:
        body["details"] = err.details
    return body


@web.middleware
async def errors(request: web.Request,
                 handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> web.StreamResponse:
    """Every failure becomes a JSON (or XML) error body; never a stack trace."""
    try:
        return await handler(request)
    except ApiError as err:
        response = answer(request, error_body(err), xml_root="error", status=err.status)
        response.headers.update(err.headers)
        return response
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        message = _http_message(request, exc)
        headers = {k: v for k, v in exc.headers.items() if k in ("Allow", "WWW-Authenticate")}
        return await errors(request, _raiser(ApiError(exc.status, message, headers=headers)))
    except Exception:
        log.exception("unexpected error answering %s %s", request.method, request.path)
        return answer(request, {"error": "internal error; the gateway's log has the details"},
                      xml_root="error", status=500)


def _raiser(err: ApiError) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    async def handler(_: web.Request) -> web.StreamResponse:
        raise err
    return handler


def _http_message(request: web.Request, exc: web.HTTPException) -> str:
    if exc.status == 404:
        return f"no such resource: {request.path}"
    if exc.status == 405:
        return f"method {request.method} is not allowed on {request.path} (allowed: {exc.headers.get('Allow', '')})"
    if exc.status == 413:
        return f"request body too large: at most {request.app[CONFIG].max_body_bytes} bytes"
    return exc.reason
