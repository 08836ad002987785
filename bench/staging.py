"""Staging benchmark: how fast the gateway stages a large S3 object into a task's folder, against
baselines measured in the same run on the same machine and S3 server.

  /work/main/.venv/bin/python bench/staging.py [--mib 1024] [--rounds 2]

Needs the dev S3 server (etc/dev/s3.sh; started here if it is not running, and then stopped
again). One object of `--mib` MiB (random bytes) is uploaded once; then, `--rounds` times each, it
is downloaded into a fresh folder by:

- staging: the gateway's own S3 staging (`gateway.staging.s3.S3.fetch` through its `Runner`, the
  code a TES input runs), into `tes/root/...` of a task folder;
- gateway: a real `jobproxy serve` (local scheduler) given a TES task with the object as its input
  and a `true` executor: submit to COMPLETE, less the same for a task without the input;
- boto3: `download_file` (s3transfer with its thread pool: what `aws s3 cp` does);
- raw GET: one aiohttp GET of a presigned URL, streamed to a file in 1 MiB chunks.

Prints MB/s (10^6 bytes per second) of each (the best round), and the upload's MB/s (a multipart
upload by the gateway's code). Stops only the processes it started, by their pids.
"""
from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import aiohttp

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.common import Server, free_port  # noqa: E402
from gateway import config as configuration  # noqa: E402
from gateway.staging.runner import Budget, Runner  # noqa: E402
from gateway.staging.s3 import S3  # noqa: E402

S3_SCRIPT = ROOT / "etc" / "dev" / "s3.sh"


def s3_env() -> tuple[dict[str, str], bool]:
    """The dev S3 server's environment, and whether this run started it."""
    started = False
    env = {**os.environ}
    weed = shutil.which("weed", path=str(Path(sys.executable).parent))
    if weed:
        env.setdefault("JOBPROXY_WEED", weed)
    if subprocess.run(["bash", str(S3_SCRIPT), "status"], capture_output=True, env=env).returncode != 0:
        subprocess.run(["bash", str(S3_SCRIPT), "start"], check=True, env=env)
        started = True
    printed = subprocess.run(["bash", str(S3_SCRIPT), "env"], capture_output=True, text=True, check=True).stdout
    found = {}
    for line in printed.splitlines():
        key, _, value = line.removeprefix("export ").partition("=")
        found[key] = value.strip("'\"")
    return found, started


def staging_config(env: dict[str, str], folder: Path) -> configuration.Config:
    return configuration.from_document({"gateway": {"state_dir": str(folder / "state")}, "staging": {"s3": {
        "endpoint_url": env["JOBPROXY_S3_ENDPOINT"], "region": "us-east-1", "addressing_style": "path",
        "access_key_id": env["JOBPROXY_S3_ACCESS_KEY"], "secret_access_key": env["JOBPROXY_S3_SECRET_KEY"]}}},
        folder, "bench")


def make_file(path: Path, mib: int) -> None:
    block = os.urandom(1 << 20)
    with open(path, "wb") as out:
        for n in range(mib):
            out.write(block[n % 251:] + block[:n % 251])  # not one block repeated


async def upload(s3: S3, source: Path, url: str) -> float:
    began = time.perf_counter()
    await s3.send(source, source.stat().st_size, url)
    return time.perf_counter() - began


async def staged(s3: S3, runner: Runner, url: str, target: Path) -> float:
    began = time.perf_counter()
    await runner.run("bench", Budget(0), lambda budget: s3.fetch(url, target, budget))
    return time.perf_counter() - began


def boto3_client(env: dict[str, str]) -> Any:
    import boto3  # type: ignore[import-untyped]
    from botocore.config import Config
    return boto3.client("s3", endpoint_url=env["JOBPROXY_S3_ENDPOINT"], region_name="us-east-1",
                        aws_access_key_id=env["JOBPROXY_S3_ACCESS_KEY"],
                        aws_secret_access_key=env["JOBPROXY_S3_SECRET_KEY"],
                        config=Config(s3={"addressing_style": "path"}))


def boto3_download(env: dict[str, str], bucket: str, key: str, target: Path) -> float:
    client = boto3_client(env)
    began = time.perf_counter()
    client.download_file(bucket, key, str(target))
    return time.perf_counter() - began


def presigned(env: dict[str, str], bucket: str, key: str) -> str:
    client = boto3_client(env)
    return str(client.generate_presigned_url("get_object", Params={"Bucket": bucket, "Key": key}, ExpiresIn=3600))


async def raw_get(url: str, target: Path) -> float:
    began = time.perf_counter()
    async with aiohttp.ClientSession() as session, session.get(url) as response:
        response.raise_for_status()
        with open(target, "wb") as out:
            async for chunk in response.content.iter_chunked(1 << 20):
                out.write(chunk)
    return time.perf_counter() - began


