"""End to end: the `jobproxy` client subcommands, task output over HTTP and the event stream,
against a real `jobproxy serve` on the local scheduler (and on Slurm, where its dev cluster runs).

The event stream is read by a real, independent SSE parser (httpx-sse) as well as by
gateway.client, and both must see the same events."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from httpx_sse import ServerSentEvent, connect_sse

from gateway import auth
from gateway.client import Client, ClientError

from . import backend_slurm
from .conftest import IN_CI, Gateway

pytestmark = pytest.mark.e2e

CONFIG = """
[scheduler]
type = "local"
poll_interval = 0.2
[scheduler.options]
cores = 2
kill_grace = 1
[streams]
max_log_bytes = 4096
follow_interval = 0.05
heartbeat_seconds = 0.5
"""
TOKENS = {"alice": "jp_alice_token_for_tests", "bob": "jp_bob_token_for_tests"}


@pytest.fixture
def gateway(gateway_factory: Callable[..., Gateway]) -> Gateway:
    return gateway_factory(CONFIG).start()


def jobproxy(gateway: Gateway | None, *argv: str, token: str | None = None, url: str | None = None,
             timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """The `jobproxy` command as a subprocess, talking to `gateway` through $JOBPROXY_URL."""
    env = {**os.environ, "JOBPROXY_URL": url or (gateway.url if gateway else "http://127.0.0.1:9")}
    env.pop("JOBPROXY_TOKEN", None)
    if token:
        env["JOBPROXY_TOKEN"] = token
    done = subprocess.run([_command(), *argv], capture_output=True, text=True, env=env, timeout=timeout)
    assert "Traceback" not in done.stderr, done.stderr
    return done


def _command() -> str:
    return shutil.which("jobproxy", path=str(Path(sys.executable).parent)) or "jobproxy"


def sse(gateway: Gateway, headers: dict[str, str] | None = None, until: Callable[[list[ServerSentEvent]], bool]
        = lambda events: False, timeout: float = 30, query: str = "") -> list[ServerSentEvent]:
    """Read the event stream with httpx-sse until `until(events)` (or `timeout` seconds)."""
    events: list[ServerSentEvent] = []
    deadline = time.monotonic() + timeout
    with httpx.Client(timeout=10) as http, connect_sse(http, "GET", f"{gateway.url}/v1/jobproxy/events{query}",
                                                       headers=headers or {}) as source:
        assert source.response.status_code == 200
        for event in source.iter_sse():
            events.append(event)
            if until(events) or time.monotonic() > deadline:
                break
    return events


class Collector:
    """httpx-sse reading the event stream in a thread, from before the test acts."""

    def __init__(self, gateway: Gateway, headers: dict[str, str] | None = None) -> None:
        self.events: list[ServerSentEvent] = []
        self.connected = threading.Event()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._read, args=(gateway, headers or {}), daemon=True)
        self.thread.start()
        assert self.connected.wait(10)

    def _read(self, gateway: Gateway, headers: dict[str, str]) -> None:
        try:
            with httpx.Client(timeout=10) as http, connect_sse(http, "GET", f"{gateway.url}/v1/jobproxy/events",
                                                               headers=headers) as source:
                self.connected.set()
                for event in source.iter_sse():
                    self.events.append(event)
                    if self.stop.is_set():
                        return
        except httpx.HTTPError:  # the gateway stopped at the end of the test
            return

    def of(self, task_id: str) -> list[dict[str, Any]]:
        return [json.loads(e.data) for e in self.events if e.event == "state" and json.loads(e.data)["id"] == task_id]

    def wait_for(self, task_id: str, code: str, timeout: float = 30) -> list[dict[str, Any]]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if any(e["code"] == code for e in self.of(task_id)):
                return self.of(task_id)
            time.sleep(0.05)
        raise AssertionError(f"no {code} event for {task_id}: {self.of(task_id)}")


# ---- the command line ------------------------------------------------------------------------


def test_cli_submit_wait_state_logs(gateway: Gateway) -> None:
    done = jobproxy(gateway, "submit", "--cores", "1", "--memory", "64", "--",
                    "sh", "-c", "echo out one; echo out two; echo oops >&2; exit 3")
    assert done.returncode == 0, done.stderr
    task_id = done.stdout.strip()
    assert jobproxy(gateway, "wait", task_id).returncode == 3  # the task's exit code
    assert jobproxy(gateway, "logs", task_id).stdout == "out one\nout two\n"
    assert jobproxy(gateway, "logs", "--stderr", task_id).stdout == "oops\n"
    assert jobproxy(gateway, "logs", "--tail", "8", task_id).stdout == "out two\n"
    table = jobproxy(gateway, "state", task_id).stdout.splitlines()
    assert table[0].split() == ["ID", "STATE", "USER", "SCHEDULER", "EXIT", "AGE"]
    assert table[1].split()[:5] == [task_id, "EXECUTOR_ERROR", os.environ.get("USER") or "root", "local", "3"]
    listed = json.loads(jobproxy(gateway, "state", "--json").stdout)
    assert [s["id"] for s in listed] == [task_id] and listed[0]["exit_code"] == 3

    ran = jobproxy(gateway, "submit", "--wait", "--", "/bin/echo", "it's", "a  drop-in")
    assert (ran.returncode, ran.stdout) == (0, "it's a  drop-in\n")
    assert jobproxy(gateway, "state", "--state", "COMPLETE", "--json").stdout.count('"COMPLETE"') == 1


def test_cli_file_submit_cancel_delete_and_wait_for_several(gateway: Gateway, tmp_path: Path) -> None:
    document = tmp_path / "task.xml"
    document.write_text(f"<task><user>{os.environ.get('USER') or 'root'}</user><cmd>sleep 300</cmd></task>")
    sleeper = jobproxy(gateway, "submit", "--file", str(document)).stdout.strip()
    quick = jobproxy(gateway, "submit", "--", "true").stdout.strip()
    gateway.wait(sleeper, lambda s: s["code"] == "RUNNING")
    canceled = jobproxy(gateway, "cancel", sleeper)
    assert (canceled.returncode, canceled.stdout) == (0, f"{sleeper} CANCELED\n")
    assert gateway.state(sleeper)["code"] == "CANCELED"
    several = jobproxy(gateway, "wait", quick, sleeper, "--timeout", "30")
    assert several.returncode == 1 and f"task {sleeper}: CANCELED" in several.stderr
    assert jobproxy(gateway, "wait", quick).returncode == 0
    deleted = jobproxy(gateway, "delete", sleeper, "no-such-task")
    assert deleted.returncode == 1 and deleted.stdout == f"{sleeper} deleted\n"
    assert deleted.stderr == "jobproxy: no task with id 'no-such-task'\n"
    assert gateway.request("GET", f"/v1/jobproxy/state/{sleeper}")[0] == 404


def test_cli_errors_are_one_line(gateway: Gateway) -> None:
    refused = jobproxy(None, "state", url="http://127.0.0.1:9")
    assert (refused.returncode, refused.stderr) == (
        1, "jobproxy: cannot reach the gateway at http://127.0.0.1:9: connection refused\n")
    invalid = jobproxy(gateway, "submit", "--cores", "0", "--", "true")
    assert (invalid.returncode, invalid.stderr) == (1, "jobproxy: invalid task: 1 problem(s): $.cores: must be >= 1 "
                                                       "(got 0)\n")
    assert jobproxy(gateway, "submit").returncode == 2  # usage: no command
    assert jobproxy(gateway, "logs").returncode == 2
    assert jobproxy(gateway, "submit", "--port", "80", "--", "true").returncode == 2  # --port without --image
    sleeper = jobproxy(gateway, "submit", "--", "sleep", "30").stdout.strip()
    timed_out = jobproxy(gateway, "wait", sleeper, "--timeout", "0.5")
    assert (timed_out.returncode, timed_out.stderr) == (124, f"jobproxy: timed out waiting for {sleeper}\n")
    jobproxy(gateway, "delete", sleeper)


def test_follow_receives_lines_written_after_it_started(gateway: Gateway, tmp_path: Path) -> None:
    go = tmp_path / "go"
    script = f"echo before; while [ ! -e {go} ]; do sleep 0.05; done; echo after; sleep 0.3; echo last"
    task_id = gateway.submit({"user": "alice", "cmd": script})
    env = {**os.environ, "JOBPROXY_URL": gateway.url}
    follower = subprocess.Popen([_command(), "logs", "--follow", task_id], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, env=env)
    assert follower.stdout is not None
    try:
        assert follower.stdout.readline() == "before\n"
        assert gateway.state(task_id)["code"] == "RUNNING"  # the rest is not written yet
        go.touch()
        assert follower.stdout.readline() == "after\n"
        assert follower.stdout.readline() == "last\n"
        assert follower.wait(30) == 0  # the answer ended with the task
        assert follower.stdout.read() == "" and gateway.state(task_id)["code"] == "COMPLETE"
    finally:
        follower.kill()
        follower.wait()


def test_logs_are_limited_per_answer_unless_following(gateway: Gateway) -> None:
    task_id = gateway.submit({"user": "alice", "cmd": ["python3", "-c", "print('x' * 9999)"]})
    gateway.wait(task_id)
    status, headers, body = gateway.request("GET", f"/v1/jobproxy/logs/{task_id}")
    assert (status, len(body), headers["JobProxy-Output-Next"], headers["JobProxy-Output-Size"]) == (
        200, 4096, "4096", "10000")
    status, headers, body = gateway.request("GET", f"/v1/jobproxy/logs/{task_id}?offset=8192")
    assert (status, len(body), headers["JobProxy-Output-Start"]) == (200, 1808, "8192")
    status, _, body = gateway.request("GET", f"/v1/jobproxy/logs/{task_id}?tail=4097")
    assert status == 400 and json.loads(body)["details"] == [
        {"path": "tail", "message": "must be a whole number from 0 to 4096"}]
    status, _, body = gateway.request("GET", f"/v1/jobproxy/logs/{task_id}?follow=true")
    assert (status, len(body)) == (200, 10000)
    assert jobproxy(gateway, "logs", "--follow", "--tail", "3", task_id).stdout == "xx\n"
    big = gateway.submit({"user": "alice", "cmd": ["python3", "-c", "print('y' * 300000)"]})
    gateway.wait(big)  # more than a pipe holds: the reader stops while the client still writes
    piped = subprocess.run(["sh", "-c", f'"$0" logs --follow {big} | head -c 5', _command()], capture_output=True,
                           text=True, env={**os.environ, "JOBPROXY_URL": gateway.url}, timeout=60)
    assert (piped.stdout, piped.stderr) == ("yyyyy", "")  # a reader that stops early: no error, no traceback
    assert Client(gateway.url).logs(task_id) == b"x" * 9999 + b"\n"  # paged through
    for query, path in (("stream=both", "stream"), ("follow=yes", "follow"), ("offset=-1", "offset")):
        status, _, body = gateway.request("GET", f"/v1/jobproxy/logs/{task_id}?{query}")
        assert status == 400 and json.loads(body)["details"][0]["path"] == path, body


def test_logs_show_only_files_of_the_tasks_account(gateway: Gateway) -> None:
    """The gateway (root here) shows an output file only if it belongs to the account the job ran
    as (`nobody`, or the task's user with [run_as]), never one another account put there."""
    if os.geteuid() != 0:
        pytest.skip("the ownership rule applies to a gateway running as root")
    task_id = gateway.submit({"user": "alice", "cmd": "echo mine"})
    stdout = Path(gateway.wait(task_id)["stdout"])
    assert gateway.request("GET", f"/v1/jobproxy/logs/{task_id}")[2] == b"mine\n"
    stdout.unlink()
    stdout.write_text("root's secret\n")  # the gateway's own account's file in its place
    status, _, body = gateway.request("GET", f"/v1/jobproxy/logs/{task_id}")
    assert status == 403 and b"not written by the task's account" in body and b"secret" not in body
    stdout.unlink()
    stdout.symlink_to("/etc/shadow")
    status, _, body = gateway.request("GET", f"/v1/jobproxy/logs/{task_id}?follow=true")
    assert status == 403 and b"not a regular file" in body


# ---- the event stream ---------------------------------------------------------------------------


def test_event_stream_sees_queued_running_complete_and_resumes(gateway: Gateway) -> None:
    collector = Collector(gateway)
    task_id = gateway.submit({"user": "alice", "cmd": "sleep 0.5; exit 0"})
    seen = collector.wait_for(task_id, "COMPLETE")
    collector.stop.set()
    assert [e["code"] for e in seen] == ["QUEUED", "RUNNING", "COMPLETE"]
    assert set(seen[0]) == {"id", "code", "description", "exit_code", "user", "time"}
    assert seen[-1]["exit_code"] == 0 and seen[-1]["user"] == "alice"
    ids = [e.id for e in collector.events if e.event == "state"]
    epoch = ids[0].split("-")[0]
    assert [int(i.split("-")[1]) for i in ids] == sorted(int(i.split("-")[1]) for i in ids)

    # a client that saw only QUEUED reconnects and gets what came after it, from the history
    resumed = sse(gateway, {"Last-Event-ID": ids[0]}, until=lambda events: len(events) == 2)
    assert [json.loads(e.data)["code"] for e in resumed] == ["RUNNING", "COMPLETE"]
    assert [e.id for e in resumed] == ids[1:3]
    # gateway.client's own parser reads the same stream the same way
    ours = Client(gateway.url).events(last_event_id=ids[0])
    mine = [next(ours), next(ours)]
    ours.close()  # type: ignore[attr-defined]
    assert [(e.id, e.event, e.data) for e in mine] == [(e.id, e.event, json.loads(e.data)) for e in resumed]
    # an id of an earlier gateway process: the stream says changes may be missing
    gap = sse(gateway, {"Last-Event-ID": "0-1" if epoch != "0" else "1-1"}, until=lambda events: len(events) == 1)
    assert gap[0].event == "gap" and "read the states again" in json.loads(gap[0].data)["reason"]
    status, _, body = gateway.request("GET", "/v1/jobproxy/events", headers={"Last-Event-ID": "bogus"})
    assert status == 400 and json.loads(body)["details"][0]["path"] == "Last-Event-ID"


def test_idle_stream_gets_heartbeats_and_ends_with_the_gateway(gateway: Gateway) -> None:
    with httpx.Client(timeout=10) as http, http.stream("GET", f"{gateway.url}/v1/jobproxy/events") as response:
        assert response.headers["Content-Type"].startswith("text/event-stream")
        started, text = time.monotonic(), ""
        lines = response.iter_lines()
        while text.count(": keepalive") < 2:
            text += next(lines) + "\n"
        assert time.monotonic() - started < 5  # every heartbeat_seconds (0.5 s here)
        stopping = time.monotonic()
        gateway.stop()
        assert list(lines) is not None  # the stream ends: the iterator runs out instead of hanging
        assert time.monotonic() - stopping < 10


def test_wait_uses_the_event_stream(gateway: Gateway) -> None:
    client = Client(gateway.url)
    ids = [client.submit({"user": "alice", "cmd": f"sleep 0.{n}; exit {n}"}) for n in (1, 3)]
    seen: list[tuple[str, str]] = []
    done = client.wait(ids, timeout=30, on_change=lambda s: seen.append((s["id"], s["code"])))
    assert [done[i]["exit_code"] for i in ids] == [1, 3] and all(done[i]["code"] == "EXECUTOR_ERROR" for i in ids)
    assert (ids[1], "RUNNING") in seen or (ids[1], "QUEUED") in seen  # changes came while it waited
    with pytest.raises(ClientError, match="no task with id 'nope'"):
        client.wait(["nope"])


def test_wait_outlives_a_restart_of_the_gateway(gateway: Gateway, tmp_path: Path) -> None:
    """The stream breaks, the gateway refuses connections for a while, then answers with a new
    event epoch: `wait` reconnects (or polls) and still ends with the task's exit code."""
    go = tmp_path / "go"
    task_id = gateway.submit({"user": "alice", "cmd": f"while [ ! -e {go} ]; do sleep 0.1; done; exit 5"})
    gateway.wait(task_id, lambda s: s["code"] == "RUNNING")
    env = {**os.environ, "JOBPROXY_URL": gateway.url}
    waiter = subprocess.Popen([_command(), "wait", task_id, "--timeout", "90"], stderr=subprocess.PIPE, text=True,
                              env=env)
    try:
        time.sleep(3)  # connected by then (a gateway never reached at all is an error at once)
        gateway.stop()
        time.sleep(2)
        gateway.start()  # the same port, the same store; the local job carried on meanwhile
        go.touch()
        code = waiter.wait(90)
        said = waiter.stderr.read() if waiter.stderr else ""
        assert (code, "Traceback" in said) == (5, False), said
    finally:
        waiter.kill()
        waiter.wait()


def test_tes_tasks_are_on_the_same_stream(gateway_factory: Callable[..., Gateway]) -> None:
    if shutil.which("bwrap") is None:
        if IN_CI:
            pytest.fail("TES executors on the host need bubblewrap (bwrap); tests/run.sh installs it")
        pytest.skip("TES executors on the host need bubblewrap (bwrap); tests/run.sh installs it")
    gateway = gateway_factory(CONFIG + '[tes]\nimages = [{ match = "*", run = "host" }]\n').start()
    collector = Collector(gateway)
    status, _, body = gateway.request("POST", "/ga4gh/tes/v1/tasks", json.dumps(
        {"executors": [{"image": "ubuntu", "command": ["echo", "from TES"]}]}).encode(),
        {"Content-Type": "application/json"})
    assert status == 200, body
    task_id = json.loads(body)["id"]
    codes = [e["code"] for e in collector.wait_for(task_id, "COMPLETE")]
    assert codes[0] == "QUEUED" and codes[-1] == "COMPLETE", codes
    assert gateway.request("GET", f"/v1/jobproxy/logs/{task_id}")[0] == 200  # its job's own output (the steps')


# ---- who sees what --------------------------------------------------------------------------------


@pytest.fixture
def secured(gateway_factory: Callable[..., Gateway]) -> Gateway:
    tokens = ", ".join(f'{{ user = "{user}", sha256 = "{auth.hash_token(token)}" }}' for user, token in TOKENS.items())
    return gateway_factory(CONFIG + f"[auth]\nenabled = true\ntokens = [ {tokens} ]\n").start()


def test_another_users_logs_and_events_are_hidden(secured: Gateway) -> None:
    alice, bob = ({"Authorization": f"Bearer {TOKENS[user]}"} for user in ("alice", "bob"))
    bobs_view, alices_view = Collector(secured, bob), Collector(secured, alice)
    submitted = jobproxy(secured, "submit", "--user", "alice", "--", "echo", "alice's output", token=TOKENS["alice"])
    task_id = submitted.stdout.strip()
    assert jobproxy(secured, "wait", task_id, token=TOKENS["alice"]).returncode == 0
    alices_view.wait_for(task_id, "COMPLETE")
    assert jobproxy(secured, "logs", task_id, token=TOKENS["alice"]).stdout == "alice's output\n"
    for query in ("", "?follow=true", "?stream=stderr"):
        status, _, body = secured.request("GET", f"/v1/jobproxy/logs/{task_id}{query}", headers=bob)
        assert (status, json.loads(body)) == (404, {"error": f"no task with id {task_id!r}"})
        assert secured.request("GET", f"/v1/jobproxy/logs/{task_id}{query}")[0] == 401
    denied = jobproxy(secured, "logs", task_id, token=TOKENS["bob"])
    assert (denied.returncode, denied.stderr) == (1, f"jobproxy: no task with id {task_id!r}\n")
    assert jobproxy(secured, "cancel", task_id, token=TOKENS["bob"]).returncode == 1
    bobs_task = jobproxy(secured, "submit", "--user", "bob", "--", "true", token=TOKENS["bob"]).stdout.strip()
    bobs_view.wait_for(bobs_task, "COMPLETE")
    assert bobs_view.of(task_id) == [] and alices_view.of(bobs_task) == []
    assert secured.request("GET", "/v1/jobproxy/events")[0] == 401


# ---- Slurm ------------------------------------------------------------------------------------------


@pytest.fixture
def slurm_gateway(gateway_factory: Callable[..., Gateway]) -> Iterator[Gateway]:
    backend_slurm.prepare()  # skips where the dev cluster cannot run (fails in CI)
    config = ('[scheduler]\ntype = "slurm"\npoll_interval = 0.3\n[scheduler.options]\ncommand_timeout = 30\n'
              "[streams]\nfollow_interval = 0.1\n")
    yield gateway_factory(config).start()


@pytest.mark.slurm
def test_logs_and_events_on_slurm(slurm_gateway: Gateway) -> None:
    collector = Collector(slurm_gateway)
    task_id = slurm_gateway.submit({"user": "alice", "cmd": "echo one; sleep 2; echo two >&2; echo three"})
    env = {**os.environ, "JOBPROXY_URL": slurm_gateway.url}
    follower = subprocess.run([_command(), "logs", "--follow", task_id], capture_output=True, text=True, env=env,
                              timeout=300)  # the cluster may be busy: the job waits its turn
    assert (follower.returncode, follower.stdout) == (0, "one\nthree\n"), follower.stderr
    seen = collector.wait_for(task_id, "COMPLETE", timeout=60)  # final already: the follow ended
    codes = [e["code"] for e in seen]
    assert codes[0] == "QUEUED" and codes[-1] == "COMPLETE" and "RUNNING" in codes, codes
    assert slurm_gateway.request("GET", f"/v1/jobproxy/logs/{task_id}?stream=stderr")[2] == b"two\n"
    assert Client(slurm_gateway.url).wait([task_id])[task_id]["scheduler"] == "slurm"


@pytest.mark.slurm
def test_a_task_slurm_refuses_at_submit_sends_no_event(slurm_gateway: Gateway) -> None:
    """sbatch refuses the task after the gateway recorded it (400, nothing kept): the stream says
    nothing of it, not even QUEUED, so no client waits on an id that never was a task."""
    from .test_e2e_slurm import node
    collector = Collector(slurm_gateway)
    too_many = {"user": "alice", "cmd": "true", "cores": int(node()["CPUTot"]) + 1}
    status, _, body = slurm_gateway.request("POST", "/v1/jobproxy/submit", json.dumps(too_many).encode(),
                                            {"Content-Type": "application/json"})
    assert status == 400 and json.loads(body)["error"].startswith("Slurm refused the task: "), body
    accepted = slurm_gateway.submit({"user": "alice", "cmd": "true"})
    collector.wait_for(accepted, "QUEUED", timeout=60)  # events come in order: the refused one's would be first
    collector.stop.set()
    assert {json.loads(e.data)["id"] for e in collector.events if e.event == "state"} == {accepted}
    assert [s["id"] for s in json.loads(slurm_gateway.request("GET", "/v1/jobproxy/state")[2])["state"]] == [accepted]


def test_the_unix_socket_and_a_progress_bar_on_a_terminal(gateway_factory: Callable[..., Gateway],
                                                          tmp_path: Path) -> None:
    socket_path = tmp_path / "run" / "jobproxy.sock"
    gateway = gateway_factory(CONFIG.replace("[scheduler]", f'[gateway]\nsocket = "{socket_path}"\n[scheduler]',
                                             1)).start()
    url = f"unix:{socket_path}"
    ran = jobproxy(gateway, "submit", "--wait", "--", "sh", "-c", "echo over the socket; exit 7", url=url)
    assert (ran.returncode, ran.stdout) == (7, "over the socket\n"), ran.stderr
    ids = [jobproxy(gateway, "submit", "--", "sleep", f"0.{n}", url=url).stdout.strip() for n in (2, 5)]
    controller, terminal = os.openpty()  # `wait` for several tasks draws a progress bar on a terminal
    try:
        waited = subprocess.run([_command(), "--url", url, "wait", *ids], stdout=subprocess.PIPE, stderr=terminal,
                                env={**os.environ, "COLUMNS": "100"}, timeout=60)
        os.close(terminal)
        drawn = b""
        while chunk := _read_some(controller):
            drawn += chunk
    finally:
        os.close(controller)
    assert waited.returncode == 0
    assert b"waiting" in drawn and b"2/2" in drawn, drawn


def _read_some(fd: int) -> bytes:
    try:
        return os.read(fd, 65536)
    except OSError:  # EIO: the terminal's other end is closed
        return b""


@pytest.fixture(scope="module")
def unix_user() -> Iterator[str]:
    """A real Unix user for [run_as], created for the test and removed after."""
    if os.geteuid() != 0:
        pytest.skip("creating Unix users and running jobs as them needs root")
    name = "jp-logs-carol"
    subprocess.run(["userdel", "-r", name], capture_output=True)
    subprocess.run(["useradd", "--create-home", "--uid", "40020", name], check=True)
    yield name
    subprocess.run(["userdel", "-r", name], capture_output=True)


def test_with_run_as_the_gateway_shows_only_what_the_user_could_read(gateway_factory: Callable[..., Gateway],
                                                                     unix_user: str) -> None:
    state = Path(f"/home/{unix_user}").parent / f"{unix_user}-state"  # a state folder the user may pass through
    shutil.rmtree(state, ignore_errors=True)
    state.mkdir(mode=0o755)
    try:
        gateway = gateway_factory(CONFIG + f'[gateway]\nstate_dir = "{state}"\n[run_as]\nenabled = true\n'
                                  '[paths]\nroots = ["/home/{user}"]\n').start()
        home = Path(f"/home/{unix_user}")
        own = gateway.submit({"user": unix_user, "cmd": "id -un", "stdout": str(home / "out.txt")})
        assert gateway.wait(own)["code"] == "COMPLETE"
        assert gateway.request("GET", f"/v1/jobproxy/logs/{own}")[2] == f"{unix_user}\n".encode()
        secret = home / "admins-notes"  # root's private file in the user's home: the user cannot read it
        secret.write_text("the root password\n")
        secret.chmod(0o600)
        aimed = gateway.submit({"user": unix_user, "cmd": "true", "stdout": str(secret)})
        assert gateway.wait(aimed)["code"] in ("SYSTEM_ERROR", "EXECUTOR_ERROR")  # it could not open it either
        status, _, body = gateway.request("GET", f"/v1/jobproxy/logs/{aimed}")
        assert status == 403 and b"password" not in body, body
        assert b"not written by the task's account" in body
    finally:
        shutil.rmtree(state, ignore_errors=True)
