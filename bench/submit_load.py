"""Submit load on the embedded default with a deep queue, against a trivial endpoint in the same run.

  .venv/bin/python bench/submit_load.py [--stored 100000] [--queued 10000] [--submits 5000] [--rounds 3]
      [--probe-every 0.005]

One gateway process (local scheduler, cores = 1, SQLite) whose store holds `--stored` tasks, of
which `--queued` wait behind a blocker that holds the one core. Prints, each beside its baseline:
1. submit throughput (JSON, concurrency 32) against a trivial aiohttp POST endpoint that reads the
   body, in its own process, driven by the same client (target >= 0.5x): `--rounds` rounds of
   `--submits` to each, alternating, and the median of their ratios; afterwards every
   acknowledged task is counted in the database through a connection of its own;
2. the p99 of GET /v1/jobproxy/state/{id} during that load against the p99 of /ping under the
   same load, over all rounds (target <= 2x): one probe of each every `--probe-every` seconds, as
   a monitor would. Back to back (0), each probe follows the last as soon as it is answered: in
   one run the gateway answered 12,700 of them beside its 15,000 submits, the trivial endpoint
   290 beside its 15,000, so item 1 measured the probes' share of the gateway more than its
   submits (median 0.14x, against 0.21x in the next run with the default);
3. the gateway's CPU while idle with the queue for 10 s (target <= 2% of one core);
4. its resident memory with `--stored` tasks stored and `--queued` active (target <= 200 MB);
5. how long a restart with all those tasks queued takes to answer, and its CPU until then, beside
   the CPU of the first start (nothing queued yet).
Stops only the processes it started, by their pid.
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sqlite3
import statistics
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import JSON, Server, cpu_seconds, creation_cost, free_port, percentile, rss_mib, submit_many
from gateway.model import new_task_id, now, task_from_document
from gateway.store import Change, Store
from schedulers.base import TaskState

TRIVIAL = textwrap.dedent("""
    import sys
    from aiohttp import web

    async def submit(request):
        await request.read()
        return web.json_response({"id": "x"})

    async def ping(request):
        return web.json_response({"status": "ok"})

    app = web.Application()
    app.add_routes([web.post("/v1/jobproxy/submit", submit), web.get("/v1/jobproxy/ping", ping)])
    web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), print=None, access_log=None)
