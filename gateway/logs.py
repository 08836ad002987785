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
import time
from datetime import UTC, datetime
from typing import Any

#: The `extra=` keys a JSON line carries over from a log record, when they are set.
EXTRA_FIELDS = ("task_id", "user")

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class TextFormatter(logging.Formatter):
    """`logging.Formatter` with its default time format, whose date and time to the second are
    formatted once a second rather than once a record: with an audit line per submit, that adds up."""

    def __init__(self, fmt: str) -> None:
        super().__init__(fmt)
        self._second = -1
        self._stamp = ""

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        if datefmt is not None:
            return super().formatTime(record, datefmt)
        second = int(record.created)
        if second != self._second:
            self._second, self._stamp = second, time.strftime(self.default_time_format, self.converter(second))
        return f"{self._stamp},{int(record.msecs):03d}"


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
        return TextFormatter(TEXT_FORMAT)
    raise ValueError(f"unknown log format {kind!r}")


def configure(level: str, kind: str) -> None:
    """Send the gateway's logs to stderr at `level`, formatted as `kind` ("text" or "json")."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(formatter(kind))
    logging.basicConfig(level=level, handlers=[handler], force=True)
    # no format here names a record's thread or process: spare each record looking them up
    logging.logThreads = logging.logProcesses = logging.logMultiprocessing = False
