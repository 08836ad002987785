"""Shared fixtures: configs in temporary folders, the aiohttp test client, a real `jobproxy serve`
process, and the scheduler backends the contract suite runs against."""
from __future__ import annotations

import asyncio
import contextlib
import json
import os
import pwd
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from gateway import config as configuration
from gateway.app import create_app
from gateway.plugins import create_scheduler
from schedulers.base import Scheduler
from schedulers.local import LocalScheduler
from schedulers.local import cgroups as local_cgroups

from .reporting import Reports

ROOT = Path(__file__).resolve().parent.parent
IN_CI = os.environ.get("CI", "").lower() == "true"


@pytest.fixture(scope="session", autouse=True)
def cgroups_left_behind() -> Iterator[None]:
    """After the session, remove the empty cgroups its gateways made: each test gateway's pool has
    a name prefix of its own (from its state folder), and one that a test kills cannot remove them.
    (Another gateway on the machine whose free groups go with them makes them again when needed.)"""
    hierarchy = local_cgroups.detect() if os.geteuid() == 0 else None
    parents = {group.parent for group in hierarchy.groups("-")} if hierarchy is not None else set()
    before = {parent: set(os.listdir(parent)) for parent in parents}
    yield
    for parent, names in before.items():
        for name in sorted(set(os.listdir(parent)) - names):
            if (parent / name).is_dir():
                with contextlib.suppress(OSError):  # a process is still in it (or a group below it): left as it is
                    (parent / name).rmdir()


@pytest.fixture(scope="session")
def passable_base() -> Iterator[Path]:
    """A folder of the test session that other accounts may pass through (o+x, never o+r), removed
    at the end: a gateway running as root with auth off runs its jobs as `nobody`, who cannot
    reach anything in pytest's own temporary tree (mode 0700 at every level, and reset to it by
    every pytest session that starts on the machine)."""
    base = Path(tempfile.mkdtemp(prefix="jobproxy-tests-"))
    base.chmod(0o711)
    yield base
    shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def tmp_path(request: pytest.FixtureRequest, passable_base: Path) -> Path:
    """A fresh folder for each test, as pytest's, but in `passable_base` and itself passable (mode
    0711), so that jobs running as `nobody` reach the task folders of a gateway whose state is in it."""
    folder = Path(tempfile.mkdtemp(prefix=re.sub(r"[^A-Za-z0-9_.-]", "_", request.node.name)[:50] + "-",
                                   dir=passable_base))
    folder.chmod(0o711)
    return folder


#: The account a gateway running as root with auth off runs its jobs as (gateway.policy).
JOB_ACCOUNT = "nobody"


def writable_by_jobs(folder: Path) -> Path:
    """`folder`, created and (when the tests run as root) given to JOB_ACCOUNT, so that jobs of a
    root gateway with auth off may write their outputs there."""
    folder.mkdir(parents=True, exist_ok=True)
    if os.geteuid() == 0:
        entry = pwd.getpwnam(JOB_ACCOUNT)
        os.chown(folder, entry.pw_uid, entry.pw_gid)
    return folder


def make_config(tmp_path: Path, scheduler: str = "local", options: dict[str, Any] | None = None,
                **gateway: Any) -> configuration.Config:
    document = {
        "gateway": {"state_dir": str(tmp_path / "state"), **gateway},
        "scheduler": {"type": scheduler, "poll_interval": 0.1, "options": options or {}},
    }
    return configuration.from_document(document, tmp_path, "test config")


@pytest.fixture
def config(tmp_path: Path) -> configuration.Config:
    return make_config(tmp_path)


@pytest.fixture
async def client(aiohttp_client: Callable[..., Awaitable[Any]], config: configuration.Config) -> Any:
    return await aiohttp_client(create_app(config))


