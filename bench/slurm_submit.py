"""Submit throughput of a real gateway on Slurm, against raw sbatch, and slurmctld's job-info load.

    /work/main/.venv/bin/python bench/slurm_submit.py [--tasks 300] [--concurrency 16] [--poll 2]

Needs the dev cluster of etc/dev/slurm.sh running (its SLURM_CONF is read from `slurm.sh env`).
In one run:

1. baseline, first half: `sbatch --wrap true` TASKS/2 times, 8 at a time (like 8 parallel shells);
2. a real gateway process (`python -m gateway.cli serve`, Slurm scheduler, poll_interval POLL)
   takes TASKS tasks `["/bin/true"]` over HTTP, CONCURRENCY requests at a time; its Slurm plugin
   submits with sbatch (`--api cli`, the default) or through slurmrestd (`--api rest`, which
   needs the dev cluster's slurmrestd: `slurm.sh env` gives JOBPROXY_SLURMRESTD_URL);
3. baseline, second half; the ratio is against the baseline's rate over both halves (a noisy
   machine drifts). With --plugin-alone, the Slurm plugin alone (SlurmScheduler.submit in this
   process, no HTTP, no store) takes TASKS tasks too.

Slurm keeps every job, finished or not, for MinJobAge (an hour here) and takes no more than
MaxJobCount: the run needs 2 x TASKS of that room (3 x with --plugin-alone) and refuses to start
without it, so that other users of the cluster can still submit.

slurmctld's RPC counts (sdiag, read before and after: never reset) give the job-info requests
(REQUEST_JOB_INFO and friends) from the burst's start to 10 s after its end, printed beside what
one request per poll interval allows. Other users of the cluster add to those counts. The
gateway's squeue calls are counted too, through a logging wrapper in its `bin_dir`.

Clean-up: tasks still active are deleted through the gateway's API, then the gateway is stopped by
its pid; the baseline's and the plugin's jobs are cancelled by id; the temporary folder is removed.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import Server, cpu_seconds, free_port, submit_many

ROOT = Path(__file__).resolve().parent.parent
PYTHON = sys.executable
JOB_INFO = ("REQUEST_JOB_INFO", "REQUEST_JOB_INFO_SINGLE", "REQUEST_JOB_USER_INFO")


def cluster_env() -> dict[str, str]:
    """The environment `etc/dev/slurm.sh env` prints (SLURM_CONF)."""
    printed = subprocess.run(["bash", str(ROOT / "etc/dev/slurm.sh"), "env"], capture_output=True, text=True,
                             check=True).stdout
    found = dict(re.findall(r"^export (\w+)=(.*)$", printed, re.M))
    return {k: v.strip("'\"") for k, v in found.items()}


def restd_url() -> str:
    """slurmrestd's address, from `etc/dev/slurm.sh env` (JOBPROXY_SLURMRESTD_URL)."""
    url = os.environ.get("JOBPROXY_SLURMRESTD_URL")
    if not url:
        sys.exit("etc/dev/slurm.sh env gives no JOBPROXY_SLURMRESTD_URL: start the dev cluster with slurmrestd")
    return url


def rpc_counts() -> dict[str, int]:
    """slurmctld's RPC counts by message type, from sdiag (read-only)."""
    text = subprocess.run(["sdiag"], capture_output=True, text=True, check=True).stdout
    return {name: int(count) for name, count in re.findall(r"^\s*(\w+)\s+\(\s*\d+\)\s+count:(\d+)", text, re.M)}


