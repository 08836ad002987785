"""HTTPS (and mutual TLS), running jobs as their Unix users, confined paths, input limits, and a
property test that no value can change the structure of a job script."""
from __future__ import annotations

import json
from gateway.model import task_from_document
import os
import pwd
import shutil
import ssl
import subprocess
import tempfile
import urllib.request
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway import config as configuration
from gateway.app import create_app
from gateway.plugins import create_scheduler
from schedulers.base import Task
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
    for name, extension in (("server", "subjectAltName=IP:127.0.0.1,DNS:localhost"), ("client", "extendedKeyUsage=clientAuth")):
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
    gateway = gateway_factory(f'[gateway.https]\nport = {free_port()}\ncert = "{tmp_path}/no.pem"\nkey = "{tmp_path}/no.key"\n')
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


def test_jobs_run_as_their_users(gateway_factory: Callable[..., Gateway], unix_users: list[str], shared_state: Path) -> None:
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
        got, _, body = gateway.request("POST", "/v1/jobproxy/submit", json.dumps({"user": user, "cmd": "id"}).encode(), JSON)
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
    with pytest.raises(configuration.ConfigError, match=r"\$\.run_as\.enabled: the drmaa scheduler cannot run jobs as their users"):
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
    response = await client.post("/v1/jobproxy/submit", json={"user": "alice", "cmd": "true", field: path.format(home=home)})
    body = await response.json()
    assert response.status == 400 and words in json.dumps(body), body
    assert body["details"][0]["path"] == f"$.{field}"


async def test_paths_inside_the_roots_are_accepted(confined: Any) -> None:
    client, home = confined
    response = await client.post("/v1/jobproxy/submit", json={"user": "alice", "cmd": "true", "stdout": f"{home}/sub/o.txt"})
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
async def test_deep_or_entity_laden_bodies_are_refused(aiohttp_client: Any, tmp_path: Path, body: str, kind: str) -> None:
    client = await aiohttp_client(create_app(make_config(tmp_path)))
    response = await client.post("/v1/jobproxy/submit", data=body, headers={"Content-Type": kind})
    error = (await response.json())["error"]
    assert response.status == 400 and ("deeper than" in error or "DOCTYPE" in error), error


# ---- no value changes the job script's structure ---------------------------------------------------

TEXT = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), min_size=1, max_size=40)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(argv=st.lists(TEXT, min_size=1, max_size=6), shell=TEXT, folder=TEXT.filter(lambda s: "/" not in s and s not in (".", "..")))
def test_no_value_changes_the_script_structure(tmp_path: Path, argv: list[str], shell: str, folder: str) -> None:
    workdir = tmp_path / folder
    workdir.mkdir(exist_ok=True)
    task = task_from_document({"user": "u", "cmd": ["python3", "-c", "import json,sys; print(json.dumps(sys.argv[1:]))", *argv],
                               "cputime": 60}, "t1", str(workdir))
    text = script.render(script.load_template("schedulers.local"), {"task_id": script.quote(task.id), "workdir": script.quote(task.workdir),
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
