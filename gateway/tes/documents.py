"""Stored tasks as TES 1.1 documents, in the three views, with their logs read back from files.

- MINIMAL: `id` and `state`.
- BASIC: the request as received (without `inputs[].content`), `id`, `state`, `creation_time`,
  and one TaskLog: start/end times, `metadata` (owner, scheduler, the state's description and
  exit code), each ended executor's start/end times and `exit_code`, and the outputs copied back
  with their sizes (those the gateway sent, one entry per file, from `tes/outputs.json`).
- FULL: BASIC plus `inputs[].content`, the tail of each executor's stdout/stderr
  (`[tes] log_tail_bytes`: the end is what explains a failure) and `system_logs`
  (notes from submission, the steps script's `tes/system.log`, and the description of a
  SYSTEM_ERROR).

Only fields of the TES schema appear (strict clients such as py-tes refuse unknown ones); what is
JobProxy's own goes into `tags` and `logs[].metadata`. A task submitted through the v1 API is
shown too, with one executor describing its command and its job's output as that executor's log.
"""
from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from typing import Any

from schedulers.base import Task, TaskState
from schedulers.files import tail
from schedulers.script import EXIT_FILE

from ..model import rfc3339
from ..store import Record
from .request import local_path, request_of, task_folder

VIEWS = ("MINIMAL", "BASIC", "FULL")


def document(record: Record, view: str, tail_bytes: int) -> dict[str, Any]:
    """`record` as a TES task in `view`; FULL shows the last `tail_bytes` of each output."""
    if view == "MINIMAL":
        return {"id": record.id, "state": record.state.value}
    full = view == "FULL"
    body = copy.deepcopy(request_of(record.task))
    if not full:
        for item in body.get("inputs", []):
            item.pop("content", None)
    body.update(id=record.id, state=record.state.value, creation_time=rfc3339(record.created))
    body["logs"] = [_task_log(record, body, full, tail_bytes)]
    return body


def _task_log(record: Record, request: dict[str, Any], full: bool, tail_bytes: int) -> dict[str, Any]:
    task = record.task
    metadata = {"user": task.user, "scheduler": record.scheduler, "description": record.description}
    if record.exit_code is not None:
        metadata["exit_code"] = str(record.exit_code)
    log: dict[str, Any] = {"logs": _executor_logs(record, len(request["executors"]), full, tail_bytes),
                           "outputs": _output_logs(record, request), "metadata": metadata}
    if record.started:
        log["start_time"] = rfc3339(record.started)
    if record.finished:
        log["end_time"] = rfc3339(record.finished)
    if full:
        log["system_logs"] = _system_logs(record)
    return log


def _read(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8", errors="replace").strip()
    except OSError:
        return None


def _executor_logs(record: Record, count: int, full: bool, tail_bytes: int) -> list[dict[str, Any]]:
    task = record.task
    if "tes" not in task.extra:
        return _job_log(record, full, tail_bytes)
    folder, request = task_folder(task) / "exec", task.extra["tes"]["request"]
    logs = []
    for index in range(count):
        code = _read(folder / f"{index}.exit")
        if code is None or not code.lstrip("-").isdigit():
            break
        entry: dict[str, Any] = {"exit_code": int(code)}
        for field, name in (("start_time", "start"), ("end_time", "end")):
            moment = _read(folder / f"{index}.{name}")
            if moment:
                entry[field] = moment
        if full:
            executor = request["executors"][index]
            for stream in ("stdout", "stderr"):
                path = (task_folder(task) / "root" / executor[stream].lstrip("/")) if stream in executor \
                    else folder / f"{index}.{stream}"
                entry[stream] = tail(path, tail_bytes)
        logs.append(entry)
    return logs


def _job_log(record: Record, full: bool, tail_bytes: int) -> list[dict[str, Any]]:
    """A v1 task's job as the log of its one executor, once it ended."""
    task = record.task
    code = _read(Path(task.workdir) / EXIT_FILE)
    if record.exit_code is None and (code is None or not code.lstrip("-").isdigit()):
        return []
    entry: dict[str, Any] = {"exit_code": record.exit_code if record.exit_code is not None else int(code or 0)}
    if record.started:
        entry["start_time"] = rfc3339(record.started)
    if record.finished:
        entry["end_time"] = rfc3339(record.finished)
    if full:
        entry["stdout"], entry["stderr"] = tail(task.stdout, tail_bytes), tail(task.stderr, tail_bytes)
    return [entry]


def _output_logs(record: Record, request: dict[str, Any]) -> list[dict[str, Any]]:
    """The outputs copied back, once the task ended."""
    if not record.state.terminal or record.state == TaskState.CANCELED:
        return []
    found = []
    staged = {item["where"] for item in record.task.extra.get("tes", {}).get("staging", {}).get("outputs", [])}
    for index, item in enumerate(request.get("outputs", [])):
        if f"outputs[{index}]" in staged:  # sent by the gateway: listed in tes/outputs.json
            continue
        # a file:// output where it was copied to; one sent elsewhere by its size before sending
        destination = local_path(item["url"]) or str(task_folder(record.task) / "root" / item["path"].lstrip("/"))
        if not os.path.exists(destination):
            continue
        found.append({"url": item["url"], "path": item["path"], "size_bytes": str(_size(destination))})
    sent = _read(task_folder(record.task) / "outputs.json") if staged else None
    return found + (json.loads(sent) if sent else [])


def _size(path: str) -> int:
    if not os.path.isdir(path):
        return os.path.getsize(path)
    return sum(os.path.getsize(os.path.join(folder, name)) for folder, _, names in os.walk(path) for name in names)


def _system_logs(record: Record) -> list[str]:
    task: Task = record.task
    lines = list(task.extra.get("tes", {}).get("notes", []))
    written = _read(task_folder(task) / "system.log")
    if written:
        lines += written.splitlines()
    if record.state == TaskState.SYSTEM_ERROR and record.description:
        lines.append(record.description)
    return lines
