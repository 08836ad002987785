"""The audit log: who did what, one line per accepted submit, cancel and delete.

Written to the logger `jobproxy.audit`, at INFO whatever `[log] level` says. `[log] audit` chooses
the format: "text" (a readable line) or "json" (JSON lines: one object a line). Without
`[log] audit_file` the lines go with the other log lines to stderr (JSON lines alone on theirs,
without the text prefix); with it, they are appended to that file, reopened when a log rotation
moves it away.

Every JSON line has the same keys, in this order:

- `time`: when, RFC 3339 UTC with milliseconds;
- `action`: "submit", "cancel" or "delete";
- `caller`: the authenticated user who asked (null when auth is off);
- `user`: the user the task runs for;
- `task`: the task id;
- `api`: "v1" or "tes";
- `source`: the client's address (`request.remote`; null when unknown);
- `replayed`: true for a submit answered with the task an earlier request with the same
  Idempotency-Key made (nothing new was submitted), otherwise false.
"""
from __future__ import annotations

import json
import logging
import logging.handlers
import sys
from datetime import UTC, datetime

from aiohttp import web

from . import auth
from .config import LogSettings
from .logs import TextFormatter
from .model import rfc3339
from .store import Record

log = logging.getLogger("jobproxy.audit")

#: The keys of every JSON line, in order.
KEYS = ("time", "action", "caller", "user", "task", "api", "source", "replayed")
_installed: list[logging.Handler] = []  # the handlers `configure` added


class JsonLines(logging.Formatter):
    """Formats an audit record as one JSON object (the `audit` attribute of the log record)."""

    def format(self, record: logging.LogRecord) -> str:
        moment = rfc3339(datetime.fromtimestamp(record.created, UTC))
        entry = getattr(record, "audit", None)
        if entry is None:  # a line someone else logged to this logger: still one JSON object
            return json.dumps({"time": moment, "message": record.getMessage()}, separators=(",", ":"))
        return json.dumps({"time": moment, **entry}, separators=(",", ":"))


def configure(settings: LogSettings) -> None:
    """Route the audit logger as `settings` say (again on each call: the last one holds)."""
    while _installed:
        previous = _installed.pop()
        log.removeHandler(previous)
        previous.close()
    log.setLevel(logging.INFO)
    if settings.audit_file is None and settings.audit == "text":
        log.propagate = True  # with the other log lines, in their format
        return
    handler: logging.Handler
    if settings.audit_file is not None:
        settings.audit_file.parent.mkdir(parents=True, exist_ok=True)
        handler = logging.handlers.WatchedFileHandler(settings.audit_file, encoding="utf-8")
    else:
        handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonLines() if settings.audit == "json"
                         else TextFormatter("%(asctime)s %(name)s: %(message)s"))
    _installed.append(handler)
    log.addHandler(handler)
    log.propagate = False


def source(request: web.Request) -> str | None:
    """The client's address, as the request knows it."""
    return request.remote or None


def write(request: web.Request, action: str, record: Record, api: str) -> None:
    """Log one audit line: `action` on the task of `record`, asked through `request`."""
    _line(request, action, record.id, record.task.user, api, replayed=False)


def submitted(request: web.Request, task_id: str, user: str, api: str, created: bool) -> None:
    """Log an accepted submit of a task for `user` (`created` False: an Idempotency-Key replay)."""
    _line(request, "submit", task_id, user, api, replayed=not created)


def _line(request: web.Request, action: str, task_id: str, user: str, api: str, *, replayed: bool) -> None:
    entry = {"action": action, "caller": auth.identity(request).user, "user": user,
             "task": task_id, "api": api, "source": source(request), "replayed": replayed}
    by = entry["caller"] or "anyone (auth off)"
    log.info("%s task %s for user %s by %s via %s from %s%s", action, task_id, user, by, api,
             entry["source"] or "an unknown address", " (replayed: no new task)" if replayed else "",
             extra={"audit": entry})


def deleted(request: web.Request, record: Record, api: str) -> None:
    """Log a delete, after the cancel it made if the task was still active."""
    if not record.state.terminal:
        write(request, "cancel", record, api)
    write(request, "delete", record, api)