async def gateway_round(env: dict[str, str], folder: Path, url: str | None) -> float:
    """Seconds from submit to COMPLETE of a TES task through a real gateway (with `url` as input)."""
    port = free_port()
    state = folder / f"gw-{uuid.uuid4().hex[:6]}"
    state.mkdir()
    (state / "jobproxy.toml").write_text(f"""
[gateway]
state_dir = "{state}/state"
[scheduler]
type = "local"
poll_interval = 0.1
[run_as]
allow_root_jobs = true
[tes]
images = [{{ match = "*", run = "host" }}]
[staging.s3]
endpoint_url = "{env['JOBPROXY_S3_ENDPOINT']}"
region = "us-east-1"
addressing_style = "path"
access_key_id = "{env['JOBPROXY_S3_ACCESS_KEY']}"
secret_access_key = "{env['JOBPROXY_S3_SECRET_KEY']}"
""")
    base = f"http://127.0.0.1:{port}"
    argv = [sys.executable, "-m", "gateway.cli", "serve", "--config", str(state / "jobproxy.toml"), "--port", str(port)]
    with Server(argv, state, base, env={**os.environ, "PYTHONPATH": str(ROOT)}) as server:
        await server.ready()
        task: dict[str, Any] = {"executors": [{"image": "x", "command": ["true"]}]}
        if url:
            task["inputs"] = [{"url": url, "path": "/data/big.bin"}]
        async with aiohttp.ClientSession() as session:
            began = time.perf_counter()
            async with session.post(f"{base}/ga4gh/tes/v1/tasks", json=task) as answer:
                task_id = (await answer.json())["id"]
            while True:
                async with session.get(f"{base}/ga4gh/tes/v1/tasks/{task_id}") as answer:
                    found = (await answer.json())["state"]
                if found in ("COMPLETE", "EXECUTOR_ERROR", "SYSTEM_ERROR"):
                    break
                await asyncio.sleep(0.05)
            seconds = time.perf_counter() - began
    if found != "COMPLETE":
        raise SystemExit(f"the gateway's task ended {found}; see {state}")
    shutil.rmtree(state, ignore_errors=True)
    return seconds


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mib", type=int, default=1024, help="object size in MiB (default 1024)")
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    env, started = s3_env()
    folder = Path(tempfile.mkdtemp(prefix="jobproxy-bench-staging-"))
    folder.chmod(0o711)
    try:
        config = staging_config(env, folder)
        s3, runner = S3(config.sections.staging), Runner(config.sections.staging)
        bucket, key = f"bench-{uuid.uuid4().hex[:8]}", "big.bin"
        url = f"s3://{bucket}/{key}"
        client = await s3._get()
        await client.create_bucket(Bucket=bucket)
        source = folder / "source.bin"
        make_file(source, args.mib)
        size = source.stat().st_size
        up = await upload(s3, source, url)
        source.unlink()
        results: dict[str, list[float]] = {"staging": [], "gateway": [], "boto3": [], "raw GET": []}
        link = presigned(env, bucket, key)
        for n in range(args.rounds):
            target = folder / f"task{n}" / "tes" / "root" / "data" / "big.bin"
            results["staging"].append(await staged(s3, runner, url, target))
            target.unlink()
            results["boto3"].append(boto3_download(env, bucket, key, folder / "boto3.bin"))
            (folder / "boto3.bin").unlink()
            results["raw GET"].append(await raw_get(link, folder / "raw.bin"))
            (folder / "raw.bin").unlink()
            results["gateway"].append(await gateway_round(env, folder, url) - await gateway_round(env, folder, None))
        await client.delete_object(Bucket=bucket, Key=key)
        await client.delete_bucket(Bucket=bucket)
        await s3.close()
        print(f"object: {size / 1e6:.0f} MB ({args.mib} MiB) in S3 (SeaweedFS on loopback), best of {args.rounds}")
        print(f"  {'upload (gateway, multipart)':32} {size / up / 1e6:8.1f} MB/s")
        for name, seconds in results.items():
            best = min(seconds)
            print(f"  {name + ' (download)':32} {size / best / 1e6:8.1f} MB/s  ({best:.2f} s)")
        print(f"  staging / raw GET: {min(results['raw GET']) / min(results['staging']):.2f}; "
              f"staging / boto3: {min(results['boto3']) / min(results['staging']):.2f}")
    finally:
        shutil.rmtree(folder, ignore_errors=True)
        if started:
            subprocess.run(["bash", str(S3_SCRIPT), "stop"], check=False)


if __name__ == "__main__":
    asyncio.run(main())