def job_info(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    return {name: after.get(name, 0) - before.get(name, 0) for name in JOB_INFO}


def api_options(api: str) -> str:
    """The lines of `[scheduler.options]` that make the Slurm plugin use `api` (cli: none)."""
    return f'api = "rest"\n[scheduler.options.rest]\nurl = {json.dumps(restd_url())}\n' if api == "rest" else ""


def check_room(needed: int) -> None:
    """Stop the run unless slurmctld can take `needed` more jobs and keep a tenth of its room."""
    held, most = headroom()
    if held + needed > most * 0.9:
        sys.exit(f"slurmctld holds {held} jobs (finished ones stay for MinJobAge) and takes at most {most}: this run "
                 f"would add {needed}; wait until old jobs age out, or pass fewer --tasks")


def headroom() -> tuple[int, int]:
    """(jobs slurmctld holds now, finished ones included; its MaxJobCount)."""
    config = subprocess.run(["scontrol", "show", "config"], capture_output=True, text=True, check=True).stdout
    found = re.search(r"^MaxJobCount\s*=\s*(\d+)", config, re.M)
    listed = subprocess.run(["squeue", "--noheader", "--all", "--states=all", "--format=%i"], capture_output=True,
                            text=True, check=True).stdout
    return len(listed.split()), int(found.group(1)) if found else 10000


async def raw_sbatch(count: int, parallel: int, ids: list[str]) -> float:
    """`sbatch --wrap true` `count` times, `parallel` at a time; answers jobs per second."""
    slots = asyncio.Semaphore(parallel)

    async def one() -> None:
        async with slots:
            process = await asyncio.create_subprocess_exec(
                "sbatch", "--parsable", "--output=/dev/null", "--job-name=bench-raw", "--wrap", "true",
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
            out, err = await process.communicate()
            if process.returncode != 0:
                raise RuntimeError(f"sbatch failed: {err.decode().strip()}")
            ids.append(out.decode().strip().split(";")[0])

    start = time.perf_counter()
    await asyncio.gather(*(one() for _ in range(count)))
    return count / (time.perf_counter() - start)


def wrappers(folder: Path, calls: Path) -> None:
    """Slurm's commands for the gateway: squeue behind a logging wrapper, the others as they are."""
    folder.mkdir()
    for name in ("sbatch", "squeue", "scontrol", "scancel"):
        real = shutil.which(name)
        if real is None:
            sys.exit(f"{name} is not installed")
        if name == "squeue":
            (folder / name).write_text(f"#!/bin/bash\necho \"$*\" >> {shlex.quote(str(calls))}\n"
                                       f"exec {shlex.quote(real)} \"$@\"\n")
            (folder / name).chmod(0o755)
        else:
            (folder / name).symlink_to(real)


def gateway(work: Path, poll: float, api: str = "cli") -> Server:
    """`python -m gateway.cli serve` on the Slurm scheduler, in `work` (its squeue calls logged:
    `squeue_calls`), over sbatch (`api` cli) or slurmrestd (rest); started when entered."""
    wrappers(work / "bin", work / "squeue.log")
    config = work / "jobproxy.toml"
    config.write_text(f'[gateway]\nstate_dir = {json.dumps(str(work / "state"))}\n'
                      f'[scheduler]\ntype = "slurm"\npoll_interval = {poll}\n'
                      f'[scheduler.options]\nbin_dir = {json.dumps(str(work / "bin"))}\n'
                      + api_options(api))
    port = free_port()
    return Server([PYTHON, "-m", "gateway.cli", "serve", "--config", str(config), "--port", str(port)], ROOT,
                  f"http://127.0.0.1:{port}", log=work / "gateway.log")


def squeue_calls(work: Path) -> int:
    """How many times the gateway in `work` has called squeue."""
    calls = work / "squeue.log"
    return len(calls.read_text().splitlines()) if calls.exists() else 0


async def tidy(session: aiohttp.ClientSession, url: str, ids: list[str]) -> int:
    """Delete (cancel) the tasks still active through the gateway's API; answers how many were."""
    active = 0
    for task_id in ids:
        async with session.get(f"{url}/v1/jobproxy/state/{task_id}") as response:
            state = await response.json()
        if state.get("code") not in ("COMPLETE", "EXECUTOR_ERROR", "SYSTEM_ERROR", "CANCELED"):
            active += 1
            async with session.delete(f"{url}/v1/jobproxy/delete/{task_id}"):
                pass
    return active


async def plugin_alone(work: Path, count: int, ids: list[str]) -> float:
    """SlurmScheduler.submit in this process, `count` tasks at once (its own bound applies):
    the plugin's share of the gateway's cost, without HTTP and store. Answers jobs per second."""
    sys.path.insert(0, str(ROOT))
    from gateway.model import new_task_id, task_from_document
    from gateway.validation import SchemaValidator
    from schedulers.slurm.plugin import SlurmScheduler

    scheduler = SlurmScheduler("slurm", SchemaValidator(SlurmScheduler.options_schema).with_defaults({}),
                               work / "plugin-state")
    await scheduler.start(lambda *_: None)
    tasks = []
    for _ in range(count):
        task_id = new_task_id()
        (work / "plugin-tasks" / task_id).mkdir(parents=True)
        tasks.append(task_from_document({"user": "bench", "cmd": ["/bin/true"]}, task_id,
                                        str(work / "plugin-tasks" / task_id)))
    start = time.perf_counter()
    ids += await asyncio.gather(*(scheduler.submit(task) for task in tasks))
    rate = count / (time.perf_counter() - start)
    await scheduler.close()
    return rate


def profiler(pid: int, output: str | None) -> subprocess.Popen[bytes] | None:
    """py-spy recording the gateway for 6 s (when asked for), a process of ours."""
    if output is None:
        return None
    argv = [str(Path(PYTHON).parent / "py-spy"), "record", "-p", str(pid), "-d", "6", "-f", "raw", "--idle",
            "--threads", "-o", output]
    return subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", type=int, default=300)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--poll", type=float, default=2.0, help="the gateway's poll_interval, seconds")
    parser.add_argument("--after", type=float, default=10.0, help="seconds counted after the burst")
    parser.add_argument("--profile", help="record the gateway with py-spy during the burst into this file (raw format)")
    parser.add_argument("--api", choices=("cli", "rest"), default="cli",
                        help="how the gateway's Slurm plugin reaches Slurm: sbatch and squeue, or slurmrestd")
    parser.add_argument("--plugin-alone", action="store_true", help="also time SlurmScheduler.submit in this process")
    args = parser.parse_args()
    os.environ.update(cluster_env())
    check_room(args.tasks * (3 if args.plugin_alone else 2))
    work = Path(tempfile.mkdtemp(prefix="jobproxy-bench-slurm-"))
    work.chmod(0o711)  # as root with auth off, jobs run as nobody, who must reach their task folders
    raw_ids: list[str] = []
    try:
        half = args.tasks // 2
        before_raw = await raw_sbatch(half, 8, raw_ids)
        alone = await plugin_alone(work, args.tasks, raw_ids) if args.plugin_alone else None
        with gateway(work, args.poll, args.api) as server:
            await server.ready(timeout=30)
            async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=args.concurrency)) as session:
                quiet = rpc_counts()  # others' job-info requests while the gateway is idle: the background
                await asyncio.sleep(args.after)
                squeue_before, counts_before = squeue_calls(work), rpc_counts()
                background = sum(job_info(quiet, counts_before).values())
                spy = profiler(server.pid, args.profile)
                start, cpu = time.monotonic(), cpu_seconds(server.pid)
                rate, ids = await submit_many(session, [f"{server.base}/v1/jobproxy/submit"], args.tasks,
                                              args.concurrency)
                burst_time, burst_cpu = time.monotonic() - start, cpu_seconds(server.pid) - cpu
                await asyncio.sleep(args.after)
                window = time.monotonic() - start
                counts_after, squeue_after = rpc_counts(), squeue_calls(work)
                if spy is not None:
                    spy.wait(timeout=60)
                after_raw = await raw_sbatch(args.tasks - half, 8, raw_ids)
                still_active = await tidy(session, server.base, ids)
        baseline = args.tasks / (half / before_raw + (args.tasks - half) / after_raw)
        infos = job_info(counts_before, counts_after)
        via = "over slurmrestd" if args.api == "rest" else "over sbatch"
        allowed = math.ceil(window / args.poll) + 1
        submits = counts_after.get("REQUEST_SUBMIT_BATCH_JOB", 0) - counts_before.get("REQUEST_SUBMIT_BATCH_JOB", 0)
        print(f"baseline: raw sbatch --wrap true, {args.tasks} jobs 8 at a time: {before_raw:.0f}/s before the "
              f"gateway, {after_raw:.0f}/s after, {baseline:.0f}/s over both halves")
        print(f"gateway ({via}): {rate:.0f} tasks/s ({args.tasks} tasks over HTTP, {args.concurrency} at a time) "
              f"| ratio {rate / baseline:.2f}x of the baseline (target >= 0.9x)")
        if alone is not None:
            print(f"  plugin alone (SlurmScheduler.submit in this process, no HTTP, no store): {alone:.0f}/s, "
                  f"{alone / baseline:.2f}x")
        print(f"  gateway CPU during the burst: {burst_cpu:.2f} s in {burst_time:.2f} s "
              f"({burst_cpu / burst_time * 100:.0f}% of one core)")
        print(f"slurmctld job-info RPCs in {window:.1f} s (burst {burst_time:.1f} s + {args.after:g} s): "
              f"{sum(infos.values())} ({', '.join(f'{k} {v}' for k, v in infos.items())}) | allowed at one per "
              f"poll interval of {args.poll:g} s (+1): {allowed} | the gateway's own squeue calls: "
              f"{squeue_after - squeue_before} (each one REQUEST_JOB_INFO)")
        print("  sdiag counts every client of slurmctld: concurrent users of this cluster may add counts "
              f"(in the {args.after:g} s before the burst, with the gateway idle: {background}); "
              f"submit RPCs in the window: {submits}")
        print(f"clean-up: {still_active} gateway tasks still active were deleted through the API; "
              f"{len(raw_ids)} baseline{' and plugin' if alone is not None else ''} jobs cancelled by id")
    finally:
        if raw_ids:
            for i in range(0, len(raw_ids), 500):
                subprocess.run(["scancel", *raw_ids[i:i + 500]], capture_output=True)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    asyncio.run(main())
