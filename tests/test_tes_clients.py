"""Real TES clients against a real `jobproxy serve` process: py-tes and Snakemake's TES executor.

Versions: snakemake-executor-plugin-tes 0.1.3 requires py-tes >=0.4.2,<0.5, so both tests use
py-tes 0.4.2 (which imports `six` without declaring it). py-tes 0.4 calls `{url}/v1/tasks...`, so
a client made with the gateway's URL uses the /v1 prefix and one made with `{url}/ga4gh/tes` the
/ga4gh/tes/v1 prefix; both are exercised.

Snakemake (9.x) with the TES plugin assumes no shared file system: it needs a default storage
provider, and the files of a rule reach the task through that provider inside the job, not as TES
inputs/outputs. Here that is snakemake-storage-plugin-fs (rsync) on a folder of this machine that
the gateway's `[tes] host_writable` lets the sandboxed executors write; the job script arrives as
a TES `content` input, and the job installs the storage plugin with pip, as the plugin's job
script always does.

No test reaches the package index: tests/run.sh fetches once, into $JOBPROXY_TEST_DEPS (default
.venv/test-deps), the wheels of the storage plugins Snakemake's jobs install (`wheels/`; the jobs'
pip runs with PIP_NO_INDEX and PIP_FIND_LINKS) and a virtualenv with py-tes 1.1 (`py-tes-1.1/`).
"""
from __future__ import annotations

import json
import os
import pwd
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from .conftest import IN_CI, Gateway, writable_by_jobs

tes = pytest.importorskip("tes", reason="py-tes is a test dependency: pip install -e '.[test]'")
# py-tes 0.4 passes user=None/password=None to requests when it has no credentials
pytestmark = [pytest.mark.e2e, pytest.mark.filterwarnings("ignore:Non-string:DeprecationWarning")]
VENV_BIN = str(Path(sys.executable).parent)
TEST_DEPS = Path(os.environ.get("JOBPROXY_TEST_DEPS", str(Path(sys.prefix) / "test-deps")))


def need_deps(path: Path, what: str) -> Path:
    """`path` under TEST_DEPS, which tests/run.sh fills; skip (fail in CI) when it is not there."""
    if not path.exists():
        reason = f"needs {what} in {path} (tests/run.sh fetches it once, so that no test reaches the package index)"
        if IN_CI:
            pytest.fail(reason)
        pytest.skip(reason)
    return path


def need(*tools: str) -> None:
    missing = [t for t in tools if shutil.which(t) is None]
    if missing:
        reason = f"needs {', '.join(missing)} (tests/run.sh installs them)"
        if IN_CI:
            pytest.fail(reason)
        pytest.skip(reason)


def start(gateway_factory: Callable[..., Gateway], tes_table: str, sections: str = "",
          env: dict[str, str] | None = None) -> Gateway:
    """A gateway with auth off: run as root, its jobs run as nobody. file:// outputs may go anywhere
    the job's account may write."""
    need("bwrap")
    config = f"""
[scheduler]
type = "local"
poll_interval = 0.2
[paths]
roots = ["/"]
{sections}
[tes]
{tes_table}
"""
    # executors run on the host: they find the site's software (here: this virtualenv) on PATH
    path = {"PATH": f"{VENV_BIN}:{os.environ.get('PATH', '/usr/bin:/bin')}"}
    return gateway_factory(config, env={**path, **(env or {})}).start()


