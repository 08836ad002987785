"""Local dispatch benchmark: how fast a real gateway on the local scheduler runs many tiny tasks,
against a baseline measured in the same run on the same machine.

  /work/main/.venv/bin/python bench/local_dispatch.py [--tasks 1000] [--concurrency 32] [--cores 2]
      [--launchers N] [--rounds 3]

- gateway: `python -m gateway.cli serve` (this tree's code) with the local scheduler on `--cores`
  cores and its state in a temporary folder; `--tasks` tasks `{"user": "bench", "cmd": ["/bin/true"]}`
  are submitted to POST /v1/jobproxy/submit, `--concurrency` at a time, and the clock stops when
  GET /v1/jobproxy/state?state=COMPLETE lists them all;
- `--drain`: the tasks are submitted while a blocker task holds all `--cores` cores, and the clock
  starts when the blocker ends: the rate at which queued tasks run, without the submits;
- baseline: `/bin/true` spawned straight from asyncio, `--tasks` times, `--cores` at a time, before
  and after each gateway run (their mean is that run's baseline);
- `--rounds`: gateway runs, alternating with the baseline runs, each with a fresh gateway. On a
  shared virtual machine one run's ratio moves by a tenth or more with its neighbours' load; the
  median of the rounds is printed last.

Prints, for each round, what making a task's folder and files cost just before it (see
`bench.common.creation_cost`: on ext4 without a journal it grows tenfold for a minute or more
after many files were removed), tasks/s of each, their ratio, and the CPU seconds the gateway and
its job launchers used.
Stops only the gateway process it started, by its pid.
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import JSON, Server, cpu_seconds, creation_cost, free_port, submit_many

ROOT = Path(__file__).resolve().parent.parent


def children(pid: int) -> list[int]:
    """The direct children of process `pid`."""
    found: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError):
            found += [int(c) for c in (task / "children").read_text().split()]
    return found


async def baseline(count: int, parallel: int) -> float:
    """`/bin/true` spawned from asyncio `count` times, `parallel` at a time: runs per second."""
    left = count

    async def worker() -> None:
        nonlocal left
        while left > 0:
            left -= 1
            process = await asyncio.create_subprocess_exec("/bin/true")
            await process.wait()

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(parallel)))
    return count / (time.perf_counter() - start)


async def listed(session: aiohttp.ClientSession, url: str, state: str) -> set[str]:
    """The ids of every task in `state`, walking all pages."""
    found: set[str] = set()
    token = ""
    while True:
        async with session.get(f"{url}/state?state={state}&page_size=10000&page_token={token}") as response:
            page = await response.json()
        found.update(s["id"] for s in page["state"])
        token = page.get("next_page_token", "")
        if not token:
            return found


async def wait_complete(session: aiohttp.ClientSession, url: str, ids: list[str], timeout: float) -> None:
    """Until every task of `ids` is COMPLETE: the last one is watched cheaply, then all are listed."""
    deadline = time.monotonic() + timeout
    wanted = set(ids)
    while time.monotonic() < deadline:
        async with session.get(f"{url}/state/{ids[-1]}") as response:
            last = await response.json()
        if last["code"] in ("EXECUTOR_ERROR", "SYSTEM_ERROR", "CANCELED"):
            raise RuntimeError(f"task {ids[-1]} ended {last['code']}: {last['description']}")
        if last["code"] == "COMPLETE" and wanted <= await listed(session, url, "COMPLETE"):
            return
        await asyncio.sleep(0.02)
    raise RuntimeError(f"the tasks did not all complete within {timeout} s")


async def run_gateway(root: Path, args: argparse.Namespace) -> tuple[float, float, float, float]:
    """Start the gateway, run the tasks through it, stop it: (tasks/s, seconds the submits took,
    gateway CPU s, launcher CPU s)."""
    (root / "jobproxy.toml").write_text(
        '[gateway]\nstate_dir = "state"\n'
        f'[scheduler]\ntype = "local"\npoll_interval = {args.poll_interval}\n'
        f'[scheduler.options]\ncores = {args.cores}\ncgroups = "{args.cgroups}"\n'
        + (f'launchers = {args.launchers}\n' if args.launchers else '')
        + '[log]\nlevel = "WARNING"\n')
    port = free_port()
    command = [sys.executable, "-m", "gateway.cli", "serve", "--config", str(root / "jobproxy.toml"),
               "--port", str(port)]
    with Server(command, root, f"http://127.0.0.1:{port}", env={**os.environ, "PYTHONPATH": str(ROOT)},
                log=root / "gateway.log") as server:
        await server.ready(timeout=30)
        url = f"{server.base}/v1/jobproxy"
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=args.concurrency)) as session:
            launchers = children(server.pid)
            flag = root / "release"
            if args.drain:
                blocker = json.dumps({"user": "bench", "cores": args.cores,
                                      "cmd": ["sh", "-c", f"until [ -e {flag} ]; do sleep 0.01; done"]})
                async with session.post(f"{url}/submit", data=blocker, headers=JSON) as response:
                    assert response.status == 200, await response.text()
            cpu_before = cpu_seconds(server.pid), sum(cpu_seconds(p) for p in launchers)
            start = time.perf_counter()
            _, ids = await submit_many(session, [f"{url}/submit"], args.tasks, args.concurrency)
            submitted = time.perf_counter() - start
            if args.drain:
                cpu_before = cpu_seconds(server.pid), sum(cpu_seconds(p) for p in launchers)
                start = time.perf_counter()
                flag.touch()
            await wait_complete(session, url, ids, timeout=600)
            elapsed = time.perf_counter() - start
            cpu_after = cpu_seconds(server.pid), sum(cpu_seconds(p) for p in launchers)
    return args.tasks / elapsed, submitted, cpu_after[0] - cpu_before[0], cpu_after[1] - cpu_before[1]


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tasks", type=int, default=1000)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--cores", type=int, default=2)
    parser.add_argument("--cgroups", choices=("auto", "off"), default="auto",
                        help="the local scheduler's cgroups option")
    parser.add_argument("--launchers", type=int, default=0,
                        help="the local scheduler's launchers option (default: the scheduler's default)")
    parser.add_argument("--drain", action="store_true",
                        help="submit the tasks behind a blocker and time only their run, from its release")
    parser.add_argument("--poll-interval", type=float, default=1.0, help="the gateway's scheduler.poll_interval")
    parser.add_argument("--rounds", type=int, default=3,
                        help="gateway runs, each between two baseline runs; the median ratio is printed last")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="jobproxy-bench-") as folder:
        await rounds(Path(folder), args)


async def rounds(folder: Path, args: argparse.Namespace) -> None:
    """The baseline and gateway runs, each gateway run in a folder of its own under `folder`. They
    are all removed together at the end: removed between rounds, the files of one round made each
    file of the next dearer to create (see `creation_cost`)."""
    folder.chmod(0o711)  # as root with auth off, jobs run as nobody, who must reach their folders
    before = await baseline(args.tasks, args.cores)
    ratios = []
    for number in range(1, args.rounds + 1):
        round_folder = folder / f"round-{number}"
        round_folder.mkdir(mode=0o711)
        cost = creation_cost(round_folder)
        rate, submitted, gateway_cpu, launcher_cpu = await run_gateway(round_folder, args)
        after = await baseline(args.tasks, args.cores)
        base = (before + after) / 2
        ratios.append(rate / base)
        print(f"round {number} of {args.rounds}")
        print(f"before it, {cost}")
        print(f"baseline: /bin/true from asyncio, {args.cores} at a time: {before:7.0f} /s before, {after:7.0f} /s "
              f"after, mean {base:7.0f} /s")
        if args.drain:
            print(f"gateway:  {args.tasks} queued tasks, from the blocker's release to all COMPLETE, on {args.cores} "
                  f"cores: {rate:7.0f} tasks/s")
        else:
            print(f"gateway:  {args.tasks} tasks through POST /v1/jobproxy/submit on {args.cores} cores: {rate:7.0f}"
                  f" tasks/s (the submits alone took {submitted:.2f} s)")
        print(f"ratio:    {rate / base:.2f}x the baseline" + ("" if args.drain else " (target >= 0.5x)"))
        print(f"CPU:      gateway {gateway_cpu:.2f} s ({1000 * gateway_cpu / args.tasks:.2f} ms/task),"
              f" job launcher {launcher_cpu:.2f} s ({1000 * launcher_cpu / args.tasks:.2f} ms/task)")
        before = after  # the next round's baseline before is this one's after
    if args.rounds > 1:
        print(f"median ratio of {args.rounds} rounds: {statistics.median(ratios):.2f}x (each: "
              + ", ".join(f"{r:.2f}" for r in ratios) + ")" + ("" if args.drain else " (target >= 0.5x)"))


if __name__ == "__main__":
    asyncio.run(main())
