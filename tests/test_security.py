"""HTTPS (and mutual TLS), running jobs as their Unix users, confined paths, input limits, and a
property test that no value can change the structure of a job script."""
from __future__ import annotations

import json
import os
import pwd
import shutil
import socket
import ssl
import subprocess
import tempfile
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway import config as configuration
from gateway import policy
from gateway.app import create_app
from gateway.model import task_from_document
from gateway.plugins import create_scheduler
from schedulers import script

from .conftest import Gateway, free_port, make_config

JSON = {"Content-Type": "application/json"}


# ---- HTTPS ----------------------------------------------------------------------------------------


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


@pytest.fixture
def pki(tmp_path: Path) -> Path:
    """A CA, a server certificate for 127.0.0.1 and a client certificate, all made by the test."""
    folder = tmp_path / "pki"
    folder.mkdir()
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.pem", "-days", "1",
             "-subj", "/CN=JobProxy test CA", cwd=folder)
    for name, extension in (("server", "subjectAltName=IP:127.0.0.1,DNS:localhost"),
                            ("client", "extendedKeyUsage=clientAuth")):
        _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.csr",
                 "-subj", f"/CN={name}", cwd=folder)
        (folder / f"{name}.ext").write_text(extension + "\n")
        _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
                 "-out", f"{name}.pem", "-days", "1", "-extfile", f"{name}.ext", cwd=folder)
    return folder


def _https_get(url: str, pki: Path, client_cert: bool) -> tuple[int, bytes]:
    context = ssl.create_default_context(cafile=str(pki / "ca.pem"))
    if client_cert:
        context.load_cert_chain(str(pki / "client.pem"), str(pki / "client.key"))
    with urllib.request.urlopen(url, context=context, timeout=30) as response:
        return response.status, response.read()


def test_https_beside_http(gateway_factory: Callable[..., Gateway], pki: Path) -> None:
    port = free_port()
    gateway = gateway_factory(f"""
[gateway.https]
port = {port}
cert = "{pki / 'server.pem'}"
key = "{pki / 'server.key'}"
[scheduler]
poll_interval = 0.2
""").start()
    status, body = _https_get(f"https://127.0.0.1:{port}/v1/jobproxy/ping", pki, client_cert=False)
    assert status == 200 and json.loads(body)["status"] == "ok"
    task_id = gateway.submit({"user": "a", "cmd": "echo over http"})  # the plain HTTP listener, side by side
    status, body = _https_get(f"https://127.0.0.1:{port}/v1/jobproxy/state/{task_id}", pki, client_cert=False)
    assert json.loads(body)["id"] == task_id


def test_mutual_tls_requires_a_client_certificate(gateway_factory: Callable[..., Gateway], pki: Path) -> None:
    port = free_port()
    gateway = gateway_factory(f"""
[gateway]
http = true
[gateway.https]
port = {port}
cert = "{pki / 'server.pem'}"
key = "{pki / 'server.key'}"
client_ca = "{pki / 'ca.pem'}"
""").start()
    assert gateway.process is not None
    status, _ = _https_get(f"https://127.0.0.1:{port}/v1/jobproxy/ping", pki, client_cert=True)
    assert status == 200
    with pytest.raises((ssl.SSLError, urllib.error.URLError, ConnectionError)):
        _https_get(f"https://127.0.0.1:{port}/v1/jobproxy/ping", pki, client_cert=False)


def test_missing_certificate_stops_the_start(gateway_factory: Callable[..., Gateway], tmp_path: Path) -> None:
    gateway = gateway_factory(f'[gateway.https]\nport = {free_port()}\ncert = "{tmp_path}/no.pem"\n'
                              f'key = "{tmp_path}/no.key"\n')
    with pytest.raises(AssertionError, match=r"\$\.gateway\.https: cannot load the certificate"):
        gateway.start()


# ---- run as the submitting Unix user --------------------------------------------------------------