def test_py_tes(gateway_factory: Callable[..., Gateway], tmp_path: Path) -> None:
    gateway = start(gateway_factory, 'images = [{ match = "ubuntu*", run = "host" }]')
    short, long = tes.HTTPClient(gateway.url, timeout=30), tes.HTTPClient(f"{gateway.url}/ga4gh/tes", timeout=30)
    info = short.get_service_info()
    assert info.name == "JobProxy" and info.storage == ["file:///"]
    results = writable_by_jobs(tmp_path / "results")

    task = tes.Task(
        name="py-tes demo", tags={"suite": "py-tes"},
        inputs=[tes.Input(path="/tmp/in.txt", content="hello from py-tes\n")],
        outputs=[tes.Output(url=f"file://{results}/copy.txt", path="/tmp/out/copy.txt")],
        resources=tes.Resources(cpu_cores=1, ram_gb=0.5),
        executors=[tes.Executor(image="ubuntu:22.04",
                                command=["/bin/sh", "-c", "cat /tmp/in.txt; cp /tmp/in.txt /tmp/out/copy.txt"]),
                   tes.Executor(image="ubuntu:22.04", command=["/bin/sh", "-c", "echo failing >&2; exit 7"])])
    task_id = long.create_task(task)
    assert short.wait(task_id, timeout=60).state == "EXECUTOR_ERROR"
    full = long.get_task(task_id, view="FULL")
    assert [log.exit_code for log in full.logs[0].logs] == [0, 7]
    assert full.logs[0].logs[0].stdout == "hello from py-tes\n" and full.logs[0].logs[1].stderr == "failing\n"
    assert full.inputs[0].content == "hello from py-tes\n" and full.tags == {"suite": "py-tes"}
    assert full.logs[0].outputs[0].size_bytes == 18 and (results / "copy.txt").read_text() == "hello from py-tes\n"
    basic = short.get_task(task_id, view="BASIC")
    assert basic.inputs[0].content is None and basic.logs[0].logs[1].stdout is None and basic.name == "py-tes demo"
    minimal = short.get_task(task_id, view="MINIMAL")
    assert (minimal.id, minimal.state, minimal.executors) == (task_id, "EXECUTOR_ERROR", None)
    assert gateway.state(task_id)["code"] == "EXECUTOR_ERROR" and gateway.state(task_id)["exit_code"] == 7

    ok_id = short.create_task(tes.Task(executors=[tes.Executor(image="ubuntu", command=["echo", "ok"])]))
    assert short.wait(ok_id, timeout=60).state == "COMPLETE"
    assert short.get_task(ok_id, view="FULL").logs[0].logs[0].stdout == "ok\n"
    assert gateway.state(ok_id)["code"] == "COMPLETE"

    running = long.create_task(tes.Task(executors=[tes.Executor(image="ubuntu", command=["sleep", "60"])]))
    gateway.wait(running, lambda s: s["code"] == "RUNNING")
    long.cancel_task(running)
    assert long.wait(running, timeout=30).state == "CANCELED" and gateway.state(running)["code"] == "CANCELED"
    long.cancel_task(ok_id)  # a task that has ended: 200, and it stays as it was
    assert short.get_task(ok_id).state == "COMPLETE"

    v1_id = gateway.submit({"user": "anonymous", "cmd": "echo from v1; exit 3"})
    gateway.wait(v1_id)
    from_v1 = short.get_task(v1_id, view="FULL")
    assert from_v1.state == "EXECUTOR_ERROR" and from_v1.logs[0].logs[0].exit_code == 3
    assert from_v1.logs[0].logs[0].stdout == "from v1\n"

    pages, token = [], None
    while True:
        page = short.list_tasks(view="BASIC", page_size=2, page_token=token)
        pages.append([t.id for t in page.tasks])
        token = page.next_page_token
        if not token:
            break
    assert pages == [[v1_id, running], [ok_id, task_id]]
    assert [t.state for t in long.list_tasks().tasks] == ["EXECUTOR_ERROR", "CANCELED", "COMPLETE", "EXECUTOR_ERROR"]


def chain_snakefile(*rules: str) -> str:
    """A Snakemake workflow of `rules` in a chain: the first reads data/in.txt, each copies what
    the one before wrote and appends its own name; the last writes results/c.txt, which rule `all`
    asks for. The others write results/RULE.txt."""
    text = 'rule all:\n    input: "results/c.txt"\n'
    source = "data/in.txt"
    for number, rule in enumerate(rules, start=1):
        target = "results/c.txt" if number == len(rules) else f"results/{rule}.txt"
        text += (f'\nrule {rule}:\n    input: "{source}"\n    output: "{target}"\n'
                 f'    shell: "cat {{input}} > {{output}}; echo {rule} >> {{output}}"\n')
        source = target
    return text


