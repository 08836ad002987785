"""Status calls per poll round of the DRMAA plugin on Grid Engine, with many active jobs.

    /work/main/.venv/bin/python bench/gridengine_status.py [--jobs 200] [--rounds 10]

Needs the dev Grid Engine of etc/dev/gridengine.sh running; its environment (which libdrmaa needs
before the process starts) is taken from `gridengine.sh env`, re-executing this script with it.
In one run:

1. JOBS tasks `sleep 60` are submitted through the plugin (`drm = "gridengine"`); with 2 slots,
   most stay queued;
2. ROUNDS poll rounds `status(all jobs)`: qstat calls (a logging wrapper in the plugin's
   `bin_dir`) and DRMAA calls (jobStatus and wait, the session's own counters) per round;
3. baseline: the same rounds on the same jobs by a second instance with `drm = "other"`, the
   DRMAA per-job path.

Clean-up: the jobs it made are deleted by id (`qdel ID...`, in batches), then checked gone.
"""
from __future__ import annotations

import argparse
import asyncio
import os
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
NEEDED = ("SGE_ROOT", "SGE_CELL", "DRMAA_LIBRARY_PATH", "GLIBC_TUNABLES")


def with_cluster_env() -> None:
    """Re-execute with `etc/dev/gridengine.sh env` in the environment, unless it is there already."""
    printed = subprocess.run(["bash", str(ROOT / "etc/dev/gridengine.sh"), "env"], capture_output=True, text=True,
                             check=True).stdout
    env = {k: v.strip("'\"") for k, v in re.findall(r"^export (\w+)=(.*)$", printed, re.M)}
    if all(os.environ.get(name) == env.get(name) for name in NEEDED):
        return
    os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **env})


def logged_bin(folder: Path, calls: Path) -> None:
    folder.mkdir()
    for name in ("qstat", "qacct"):
        real = shutil.which(name)
        if real is None:
            sys.exit(f"{name} is not installed")
        (folder / name).write_text(f"#!/bin/bash\necho {name} >> {shlex.quote(str(calls))}\n"
                                   f"exec {shlex.quote(real)} \"$@\"\n")
        (folder / name).chmod(0o755)


def count(calls: Path, name: str) -> int:
    return sum(1 for line in (calls.read_text().splitlines() if calls.exists() else []) if line == name)


async def rounds(scheduler: Any, jobs: list[Any], number: int, calls: Path) -> dict[str, list[float]]:
    """`number` status rounds over `jobs`; per round: qstat calls, DRMAA jobStatus and wait calls, seconds."""
    from schedulers.drmaa.session import shared
    session = shared()
    seen: dict[str, list[float]] = {"qstat": [], "jobStatus": [], "wait": [], "seconds": [], "answered": []}
    for _ in range(number):
        qstat, status, waits = count(calls, "qstat"), session.counts["jobStatus"], session.counts["wait"]
        start = time.perf_counter()
        answers = await scheduler.status(jobs)
        seen["seconds"].append(time.perf_counter() - start)
        seen["qstat"].append(count(calls, "qstat") - qstat)
        seen["jobStatus"].append(session.counts["jobStatus"] - status)
        seen["wait"].append(session.counts["wait"] - waits)
        seen["answered"].append(len(answers))
        await asyncio.sleep(0.5)
    return seen


def summary(name: str, seen: dict[str, list[float]]) -> str:
    per_round = seen["qstat"][0] + seen["jobStatus"][0] + seen["wait"][0]
    calls = [q + s + w for q, s, w in zip(seen["qstat"], seen["jobStatus"], seen["wait"], strict=True)]
    return (f"{name}: status calls per round min {min(calls):g} max {max(calls):g} (first round {per_round:g}: "
            f"qstat {seen['qstat'][0]:g}, DRMAA jobStatus {seen['jobStatus'][0]:g}, wait {seen['wait'][0]:g}); "
            f"round time p50 {statistics.median(seen['seconds']) * 1000:.0f} ms, "
            f"max {max(seen['seconds']) * 1000:.0f} ms; "
            f"jobs answered per round {min(seen['answered']):g}-{max(seen['answered']):g}")


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=10)
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    from gateway import config as configuration
    from gateway.model import new_task_id, task_from_document
    from gateway.plugins import create_scheduler
    from schedulers.base import JobRef
    from schedulers.drmaa.mapping import GRID_ENGINE_SPEC

    work = Path(tempfile.mkdtemp(prefix="jobproxy-bench-ge-"))
    calls = work / "calls.log"
    logged_bin(work / "bin", calls)

    async def plugin(**options: Any) -> Any:
        document = {"gateway": {"state_dir": str(work / "state")}, "run_as": {"allow_root_jobs": True},
                    "scheduler": {"type": "drmaa", "poll_interval": 1, "options": options}}
        scheduler = create_scheduler(configuration.from_document(document, work, "bench"))
        await scheduler.start(lambda *_: None)
        return scheduler

    native: list[str] = []
    try:
        grid = await plugin(bin_dir=str(work / "bin"))
        jobs = []
        start = time.perf_counter()
        for i in range(args.jobs):
            workdir = work / "tasks" / str(i)
            workdir.mkdir(parents=True)
            task = task_from_document({"user": "bench", "cmd": "sleep 60"}, new_task_id(), str(workdir))
            job_id = await grid.submit(task)
            native.append(job_id)
            jobs.append(JobRef(task, job_id))
        print(f"submitted {args.jobs} jobs through the plugin in {time.perf_counter() - start:.1f} s")
        new = await rounds(grid, jobs, args.rounds, calls)
        other = await plugin(drm="other", native_spec=list(GRID_ENGINE_SPEC))
        old = await rounds(other, jobs, args.rounds, calls)
        states: dict[str, int] = {}
        for status in (await grid.status(jobs)).values():
            states[status.state.value] = states.get(status.state.value, 0) + 1
        tally = ", ".join(f"{k} {v}" for k, v in sorted(states.items()))
        print(f"{args.jobs} active jobs ({tally}), {args.rounds} rounds each")
        print(summary('drm = "gridengine" (qstat)', new) + " | target 1 call per round")
        print(summary('baseline drm = "other" (DRMAA per job)', old))
        new_calls = max(q + s + w for q, s, w in zip(new["qstat"], new["jobStatus"], new["wait"], strict=True))
        old_calls = max(q + s + w for q, s, w in zip(old["qstat"], old["jobStatus"], old["wait"], strict=True))
        print(f"calls per round: {new_calls:g} (qstat) vs {old_calls:g} (baseline, DRMAA per job); slowest round "
              f"{max(new['seconds']) * 1000:.0f} ms vs {max(old['seconds']) * 1000:.0f} ms")
    finally:
        for i in range(0, len(native), 100):
            subprocess.run(["qdel", *native[i:i + 100]], capture_output=True, check=False)
        deadline, left = time.monotonic() + 60, set(native)
        while left and time.monotonic() < deadline:  # running jobs pass through "dr" first
            listed = subprocess.run(["qstat", "-u", "*"], capture_output=True, text=True, check=False).stdout.split()
            left = set(native) & set(listed)
            if left:
                time.sleep(1)
        print(f"clean-up: deleted {len(native)} jobs by id; still listed: {len(left)}")
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    with_cluster_env()
    asyncio.run(main())