@pytest.fixture
def shared_state() -> Iterator[Path]:
    """A state folder outside pytest's private (mode 0700) temporary tree, so task users can reach it."""
    folder = Path(tempfile.mkdtemp(prefix="jobproxy-runas-"))
    folder.chmod(0o755)
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="module")
def unix_users() -> Iterator[list[str]]:
    """Two real Unix users, created for the test and removed after."""
    if os.geteuid() != 0:
        pytest.skip("creating Unix users and switching to them needs root")
    names = ["jp-test-alice", "jp-test-bob"]
    for name in names:
        subprocess.run(["userdel", "-r", name], capture_output=True)
        subprocess.run(["useradd", "--create-home", "--uid", str(40000 + names.index(name)), name], check=True)
    yield names
    for name in names:
        subprocess.run(["userdel", "-r", name], capture_output=True)


def test_jobs_run_as_their_users(gateway_factory: Callable[..., Gateway], unix_users: list[str],
                                 shared_state: Path) -> None:
    gateway = gateway_factory(f"""
[gateway]
state_dir = "{shared_state}"
[scheduler]
poll_interval = 0.2
[run_as]
enabled = true
deny = ["jp-test-bob"]
[paths]
roots = ["/home/{{user}}"]
""").start()
    alice = pwd.getpwnam(unix_users[0])
    output = f"{alice.pw_dir}/out.txt"
    task_id = gateway.submit({"user": alice.pw_name, "cmd": "id -u; id -g; echo $HOME; touch made-here; env | wc -l",
                              "stdout": output})
    state = gateway.wait(task_id)
    assert state["code"] == "COMPLETE", (state, Path(state["stderr"]).read_text())
    uid, gid, home, env_lines = Path(output).read_text().split()
    assert (int(uid), int(gid), home) == (alice.pw_uid, alice.pw_gid, alice.pw_dir)
    assert int(env_lines) < 12  # a clean environment, not the gateway's
    assert os.stat(output).st_uid == alice.pw_uid and os.stat(output).st_mode & 0o077 == 0
    made = Path(state["stderr"]).parent / "made-here"
    assert os.stat(made).st_uid == alice.pw_uid
    for user, status, words in (("root", 403, b"may not run as 'root'"), ("daemon", 403, b"may not run as 'daemon'"),
                                ("jp-test-bob", 403, b"may not run as 'jp-test-bob'"),
                                ("no-such-user-here", 400, b"no Unix user named 'no-such-user-here'")):
        got, _, body = gateway.request("POST", "/v1/jobproxy/submit", json.dumps({"user": user, "cmd": "id"}).encode(),
                                       JSON)
        assert got == status and words in body, body


def test_a_user_cannot_write_where_the_kernel_says_no(gateway_factory: Callable[..., Gateway], unix_users: list[str],
                                                      shared_state: Path) -> None:
    gateway = gateway_factory(f'[gateway]\nstate_dir = "{shared_state}"\n[scheduler]\npoll_interval = 0.2\n'
                              "[run_as]\nenabled = true\n").start()
    alice = unix_users[0]
    task_id = gateway.submit({"user": alice, "cmd": "echo x", "stdout": "/root/stolen.txt"})
    state = gateway.wait(task_id)
    assert state["code"] == "SYSTEM_ERROR" and "Permission denied" in state["description"]
    assert not Path("/root/stolen.txt").exists()