async def wait_state(client: Any, task_id: str, done: Callable[[dict[str, Any]], bool], timeout: float = 30,
                     headers: dict[str, str] | None = None) -> dict[str, Any]:
    """Poll GET /v1/jobproxy/state/{id} until `done(state)`; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    state: dict[str, Any] = {}
    while time.monotonic() < deadline:
        response = await client.get(f"/v1/jobproxy/state/{task_id}", headers=headers)
        state = await response.json()
        if response.status == 200 and done(state):
            return state
        await asyncio.sleep(0.1)
    raise AssertionError(f"task {task_id} did not reach the expected state in {timeout} s; last: {state}")


def final(state: dict[str, Any]) -> bool:
    return state["code"] in ("COMPLETE", "EXECUTOR_ERROR", "SYSTEM_ERROR", "CANCELED")


class Hold:
    """A step of the gateway held, on whatever thread runs it, until a request sent meanwhile has
    been answered: proof that the step runs off the event loop (were it on the loop, the request
    would never be answered, and the step fails after 20 s saying what it waited for)."""

    def __init__(self, what: str) -> None:
        self.what = what
        self.reached, self.released = threading.Event(), threading.Event()

    def wrap(self, step: Callable[..., Any]) -> Callable[..., Any]:
        """`step`, held when called."""

        def held(*args: Any, **kwargs: Any) -> Any:
            self.reached.set()
            assert self.released.wait(20), f"no request was answered while {self.what}"
            return step(*args, **kwargs)

        return held

    async def ping_meanwhile(self, client: Any) -> int:
        """Once the step is reached: GET /ping, then release the step; answers the ping's status."""
        assert await asyncio.to_thread(self.reached.wait, 20), f"the gateway never got to where {self.what}"
        try:
            response = await client.get("/v1/jobproxy/ping")
            return int(response.status)
        finally:
            self.released.set()


