"""Schemathesis against a real `jobproxy serve`, from the OpenAPI document it serves: the v1 API and
the TES API, every check, stateful sequences through the document's links (submit -> state/delete,
TES create -> get/cancel with real ids), deterministic and bounded.

What the fuzzer sends cannot harm the machine:
- the gateway runs in a bubblewrap sandbox that sees the machine read-only, with a private /tmp
  and PID namespace; the only writable place is this test's folder, and every process the gateway
  starts dies with the sandbox;
- the local scheduler's job template never runs the task's command (generated `cmd`s, TES
  executors and their file staging): it only records exit status 0, so tasks still go through
  QUEUED, RUNNING and COMPLETE;
- one core and 256 MiB for all tasks, `[limits]` of 1 core and 256 MiB per task, no container
  runtime (tasks with a `container` are refused), and the tasks left are deleted at the end.

Run alone: `pytest tests/test_fuzz.py -s` (prints the figures of each run).
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from schedulers.script import EXIT_FILE

from .conftest import IN_CI, ROOT, Gateway

pytestmark = pytest.mark.e2e

#: Test cases per operation and phase, per API: with the coverage phase (v1 submit's is the largest)
#: both runs take about 1.5 minutes; TES gets more, so that its stateful phase follows create's links.
MAX_EXAMPLES = {"v1": 10, "tes": 40}

TEMPLATE = f"""#!/bin/bash
# JobProxy fuzz test: task {{{{task_id}}}} ({{{{resources}}}}). The generated command is never run.
cd {{{{workdir}}}} || exit 1
printf '0\\n' > {EXIT_FILE}.part && mv -f {EXIT_FILE}.part {EXIT_FILE}
"""

CONFIG = """
[gateway]
state_dir = "{root}/state"
page_size = 10
max_page_size = 50

[run_as]
# the sandboxed jobs run no command at all (see fuzz-job.sh), and nobody could not reach the test folder
allow_root_jobs = true

[scheduler]
type = "local"
poll_interval = 0.2

[scheduler.options]
cores = 1
memory = 256
cgroups = "off"
kill_grace = 0
template = "{root}/fuzz-job.sh"

[limits]
cores = 1
memory = 256

[tes]
images = [{{ match = "*", run = "host" }}]
"""

#: Statuses beyond Schemathesis' defaults, each for a documented reason:
#: - 413 for invalid data: a body over [gateway] max_body_bytes is refused before it is read;
#: - 422 for valid data: an Idempotency-Key the fuzzer already used for another request;
#: - 400 for valid submits: what a schema cannot say (a stdout file's folder must exist; a TES
#:   executor's paths must lie in its own folders; a file:// input must exist). The hooks' check
#:   `refusals_explained` still fails when the gateway's own schema refuses valid data.
SCHEMATHESIS_CONFIG = """
[checks.negative_data_rejection]
expected-statuses = ["400", "401", "403", "404", "405", "406", "409", "413", "415", "422", "428", "429"]

[checks.positive_data_acceptance]
expected-statuses = ["2xx", "401", "403", "404", "409", "422", "429"]

[[operations]]
include-operation-id-regex = "^(v1Submit|tesCreateTask)"
checks.positive_data_acceptance.expected-statuses = ["2xx", "400", "401", "403", "404", "409", "422", "429"]
"""


class SandboxedGateway(Gateway):
    """`jobproxy serve` inside bubblewrap: the machine read-only, this test's folder writable."""

    def wrapper(self) -> list[str]:
        folder = str(self.workdir)
        # a private /tmp, with the checkout and its virtualenv seen again read-only should they live there
        code = [arg for path in {str(ROOT), sys.prefix} for arg in ("--ro-bind", path, path)]
        return ["bwrap", "--ro-bind", "/", "/", "--dev", "/dev", "--proc", "/proc", "--tmpfs", "/tmp", *code,
                "--bind", folder, folder, "--unshare-pid", "--die-with-parent", "--chdir", folder]


