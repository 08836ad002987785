"""What the dashboard shows of one task beyond its state, under /v1/jobproxy:

- `GET /v1/jobproxy/task/{id}`: the task as asked for (command, resources, output paths,
  container), in the v1 field names and units;
- `GET /v1/jobproxy/output/{id}?bytes=N`: the last N bytes (default 64 KiB, at most 1 MiB) of its
  stdout and stderr, read by the gateway.

The same visibility rule as the state: another user's task answers 404, like an unknown one.
Output files are read without following a symbolic link at the end of the path and only if they
are regular files; a gateway running as root reads a file only if it belongs to the account the
job runs as, so a task cannot show its owner a file that only the gateway could read.
"""
from __future__ import annotations

import asyncio
import os
import stat
from typing import Any

from aiohttp import web

from schedulers import accounts
from schedulers.base import Task

from . import paging
from .keys import SCHEDULERS
from .responses import ApiError, answer
from .service import visible

routes = web.RouteTableDef()

DEFAULT_BYTES = 65536
MAX_BYTES = 1048576


@routes.get("/v1/jobproxy/task/{id}")
async def task_document(request: web.Request) -> web.Response:
    task = visible(request, request.match_info["id"]).task
    body: dict[str, Any] = {"id": task.id, "user": task.user}
    if task.name is not None:
        body["name"] = task.name
    if task.cmd is not None:
        body["cmd"] = task.cmd if isinstance(task.cmd, str) else list(task.cmd)
    for key in ("cores", "memory", "cputime"):
        if getattr(task, key) is not None:
            body[key] = getattr(task, key)
    if task.gpus:
        body["gpus"] = task.gpus
    if task.backend_parameters:
        body["options"] = dict(task.backend_parameters)
    body.update(stdout=task.stdout, stderr=task.stderr)
    if task.container is not None:
        body["container"] = {
            "image": task.container.image,
            "ports": [{"host": p.host, "container": p.container} for p in task.container.ports],
            "volumes": [{"host": m.host, "container": m.container, "mode": "RO" if m.read_only else "RW"}
                        for m in task.container.volumes],
        }
    return answer(request, body, xml_root="task")


@routes.get("/v1/jobproxy/output/{id}")
async def output(request: web.Request) -> web.Response:
    record = visible(request, request.match_info["id"])
    try:
        limit = paging.whole_number(request.query.get("bytes"), "bytes", DEFAULT_BYTES, 1, MAX_BYTES)
    except paging.OutOfRange as exc:
        raise ApiError(400, str(exc), [{"path": "bytes", "message": exc.rule}]) from None
    owner = job_owner(request.app, record.task)
    loop = asyncio.get_running_loop()  # file systems can be slow (NFS): off the event loop
    streams = {name: await loop.run_in_executor(None, read_tail, path, limit, owner)
               for name, path in (("stdout", record.task.stdout), ("stderr", record.task.stderr))}
    return answer(request, {"id": record.id, "bytes": limit, **streams}, xml_root="output")


def job_owner(app: web.Application, task: Task) -> int | None:
    """The uid whose files the gateway may show of `task`: the account its job runs as (its user
    with `[run_as]`), when the gateway runs as root; None (any file the gateway can read) else."""
    # the job account follows the site policy, the same for every scheduler instance
    account = next(iter(app[SCHEDULERS].values())).job_account(task)
    return _uid(account) if os.geteuid() == 0 and account is not None else None


def _uid(account: str) -> int | None:
    try:
        return accounts.entry(account).pw_uid
    except KeyError:
        return -1  # no such account: no file can belong to it


def read_tail(path: str, limit: int, owner: int | None = None) -> dict[str, Any]:
    """The last `limit` bytes of the file at `path` as text: `{"path", "size", "tail", "truncated"}`
    and, when nothing could be read, `note` saying why (`size` then null). With `owner`, only a
    file of that uid is read."""
    found: dict[str, Any] = {"path": path, "size": None, "tail": "", "truncated": False}
    opened = open_output(path, owner)
    if isinstance(opened, str):
        return {**found, "note": opened}
    fd, size = opened
    try:
        start = max(0, size - limit)
        data = os.pread(fd, limit, start)
    except OSError as exc:
        return {**found, "note": f"cannot be read: {exc.strerror}"}
    finally:
        os.close(fd)
    return {**found, "size": size, "tail": data.decode("utf-8", errors="replace"), "truncated": start > 0}


#: What `open_output` answers for a file that does not exist (yet).
NOT_WRITTEN = "not written yet"


def open_output(path: str, owner: int | None = None) -> tuple[int, int] | str:
    """Open a task's output file for reading, safely: `(fd, size)`, or a note saying why not
    (NOT_WRITTEN for a missing file). A symbolic link at the end of the path, anything but a
    regular file, a file swapped between look and open, and (with `owner`) a file of another uid
    are refused. The caller closes the fd."""
    try:
        seen = os.lstat(path)
        if not stat.S_ISREG(seen.st_mode):
            return "not a regular file"
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        return NOT_WRITTEN
    except OSError as exc:
        return f"cannot be read: {exc.strerror}"
    try:
        opened = os.fstat(fd)
        if (opened.st_dev, opened.st_ino) != (seen.st_dev, seen.st_ino) or not stat.S_ISREG(opened.st_mode):
            note = "replaced while being read"
        elif owner is not None and opened.st_uid != owner:
            note = "not written by the task's account"
        else:
            return fd, opened.st_size
    except OSError as exc:
        note = f"cannot be read: {exc.strerror}"
    os.close(fd)
    return note