# ---- a real gateway process --------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Gateway:
    """`jobproxy serve` as a real process, driven over HTTP with the standard library."""

    def __init__(self, workdir: Path, config_text: str | None, env: dict[str, str] | None = None) -> None:
        """`config_text` None: no config file at all, the embedded defaults."""
        self.workdir = workdir
        self.config_path = workdir / "jobproxy.toml"
        if config_text is not None:
            self.config_path.write_text(config_text)
        self.config_args = [] if config_text is None else ["--config", str(self.config_path)]
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = {**os.environ, **(env or {})}
        self.process: subprocess.Popen[bytes] | None = None
        self.log = workdir / "gateway.log"

    def wrapper(self) -> list[str]:
        """What `jobproxy serve` runs under (e.g. a sandbox); nothing by default."""
        return []

    def start(self) -> Gateway:
        command = shutil.which("jobproxy", path=str(Path(sys.executable).parent)) or "jobproxy"
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen(
                [*self.wrapper(), command, "serve", *self.config_args, "--port", str(self.port)],
                stdout=log, stderr=subprocess.STDOUT, cwd=self.workdir, env=self.env)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"jobproxy serve exited with {self.process.returncode}:\n{self.log.read_text()}")
            try:
                self.request("GET", "/v1/jobproxy/ping")
                return self
            except OSError:
                time.sleep(0.1)
        raise AssertionError(f"jobproxy serve did not answer within 30 s:\n{self.log.read_text()}")

    def stop(self, kill: bool = False) -> None:
        if self.process and self.process.poll() is None:
            self.process.kill() if kill else self.process.terminate()
            self.process.wait(timeout=30)

    def request(self, method: str, path: str, body: bytes | None = None,
                headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
        req = urllib.request.Request(self.url + path, data=body, method=method, headers=headers or {})
        try:
            with urllib.request.urlopen(req, timeout=60) as response:
                return response.status, dict(response.headers), response.read()
        except urllib.error.HTTPError as err:
            return err.code, dict(err.headers), err.read()

    def submit(self, task: dict[str, Any]) -> str:
        status, _, body = self.request("POST", "/v1/jobproxy/submit", json.dumps(task).encode(),
                                       {"Content-Type": "application/json"})
        assert status == 200, body
        return str(json.loads(body)["id"])

    def state(self, task_id: str) -> dict[str, Any]:
        status, _, body = self.request("GET", f"/v1/jobproxy/state/{task_id}")
        assert status == 200, body
        return dict(json.loads(body))

    def wait(self, task_id: str, done: Callable[[dict[str, Any]], bool] = final, timeout: float = 60) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        state: dict[str, Any] = {}
        while time.monotonic() < deadline:
            state = self.state(task_id)
            if done(state):
                return state
            time.sleep(0.1)
        raise AssertionError(f"task {task_id}: expected state not reached in {timeout} s; last: {state}\n"
                             + self.log.read_text()[-3000:])


@pytest.fixture
def gateway_factory(tmp_path: Path) -> Iterator[Callable[..., Gateway]]:
    started: list[Gateway] = []

    def factory(config_text: str | None, env: dict[str, str] | None = None) -> Gateway:
        gateway = Gateway(tmp_path, config_text, env)
        started.append(gateway)
        return gateway

    yield factory
    for gateway in started:
        gateway.stop()


# ---- scheduler backends for the contract suite ---------------------------------------------------

_clusters: dict[str, dict[str, str] | str] = {}
_started_here: list[str] = []  # the clusters this session started (tests/run.sh starts its own first)


def cluster_env(script: str) -> dict[str, str]:
    """Start the dev cluster `etc/dev/<script>.sh` (once per test session) and answer its environment.

    Skips the calling test when the cluster cannot run here; in CI (CI=true) that is a failure.
    """
    if script not in _clusters:
        _clusters[script] = _start_cluster(script)
    found = _clusters[script]
    if isinstance(found, str):
        if IN_CI:
            pytest.fail(f"{script} is required in CI but could not start: {found}")
        pytest.skip(found)
    return found


def _start_cluster(script: str) -> dict[str, str] | str:
    path = ROOT / "etc" / "dev" / f"{script}.sh"
    if not path.exists():
        return f"{path} does not exist"
    if os.geteuid() != 0 or not Path("/etc/debian_version").exists():
        return f"{script}: the dev cluster needs root on Debian"
    was_up = subprocess.run(["bash", str(path), "status"], capture_output=True, timeout=60).returncode == 0
    started = subprocess.run(["bash", str(path), "start"], capture_output=True, text=True, timeout=1200)
    if not was_up:
        _started_here.append(script)
    if started.returncode != 0:
        return f"{script} did not start (exit {started.returncode}): {(started.stdout + started.stderr)[-2000:]}"
    printed = subprocess.run(["bash", str(path), "env"], capture_output=True, text=True, check=True).stdout
    env = {}
    for line in printed.splitlines():
        if line.startswith("export ") and "=" in line:
            key, _, value = line[len("export "):].partition("=")
            env[key] = value.strip().strip("'\"")
    return env


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Stop the dev clusters this session started, as tests/run.sh stops those it started
    (JOBPROXY_KEEP_CLUSTERS=1 keeps them for the next run)."""
    if os.environ.get("JOBPROXY_KEEP_CLUSTERS") == "1":
        return
    for script in reversed(_started_here):
        stopped = subprocess.run(["bash", str(ROOT / "etc" / "dev" / f"{script}.sh"), "stop"], capture_output=True,
                                 text=True, timeout=600)
        if stopped.returncode != 0:
            print(f"could not stop {script}: {(stopped.stdout + stopped.stderr)[-500:]}", file=sys.stderr)
    _started_here.clear()


@pytest.fixture(scope="session")
def rootfs(passable_base: Path) -> Path:
    """A busybox root file system, for the Apptainer stand-in and sandboxed TES executors."""
    busybox = shutil.which("busybox")
    if not busybox or not shutil.which("bwrap"):
        reason = ("the Apptainer stand-in needs busybox (busybox-static) and bwrap (bubblewrap); "
                  "tests/run.sh installs them")
        if IN_CI:
            pytest.fail(reason)
        pytest.skip(reason)
    root = passable_base / "rootfs"  # executors running as `nobody` sandbox themselves in it
    root.mkdir()
    root.chmod(0o755)
    for folder in ("bin", "tmp", "proc", "dev", "data", "out"):
        (root / folder).mkdir()
    shutil.copy(busybox, root / "bin" / "busybox")
    applets = subprocess.run([busybox, "--list"], capture_output=True, text=True, check=True).stdout.split()
    for applet in applets:
        if applet != "busybox":
            (root / "bin" / applet).symlink_to("busybox")
    return root


# ---- local scheduler plugins started in the test process -------------------------------------


@pytest.fixture
async def local(tmp_path: Path) -> AsyncIterator[Callable[..., Any]]:
    """Start local plugins on one state folder (as a restarted gateway would); all closed after."""
    started: list[Scheduler] = []

    async def factory(**options: Any) -> tuple[LocalScheduler, Reports]:
        # the plugin's own mechanics, on folders the test makes: jobs run as the gateway's account
        document = {"gateway": {"state_dir": str(tmp_path / "state")}, "run_as": {"allow_root_jobs": True},
                    "scheduler": {"type": "local", "options": {"kill_grace": 1, **options}}}
        instance = create_scheduler(configuration.from_document(document, tmp_path, "local plugin test"))
        assert isinstance(instance, LocalScheduler)
        reports = Reports()
        await instance.start(reports)
        started.append(instance)
        return instance, reports

    yield factory
    for instance in started:
        await instance.close()


# ---- PostgreSQL: a fresh database, and the store tests' two stores -------------------------------

from .pg import _drop_test_databases, database, store_factory, store_section  # noqa: E402,F401  (fixtures)
