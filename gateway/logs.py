"""How the gateway's log lines look: `[log] format = "text"` (readable) or `"json"` (one JSON
object a line, for log collectors).

A JSON line has `time` (UTC, ISO 8601), `level`, `logger` and `message`, plus `task_id` and `user`
when the log call passed them (`log.info(..., extra={"task_id": ..., "user": ...})`) and `exc`, the
traceback as one string, when the record carries an exception: never more than one line a record.
"""
from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime
from typing import Any

#: The `extra=` keys a JSON line carries over from a log record, when they are set.
EXTRA_FIELDS = ("task_id", "user")

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class JsonFormatter(logging.Formatter):
    """One JSON object per record, on one line."""

    def format(self, record: logging.LogRecord) -> str:
        """The record as a JSON object: time, level, logger, message, the extras that are set, exc."""
        line: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for field in EXTRA_FIELDS:
            value = getattr(record, field, None)
            if value is not None:
                line[field] = str(value)
        if record.exc_info:
            line["exc"] = self.formatException(record.exc_info)
        elif record.exc_text:
            line["exc"] = record.exc_text
        if record.stack_info:
            line["stack"] = self.formatStack(record.stack_info)
        return json.dumps(line, ensure_ascii=False)


def formatter(kind: str) -> logging.Formatter:
    """The formatter of a `[log] format`: "json" or "text"."""
    if kind == "json":
        return JsonFormatter()
    if kind == "text":
        return logging.Formatter(TEXT_FORMAT)
    raise ValueError(f"unknown log format {kind!r}")


def configure(level: str, kind: str) -> None:
    """Send the gateway's logs to stderr at `level`, formatted as `kind` ("text" or "json")."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(formatter(kind))
    logging.basicConfig(level=level, handlers=[handler], force=True)
