"""The pages a person opens in a browser: the API docs (`/v1/docs`) and the dashboard (`/ui`).

Everything they load comes from installed packages, never from a CDN (many clusters have no
internet): the dashboard's HTML, CSS and JavaScript are this package's data (`gateway/ui/`), the
API docs are Swagger UI from the `swagger-ui-py` package rendering `/v1/openapi.json`. Both are
public, like `openapi.json`: the dashboard asks for a token itself and sends it to the API.
"""
from __future__ import annotations

import importlib.util
import logging
from collections.abc import Awaitable, Callable
from pathlib import Path

from aiohttp import web

from .errors import ApiError

log = logging.getLogger(__name__)
UI = Path(__file__).resolve().parent / "ui"
#: Path -> (file, content type) of every file the pages load.
DASHBOARD = {
    "/ui": (UI / "index.html", "text/html"),
    "/ui/app.js": (UI / "app.js", "text/javascript"),
    "/ui/style.css": (UI / "style.css", "text/css"),
}
DOCS = {
    "/v1/docs": (UI / "docs.html", "text/html"),
    "/v1/docs/docs.js": (UI / "docs.js", "text/javascript"),
}
#: Swagger UI's own files, from its package.
SWAGGER = {"/v1/docs/swagger-ui.css": ("swagger-ui.css", "text/css"),
           "/v1/docs/swagger-ui-bundle.js": ("swagger-ui-bundle.js", "text/javascript")}
#: The paths anyone may load (gateway/auth.py).
PUBLIC = frozenset(DASHBOARD) | frozenset(DOCS) | frozenset(SWAGGER)

#: The dashboard runs only its own scripts and styles and talks only to this gateway.
DASHBOARD_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
                               "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}
DOCS_HEADERS = {"X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer", "Cache-Control": "no-cache",
                "Content-Security-Policy": "frame-ancestors 'none'"}


def swagger_ui_folder() -> Path:
    """Swagger UI's static files, from the installed `swagger-ui-py` package (found without
    importing it: its Python part is not needed)."""
    spec = importlib.util.find_spec("swagger_ui")
    if spec is None or spec.origin is None:
        raise RuntimeError("the swagger-ui-py package is not installed: pip install swagger-ui-py")
    return Path(spec.origin).parent / "static"


def _file(path: Path, content_type: str, headers: dict[str, str]) -> Callable[[web.Request], Awaitable[web.Response]]:
    async def handler(request: web.Request) -> web.Response:
        return web.Response(body=path.read_bytes(), content_type=content_type, charset="utf-8", headers=headers)
    return handler


def add_routes(app: web.Application) -> None:
    """Serve the dashboard and the API docs."""
    for url, (path, kind) in DASHBOARD.items():
        app.router.add_get(url, _file(path, kind, DASHBOARD_HEADERS))
    for url, (path, kind) in DOCS.items():
        app.router.add_get(url, _file(path, kind, DOCS_HEADERS))
    try:
        swagger = swagger_ui_folder()
    except RuntimeError as exc:  # the gateway still serves; only the docs page cannot render
        log.warning("GET /v1/docs cannot render: %s", exc)
        for url in SWAGGER:
            app.router.add_get(url, _missing(str(exc)))
        return
    cached = {**DOCS_HEADERS, "Cache-Control": "max-age=86400"}
    for url, (name, kind) in SWAGGER.items():
        app.router.add_get(url, _file(swagger / name, kind, cached))


def _missing(reason: str) -> Callable[[web.Request], Awaitable[web.Response]]:
    async def handler(request: web.Request) -> web.Response:
        raise ApiError(503, reason)
    return handler
