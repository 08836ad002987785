"""End to end: `jobproxy serve` as a real process on the Slurm scheduler, against the real
single-node cluster of etc/dev/slurm.sh, driven over HTTP; every test runs twice, through Slurm's
commands (`api = "cli"`) and through its slurmrestd (`api = "rest"`).

The gateway runs Slurm's commands through a folder of small wrappers (option `bin_dir`) that log
every call before running the real command, or reaches slurmrestd through a logging proxy
(tests/slurmrest_proxy.py) that logs each request under the command it stands for: that is how
the tests count status queries, and how one test holds a submission that Slurm has already
answered, to crash the gateway in the middle of it.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import os
import pwd
import re
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from gateway.model import new_task_id, task_from_document
from gateway.store import Store
from gateway.validation import SchemaValidator
from schedulers.base import JobRef, Task, TaskState
from schedulers.script import quote
from schedulers.slurm.plugin import COMMANDS, JOB_ID_FILE, SlurmScheduler

from . import backend_slurm
from .conftest import ROOT, Gateway, writable_by_jobs
from .slurmrest_proxy import RestProxy

pytestmark = [pytest.mark.e2e, pytest.mark.slurm]

HOG = "import time; b = bytearray(400 * 1024 * 1024); b[::4096] = b'x' * len(b[::4096]); time.sleep(1)"


@pytest.fixture(scope="module")
def cluster() -> None:
    backend_slurm.prepare()  # starts the dev cluster, puts SLURM_CONF into os.environ (skips, or fails in CI)


@pytest.fixture(params=["cli", "rest"])
def api(request: pytest.FixtureRequest) -> str:
    """How the plugin reaches Slurm: its commands, or slurmrestd."""
    return str(request.param)


@dataclass
class Wrappers:
    """Slurm's commands behind logging wrappers, or slurmrestd behind a logging proxy (`url`):
    a line when each command (request) starts, `<name>-done` when it ends; `hold` makes a
    submission wait after Slurm answered, `slow` makes it wait 0.5 s before."""

    bin_dir: Path
    calls: Path
    hold: Path
    slow: Path
    api: str = "cli"
    url: str = ""

    def submitted_task(self, index: int) -> str:
        """The task id of the `index`-th submission (sbatch's `--job-name=`, the script coming on
        stdin; or the REST job's name)."""
        args = self.lines("sbatch")[index][1]
        found = re.search(r" name=(\S+)" if self.api == "rest" else r"--job-name=(\S+)", args)
        assert found, args
        return found.group(1)

    def lines(self, command: str) -> list[tuple[float, str]]:
        found = []
        for line in self.calls.read_text().splitlines() if self.calls.exists() else []:
            stamp, name, args = line.split(" ", 2)
            if name == command:
                found.append((float(stamp), args))
        return found


@pytest.fixture
def wrappers(cluster: None, tmp_path: Path, api: str) -> Iterator[Wrappers]:
    bin_dir, calls, hold = tmp_path / "slurm-bin", tmp_path / "slurm-calls.log", tmp_path / "hold-sbatch"
    if api == "rest":
        proxy = RestProxy(os.environ["JOBPROXY_SLURMRESTD_URL"], calls, hold, tmp_path / "slow-sbatch").start()
        yield Wrappers(bin_dir, calls, hold, tmp_path / "slow-sbatch", api, proxy.url)
        proxy.stop()
        return
    bin_dir.mkdir()
    for name in COMMANDS:
        real = shutil.which(name)
        assert real, f"{name} is not installed"
        held = ((f"if [ -e {quote(str(hold))} ]; then : > {quote(str(hold) + '.submitted')}\n"
                 f"  for _ in $(seq 600); do [ -e {quote(str(hold))} ] || break; sleep 0.1; done\nfi\n")
                if name == "sbatch" else "")
        slow = f"[ -e {quote(str(tmp_path / 'slow-sbatch'))} ] && sleep 0.5\n" if name == "sbatch" else ""
        (bin_dir / name).write_text(
            "#!/bin/bash\n"
            f"printf '%s %s %s\\n' \"$(date +%s.%N)\" {name} \"$*\" >> {quote(str(calls))}\n"
            f"{slow}{quote(real)} \"$@\"\nstatus=$?\n{held}"
            f"printf '%s %s %s\\n' \"$(date +%s.%N)\" {name}-done \"$*\" >> {quote(str(calls))}\nexit $status\n")
        (bin_dir / name).chmod(0o755)
    yield Wrappers(bin_dir, calls, hold, tmp_path / "slow-sbatch")


def config(wrappers: Wrappers, interval: float = 0.5, timeout: float | None = 30) -> str:
    """The [scheduler] tables of a gateway on the dev cluster through `wrappers` (None: the
    default command_timeout)."""
    text = f'[scheduler]\ntype = "slurm"\npoll_interval = {interval}\n[scheduler.options]\n'
    text += "" if timeout is None else f"command_timeout = {timeout}\n"
    if wrappers.api == "rest":
        return text + f'api = "rest"\n[scheduler.options.rest]\nurl = {json.dumps(wrappers.url)}\n'
    return text + f"bin_dir = {json.dumps(str(wrappers.bin_dir))}\n"


def timed_out(wrappers: Wrappers, seconds: int) -> str:
    """The error of a submission Slurm did not answer in time."""
    return f"Slurm did not answer within {seconds} s ({'slurmrestd' if wrappers.api == 'rest' else 'sbatch'})"


@pytest.fixture
def gateway(gateway_factory: Callable[..., Gateway], wrappers: Wrappers) -> Gateway:
    return gateway_factory(config(wrappers)).start()


def slurm(*argv: str) -> str:
    return subprocess.run(argv, capture_output=True, text=True, timeout=60, check=True).stdout


def job_of(task_id: str) -> dict[str, str]:
    """`scontrol show job` of the one Slurm job named after `task_id`, as a dict."""
    ids = slurm("squeue", "--noheader", "--states=all", f"--name={task_id}", "--format=%i").split()
    assert len(ids) == 1, f"expected one Slurm job named {task_id}, found {ids}"
    return scontrol(ids[0])


def scontrol(job_id: str) -> dict[str, str]:
    text = slurm("scontrol", "--oneliner", "show", "job", job_id)
    return dict(re.findall(r"(?:^|\s)([\w/:]+)=(\S*)", text))


def node() -> dict[str, str]:
    return dict(re.findall(r"(?:^|\s)(\w+)=(\S*)", slurm("scontrol", "--oneliner", "show", "node")))


def eventually(check: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.2)
    raise AssertionError(f"{what}: not within {timeout} s")


def submit_raw(gateway: Gateway, task: dict[str, Any]) -> tuple[int, dict[str, str], Any]:
    status, headers, body = gateway.request("POST", "/v1/jobproxy/submit", json.dumps(task).encode(),
                                            {"Content-Type": "application/json"})
    return status, headers, json.loads(body)


# ---- limits and outcomes -------------------------------------------------------------------------


def test_cores_memory_and_time_reach_slurm(gateway: Gateway) -> None:
    task_id = gateway.submit({"user": "alice", "cmd": "nproc", "cores": 2, "memory": 300, "cputime": 30})
    state = gateway.wait(task_id)
    assert (state["code"], state["exit_code"]) == ("COMPLETE", 0)
    job = job_of(task_id)
    assert ((job["JobName"], job["JobState"], job["NumCPUs"], job["MinMemoryNode"])
            == (task_id, "COMPLETED", "2", "300M"))
    assert "mem=300M" in job["TRES"]
    assert job["TimeLimit"] == "00:02:00"  # 30 CPU seconds × 2 + 5 s, in whole minutes
    assert Path(state["stdout"]).read_text() == "2\n"


def test_exit_codes_and_odd_output_paths(gateway_factory: Callable[..., Gateway], wrappers: Wrappers,
                                         tmp_path: Path) -> None:
    gateway = gateway_factory(f'[paths]\nroots = ["{tmp_path}"]\n' + config(wrappers)).start()  # outputs outside
    odd = writable_by_jobs(tmp_path / "out 100% it's $HOME `id` \"q\" #x ü")  # jobs run as nobody (root, auth off)
    ok = gateway.submit({"user": "a", "cmd": ["/bin/echo", "it's  fine"], "stdout": str(odd / "o %j.txt")})
    bad = gateway.submit({"user": "a", "cmd": "echo oops >&2; exit 3"})
    done, failed = gateway.wait(ok), gateway.wait(bad)
    assert (done["code"], done["exit_code"], done["description"]) == ("COMPLETE", 0, "exit code 0")
    assert (odd / "o %j.txt").read_text() == "it's  fine\n"
    assert (failed["code"], failed["exit_code"], failed["description"]) == ("EXECUTOR_ERROR", 3, "exit code 3")
    assert "oops" in Path(failed["stderr"]).read_text()
    assert job_of(bad)["ExitCode"] == "3:0"


def test_memory_and_cputime_limits_kill(gateway: Gateway) -> None:
    hog = gateway.submit({"user": "a", "cmd": ["python3", "-c", HOG], "memory": 100})
    busy = gateway.submit({"user": "a", "cmd": "while :; do :; done", "cputime": 2})
    over = gateway.wait(hog)
    assert over["code"] == "EXECUTOR_ERROR"
    assert over["description"] == "killed: memory limit of 100 MiB exceeded"
    assert job_of(hog)["JobState"] in ("OUT_OF_MEMORY", "FAILED")  # FAILED 0:9 without a memory cgroup
    spun = gateway.wait(busy)
    assert (spun["code"], spun["description"], spun["exit_code"]) == (
        "EXECUTOR_ERROR", "killed: CPU time limit of 2 s exceeded", 152)


def test_delete_cancels_the_slurm_job(gateway: Gateway) -> None:
    task_id = gateway.submit({"user": "a", "cmd": "sleep 300"})
    gateway.wait(task_id, lambda s: s["code"] == "RUNNING")
    job_id = job_of(task_id)["JobId"]
    status, _, _ = gateway.request("DELETE", f"/v1/jobproxy/delete/{task_id}")
    assert status == 204
    eventually(lambda: scontrol(job_id)["JobState"] == "CANCELLED", 20, f"Slurm job {job_id} CANCELLED")
    assert gateway.request("GET", f"/v1/jobproxy/state/{task_id}")[0] == 404


@pytest.mark.parametrize("what", ["cores", "memory"])
def test_requests_slurm_can_never_satisfy_are_refused(gateway: Gateway, what: str, api: str) -> None:
    size = node()
    task: dict[str, Any] = {"user": "a", "cmd": "true"}
    if what == "cores":
        task["cores"], reason = int(size["CPUTot"]) + 1, "More processors requested than permitted"
    else:  # sbatch checks memory before it asks slurmctld, whose own words slurmrestd passes on
        task["memory"] = int(size["RealMemory"]) + 1024
        reason = ("Requested node configuration is not available" if api == "rest"
                  else "Memory specification can not be satisfied")
    status, _, body = submit_raw(gateway, task)
    assert status == 400, body
    assert body["error"].startswith("Slurm refused the task: ") and reason in body["error"]
    listed = json.loads(gateway.request("GET", "/v1/jobproxy/state")[2])
    assert listed["state"] == []  # nothing kept


# ---- one status query per interval ---------------------------------------------------------------


def test_fifty_tasks_with_one_squeue_call_per_interval(gateway_factory: Callable[..., Gateway],
                                                       wrappers: Wrappers) -> None:
    interval = 1.0
    gateway = gateway_factory(config(wrappers, interval=interval)).start()
    ids: list[str] = []
    lock = threading.Lock()

    def submit(i: int) -> None:
        task_id = gateway.submit({"user": "a", "cmd": f"echo {i}", "memory": 50})
        with lock:
            ids.append(task_id)

    threads = [threading.Thread(target=submit, args=(i,)) for i in range(50)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(ids) == 50
    submitted = time.time()
    states = {task_id: gateway.wait(task_id, timeout=150) for task_id in ids}
    finished = time.time()
    assert {s["code"] for s in states.values()} == {"COMPLETE"}
    assert all(Path(s["stdout"]).read_text().strip().isdigit() for s in states.values())

    calls = [(stamp, args) for stamp, args in wrappers.lines("squeue") if submitted <= stamp <= finished]
    rounds = (finished - submitted) / interval
    assert len(calls) <= rounds + 2, f"{len(calls)} squeue calls in {finished - submitted:.1f} s"
    assert len(wrappers.lines("scontrol")) == 0  # every job was resolved from the status queries alone
    if wrappers.api == "rest":
        return  # one GET /jobs per interval: slurmrestd 22.05 filters the job table by update time only
    first = calls[0][1]
    listed = re.search(r"--jobs=(\S+)", first)
    assert listed and "--name=" not in first, first
    assert len(listed.group(1).split(",")) > 25, "the first status query after the submissions covers them all"
    assert len(wrappers.lines("scontrol")) == 0  # every job was resolved from squeue alone


# ---- restarts and outages ------------------------------------------------------------------------


def test_restart_mid_run_loses_nothing(gateway_factory: Callable[..., Gateway], wrappers: Wrappers,
                                       tmp_path: Path) -> None:
    gateway = gateway_factory(config(wrappers)).start()
    flag = tmp_path / "go"
    done = gateway.submit({"user": "a", "cmd": "exit 4"})
    gateway.wait(done)
    running = gateway.submit({"user": "a",
                              "cmd": f"while [ ! -e {quote(str(flag))} ]; do sleep 0.1; done; echo finished"})
    gateway.wait(running, lambda s: s["code"] == "RUNNING")
    queued = gateway.submit({"user": "a", "cmd": "echo late", "cores": 2})  # waits for `running`'s core
    gateway.wait(queued, lambda s: s["description"].startswith("pending as Slurm job"))

    # A submission in flight: Slurm has the job, the gateway dies before it records the job id.
    wrappers.hold.touch()
    in_flight = threading.Thread(target=lambda: _ignore_errors(submit_raw, gateway,
                                                               {"user": "a", "cmd": "echo flight"}))
    in_flight.start()
    eventually(lambda: Path(str(wrappers.hold) + ".submitted").exists(), 30, "sbatch answered")
    gateway.stop(kill=True)
    wrappers.hold.unlink()
    in_flight.join(timeout=30)
    flight = _unsubmitted(gateway)
    assert len(flight) == 1, "the task in flight is recorded, without its job id"

    flag.touch()  # `running` finishes while the gateway is down
    gateway.start()
    assert gateway.wait(running)["code"] == "COMPLETE"
    assert Path(gateway.state(running)["stdout"]).read_text() == "finished\n"
    assert gateway.wait(queued)["code"] == "COMPLETE"
    assert gateway.wait(flight[0])["code"] == "COMPLETE"
    assert Path(gateway.state(flight[0])["stdout"]).read_text() == "flight\n"
    assert gateway.state(done)["exit_code"] == 4
    job_of(flight[0])  # exactly one Slurm job carries its name: nothing was submitted twice
    assert f"task {flight[0]}: recovered its job" in gateway.log.read_text()
    assert len(wrappers.lines("sbatch")) == 4


def _ignore_errors(function: Callable[..., Any], *args: Any) -> None:
    with contextlib.suppress(Exception):  # the gateway is killed under this request on purpose
        function(*args)


def _unsubmitted(gateway: Gateway) -> list[str]:
    """Tasks the gateway's store holds without a job id, read while the gateway is down."""
    store = Store(gateway.workdir / "jobproxy-state" / "jobproxy.db")
    try:
        return [record.id for record in store.active("slurm") if record.native_id is None]
    finally:
        store.close()


def test_submit_that_times_out_leaves_no_job_running(gateway_factory: Callable[..., Gateway],
                                                      wrappers: Wrappers) -> None:
    """sbatch overruns `command_timeout` after Slurm took the job: 503, and the job is cancelled."""
    gateway = gateway_factory(config(wrappers, timeout=2)).start()
    wrappers.hold.touch()
    try:
        status, _, body = submit_raw(gateway, {"user": "a", "cmd": "sleep 120"})
    finally:
        wrappers.hold.unlink()
    assert status == 503, body
    assert body["error"] == timed_out(wrappers, 2)
    task_id = wrappers.submitted_task(0)
    eventually(lambda: job_of(task_id)["JobState"] == "CANCELLED", 30, f"the job of {task_id} CANCELLED")
    assert json.loads(gateway.request("GET", "/v1/jobproxy/state")[2])["state"] == []


@pytest.fixture
def restore_cluster(cluster: None) -> Iterator[None]:
    yield
    subprocess.run(["bash", str(ROOT / "etc" / "dev" / "slurm.sh"), "start"], capture_output=True, timeout=300,
                   check=True)


def test_unreachable_slurm_answers_503_and_states_catch_up(gateway_factory: Callable[..., Gateway], wrappers: Wrappers,
                                                         restore_cluster: None) -> None:
    gateway = gateway_factory(config(wrappers)).start()
    first = gateway.submit({"user": "a", "cmd": "sleep 3; echo survived"})
    gateway.wait(first, lambda s: s["code"] == "RUNNING")
    slurm("scontrol", "shutdown", "slurmctld")
    eventually(lambda: subprocess.run(["scontrol", "ping"], capture_output=True, text=True).stdout.count("DOWN") > 0,
               30, "slurmctld down")
    failures_before = gateway.log.read_text().count("status query failed, will retry")

    status, headers, body = submit_raw(gateway, {"user": "a", "cmd": "true"})
    assert status == 503, body
    assert body["error"].startswith("Slurm cannot take the task now: ")
    assert "Unable to contact slurm controller" in body["error"]
    assert headers["Retry-After"] == "30"
    eventually(lambda: gateway.log.read_text().count("status query failed, will retry") > failures_before, 60,
               "the poller reports a failed status query")
    assert gateway.state(first)["code"] == "RUNNING"  # no news is not bad news
    assert json.loads(gateway.request("GET", "/v1/jobproxy/state")[2])["state"].__len__() == 1

    subprocess.run(["bash", str(ROOT / "etc" / "dev" / "slurm.sh"), "start"], capture_output=True, timeout=300,
                   check=True)
    caught_up = gateway.wait(first, timeout=90)
    assert (caught_up["code"], caught_up["exit_code"]) == ("COMPLETE", 0)
    assert Path(caught_up["stdout"]).read_text() == "survived\n"
    after = gateway.submit({"user": "a", "cmd": "echo back"})
    assert gateway.wait(after)["code"] == "COMPLETE"


# ---- jobs Slurm no longer lists (the plugin itself, against the cluster) ---------------------------


def plugin(tmp_path: Path, api: str, wrappers: Wrappers | None = None, **options: Any) -> SlurmScheduler:
    """The plugin over `api` (through `wrappers` if given) with `options` as the gateway hands
    them over: checked, defaults filled in."""
    if api == "rest":
        options = {**options, "api": "rest",
                   "rest": {"url": wrappers.url if wrappers else os.environ["JOBPROXY_SLURMRESTD_URL"]}}
    elif wrappers is not None:
        options = {**options, "bin_dir": str(wrappers.bin_dir)}
    validator = SchemaValidator(SlurmScheduler.options_schema)
    assert validator.problems(options) == []
    return SlurmScheduler("slurm", validator.with_defaults(options), tmp_path / "state")


async def test_one_squeue_call_per_status_asks_for_just_those_jobs(wrappers: Wrappers, tmp_path: Path) -> None:
    """N jobs, every state from pending to done: each status() is one squeue call, `--jobs=` with
    exactly their ids (never `--name=`, which makes slurmctld list every job), and no scontrol."""
    scheduler = plugin(tmp_path, wrappers.api, wrappers)
    await scheduler.start(lambda *_: None)
    jobs = []
    for i in range(24):
        workdir = tmp_path / f"t{i}"
        workdir.mkdir()
        task = task_from_document({"user": "a", "cmd": f"sleep {i % 3}", "memory": 50}, new_task_id(), str(workdir))
        jobs.append(JobRef(task, await scheduler.submit(task)))
    rounds, deadline = 0, time.monotonic() + 120
    states: dict[str, TaskState] = {}
    while True:
        answers = await scheduler.status(jobs)
        rounds += 1
        assert set(answers) == {job.task_id for job in jobs}
        states = {task_id: status.state for task_id, status in answers.items()}
        if all(state.terminal for state in states.values()) or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.5)
    assert set(states.values()) == {TaskState.COMPLETE}
    calls = [args for _, args in wrappers.lines("squeue")]
    assert len(calls) == rounds, f"{len(calls)} squeue calls for {rounds} status() calls"
    for args in calls if wrappers.api == "cli" else []:
        listed = re.search(r"--jobs=(\S+)", args)
        assert listed and "--name=" not in args, args
        assert listed.group(1).split(",") == [job.native_id for job in jobs]
    assert wrappers.lines("scontrol") == []
    await scheduler.close()


async def test_submissions_run_concurrently_up_to_submit_concurrency(wrappers: Wrappers, tmp_path: Path) -> None:
    """Ten submissions at once with submit_concurrency = 3: sbatch runs in parallel, never more than 3 at a time."""
    scheduler = plugin(tmp_path, wrappers.api, wrappers, submit_concurrency=3)
    await scheduler.start(lambda *_: None)
    tasks = []
    for i in range(10):
        workdir = tmp_path / f"t{i}"
        workdir.mkdir()
        tasks.append(task_from_document({"user": "a", "cmd": "true"}, new_task_id(), str(workdir)))
    wrappers.slow.touch()
    native = await asyncio.gather(*(scheduler.submit(task) for task in tasks))
    wrappers.slow.unlink()
    assert len(set(native)) == 10
    events = sorted([(stamp, 1) for stamp, _ in wrappers.lines("sbatch")]
                    + [(stamp, -1) for stamp, _ in wrappers.lines("sbatch-done")])
    running, most = 0, 0
    for _, step in events:
        running += step
        most = max(most, running)
    assert most == 3, f"at most {most} sbatch calls ran at once"
    jobs = [JobRef(task, job_id) for task, job_id in zip(tasks, native, strict=True)]
    deadline = time.monotonic() + 60
    while not all(s.state.terminal for s in (await scheduler.status(jobs)).values()):
        assert time.monotonic() < deadline
        await asyncio.sleep(0.5)
    await scheduler.close()


async def test_jobs_squeue_no_longer_lists_are_resolved(cluster: None, tmp_path: Path, api: str) -> None:
    """The exit-code file decides; else scontrol, which must name the task; else the job is lost."""
    scheduler = plugin(tmp_path, api)
    await scheduler.start(lambda *_: None)

    def task(name: str, cmd: str) -> Task:
        workdir = tmp_path / name
        workdir.mkdir()
        return task_from_document({"user": "a", "cmd": cmd}, new_task_id(), str(workdir))

    ran = task("ran", "exit 5")
    real = JobRef(ran, await scheduler.submit(ran))
    deadline = time.monotonic() + 60
    while not (await scheduler.status([real]))[ran.id].state.terminal:
        assert time.monotonic() < deadline, "the job did not end"
        await asyncio.sleep(0.3)

    # squeue lists `ran` under its real job id only: for another id, its exit-code file decides
    moved = (await scheduler.status([JobRef(ran, "999999999")]))[ran.id]
    assert (moved.state, moved.description, moved.exit_code) == (TaskState.EXECUTOR_ERROR, "exit code 5", 5)

    never = task("never", "true")
    # a job id scontrol knows, but carrying another task's name; and one Slurm never heard of
    for native in (real.native_id, "999999998"):
        lost = (await scheduler.status([JobRef(never, native)]))[never.id]
        assert (lost.state, lost.description) == (TaskState.SYSTEM_ERROR, f"Slurm no longer knows job {native}, "
                                                  f"and the job left no exit code in {never.workdir}/exit_code")

    assert await scheduler.find(never) is None
    (Path(never.workdir) / JOB_ID_FILE).write_text("424242\n")  # written by a job Slurm has since forgotten
    assert await scheduler.find(never) == "424242"
    assert await scheduler.find(ran) == real.native_id
    await scheduler.close()


def test_run_as_user_submits_on_the_users_behalf(gateway_factory: Callable[..., Gateway], wrappers: Wrappers) -> None:
    """[run_as] on Slurm: sbatch --uid/--gid as root, the job runs as the user with a login environment."""
    if os.geteuid() != 0:
        pytest.skip("run_as needs a gateway running as root")
    name = "jp-test-slurm"
    subprocess.run(["userdel", "-r", name], capture_output=True)
    subprocess.run(["useradd", "--create-home", "--uid", "40010", name], check=True)
    state = Path(tempfile.mkdtemp(prefix="jobproxy-slurm-runas-"))
    state.chmod(0o755)
    try:
        entry = pwd.getpwnam(name)
        gateway = gateway_factory(f'[gateway]\nstate_dir = "{state}"\n' + config(wrappers)
                                  + "[run_as]\nenabled = true\n").start()
        task_id = gateway.submit({"user": name, "cmd": "id -u; echo $HOME; touch mine"})
        done = gateway.wait(task_id, timeout=120)
        assert done["code"] == "COMPLETE", done
        uid, home = Path(done["stdout"]).read_text().split()
        assert (int(uid), home) == (entry.pw_uid, entry.pw_dir)
        assert os.stat(done["stdout"]).st_uid == entry.pw_uid and os.stat(done["stdout"]).st_mode & 0o077 == 0
        assert os.stat(Path(done["stdout"]).parent / "mine").st_uid == entry.pw_uid
        on_behalf = f"user={name}" if wrappers.api == "rest" else f"--uid={entry.pw_uid}"
        assert any(on_behalf in args for _, args in wrappers.lines("sbatch"))
        status, _, body = gateway.request("POST", "/v1/jobproxy/submit",
                                          json.dumps({"user": "root", "cmd": "id"}).encode(),
                                          {"Content-Type": "application/json"})
        assert status == 403 and b"may not run as 'root'" in body
    finally:
        subprocess.run(["userdel", "-r", name], capture_output=True)
        shutil.rmtree(state, ignore_errors=True)


def _slurmctld_pid() -> int:
    """The pid of the dev cluster's slurmctld (etc/dev/slurm.sh's pid file), checked by its name."""
    pid_file = Path(os.environ.get("JOBPROXY_DEV_ROOT", "/tmp/jobproxy-dev")) / "slurm" / "run" / "slurmctld.pid"
    pid = int(pid_file.read_text().split()[0])
    assert Path(f"/proc/{pid}/comm").read_text().strip() == "slurmctld", f"pid {pid} is not slurmctld"
    return pid


def test_hung_slurmctld_answers_503_within_the_default_command_timeout(gateway_factory: Callable[..., Gateway],
                                                                       wrappers: Wrappers) -> None:
    """slurmctld stopped (SIGSTOP): a submit answers 503 with Retry-After within the default 5 s
    `command_timeout` (not sbatch's own 10 s, nor the old 30 s default); state reads answer from the
    store meanwhile; once slurmctld runs again, the refused task has left no job behind."""
    gateway = gateway_factory(config(wrappers, timeout=None)).start()
    first = gateway.submit({"user": "a", "cmd": "sleep 2; echo survived"})
    gateway.wait(first, lambda s: s["code"] == "RUNNING")
    pid = _slurmctld_pid()
    os.kill(pid, signal.SIGSTOP)
    try:
        assert gateway.state(first)["code"] == "RUNNING"
        started = time.monotonic()
        status, headers, body = submit_raw(gateway, {"user": "a", "cmd": "echo refused"})
        took = time.monotonic() - started
        assert gateway.state(first)["code"] == "RUNNING"  # the store answers while Slurm does not
    finally:
        os.kill(pid, signal.SIGCONT)
    assert status == 503, body
    assert "Retry-After" in headers, headers
    assert body["error"] == timed_out(wrappers, 5), body
    assert took < 6.5, f"the submit took {took:.1f} s"
    caught_up = gateway.wait(first, timeout=90)
    assert (caught_up["code"], caught_up["exit_code"]) == ("COMPLETE", 0)
    refused = wrappers.submitted_task(-1)

    def no_orphan() -> bool:
        states = slurm("squeue", "--noheader", "--states=all", f"--name={refused}", "--format=%T").split()
        # never taken, or taken once slurmctld resumed: then cancelled by name, or ended (its folder is gone)
        return not set(states) & {"PENDING", "CONFIGURING", "RUNNING", "SUSPENDED", "COMPLETING"}
    eventually(no_orphan, 60, f"no job of the refused task {refused} left running")
    eventually(lambda: f"task {refused}: its submission failed; cancelled the Slurm job" in gateway.log.read_text(),
               60, "scancel --name of the refused task, once slurmctld answers")
    assert [t["id"] for t in json.loads(gateway.request("GET", "/v1/jobproxy/state")[2])["state"]] == [first]


async def test_rest_tokens_signed_with_the_clusters_key(cluster: None, tmp_path: Path) -> None:
    """`rest.jwt_key_file`: the gateway signs its own tokens with the cluster's JWT key (the dev
    cluster's, readable by root only) and slurmctld accepts them: no Slurm command is run."""
    key = Path(os.environ.get("JOBPROXY_DEV_ROOT", "/tmp/jobproxy-dev")) / "slurm" / "jwt.key"
    if not os.access(key, os.R_OK):
        pytest.skip(f"{key} is not readable here (it is root's)")
    options = {"api": "rest", "rest": {"url": os.environ["JOBPROXY_SLURMRESTD_URL"], "jwt_key_file": str(key),
                                       "token_command": ["/bin/false"]}}  # would fail, were it run
    scheduler = SlurmScheduler("slurm", SchemaValidator(SlurmScheduler.options_schema).with_defaults(options),
                               tmp_path / "state")
    await scheduler.start(lambda *_: None)
    workdir = tmp_path / "signed"
    workdir.mkdir()
    task = task_from_document({"user": "a", "cmd": "exit 7"}, new_task_id(), str(workdir))
    job = JobRef(task, await scheduler.submit(task))
    deadline = time.monotonic() + 120
    while not (status := (await scheduler.status([job]))[task.id]).state.terminal:
        assert time.monotonic() < deadline, "the job did not end"
        await asyncio.sleep(0.5)
    assert (status.state, status.exit_code) == (TaskState.EXECUTOR_ERROR, 7)
    assert scontrol(job.native_id)["JobName"] == task.id
    await scheduler.close()
