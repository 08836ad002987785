"""Submit throughput of one, two and three replicas on PostgreSQL, against one gateway on SQLite,
in the same run.

  bash etc/dev/postgresql.sh start
  .venv/bin/python bench/replicas.py [--submits 3000] [--concurrency 32]

Each setup is fresh: gateway processes with the local scheduler (`cores = 1`: the jobs, `/bin/true`,
wait their turn, so the figure is the gateway's, not the jobs'), a new database (PostgreSQL) or
file (SQLite). The client spreads the submits over the replicas in turn, as a round-robin load
balancer would, and counts only answered (200) submits; afterwards every acknowledged task is
counted in the store through a connection of its own. Prints a table, the SQLite gateway first
(the baseline). Stops only the processes it started, by their pid.
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

import aiohttp
import psycopg

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import Server, free_port, submit_many
from gateway.pgstore import conninfo

ROOT = Path(__file__).resolve().parent.parent
TASK = json.dumps({"user": "bench", "cmd": ["/bin/true"], "cores": 1, "memory": 10}).encode()


def dev_postgresql() -> tuple[str, Path]:
    """The dev cluster's URL and password file (etc/dev/postgresql.sh must have started it)."""
    script = ROOT / "etc" / "dev" / "postgresql.sh"
    if subprocess.run(["bash", str(script), "status"], capture_output=True).returncode != 0:
        raise SystemExit("PostgreSQL is not running: bash etc/dev/postgresql.sh start")
    printed = subprocess.run(["bash", str(script), "env"], capture_output=True, text=True, check=True).stdout
    env = dict(line[len("export "):].split("=", 1) for line in printed.splitlines() if line.startswith("export "))
    return env["JOBPROXY_TEST_PG_URL"], Path(env["JOBPROXY_TEST_PG_PASSWORD_FILE"])


async def drive(bases: list[str], count: int, concurrency: int) -> tuple[float, list[str]]:
    """Submits per second over `bases` in turn; the ids answered."""
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency * 2)) as session:
        return await submit_many(session, [f"{base}/v1/jobproxy/submit" for base in bases], count, concurrency, TASK)


async def setup(folder: Path, replicas: int, store: str, submits: int, concurrency: int,
                pg: tuple[str, Path]) -> tuple[float, int]:
    """One setup's submits per second, and how many tasks its store holds afterwards."""
    folder.mkdir()
    command = shutil.which("jobproxy", path=str(Path(sys.executable).parent)) or "jobproxy"
    table = ""
    name = f"jobproxy_bench_{uuid.uuid4().hex[:8]}"
    url, password_file = pg
    admin = conninfo(url, password_file)
    if store == "postgresql":
        with psycopg.connect(admin, autocommit=True) as db:
            db.execute(f"CREATE DATABASE {name}".encode())
        table = f'[store]\nurl = "{url.rsplit("/", 1)[0]}/{name}"\npassword_file = "{password_file}"\n'
    (folder / "jobproxy.toml").write_text(
        f'[gateway]\nstate_dir = "{folder / "state"}"\n{table}'
        '[scheduler]\ntype = "local"\npoll_interval = 1\n[scheduler.options]\ncores = 1\n'
        '[log]\nlevel = "WARNING"\n')
    try:
        with contextlib.ExitStack() as stack:
            servers = []
            for n in range(replicas):
                port = free_port()
                work = folder / f"replica-{n}"
                work.mkdir()
                servers.append(stack.enter_context(Server(
                    [command, "serve", "--config", str(folder / "jobproxy.toml"), "--port", str(port)],
                    work, f"http://127.0.0.1:{port}")))
            for server in servers:
                await server.ready()
            await drive([s.base for s in servers], 200, concurrency)  # warm-up
            rate, _ = await drive([s.base for s in servers], submits, concurrency)
        if store == "postgresql":
            with psycopg.connect(conninfo(f"{url.rsplit('/', 1)[0]}/{name}", password_file)) as db:
                row = db.execute("SELECT COUNT(*) FROM tasks").fetchone()
                stored = int(row[0]) if row else 0
        else:
            with sqlite3.connect(folder / "state" / "jobproxy.db") as sdb:
                stored = int(sdb.execute("SELECT COUNT(*) FROM tasks").fetchone()[0])
        return rate, stored
    finally:
        if store == "postgresql":
            with psycopg.connect(admin, autocommit=True) as db:
                db.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)".encode())


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--submits", type=int, default=3000)
    parser.add_argument("--concurrency", type=int, default=32)
    args = parser.parse_args()
    pg = dev_postgresql()
    base = Path(tempfile.mkdtemp(prefix="jobproxy-bench-replicas-"))
    base.chmod(0o711)
    rows = []
    try:
        for replicas, store in ((1, "sqlite"), (1, "postgresql"), (2, "postgresql"), (3, "postgresql")):
            rate, stored = await setup(base / f"{store}-{replicas}", replicas, store, args.submits,
                                       args.concurrency, pg)
            rows.append((replicas, store, rate, stored))
            print(f"{replicas} x {store}: {rate:.0f} submits/s", file=sys.stderr)
    finally:
        shutil.rmtree(base, ignore_errors=True)
    baseline = rows[0][2]
    print(f"\n{args.submits} submits, concurrency {args.concurrency}, local scheduler (cores = 1)\n")
    print("| replicas | store | submits/s | vs 1 x SQLite | tasks stored |")
    print("| --- | --- | --- | --- | --- |")
    for replicas, store, rate, stored in rows:
        print(f"| {replicas} | {store} | {rate:.0f} | {rate / baseline:.2f}x | {stored} |")


if __name__ == "__main__":
    asyncio.run(main())