""")
TASK = json.dumps({"user": "bench", "cmd": ["/bin/true"], "cores": 1, "memory": 10}).encode()


async def seed(path: Path, count: int) -> None:
    """`count` finished tasks, written straight into the store."""
    store = Store(path)
    for start in range(0, count, 1000):
        ids = [new_task_id() + f"{n:05d}" for n in range(start, min(count, start + 1000))]
        await asyncio.gather(*(store.add(task_from_document({"user": "old", "cmd": "true"}, i, f"/gone/{i}"), "local")
                               for i in ids))
        done = now()
        await asyncio.wrap_future(store.apply(Change(i, TaskState.COMPLETE, "exit code 0", 0, done, done) for i in ids))
    store.close()


async def sample(session: aiohttp.ClientSession, urls: dict[str, str], stop: asyncio.Event,
                 every: float) -> dict[str, list[float]]:
    """Latencies (s) of each URL, one request at a time, round robin, a round every `every` seconds
    (0: back to back), until `stop`."""
    seen: dict[str, list[float]] = {name: [] for name in urls}
    while not stop.is_set():
        started = time.perf_counter()
        for name, url in urls.items():
            start = time.perf_counter()
            async with session.get(url) as response:
                await response.read()
                assert response.status == 200, response.status
            seen[name].append(time.perf_counter() - start)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), max(0.0, every - (time.perf_counter() - started)))
    return seen


async def measure(url: str, count: int, probe_id: str | None,
                  every: float) -> tuple[float, list[str], dict[str, list[float]]]:
    connector = aiohttp.TCPConnector(limit=64)
    async with aiohttp.ClientSession(connector=connector) as session:
        probes = {"ping": f"{url}/ping"}
        if probe_id:
            probes["state"] = f"{url}/state/{probe_id}"
        stop = asyncio.Event()
        sampler = asyncio.create_task(sample(session, probes, stop, every))
        rate, ids = await submit_many(session, [f"{url}/submit"], count, 32, TASK)
        stop.set()
        return rate, ids, await sampler


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--stored", type=int, default=100_000)
    parser.add_argument("--queued", type=int, default=10_000)
    parser.add_argument("--submits", type=int, default=5_000, help="submits per round, to each endpoint")
    parser.add_argument("--probe-every", type=float, default=0.005,
                        help="seconds between the rounds of latency probes during each load (0: back to back)")
    parser.add_argument("--rounds", type=int, default=3,
                        help="rounds of submits to the trivial endpoint then to the gateway; the median ratio counts")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        root.chmod(0o711)  # as root with auth off, jobs run as nobody, who must pass through to the task folders
        db = root / "state" / "jobproxy.db"
        print(f"before the run, {creation_cost(root)}")
        started = time.perf_counter()
        await seed(db, args.stored - args.queued - 1)
        print(f"seeded {args.stored - args.queued - 1} finished tasks in {time.perf_counter() - started:.1f} s")
        (root / "jobproxy.toml").write_text('[gateway]\nstate_dir = "state"\n[scheduler]\npoll_interval = 1\n'
                                            '[scheduler.options]\ncores = 1\n[log]\nlevel = "WARNING"\n')
        trivial_port, port = free_port(), free_port()
        trivial = Server([sys.executable, "-c", TRIVIAL, str(trivial_port)], root, f"http://127.0.0.1:{trivial_port}")
        jobproxy = str(Path(sys.executable).parent / "jobproxy")
        gateway = Server([jobproxy, "serve", "--config", str(root / "jobproxy.toml"), "--port", str(port)], root,
                         f"http://127.0.0.1:{port}")
        with trivial, gateway:
            await trivial.ready()
            await gateway.ready()
            first_start = cpu_seconds(gateway.pid)
            v1 = f"{gateway.base}/v1/jobproxy"
            blocking = json.dumps({"user": "bench", "cmd": ["sleep", "3600"]})
            async with aiohttp.ClientSession() as session, \
                    session.post(f"{v1}/submit", data=blocking, headers=JSON) as response:
                    blocker = (await response.json())["id"]
            fill, filled, _ = await measure(v1, args.queued, None, args.probe_every)
            memory_full = rss_mib(gateway.pid)
            rounds: list[tuple[float, float]] = []  # (gateway, trivial endpoint) submits/s
            ids: list[str] = []
            lat: dict[str, list[float]] = {"ping": [], "state": []}
            base_lat: dict[str, list[float]] = {"ping": []}
            for _ in range(args.rounds):  # alternating: the neighbours' load moves both alike
                base_rate, _, base_seen = await measure(f"{trivial.base}/v1/jobproxy", args.submits, None,
                                                             args.probe_every)
                rate, made, seen = await measure(v1, args.submits, filled[len(filled) // 2], args.probe_every)
                rounds.append((rate, base_rate))
                ids += made
                base_lat["ping"] += base_seen["ping"]
                for name in lat:
                    lat[name] += seen[name]
            await asyncio.sleep(2)  # let the last writes and log lines settle
            before = cpu_seconds(gateway.pid)
            await asyncio.sleep(10)
            idle = (cpu_seconds(gateway.pid) - before) / 10
            memory_end = rss_mib(gateway.pid)
            gateway.stop()  # the blocker's job runs on
            again = Server(gateway.argv, root, gateway.base)
            with again:
                started = time.perf_counter()
                await again.ready()
                restart, restart_cpu = time.perf_counter() - started, cpu_seconds(again.pid)
                async with aiohttp.ClientSession() as session:
                    async with session.get(f"{v1}/state/{blocker}") as response:
                        assert (await response.json())["code"] == "RUNNING"
                    async with session.delete(f"{v1}/delete/{blocker}") as response:
                        assert response.status == 204
        with sqlite3.connect(db) as check:
            stored = check.execute("SELECT COUNT(*) FROM tasks").fetchone()[0]
            acknowledged = set(filled) | set(ids)
            found = {row[0] for row in check.execute("SELECT id FROM tasks WHERE user = 'bench'")}
    ping_p99, state_p99 = percentile(lat["ping"], 99), percentile(lat["state"], 99)
    print(f"fill: {args.queued} submits at {fill:.0f}/s while the queue grew from 0 to {args.queued}")
    for number, (rate, base_rate) in enumerate(rounds, 1):
        print(f"   round {number} of {args.rounds}: submit {rate:8.0f}/s   trivial endpoint: {base_rate:8.0f}/s   "
              f"ratio {rate / base_rate:.2f}")
    ratio = statistics.median(rate / base_rate for rate, base_rate in rounds)
    print(f"1. submit with {args.queued}+ queued: median ratio of {args.rounds} rounds {ratio:.2f} (target >= 0.5)")
    print(f"   acknowledged {len(acknowledged)} tasks, {len(acknowledged - found)} of them missing from the "
          f"database; {stored} tasks stored")
    print(f"2. GET state/{{id}} p99 {state_p99 * 1000:6.1f} ms (p50 {percentile(lat['state'], 50) * 1000:.1f}, "
          f"{len(lat['state'])} samples)   /ping p99 under the same load {ping_p99 * 1000:6.1f} ms "
          f"(trivial endpoint's ping p99 {percentile(base_lat['ping'], 99) * 1000:.1f} ms, {len(base_lat['ping'])} "
          f"samples)   "
          f"ratio {state_p99 / ping_p99:.2f} (target <= 2)")
    queued = args.queued + args.rounds * args.submits
    print(f"3. idle CPU with {queued} queued: {idle * 100:.2f}% of one core over 10 s (target <= 2%)")
    print(f"4. resident memory: {memory_full:.0f} MiB with {args.stored} stored and {args.queued} active "
          f"(target <= 200 MB); {memory_end:.0f} MiB at the end with {queued} active")
    print(f"5. restart with {queued} queued: answering after {restart:.1f} s, {restart_cpu:.1f} s of CPU by then "
          f"(the first start, with nothing queued: {first_start:.1f} s of CPU)")


if __name__ == "__main__":
    asyncio.run(main())
