"""Stored tasks as TES 1.1 documents, in the three views, with their logs read back from files.

- MINIMAL: `id` and `state`.
- BASIC: the request as received (without `inputs[].content`), `id`, `state`, `creation_time`,
  and one TaskLog: start/end times, `metadata` (owner, scheduler, the state's description and
  exit code), a log for each executor that has started (`start_time`; `end_time` and
  `exit_code` once it ended: a running executor has no `exit_code` yet), and the outputs copied
  back with their sizes (those the gateway sent, one entry per file, from `tes/outputs.json`).
- FULL: BASIC plus `inputs[].content`, the tail of each started executor's stdout/stderr, also
  while it runs (`[tes] log_tail_bytes`: the end is what explains a failure) and `system_logs`
  (notes from submission, the steps script's `tes/system.log`, the gateway's staging notes
  `tes/staging.log`, and the description of a
  SYSTEM_ERROR).

Files the job wrote are read with `gateway.output.read_tail`: never through a symbolic link, only
regular files, and (a gateway running as root) only files of the job's account (`owner`).

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
from schedulers.script import EXIT_FILE

from ..model import rfc3339
from ..output import read_tail
from ..store import Record
from .request import local_path, request_of, task_folder

VIEWS = ("MINIMAL", "BASIC", "FULL")


def document(record: Record, view: str, tail_bytes: int, owner: int | None = None) -> dict[str, Any]:
    """`record` as a TES task in `view`; FULL shows the last `tail_bytes` of each output. With
    `owner`, only files of that uid are read (see the module docstring)."""
    if view == "MINIMAL":
        return {"id": record.id, "state": record.state.value}
    full = view == "FULL"
    body = copy.deepcopy(request_of(record.task))
    if not full:
        for item in body.get("inputs", []):
            item.pop("content", None)
    body.update(id=record.id, state=record.state.value, creation_time=rfc3339(record.created))
    body["logs"] = [_task_log(record, body, full, _Reader(tail_bytes, owner))]
    return body


SENT_LIMIT = 64 << 20  # bytes of the list of outputs the gateway sent


class _Reader:
    """Reads what the job wrote, safely (`read_tail`): small files whole, outputs' tails."""

    def __init__(self, tail_bytes: int, owner: int | None) -> None:
        self.tail_bytes, self.owner = tail_bytes, owner

    def text(self, path: Path | str) -> str | None:
        """A small file (an executor's time or exit code), stripped; None if there is none."""
        found = read_tail(str(path), 4096, self.owner)
        return None if found["size"] is None else str(found["tail"]).strip()

    def gateways(self, path: Path | str) -> str | None:
        """A file the gateway itself wrote into the task's folder (the outputs it sent), whole."""
        found = read_tail(str(path), SENT_LIMIT, os.geteuid())
        return None if found["size"] is None or found["truncated"] else str(found["tail"])

    def tail(self, path: Path | str) -> str:
        return str(read_tail(str(path), self.tail_bytes, self.owner)["tail"])


def _task_log(record: Record, request: dict[str, Any], full: bool, reader: _Reader) -> dict[str, Any]:
    task = record.task
    metadata = {"user": task.user, "scheduler": record.scheduler, "description": record.description}
    if record.exit_code is not None:
        metadata["exit_code"] = str(record.exit_code)
    log: dict[str, Any] = {"logs": _executor_logs(record, len(request["executors"]), full, reader),
                           "outputs": _output_logs(record, request, reader), "metadata": metadata}
    if record.started:
        log["start_time"] = rfc3339(record.started)
    if record.finished:
        log["end_time"] = rfc3339(record.finished)
    if full:
        log["system_logs"] = _system_logs(record, reader)
    return log


def _code(text: str | None) -> int | None:
    return int(text) if text is not None and text.lstrip("-").isdigit() else None


def _executor_logs(record: Record, count: int, full: bool, reader: _Reader) -> list[dict[str, Any]]:
    """A log for each executor that has started, in order: its start time (and, FULL, the tail
    of its output so far), its end time and exit code once it ended. An executor a task that
    has ended left unfinished (the job was cancelled or killed) gets the task's exit code."""
    task = record.task
    if "tes" not in task.extra:
        return _job_log(record, full, reader)
    folder, request = task_folder(task) / "exec", task.extra["tes"]["request"]
    logs = []
    for index in range(count):
        started = reader.text(folder / f"{index}.start")
        code = _code(reader.text(folder / f"{index}.exit"))
        if not started and code is None:
            break
        entry: dict[str, Any] = {"start_time": started} if started else {}
        if code is not None:
            entry["exit_code"] = code
            ended = reader.text(folder / f"{index}.end")
            if ended:
                entry["end_time"] = ended
        elif record.state.terminal:
            entry["exit_code"] = record.exit_code if record.exit_code is not None else -1
        if full:
            executor = request["executors"][index]
            for stream in ("stdout", "stderr"):
                path = (task_folder(task) / "root" / executor[stream].lstrip("/")) if stream in executor \
                    else folder / f"{index}.{stream}"
                entry[stream] = reader.tail(path)
        logs.append(entry)
        if code is None:
            break
    return logs


def _job_log(record: Record, full: bool, reader: _Reader) -> list[dict[str, Any]]:
    """A v1 task's job as the log of its one executor, from when it started (FULL: the tail of
    its output so far); its exit code once it ended."""
    task = record.task
    code = record.exit_code if record.exit_code is not None else _code(reader.text(Path(task.workdir) / EXIT_FILE))
    if code is None and record.started is None:
        return []
    entry: dict[str, Any] = {}
    if record.started:
        entry["start_time"] = rfc3339(record.started)
    if code is not None:
        entry["exit_code"] = code
    if record.finished:
        entry["end_time"] = rfc3339(record.finished)
    if full:
        entry["stdout"], entry["stderr"] = reader.tail(task.stdout), reader.tail(task.stderr)
    return [entry]


def _output_logs(record: Record, request: dict[str, Any], reader: _Reader) -> list[dict[str, Any]]:
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
    sent = reader.gateways(task_folder(record.task) / "outputs.json") if staged else None
    return found + (json.loads(sent) if sent else [])


def _size(path: str) -> int:
    if not os.path.isdir(path):
        return os.path.getsize(path)
    return sum(os.path.getsize(os.path.join(folder, name)) for folder, _, names in os.walk(path) for name in names)


def _system_logs(record: Record, reader: _Reader) -> list[str]:
    task: Task = record.task
    lines = list(task.extra.get("tes", {}).get("notes", []))
    written = reader.tail(task_folder(task) / "system.log").strip()  # the steps script's
    if written:
        lines += written.splitlines()
    staged = reader.gateways(task_folder(task) / "staging.log")  # the gateway's, on staging
    if staged:
        lines += staged.strip().splitlines()
    if record.state == TaskState.SYSTEM_ERROR and record.description:
        lines.append(record.description)
    return lines
