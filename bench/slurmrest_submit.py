"""Submit throughput of a real gateway on Slurm over slurmrestd (`api = "rest"`) against the same
gateway over Slurm's commands (`api = "cli"`), measured in the same run.

    /work/main/.venv/bin/python bench/slurmrest_submit.py [--tasks 200] [--concurrency 16] [--rounds 2]

Needs the dev cluster of etc/dev/slurm.sh with its slurmrestd (`slurm.sh env` gives SLURM_CONF and
JOBPROXY_SLURMRESTD_URL). Two gateway processes (`python -m gateway.cli serve`, one per api, the
same options otherwise) take TASKS tasks `["/bin/true"]` over HTTP, CONCURRENCY requests at a time,
in ROUNDS alternating bursts each (cli, rest, cli, rest, ...), so a noisy, shared machine drifts
on both alike; the figure is each api's rate over all its bursts, and the ratio REST / CLI.

Slurm keeps every job for MinJobAge (an hour here) and takes no more than MaxJobCount: the run
needs 2 x TASKS x ROUNDS of that room and refuses to start without it (bench/slurm_submit.py's
check), so that other users of the cluster can still submit.

Clean-up: tasks still active are deleted through each gateway's API, then both gateways are
stopped by their pids; the temporary folder is removed.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import aiohttp

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import Server, cpu_seconds, free_port, submit_many
from bench.slurm_submit import api_options, check_room, cluster_env, restd_url, tidy

ROOT = Path(__file__).resolve().parent.parent


def gateway(work: Path, api: str, poll: float) -> Server:
    """A gateway on the dev cluster through `api`, in its own folder of `work`."""
    folder = work / api
    folder.mkdir()
    folder.chmod(0o711)  # as root with auth off, jobs run as nobody, who must reach their task folders
    (folder / "jobproxy.toml").write_text(f'[gateway]\nstate_dir = {json.dumps(str(folder / "state"))}\n'
                                          f'[scheduler]\ntype = "slurm"\npoll_interval = {poll}\n'
                                          f"[scheduler.options]\n{api_options(api)}")
    port = free_port()
    return Server([sys.executable, "-m", "gateway.cli", "serve", "--config", str(folder / "jobproxy.toml"),
                   "--port", str(port)], folder, f"http://127.0.0.1:{port}",
                  env={**os.environ, "PYTHONPATH": str(ROOT)})


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", type=int, default=200, help="tasks per burst")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=2, help="bursts per api, alternating")
    parser.add_argument("--poll", type=float, default=2.0, help="the gateways' poll_interval, seconds")
    args = parser.parse_args()
    os.environ.update(cluster_env())
    restd_url()  # stops the run without slurmrestd
    check_room(2 * args.tasks * args.rounds)
    work = Path(tempfile.mkdtemp(prefix="jobproxy-bench-slurmrest-"))
    work.chmod(0o711)
    seconds = {"cli": 0.0, "rest": 0.0}
    cpu = {"cli": 0.0, "rest": 0.0}
    rates: dict[str, list[float]] = {"cli": [], "rest": []}
    try:
        with gateway(work, "cli", args.poll) as cli, gateway(work, "rest", args.poll) as rest:
            servers = {"cli": cli, "rest": rest}
            await cli.ready()
            await rest.ready()
            async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=args.concurrency)) as session:
                ids: dict[str, list[str]] = {"cli": [], "rest": []}
                for _ in range(args.rounds):
                    for api, server in servers.items():
                        used = cpu_seconds(server.pid)
                        rate, done = await submit_many(session, [f"{server.base}/v1/jobproxy/submit"], args.tasks,
                                                       args.concurrency)
                        cpu[api] += cpu_seconds(server.pid) - used
                        seconds[api] += args.tasks / rate
                        rates[api].append(rate)
                        ids[api] += done
                still = {api: await tidy(session, servers[api].base, ids[api]) for api in servers}
        total = args.tasks * args.rounds
        figure = {api: total / seconds[api] for api in seconds}
        print(f"baseline: gateway over Slurm's commands (sbatch): {figure['cli']:.0f} tasks/s "
              f"({total} tasks over HTTP, {args.concurrency} at a time; bursts: "
              f"{', '.join(f'{r:.0f}' for r in rates['cli'])}/s; gateway CPU {cpu['cli']:.1f} s)")
        print(f"slurmrestd: gateway over Slurm's REST API: {figure['rest']:.0f} tasks/s "
              f"(bursts: {', '.join(f'{r:.0f}' for r in rates['rest'])}/s; gateway CPU {cpu['rest']:.1f} s) | ratio "
              f"{figure['rest'] / figure['cli']:.2f}x of the CLI")
        print(f"clean-up: {still['cli']} + {still['rest']} tasks still active were deleted through the API")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    asyncio.run(main())
