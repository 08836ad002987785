"""Gateway benchmark: submit throughput and walking a large task list, against baselines measured
in the same run on the same machine (so noisy, shared machines still give meaningful ratios).

  .venv/bin/python bench/gateway_bench.py [--submits 2000] [--tasks 100000]

Prints each figure and its ratio to its baseline:
- submit: POST /v1/jobproxy/submit (validation, store, local scheduler's spool) per second, against
  GET /v1/jobproxy/ping per second on the same server (the HTTP floor).
- list: walking --tasks tasks through GET /v1/jobproxy/state in pages of 1000, against reading the
  same rows straight from the store.
- memory: the server's resident memory after the walk.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from schedulers.base import Task
from gateway.model import new_task_id  # noqa: E402, task_from_document
from gateway.store import Store  # noqa: E402
from tests.conftest import free_port  # noqa: E402


async def rate(session: aiohttp.ClientSession, method: str, url: str, count: int, body: bytes | None = None,
               concurrency: int = 8) -> float:
    """Requests per second for `count` requests, `concurrency` at a time."""
    left = count
    headers = {"Content-Type": "application/json"} if body else {}

    async def worker() -> None:
        nonlocal left
        while left > 0:
            left -= 1
            async with session.request(method, url, data=body, headers=headers) as response:
                await response.read()
                assert response.status == 200, response.status

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return count / (time.perf_counter() - start)


def seed(store_path: Path, count: int) -> None:
    store = Store(store_path)
    for _ in range(count):
        task_id = new_task_id()
        store.add(task_from_document({"user": "bench", "cmd": "true"}, task_id, f"/nonexistent/{task_id}"), "other")
    store.close()


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--submits", type=int, default=2000)
    parser.add_argument("--tasks", type=int, default=100_000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        root.chmod(0o711)  # as root with auth off, jobs run as nobody, who must pass through to the task folders
        seed(root / "state" / "jobproxy.db", args.tasks)
        (root / "jobproxy.toml").write_text(
            '[gateway]\nstate_dir = "state"\n[scheduler]\npoll_interval = 5\n'
            '[scheduler.options]\ncores = 1\n[log]\nlevel = "WARNING"\n')
        port = free_port()
        command = [str(Path(sys.executable).parent / "jobproxy"), "serve", "--config", str(root / "jobproxy.toml"),
                   "--port", str(port)]
        server = subprocess.Popen(command, cwd=root, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        url = f"http://127.0.0.1:{port}/v1/jobproxy"
        try:
            async with aiohttp.ClientSession() as session:
                for _ in range(300):
                    try:
                        async with session.get(f"{url}/ping") as response:
                            if response.status == 200:
                                break
                    except aiohttp.ClientError:
                        await asyncio.sleep(0.1)
                blocker = json.dumps({"user": "bench", "cmd": "sleep 600"}).encode()
                await rate(session, "POST", f"{url}/submit", 1, blocker, concurrency=1)  # holds the one core
                ping = await rate(session, "GET", f"{url}/ping", args.submits)
                task = json.dumps({"user": "bench", "cmd": ["/bin/true"], "cores": 1, "memory": 10}).encode()
                submit = await rate(session, "POST", f"{url}/submit", args.submits, task)

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
                    direct += len([r.as_state() for r in rows])
                    after = rows[-1].seq
                store_walk = time.perf_counter() - start
                memory = rss_mib(server.pid)
        finally:
            server.terminate()
            server.wait(timeout=30)
            subprocess.run(["pkill", "-f", "sleep 600"], check=False)
    print(f"baseline ping:   {ping:8.0f} requests/s")
    print(f"submit:          {submit:8.0f} tasks/s      ratio to ping {submit / ping:.2f}")
    print(f"list walk:       {walked:8d} tasks in {http_walk:.2f} s ({walked / http_walk:.0f} tasks/s)")
    print(f"baseline store:  {direct:8d} tasks in {store_walk:.2f} s      ratio HTTP/store time {http_walk / store_walk:.2f}")
    print(f"server memory:   {memory:8.1f} MiB resident after the walk")


if __name__ == "__main__":
    asyncio.run(main())
