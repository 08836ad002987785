"""`GET /v1/jobproxy/logs/{id}`: a task's stdout or stderr over HTTP, as text/plain bytes.

- `stream=stdout|stderr` (default stdout);
- `offset=N`: from byte N of the file (default 0); `tail=N`: only the last N bytes (of those);
- `follow=true`: a chunked answer that keeps sending what the job writes and ends once the task
  is final (or deleted, or the gateway shuts down).

Without `follow`, one answer holds at most `[streams] max_log_bytes`: the headers
`JobProxy-Output-Start`, `JobProxy-Output-Next` and `JobProxy-Output-Size` say which bytes came and
how large the file is, so a client pages on with `offset=<Next>`; `tail` may ask no more. An output
file the job has not written yet reads as empty. Every scheduler works alike: the files are in the
task's folder (or where the task asked), on the shared task root.

The same visibility as the state: another user's task answers 404, like an unknown one. The files
are opened as `gateway.output` opens them (no symbolic link at the end, regular files only) and,
when the gateway runs as root, only if they belong to the account the task's job runs as: with
`[run_as]`, the task's user, so the gateway shows nobody a file the task's user could not read.
"""
from __future__ import annotations

import asyncio
import os
from typing import Any

from aiohttp import web
from multidict import MultiMapping

from . import paging
from .events import closing
from .keys import CONFIG
from .output import NOT_WRITTEN, job_owner, open_output
from .responses import ApiError
from .service import current, visible

routes = web.RouteTableDef()
STREAMS = ("stdout", "stderr")
CHUNK = 65536


def _refuse(name: str, message: str) -> ApiError:
    return ApiError(400, f"{name}: {message}", [{"path": name, "message": message}])


def _number(query: MultiMapping[str], name: str, high: int) -> int | None:
    if query.get(name) in (None, ""):
        return None
    try:
        return paging.whole_number(query.get(name), name, 0, 0, high)
    except paging.OutOfRange as exc:
        raise _refuse(name, exc.rule) from None


def _follow(raw: str | None) -> bool:
    if raw in (None, "false"):
        return False
    if raw == "true":
        return True
    raise _refuse("follow", f"must be true or false, not {raw!r}")


def _start(offset: int | None, tail: int | None, size: int) -> int:
    """Where reading starts: at `offset` (default 0), or `tail` bytes before the end if later."""
    start = offset or 0
    return max(start, size - tail) if tail is not None else start


async def _in_thread(function: Any, *args: Any) -> Any:
    """File systems can be slow (NFS): reads run off the event loop."""
    return await asyncio.get_running_loop().run_in_executor(None, function, *args)


@routes.get("/v1/jobproxy/logs/{id}")
async def logs(request: web.Request) -> web.StreamResponse:
    record = visible(request, request.match_info["id"])
    query, settings = request.query, request.app[CONFIG].sections.streams
    stream = query.get("stream") or "stdout"
    if stream not in STREAMS:
        raise _refuse("stream", f"must be stdout or stderr, not {stream!r}")
    offset, tail = _number(query, "offset", 2**62), _number(query, "tail", settings.max_log_bytes)
    follow = _follow(query.get("follow"))
    path = record.task.stdout if stream == "stdout" else record.task.stderr
    owner = job_owner(request.app, record.task)
    opened = await _in_thread(open_output, path, owner)
    if isinstance(opened, str) and opened != NOT_WRITTEN:
        raise ApiError(403, f"the {stream} of task {record.id} cannot be shown: {path} is {opened}")
    fd, size = opened if isinstance(opened, tuple) else (None, 0)
    start = _start(offset, tail, size)
    try:
        if not follow:
            data = b"" if fd is None else await _in_thread(os.pread, fd, min(settings.max_log_bytes, size), start)
            return web.Response(body=data, content_type="text/plain", charset="utf-8", headers={
                "JobProxy-Output-Start": str(start), "JobProxy-Output-Next": str(start + len(data)),
                "JobProxy-Output-Size": str(size)})
        response = web.StreamResponse(headers={"Content-Type": "text/plain; charset=utf-8", "Cache-Control": "no-cache",
                                               "X-Accel-Buffering": "no", "JobProxy-Output-Start": str(start)})
        response.enable_chunked_encoding()
        await response.prepare(request)
        fd = await _follow_file(request, response, fd, path, owner, start, tail)
        return response
    finally:
        if fd is not None:
            os.close(fd)


async def _follow_file(request: web.Request, response: web.StreamResponse, fd: int | None, path: str,
                       owner: int | None, position: int, tail: int | None) -> int | None:
    """Send what the file holds from `position` on, and what is written to it, until the task is
    final and nothing more came; answers the fd to close."""
    app, task_id = request.app, request.match_info["id"]
    interval = app[CONFIG].sections.streams.follow_interval
    try:
        while not closing(app):
            record = current(app, task_id)
            ended = record is None or record.state.terminal  # seen before the read: nothing comes after
            if fd is None:
                opened = await _in_thread(open_output, path, owner)
                if isinstance(opened, str) and opened != NOT_WRITTEN:
                    break  # swapped for something the gateway must not show
                if isinstance(opened, tuple):
                    fd, size = opened
                    position = _start(position, tail, size)
            data = b"" if fd is None else await _in_thread(os.pread, fd, CHUNK, position)
            if data:
                position += len(data)
                await response.write(data)
                continue
            if ended:
                break
            await asyncio.sleep(interval)
        await response.write_eof()
    except ConnectionError:  # the client went away
        pass
    return fd
