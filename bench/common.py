"""What the benchmarks share: a server process they start and stop by its pid, the submit load
they drive it with, and the readings they take of it (CPU, memory) and of their own samples."""
from __future__ import annotations

import asyncio
import itertools
import json
import os
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType

import aiohttp

TICKS = os.sysconf("SC_CLK_TCK")
JSON = {"Content-Type": "application/json"}
#: The task of a submit load: the smallest job there is.
TRUE = json.dumps({"user": "bench", "cmd": ["/bin/true"]}).encode()


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def rss_mib(pid: int) -> float:
    """Resident memory of process `pid`, in MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def cpu_seconds(pid: int) -> float:
    """CPU time (user + system) process `pid` has used so far (0 if it is gone)."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0.0
    fields = text[text.rindex(")") + 2:].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


def creation_cost(folder: Path, count: int = 100) -> str:
    """What making a local task's files in `folder` costs here, in words: the median CPU time of
    `count` folders made as a task's are (a folder, then three files in it: stdout, stderr, exit
    code), per creation. They stay (in `folder/.probe-*`) until the caller removes `folder`.

    A local task makes those four, so this moves the local figures. On an ext4 file system
    without a journal (these virtual machines' root), the kernel skips, for each new inode, every
    free inode of its group freed in the last 60 s (360 s while its inode table block is not yet
    written back), one buffer look-up each (`recently_deleted` in fs/ext4/ialloc.c): right after
    thousands of files were removed nearby, by a test run, another benchmark's cleanup or a purge,
    a creation costs hundreds of µs instead of tens. A benchmark therefore removes its own files
    only at its end, and prints this before each round."""
    probe = Path(tempfile.mkdtemp(prefix=".probe-", dir=folder))
    costs = []
    for index in range(count):
        started = time.process_time()
        task = probe / str(index)
        task.mkdir(0o700)
        for name in ("stdout", "stderr", "exit_code"):
            os.close(os.open(task / name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        costs.append((time.process_time() - started) / 4)
    return f"making a task's folder and files under {folder}: {percentile(costs, 50) * 1e6:.0f} µs of CPU a " \
           f"creation (median of {count})"


def percentile(samples: list[float], p: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(len(ordered) * p / 100))] if ordered else float("nan")


def gone(pid: int) -> bool:
    """True once `pid` has exited (a zombie counts: PID 1 may reap it late)."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return text[text.rindex(")") + 2:].split()[0] in ("Z", "X")


async def submit_many(session: aiohttp.ClientSession, urls: Sequence[str], count: int, concurrency: int,
                      body: bytes = TRUE) -> tuple[float, list[str]]:
    """POST `body` `count` times, `concurrency` at a time, to `urls` in turn (as a round-robin
    load balancer would); answers (submits per second, the task ids in the order answered). A
    submit not answered 200 stops the load with RuntimeError."""
    left, ids, turn = count, [], itertools.cycle(urls)

    async def worker() -> None:
        nonlocal left
        while left > 0:
            left -= 1
            async with session.post(next(turn), data=body, headers=JSON) as response:
                answer = await response.read()
                if response.status != 200:
                    raise RuntimeError(f"submit answered {response.status}: {answer[:200]!r}")
                ids.append(json.loads(answer)["id"])

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return len(ids) / (time.perf_counter() - start), ids


class Server:
    """A process serving HTTP at `base`, started on entry and stopped by its pid on exit; what it
    prints goes to `log` (by default a new server-N.log in `cwd`)."""

    def __init__(self, argv: list[str], cwd: Path, base: str, env: dict[str, str] | None = None,
                 log: Path | None = None) -> None:
        self.argv, self.cwd, self.base, self.env, self.log_path = argv, cwd, base, env, log
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def __enter__(self) -> Server:
        self.log_path = self.log_path or self.cwd / f"server-{len(os.listdir(self.cwd))}.log"
        self.log = open(self.log_path, "wb")
        self.process = subprocess.Popen(self.argv, cwd=self.cwd, stdout=self.log, stderr=subprocess.STDOUT,
                                        env=self.env, start_new_session=True)
        return self

    async def ready(self, timeout: float = 60) -> None:
        """Wait until the server answers HTTP at all."""
        deadline = time.monotonic() + timeout
        async with aiohttp.ClientSession() as session:
            while time.monotonic() < deadline:
                assert self.process is not None
                if self.process.poll() is not None:
                    raise RuntimeError(f"{self.argv[0]} exited with {self.process.returncode}; see {self.log_path}")
                try:
                    async with session.get(f"{self.base}/v1/jobproxy/ping") as response:
                        await response.read()
                        return
                except aiohttp.ClientError:
                    await asyncio.sleep(0.1)
        raise TimeoutError(f"{self.argv} did not answer within {timeout} s")

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()

    def stop(self) -> None:
        """Stop the server by its pid (SIGTERM, then SIGKILL after 30 s); again: nothing more."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.log.close()