@pytest.fixture
def fuzz_gateway(tmp_path: Path) -> Iterator[Gateway]:
    if not shutil.which("bwrap"):
        reason = "the fuzz tests sandbox the gateway with bwrap (bubblewrap); tests/run.sh installs it"
        if IN_CI:
            pytest.fail(reason)
        pytest.skip(reason)
    (tmp_path / "fuzz-job.sh").write_text(TEMPLATE)
    env = {"PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    gateway = SandboxedGateway(tmp_path, CONFIG.format(root=tmp_path), env)
    gateway.start()
    try:
        yield gateway
    finally:
        _delete_all(gateway)
        gateway.stop()


def _delete_all(gateway: Gateway) -> None:
    """Stop and delete every task the fuzzer made."""
    for _ in range(1000):
        status, _, body = gateway.request("GET", "/v1/jobproxy/state?page_size=50")
        tasks = json.loads(body)["state"] if status == 200 else []
        if not tasks:
            return
        for task in tasks:
            gateway.request("DELETE", f"/v1/jobproxy/delete/{task['id']}")


def _schemathesis(gateway: Gateway, tmp_path: Path, name: str, *selection: str) -> tuple[int, str]:
    """Run Schemathesis on the `selection` of operations; answers its exit code and output."""
    config = tmp_path / "schemathesis.toml"
    config.write_text(SCHEMATHESIS_CONFIG)
    command = shutil.which("schemathesis", path=str(Path(sys.executable).parent)) or "schemathesis"
    env = {**os.environ, "SCHEMATHESIS_HOOKS": "tests.schemathesis_hooks",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    argv = [command, "--config-file", str(config), "run", f"{gateway.url}/v1/openapi.json", *selection,
            "--checks", "all", "--phases", "examples,coverage,fuzzing,stateful",
            "--max-examples", str(MAX_EXAMPLES[name]), "--generation-deterministic", "--workers", "1",
            "--request-timeout", "30", "--no-color", "--output-truncate", "true",
            "--report", "json,ndjson", "--report-json-path", str(tmp_path / f"{name}.json"),
            "--report-ndjson-path", str(tmp_path / f"{name}.ndjson")]
    started = time.monotonic()
    run = subprocess.run(argv, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)
    output = run.stdout + run.stderr
    (tmp_path / f"{name}.schemathesis.txt").write_text(output)
    report = json.loads((tmp_path / f"{name}.json").read_text())
    print(f"schemathesis {name}: {report['operations']['tested']} operations, {report['test_cases']['generated']} "
          f"test cases, {len(report['failures'])} failures, {len(report['errors'])} errors, exit {run.returncode}, "
          f"{time.monotonic() - started:.0f} s")
    assert report["complete"] and report["test_cases"]["with_failures"] == 0, output[-20000:]
    assert report["failures"] == [] and report["errors"] == [], output[-20000:]
    return run.returncode, output


def _followed_links(tmp_path: Path, name: str) -> set[str]:
    """The documented links (not Schemathesis' inferred ones) the stateful phase followed."""
    text = (tmp_path / f"{name}.ndjson").read_text()
    return set(re.findall(r'"transition":\{"id":"([^"]+)","parent_id":"[^"]*","is_inferred":false', text))


def _check_run(gateway: Gateway, code: int, output: str) -> None:
    log = gateway.log.read_text()
    # the middleware logs every 500 it answers (aiohttp itself logs the malformed requests it answers 400)
    assert "unexpected error answering" not in log, log[-5000:]
    assert code == 0, output[-20000:]
    assert re.search(r"Test cases:\s+\d+ generated", output) and "failure" not in output.split("SUMMARY")[-1].lower(), \
        output[-20000:]


def test_fuzz_v1_api(fuzz_gateway: Gateway, tmp_path: Path) -> None:
    # the event stream never ends by itself: tests/test_client_e2e.py tests it with real SSE clients
    code, output = _schemathesis(fuzz_gateway, tmp_path, "v1", "--include-path-regex", "^/v1/(jobproxy/|openapi)",
                                 "--exclude-operation-id", "v1Events")
    _check_run(fuzz_gateway, code, output)
    # submit, list, state, cancel, delete, ping, task, output, logs, openapi
    assert re.search(r"Operations:\s+10 selected", output), output[:3000]
    followed = _followed_links(tmp_path, "v1")
    assert any(link.startswith("POST /v1/jobproxy/submit -> [200] ") for link in followed), followed


def test_fuzz_tes_api(fuzz_gateway: Gateway, tmp_path: Path) -> None:
    code, output = _schemathesis(fuzz_gateway, tmp_path, "tes", "--include-tag", "TES")
    _check_run(fuzz_gateway, code, output)
    assert re.search(r"Operations:\s+11 selected", output), output[:3000]
    followed = _followed_links(tmp_path, "tes")
    assert any(re.match(r"POST \S+/tasks -> \[200\] (Get|Cancel) ", link) for link in followed), followed