def test_drmaa_refuses_run_as_at_start_up(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("run_as is only possible for a gateway running as root")
    document = {"run_as": {"enabled": True}, "scheduler": {"type": "drmaa"}}
    with pytest.raises(configuration.ConfigError,
                       match=r"\$\.run_as\.enabled: the drmaa scheduler cannot run jobs as their users"):
        create_scheduler(configuration.from_document(document, tmp_path, "t"))


# ---- confined paths and input limits --------------------------------------------------------------


@pytest.fixture
async def confined(aiohttp_client: Any, tmp_path: Path) -> Any:
    home = tmp_path / "home" / "alice"
    (home / "sub").mkdir(parents=True)
    (home / "out-link").symlink_to("/etc/passwd")
    (home / "dir-link").symlink_to("/etc")
    document = {"gateway": {"state_dir": str(tmp_path / "state")},
                "paths": {"roots": [str(tmp_path / "home" / "{user}")]},
                "limits": {"cores": 1, "memory": 100, "cputime": 60}}
    return await aiohttp_client(create_app(configuration.from_document(document, tmp_path, "t"))), home


@pytest.mark.parametrize("field, path, words", [
    ("stdout", "{home}/../bob/out", "is outside the folders"),
    ("stdout", "{home}/sub/../../../x", "is outside the folders"),
    ("stderr", "{home}/out-link", "is outside the folders"),
    ("stdout", "{home}/dir-link/x", "is outside the folders"),
    ("stdout", "/dev/null", "is outside the folders"),
    ("stdout", "{home}/sub", "is not a regular file"),
    ("stdout", "relative/out", "must be an absolute path"),
])
async def test_paths_outside_the_users_roots_are_refused(confined: Any, field: str, path: str, words: str) -> None:
    client, home = confined
    response = await client.post("/v1/jobproxy/submit",
                                 json={"user": "alice", "cmd": "true", field: path.format(home=home)})
    body = await response.json()
    assert response.status == 400 and words in json.dumps(body), body
    assert body["details"][0]["path"] == f"$.{field}"


async def test_paths_inside_the_roots_are_accepted(confined: Any) -> None:
    client, home = confined
    response = await client.post("/v1/jobproxy/submit",
                                 json={"user": "alice", "cmd": "true", "stdout": f"{home}/sub/o.txt"})
    assert response.status == 200


@pytest.mark.parametrize("field, value, words", [
    ("cores", 2, "$.cores: 2 exceeds this site's limit of 1 cores"),
    ("memory", 101, "$.memory: 101 exceeds this site's limit of 100 MiB"),
    ("cputime", 61, "$.cputime: 61 exceeds this site's limit of 60 CPU seconds"),
])
async def test_site_limits_name_the_limit(confined: Any, field: str, value: int, words: str) -> None:
    client, _ = confined
    response = await client.post("/v1/jobproxy/submit", json={"user": "alice", "cmd": "true", field: value})
    assert response.status == 400 and words in (await response.json())["error"]


@pytest.mark.parametrize("body, kind", [
    ("[" * 100 + "]" * 100, "application/json"),
    ('{"user": "a", "cmd": "x", "container": ' + '{"a": ' * 50 + "1" + "}" * 50 + "}", "application/json"),
    ("<task>" + "<a>" * 100 + "</a>" * 100 + "</task>", "application/xml"),
    ('<?xml version="1.0"?><!DOCTYPE t [<!ENTITY x "y">]><task><user>&x;</user></task>', "application/xml"),
])
async def test_deep_or_entity_laden_bodies_are_refused(aiohttp_client: Any, tmp_path: Path, body: str,
                                                       kind: str) -> None:
    client = await aiohttp_client(create_app(make_config(tmp_path)))
    response = await client.post("/v1/jobproxy/submit", data=body, headers={"Content-Type": kind})
    error = (await response.json())["error"]
    assert response.status == 400 and ("deeper than" in error or "DOCTYPE" in error), error


# ---- no value changes the job script's structure ---------------------------------------------------

TEXT = st.text(st.characters(blacklist_categories=["Cs"], blacklist_characters="\x00"), min_size=1, max_size=40)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(argv=st.lists(TEXT, min_size=1, max_size=6), shell=TEXT,
       folder=TEXT.filter(lambda s: "/" not in s and s not in (".", "..")))
def test_no_value_changes_the_script_structure(tmp_path: Path, argv: list[str], shell: str, folder: str) -> None:
    workdir = tmp_path / folder
    workdir.mkdir(exist_ok=True)
    task = task_from_document({"user": "u",
                               "cmd": ["python3", "-c", "import json,sys; print(json.dumps(sys.argv[1:]))", *argv],
                               "cputime": 60}, "t1", str(workdir))
    text = script.render(script.load_template("schedulers.local"),
                         {"task_id": script.quote(task.id), "workdir": script.quote(task.workdir),
                          "resources": script.describe_request(task),
                          "run": script.run_block(task, script.command_argv(task))})
    job = tmp_path / "job.sh"
    job.write_text(text)
    assert subprocess.run(["bash", "-n", str(job)], capture_output=True).returncode == 0
    result = subprocess.run(["bash", str(job)], capture_output=True, timeout=30)
    assert json.loads(result.stdout) == argv
    assert (workdir / script.EXIT_FILE).read_text() == "0\n"
    shell_task = task_from_document({"user": "u", "cmd": shell}, "t2", str(workdir))
    body = script.run_block(shell_task, script.command_argv(shell_task))
    job.write_text(f"{body}\n")
    assert subprocess.run(["bash", "-n", str(job)], capture_output=True).returncode == 0
    assert script.command_argv(shell_task)[2] == shell
    assert f"/bin/sh -c {script.quote(shell)}\n" in body


# ---- auth off: local callers cannot run commands as the gateway's root ----------------------------
# The callers are real unprivileged users running curl (over TCP or the Unix socket) under runuser;
# the gateway is a real `jobproxy serve` running as root with auth off.

NOBODY = pwd.getpwnam("nobody") if os.geteuid() == 0 else None


@pytest.fixture(scope="module")
def callers() -> Iterator[list[str]]:
    """Two real unprivileged Unix users, created for these tests and removed after (names of their
    own: other test sessions on the machine create and remove jp-test-alice and jp-test-bob)."""
    if os.geteuid() != 0:
        pytest.skip("creating Unix users and switching to them needs root")
    names = ["jp-sec-mallory", "jp-sec-trent"]
    for uid, name in enumerate(names, start=40300):
        subprocess.run(["userdel", "-r", name], capture_output=True)
        subprocess.run(["useradd", "--create-home", "--uid", str(uid), name], check=True)
    yield names
    for name in names:
        subprocess.run(["userdel", "-r", name], capture_output=True)


def _need_root_and_curl() -> None:
    if os.geteuid() != 0:
        pytest.skip("a gateway running as root, and callers switching to other users, need root")
    if shutil.which("curl") is None:
        reason = "these tests call the gateway with curl (tests/run.sh installs it)"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(reason)
        pytest.skip(reason)


def curl_as(user: str, *args: str) -> tuple[int, Any]:
    """Run curl as `user` (`runuser -u USER --`); answer the status and the body (JSON if it is)."""
    done = subprocess.run(["runuser", "-u", user, "--", "curl", "-sS", "-w", "\n%{http_code}", *args],
                          check=False, capture_output=True, text=True, timeout=60, cwd="/")
    assert done.returncode == 0, done.stderr
    body, _, status = done.stdout.rpartition("\n")
    try:
        return int(status), json.loads(body)
    except ValueError:
        return int(status), body


def submit_as(user: str, task: dict[str, Any], *target: str) -> tuple[int, Any]:
    """POST `task` to the gateway as `user`; `target` is the URL (and for the socket, --unix-socket PATH)."""
    *options, url = target
    return curl_as(user, *options, "-H", "Content-Type: application/json", "-d", json.dumps(task),
                   f"{url}/v1/jobproxy/submit")


@pytest.fixture
def no_new_file() -> Iterator[Path]:
    path = Path("/etc/new-file")
    assert not path.exists(), "remove /etc/new-file before running the tests"
    yield path
    path.unlink(missing_ok=True)


def test_over_tcp_without_auth_jobs_run_as_nobody(gateway_factory: Callable[..., Gateway], callers: list[str],
                                                  no_new_file: Path) -> None:
    """The embedded default (no config at all), as root: a local user's job runs as nobody, and an
    output path outside the task root is refused before anything runs."""
    _need_root_and_curl()
    assert NOBODY is not None
    gateway = gateway_factory(None).start()
    mallory = callers[0]
    status, body = submit_as(mallory, {"user": "x", "cmd": "id; touch /etc/new-file"}, gateway.url)
    assert status == 200, body
    state = gateway.wait(body["id"])
    assert state["code"] == "EXECUTOR_ERROR" and state["user"] == "x", state
    assert Path(state["stdout"]).read_text().startswith(f"uid={NOBODY.pw_uid}(nobody) gid={NOBODY.pw_gid}(")
    assert "Permission denied" in Path(state["stderr"]).read_text()
    assert os.stat(Path(state["stdout"]).parent).st_uid == NOBODY.pw_uid  # its folder is the account's
    status, body = submit_as(mallory, {"user": "x", "cmd": "id", "stdout": str(no_new_file)}, gateway.url)
    assert status == 400 and body["details"][0]["path"] == "$.stdout", body
    assert "is outside the folders this site allows" in body["error"]
    assert not no_new_file.exists()


def test_allow_root_jobs_opts_in_to_root(gateway_factory: Callable[..., Gateway], callers: list[str],
                                         no_new_file: Path) -> None:
    _need_root_and_curl()
    gateway = gateway_factory("[run_as]\nallow_root_jobs = true\n").start()
    status, body = submit_as(callers[0], {"user": "x", "cmd": "id -u"}, gateway.url)
    assert status == 200, body
    state = gateway.wait(body["id"])
    assert state["code"] == "COMPLETE" and Path(state["stdout"]).read_text() == "0\n"
    status, body = submit_as(callers[0], {"user": "x", "cmd": "id", "stdout": str(no_new_file)}, gateway.url)
    assert status == 400 and body["details"][0]["path"] == "$.stdout", body  # still confined without auth
    assert not no_new_file.exists()


def test_an_account_the_admin_names(gateway_factory: Callable[..., Gateway], callers: list[str],
                                    tmp_path: Path) -> None:
    _need_root_and_curl()
    account = pwd.getpwnam(callers[1])
    gateway = gateway_factory(f'[run_as]\naccount = "{account.pw_name}"\n[paths]\nroots = ["{tmp_path}"]\n').start()
    task_id = gateway.submit({"user": "x", "cmd": "id -un; echo $HOME; env | wc -l"})
    state = gateway.wait(task_id)
    assert state["code"] == "COMPLETE", state
    name, home, env_lines = Path(state["stdout"]).read_text().split()
    assert (name, home) == (account.pw_name, account.pw_dir) and int(env_lines) < 12  # a clean environment
    assert os.stat(state["stdout"]).st_uid == account.pw_uid


def test_unreachable_task_root_stops_the_start(gateway_factory: Callable[..., Gateway], tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("jobs run as nobody only for a gateway running as root")
    closed = tmp_path / "closed"
    closed.mkdir(mode=0o700)
    closed.chmod(0o700)
    gateway = gateway_factory(f'[gateway]\nstate_dir = "{closed}/state"\n')
    with pytest.raises(AssertionError, match=rf"(?s)exited with 2:.*jobs run as 'nobody', who cannot reach the task "
                                             rf"folders in {closed}/state/tasks \({closed} is closed to it\)"):
        gateway.start()


def test_unix_socket_callers_are_who_the_kernel_says(gateway_factory: Callable[..., Gateway], callers: list[str],
                                                     tmp_path: Path) -> None:
    _need_root_and_curl()
    alice, bob = callers
    path = tmp_path / "run" / "jobproxy.sock"
    gateway = gateway_factory(f'[gateway]\nsocket = "{path}"\n[scheduler]\npoll_interval = 0.2\n'
                              '[tes]\nimages = [{ match = "*", run = "host" }]\n').start()
    assert stat_mode(path) == 0o666 and stat_mode(path.parent) == 0o755
    over = ("--unix-socket", str(path), "http://localhost")
    status, body = submit_as(alice, {"user": alice, "cmd": "id -un"}, *over)
    assert status == 200, body
    mine = body["id"]
    for other in (bob, "x", "root"):
        status, body = submit_as(alice, {"user": other, "cmd": "id"}, *over)
        assert status == 403 and f"you are '{alice}'" in body["error"], body
    state = gateway.wait(mine)
    assert state["user"] == alice and Path(state["stdout"]).read_text() == "nobody\n"  # who asked, not who runs
    status, body = curl_as(alice, *over[:2], f"{over[2]}/ga4gh/tes/v1/tasks", "-H", "Content-Type: application/json",
                           "-d", json.dumps({"executors": [{"image": "any", "command": ["true"]}]}))
    assert status == 200, body
    tes_task = body["id"]
    status, body = curl_as(alice, *over[:2], f"{over[2]}/ga4gh/tes/v1/tasks/{tes_task}?view=BASIC")
    assert status == 200 and body["logs"][0]["metadata"]["user"] == alice and "tags" not in body, body

    status, body = curl_as(bob, *over[:2], f"{over[2]}/v1/jobproxy/state")
    assert status == 200 and body["state"] == [], body  # bob sees none of alice's tasks
    for method, route in (("GET", f"/v1/jobproxy/state/{mine}"), ("DELETE", f"/v1/jobproxy/delete/{mine}"),
                          ("GET", f"/ga4gh/tes/v1/tasks/{tes_task}")):
        status, body = curl_as(bob, "-X", method, *over[:2], over[2] + route)
        assert status == 404, (route, body)
    status, body = curl_as(alice, *over[:2], f"{over[2]}/v1/jobproxy/state?user={bob}")
    assert status == 200 and {s["id"] for s in body["state"]} == {mine, tes_task}  # ?user= is for admins only

    status, body = submit_as("root", {"user": bob, "cmd": "true"}, *over)  # root may name anyone
    assert status == 200, body
    status, body = curl_as("root", *over[:2], f"{over[2]}/v1/jobproxy/state")
    assert status == 200 and {s["user"] for s in body["state"]} == {alice, bob}
    status, _ = curl_as(alice, "-X", "DELETE", *over[:2], f"{over[2]}/v1/jobproxy/delete/{mine}")
    assert status == 204
    gateway.stop()
    assert not path.exists()  # the gateway removes its socket when it stops


def stat_mode(path: Path) -> int:
    return os.stat(path).st_mode & 0o7777


def test_a_stale_socket_is_replaced_a_live_one_is_not(gateway_factory: Callable[..., Gateway],
                                                      tmp_path: Path) -> None:
    _need_root_and_curl()
    path = tmp_path / "jobproxy.sock"
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(path))
    stale.close()  # its file stays, with nobody listening
    first = gateway_factory(f'[gateway]\nsocket = "{path}"\n').start()
    status, body = curl_as("nobody", "--unix-socket", str(path), "http://localhost/v1/jobproxy/ping")
    assert status == 200 and body["status"] == "ok"
    (tmp_path / "second").mkdir()
    (tmp_path / "third").mkdir()
    second = Gateway(tmp_path / "second", f'[gateway]\nsocket = "{path}"\n')
    with pytest.raises(AssertionError, match="another process is listening on"):
        second.start()
    assert not (tmp_path / "second" / "jobproxy-state").exists()  # stopped before touching anything
    status, body = curl_as("nobody", "--unix-socket", str(path), "http://localhost/v1/jobproxy/ping")
    assert status == 200  # the first one still serves on it
    first.stop()
    path.write_text("not a socket")
    third = Gateway(tmp_path / "third", f'[gateway]\nsocket = "{path}"\n')
    with pytest.raises(AssertionError, match="exists and is not a socket"):
        third.start()
    assert path.read_text() == "not a socket"


def test_schedulers_that_cannot_run_jobs_as_another_account_refuse_to_start(tmp_path: Path) -> None:
    """DRMAA cannot run a job as another account: under a root gateway with auth off it refuses
    to start, naming the fixes; each fix lets it past that check."""
    if os.geteuid() != 0:
        pytest.skip("jobs run as nobody only for a gateway running as root")
    document: dict[str, Any] = {"scheduler": {"type": "drmaa"}}
    with pytest.raises(configuration.ConfigError, match=r"runs its jobs as 'nobody', never as root, but the drmaa "
                       r"scheduler cannot run jobs as another account: turn auth on \(\[auth\] enabled = true\), "
                       r"set \[run_as\] allow_root_jobs = true .*or run the gateway as an unprivileged user"):
        create_scheduler(configuration.from_document(document, tmp_path, "t"))
    for fix in ({"run_as": {"allow_root_jobs": True}}, {"auth": {"enabled": True}}):
        try:
            create_scheduler(configuration.from_document({**document, **fix}, tmp_path, "t"))
        except configuration.ConfigError as exc:  # the DRM itself may be missing here: not this check
            assert "another account" not in str(exc)
    with pytest.raises(configuration.ConfigError, match=r"\$\.run_as\.account: jobs run as 'nobody', but the drmaa"):
        create_scheduler(configuration.from_document({**document, "run_as": {"account": "nobody"}}, tmp_path, "t"))


def test_containers_under_nobody_need_an_explicit_choice(tmp_path: Path, callers: list[str]) -> None:
    if os.geteuid() != 0:
        pytest.skip("jobs run as nobody only for a gateway running as root")
    document: dict[str, Any] = {"scheduler": {"type": "local", "container": {"runtime": "docker"}}}
    with pytest.raises(configuration.ConfigError, match=r"'nobody' cannot use the container runtime \(docker\): "
                       r"name an account that may"):
        create_scheduler(configuration.from_document(document, tmp_path, "t"))
    for choice, account in (({"allow_root_jobs": True}, None), ({"account": callers[0]}, callers[0])):
        scheduler = create_scheduler(configuration.from_document({**document, "run_as": choice}, tmp_path, "t"))
        assert scheduler.account == account


@pytest.mark.parametrize("run_as, words", [
    ({"account": "no-such-account-here"}, "$.run_as.account: there is no Unix account named 'no-such-account-here'"),
    ({"account": "root"}, "$.run_as.account: 'root' is root; to run jobs as root, set [run_as] allow_root_jobs"),
])
def test_unusable_accounts_stop_the_start(tmp_path: Path, run_as: dict[str, Any], words: str) -> None:
    with pytest.raises(configuration.ConfigError) as raised:
        create_scheduler(configuration.from_document({"run_as": run_as}, tmp_path, "t"))
    assert words in str(raised.value)


def test_who_jobs_run_as(tmp_path: Path) -> None:
    """The rules of gateway.policy.job_account and confinement_roots, for this process's uid."""
    def config(**document: Any) -> configuration.Config:
        return configuration.from_document(document, tmp_path, "t")

    root = os.geteuid() == 0
    assert policy.job_account(config()) == (("nobody", False) if root else (None, False))
    assert policy.job_account(config(auth={"enabled": True})) == (None, False)
    assert policy.job_account(config(run_as={"allow_root_jobs": True})) == (None, False)
    assert policy.confinement_roots(config()) == (str((tmp_path / "jobproxy-state" / "tasks").resolve()),)
    assert policy.confinement_roots(config(paths={"roots": ["/scratch/{user}"]})) == ("/scratch/{user}",)
    assert policy.confinement_roots(config(auth={"enabled": True})) is None


def test_the_embedded_default_as_root_from_a_closed_folder_just_works(tmp_path: Path) -> None:
    """`jobproxy serve` without a config file, as root, from a folder nobody cannot pass (e.g. a
    clone under /root): it starts, and its jobs run as nobody in task folders it can reach."""
    if os.geteuid() != 0:
        pytest.skip("jobs run as nobody only for a gateway running as root")
    closed = tmp_path / "closed"
    closed.mkdir()
    closed.chmod(0o700)
    made = [p for p in (policy.FIRST_RUN_TASK_ROOT.parent, policy.FIRST_RUN_TASK_ROOT) if not p.exists()]
    gateway = Gateway(closed, None)
    try:
        gateway.start()
        task_id = gateway.submit({"user": "x", "cmd": "id -un"})
        state = gateway.wait(task_id)
        assert state["code"] == "COMPLETE" and state["stdout"] == f"{policy.FIRST_RUN_TASK_ROOT}/{task_id}/stdout"
        assert Path(state["stdout"]).read_text() == "nobody\n"
        assert f"task folders are in {policy.FIRST_RUN_TASK_ROOT} instead" in gateway.log.read_text()
        assert (closed / "jobproxy-state" / "jobproxy.db").exists()  # the store stays where it was
        assert gateway.request("DELETE", f"/v1/jobproxy/delete/{task_id}")[0] == 204
        assert not Path(state["stdout"]).parent.exists()
    finally:
        gateway.stop()
        for folder in reversed(made):
            shutil.rmtree(folder, ignore_errors=True)


def test_with_auth_on_the_socket_needs_no_token_but_tcp_does(gateway_factory: Callable[..., Gateway],
                                                            callers: list[str], tmp_path: Path) -> None:
    _need_root_and_curl()
    path = tmp_path / "jobproxy.sock"
    gateway = gateway_factory(f'[gateway]\nsocket = "{path}"\n[auth]\nenabled = true\n'
                              '[scheduler]\npoll_interval = 0.2\n').start()
    mallory = callers[0]
    status, body = submit_as(mallory, {"user": mallory, "cmd": "id -un"}, "--unix-socket", str(path), "http://localhost")
    assert status == 200, body
    status, state = curl_as(mallory, "--unix-socket", str(path), f"http://localhost/v1/jobproxy/state/{body['id']}")
    assert status == 200 and state["user"] == mallory
    status, body = submit_as(mallory, {"user": mallory, "cmd": "id"}, gateway.url)
    assert status == 401, body
