"""Gateway benchmark: submit throughput and walking a large task list, against baselines measured
in the same run on the same machine (so noisy, shared machines still give meaningful ratios).

  .venv/bin/python bench/gateway_bench.py [--submits 2000] [--tasks 100000]

Prints each figure and its ratio to its baseline:
- submit: POST /v1/jobproxy/submit (validation, store, local scheduler's spool) per second, against
  GET /v1/jobproxy/ping per second on the same server (the HTTP floor).
- list: walking --tasks tasks through GET /v1/jobproxy/state in pages of 1000, against reading the
  same rows straight from the store.
- memory: the server's resident memory before and after the walk. The --tasks seeded tasks are
  QUEUED for a scheduler instance the server does not have, so all of them are in its active set.

It stops only what it started, by pid: the server it ran, then every process of the tasks it
submitted (found by the JOBPROXY_TASK_ID the local scheduler gives each job), waiting until each is
gone or a zombie (whose reaping is up to PID 1).
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import Server, free_port, gone, rss_mib
from gateway.api_v1 import state_document
from gateway.model import new_task_id, task_from_document
from gateway.store import Store


async def rate(session: aiohttp.ClientSession, method: str, url: str, count: int, body: bytes | None = None,
               concurrency: int = 8, ids: list[str] | None = None) -> float:
    """Requests per second for `count` requests, `concurrency` at a time; the `id` of each answer is
    added to `ids` if given (submits: the tasks to stop at the end)."""
    left = count
    headers = {"Content-Type": "application/json"} if body else {}

    async def worker() -> None:
        nonlocal left
        while left > 0:
            left -= 1
            async with session.request(method, url, data=body, headers=headers) as response:
                answer = await response.read()
                assert response.status == 200, response.status
                if ids is not None:
                    ids.append(json.loads(answer)["id"])

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return count / (time.perf_counter() - start)


async def seed(store_path: Path, count: int) -> None:
    store = Store(store_path)
    for start in range(0, count, 1000):
        ids = [f"{new_task_id()}{n:06d}" for n in range(start, min(count, start + 1000))]
        await asyncio.gather(*(store.add(task_from_document({"user": "bench", "cmd": "true"}, i, f"/nonexistent/{i}"),
                                         "other") for i in ids))
    store.close()


def task_processes(task_ids: set[str]) -> list[int]:
    """Pids of the processes whose environment names one of `task_ids` (JOBPROXY_TASK_ID)."""
    wanted = {f"JOBPROXY_TASK_ID={task_id}".encode() for task_id in task_ids}
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            environ = (entry / "environ").read_bytes().split(b"\0")
        except OSError:  # gone meanwhile, or not ours to read
            continue
        if wanted.intersection(environ):
            found.append(int(entry.name))
    return found


def stop(pids: list[int], timeout: float = 30) -> None:
    """SIGKILL each of `pids` and wait until all have ended."""
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):  # ended meanwhile
            os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + timeout
    while not all(gone(pid) for pid in pids):
        if time.monotonic() > deadline:
            raise RuntimeError(f"processes still alive {timeout:.0f} s after SIGKILL: "
                               f"{[pid for pid in pids if not gone(pid)]}")
        time.sleep(0.05)


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--submits", type=int, default=2000)
    parser.add_argument("--tasks", type=int, default=100_000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        root.chmod(0o711)  # as root with auth off, jobs run as nobody, who must pass through to the task folders
        await seed(root / "state" / "jobproxy.db", args.tasks)
        (root / "jobproxy.toml").write_text(
            '[gateway]\nstate_dir = "state"\n[scheduler]\npoll_interval = 5\n'
            '[scheduler.options]\ncores = 1\n[log]\nlevel = "WARNING"\n')
        port = free_port()
        command = [str(Path(sys.executable).parent / "jobproxy"), "serve", "--config", str(root / "jobproxy.toml"),
                   "--port", str(port)]
        url = f"http://127.0.0.1:{port}/v1/jobproxy"
        submitted: list[str] = []
        try:
            with Server(command, root, f"http://127.0.0.1:{port}") as server:  # stopped first: no queued task starts
                await server.ready()
                async with aiohttp.ClientSession() as session:
                    blocker = json.dumps({"user": "bench", "cmd": "sleep 600"}).encode()
                    await rate(session, "POST", f"{url}/submit", 1, blocker, concurrency=1, ids=submitted)  # the core
                    ping = await rate(session, "GET", f"{url}/ping", args.submits)
                    task = json.dumps({"user": "bench", "cmd": ["/bin/true"], "cores": 1, "memory": 10}).encode()
                    submit = await rate(session, "POST", f"{url}/submit", args.submits, task, ids=submitted)

                    memory_before = rss_mib(server.pid)
                    start, token, walked = time.perf_counter(), "", 0
                    while True:
                        async with session.get(f"{url}/state?page_size=1000&page_token={token}") as response:
                            page = await response.json()
                        walked += len(page["state"])
                        token = page.get("next_page_token", "")
                        if not token:
                            break
                    http_walk = time.perf_counter() - start
                    start = time.perf_counter()
                    store, after, direct = Store(root / "state" / "jobproxy.db"), 0, 0
                    while rows := store.page(after=after, limit=1000):
                        direct += len([state_document(r) for r in rows])
                        after = rows[-1].seq
                    store_walk = time.perf_counter() - start
                    memory = rss_mib(server.pid)
        finally:
            stop(task_processes(set(submitted)))
    print(f"baseline ping:   {ping:8.0f} requests/s")
    print(f"submit:          {submit:8.0f} tasks/s      ratio to ping {submit / ping:.2f}")
    print(f"list walk:       {walked:8d} tasks in {http_walk:.2f} s ({walked / http_walk:.0f} tasks/s)")
    print(f"baseline store:  {direct:8d} tasks in {store_walk:.2f} s      "
          f"ratio HTTP/store time {http_walk / store_walk:.2f}")
    print(f"server memory:   {memory_before:8.1f} MiB resident before the walk, {memory:.1f} MiB after it, with "
          f"{args.tasks + len(submitted)} active tasks (the seeded ones wait for a scheduler instance it lacks)")


if __name__ == "__main__":
    asyncio.run(main())
