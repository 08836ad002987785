"""A logging HTTP proxy in front of the dev cluster's slurmrestd, the REST counterpart of the
logging wrappers around Slurm's commands in tests/test_e2e_slurm.py: every request is forwarded
unchanged to the real slurmrestd and logged under the command it stands for (`POST /job/submit`
as `sbatch`, `GET /jobs` as `squeue`, `GET /job/{id}` as `scontrol`, `DELETE /job/{id}` as
`scancel`), when it starts and (`<name>-done`) when it is answered. `hold` makes a submission's
answer wait after slurmrestd gave it; `slow` delays a submission by 0.5 s before forwarding it."""
from __future__ import annotations

import asyncio
import json
import re
import threading
import time
from pathlib import Path

import aiohttp
from aiohttp import web

_NAMES = ((re.compile(r"POST /slurm/v[\d.]+/job/submit$"), "sbatch"),
          (re.compile(r"GET /slurm/v[\d.]+/jobs$"), "squeue"),
          (re.compile(r"GET /slurm/v[\d.]+/job/\d+$"), "scontrol"),
          (re.compile(r"DELETE /slurm/v[\d.]+/job/"), "scancel"))


class RestProxy:
    """The proxy, serving on 127.0.0.1 from a thread of its own until `stop`."""

    def __init__(self, upstream: str, calls: Path, hold: Path, slow: Path) -> None:
        self.upstream = upstream.rstrip("/")
        self.calls, self.hold, self.slow = calls, hold, slow
        self.url = ""
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._runner: web.AppRunner | None = None

    def start(self) -> RestProxy:
        self._thread.start()
        assert self._ready.wait(30), "the slurmrestd proxy did not start"
        return self

    def stop(self) -> None:
        if self._runner is not None:
            asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(30)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(30)

    def _log(self, name: str, args: str) -> None:
        with open(self.calls, "a", encoding="utf-8") as log:
            log.write(f"{time.time():.6f} {name} {args}\n")

    def _serve(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._loop.run_until_complete(self._start())
        self._ready.set()
        self._loop.run_forever()

    async def _start(self) -> None:
        self.session = aiohttp.ClientSession()
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._forward)
        app.on_cleanup.append(lambda _: self.session.close())
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = self._runner.addresses[0][1]
        self.url = f"http://127.0.0.1:{port}"

    async def _forward(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        line = f"{request.method} {request.path}"
        name = next((n for pattern, n in _NAMES if pattern.match(line)), "other")
        args = request.path_qs
        if name == "sbatch":
            try:
                args += " name=" + str(json.loads(body)["job"]["name"])
                args += " user=" + request.headers.get("X-SLURM-USER-NAME", "")
            except (ValueError, KeyError, TypeError):
                pass
            if self.slow.exists():
                await asyncio.sleep(0.5)
        self._log(name, args)
        headers = {k: v for k, v in request.headers.items() if k.lower().startswith("x-slurm") or k == "Content-Type"}
        async with self.session.request(request.method, self.upstream + request.path_qs, data=body or None,
                                        headers=headers) as reply:
            status, data, kind = reply.status, await reply.read(), reply.content_type
        if name == "sbatch" and self.hold.exists():
            Path(str(self.hold) + ".submitted").touch()
            for _ in range(600):
                if not self.hold.exists():
                    break
                await asyncio.sleep(0.1)
        self._log(name + "-done", args)
        return web.Response(status=status, body=data, content_type=kind if data else None)