def test_snakemake_workflow(gateway_factory: Callable[..., Gateway], tmp_path: Path) -> None:
    need("rsync", "bwrap")
    wheels = need_deps(TEST_DEPS / "wheels", "the wheels of Snakemake's storage plugins")
    storage = tmp_path / "storage"  # the shared folder: the nodes see it at the same path
    (storage / "data").mkdir(parents=True)
    (storage / "data" / "in.txt").write_text("input\n")
    # each job pip-installs the storage plugin: from the wheels fetched once, never from the index
    offline = {"PIP_NO_INDEX": "1", "PIP_FIND_LINKS": str(wheels), "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    # The jobs run Snakemake from this virtualenv, whose interpreter may live where nobody cannot
    # reach it (e.g. pyenv under /root): this site runs its jobs as root, explicitly.
    gateway = start(gateway_factory, f'images = [{{ match = "snakemake/snakemake:*", run = "host" }}]\n'
                                     f'host_writable = ["{storage}"]\nhost_readable = ["{sys.prefix}", "{wheels}"]',
                    "[run_as]\nallow_root_jobs = true", env=offline)
    project = tmp_path / "project"
    project.mkdir()
    (project / "Snakefile").write_text(chain_snakefile("first", "second", "third"))
    began = time.monotonic()
    result = subprocess.run(
        [f"{VENV_BIN}/snakemake", "--executor", "tes", "--tes-url", f"{gateway.url}/ga4gh/tes", "--jobs", "1",
         "--default-storage-provider", "fs", "--default-storage-prefix", str(storage),
         "--seconds-between-status-checks", "1"],
        cwd=project, capture_output=True, text=True, timeout=900,
        env={**os.environ, "PATH": f"{VENV_BIN}:{os.environ.get('PATH', '/usr/bin:/bin')}"})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:] + gateway.log.read_text()[-3000:]
    assert (storage / "results" / "c.txt").read_text() == "input\nfirst\nsecond\nthird\n"

    status, _, body = gateway.request("GET", "/ga4gh/tes/v1/tasks?view=BASIC")
    tasks = json.loads(body)["tasks"]
    assert status == 200
    assert [t["name"] for t in tasks] == ["snakejob.third.1.sh", "snakejob.second.2.sh", "snakejob.first.3.sh"]
    for task in tasks:
        assert task["state"] == "COMPLETE" and task["logs"][0]["logs"][0]["exit_code"] == 0
        assert task["inputs"][0]["path"] == "/tmp/run_snakemake.sh"
        assert gateway.state(task["id"])["code"] == "COMPLETE"
        _, _, body = gateway.request("GET", f"/ga4gh/tes/v1/tasks/{task['id']}?view=FULL")
        log = json.loads(body)["logs"][0]["logs"][0]
        output = log.get("stdout", "") + log.get("stderr", "")
        assert f"Looking in links: {wheels}" in output and "Successfully installed" in output, output[-3000:]
    print(f"snakemake: 3 rules through TES in {time.monotonic() - began:.0f} s")


PY_TES_1_1 = """
import sys, tes
client = tes.HTTPClient(sys.argv[1], timeout=30)   # probes /ga4gh/tes/v1, then /v1
assert client.get_service_info().type["artifact"] == "tes"
task = tes.Task(name="new-py-tes", tags={"k": "v"},
                inputs=[tes.Input(path="/tmp/a.txt", content="A\\n")],
                resources=tes.Resources(cpu_cores=1, ram_gb=0.25, backend_parameters={"cputime": "10"},
                                        backend_parameters_strict=True),
                executors=[tes.Executor(image="ubuntu", command=["cat", "/tmp/a.txt"], ignore_error=False)])
task_id = client.create_task(task)
assert client.wait(task_id, timeout=60).state == "COMPLETE"
for view in ("MINIMAL", "BASIC", "FULL"):
    got = client.get_task(task_id, view=view)
    assert got.state == "COMPLETE", view
full = client.get_task(task_id, view="FULL")
assert full.logs[0].logs[0].exit_code == 0 and full.logs[0].logs[0].stdout == "A\\n"
assert full.resources.backend_parameters == {"cputime": "10"} and full.executors[0].ignore_error is False
listed = client.list_tasks(view="FULL", page_size=1)
assert [t.id for t in listed.tasks] == [task_id] and listed.next_page_token is None
print("py-tes", tes.__version__ if hasattr(tes, "__version__") else "?", "ok")
"""


@pytest.fixture(scope="module")
def py_tes_1_1() -> Path:
    """py-tes 1.1 in a virtualenv of its own (tests/run.sh makes it): the Snakemake plugin pins
    py-tes <0.5 in ours."""
    python = need_deps(TEST_DEPS / "py-tes-1.1" / "bin" / "python", "a virtualenv with py-tes 1.1")
    found = subprocess.run([str(python), "-c", "from importlib.metadata import version; print(version('py-tes'))"],
                           capture_output=True, text=True, timeout=60)
    assert found.returncode == 0 and found.stdout.startswith("1.1."), found.stdout + found.stderr
    return python


def test_py_tes_1_1(gateway_factory: Callable[..., Gateway], py_tes_1_1: Path) -> None:
    gateway = start(gateway_factory, 'images = [{ match = "ubuntu*", run = "host" }]')
    result = subprocess.run([str(py_tes_1_1), "-c", PY_TES_1_1, gateway.url],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "ok" in result.stdout, \
        result.stdout + result.stderr + gateway.log.read_text()[-2000:]


@pytest.fixture
def carol() -> Iterator[pwd.struct_passwd]:
    """A real Unix user, and a state folder she can reach (pytest's own tree is private)."""
    if os.geteuid() != 0:
        pytest.skip("creating Unix users and switching to them needs root")
    subprocess.run(["userdel", "-r", "jp-tes-carol"], capture_output=True)
    subprocess.run(["useradd", "--create-home", "--uid", "40010", "jp-tes-carol"], check=True)
    yield pwd.getpwnam("jp-tes-carol")
    subprocess.run(["userdel", "-r", "jp-tes-carol"], capture_output=True)


def test_tes_tasks_run_as_their_users(gateway_factory: Callable[..., Gateway], carol: pwd.struct_passwd) -> None:
    need("bwrap")
    state = Path(tempfile.mkdtemp(prefix="jobproxy-tes-runas-"))
    state.chmod(0o755)
    try:
        gateway = gateway_factory(f"""
[gateway]
state_dir = "{state}"
[scheduler]
poll_interval = 0.2
[run_as]
enabled = true
[paths]
roots = ["/home/{{user}}"]
[tes]
images = [{{ match = "*", run = "host" }}]
""").start()
        home = Path(carol.pw_dir)
        (home / "in.txt").write_text("carol's data\n")
        os.chown(home / "in.txt", carol.pw_uid, carol.pw_gid)
        client = tes.HTTPClient(gateway.url, timeout=30)
        task_id = client.create_task(tes.Task(
            tags={"user": carol.pw_name},
            inputs=[tes.Input(url=f"file://{home}/in.txt", path="/data/in.txt")],
            outputs=[tes.Output(url=f"file://{home}/out.txt", path="/data/out.txt")],
            executors=[tes.Executor(image="any", command=["/bin/sh", "-c", "id -u; cp /data/in.txt /data/out.txt"])]))
        assert client.wait(task_id, timeout=60).state == "COMPLETE"
        assert client.get_task(task_id, view="FULL").logs[0].logs[0].stdout == f"{carol.pw_uid}\n"
        assert (home / "out.txt").read_text() == "carol's data\n" and (home / "out.txt").stat().st_uid == carol.pw_uid
        status, _, body = gateway.request("POST", "/ga4gh/tes/v1/tasks", json.dumps({
            "tags": {"user": carol.pw_name}, "outputs": [{"url": "file:///root/stolen.txt", "path": "/data/x"}],
            "executors": [{"image": "any", "command": ["true"]}]}).encode(), {"Content-Type": "application/json"})
        assert status == 400 and b"$.outputs[0].url" in body and b"outside the folders" in body
    finally:
        shutil.rmtree(state, ignore_errors=True)
