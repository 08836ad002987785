"""The pure half of Slurm over slurmrestd (schedulers/slurm/rest_parse.py, token.py): the job's
properties read back from the job script the CLI plugin renders, Slurm's JSON answers (captured
from slurmrestd 22.05, openapi/v0.0.38), its errors, and the tokens."""
from __future__ import annotations

import doctest
import json
import os
import socket
import time
from pathlib import Path
from typing import Any

import pytest

from gateway.model import task_from_document
from gateway.validation import SchemaValidator
from schedulers.base import SchedulerConfigError, SchedulerUnavailable, TaskState
from schedulers.commands import CommandTimeout
from schedulers.slurm import rest_parse
from schedulers.slurm.parse import job_status, output_pattern
from schedulers.slurm.plugin import SlurmScheduler
from schedulers.slurm.rest import SlurmRestScheduler
from schedulers.slurm.rest_parse import error_text, job_properties, parse_jobs, submission
from schedulers.slurm.token import Tokens, expiry, printed_token, sign

CAPTURED = Path(__file__).parent / "captured"
ENV = {"PATH": "/usr/bin:/bin"}


def scheduler(tmp_path: Path, **options: Any) -> SlurmScheduler:
    validator = SchemaValidator(SlurmScheduler.options_schema)
    options = {"api": "rest", "rest": {"url": "http://slurm-head:6820"}, **options}
    assert validator.problems(options) == []
    return SlurmScheduler("slurm", validator.with_defaults(options), tmp_path / "state")


def test_doctests() -> None:
    failures, tried = doctest.testmod(rest_parse)
    assert tried > 0 and failures == 0


def test_api_rest_is_the_same_plugin_over_rest(tmp_path: Path) -> None:
    assert isinstance(scheduler(tmp_path), SlurmRestScheduler)
    validator = SchemaValidator(SlurmScheduler.options_schema)
    assert type(SlurmScheduler("slurm", validator.with_defaults({}), tmp_path)) is SlurmScheduler
    with pytest.raises(SchedulerConfigError, match=r"rest\.url: required"):
        SlurmScheduler("slurm", validator.with_defaults({"api": "rest"}), tmp_path)
    with pytest.raises(SchedulerConfigError, match="--hint has no counterpart"):
        scheduler(tmp_path, extra_directives=["--hint=nomultithread"])


def test_the_properties_are_the_job_scripts_sbatch_lines(tmp_path: Path) -> None:
    odd = tmp_path / "out 100% it's $HOME \"q\" #x"
    odd.mkdir()
    workdir = tmp_path / "w"
    workdir.mkdir()
    task = task_from_document({"user": "u", "cmd": "true", "cores": 2, "memory": 300, "cputime": 30,
                               "stdout": str(odd / "o %j.txt")}, "18c1b2e4d5f6a7b8c9d", str(workdir))
    plugin = scheduler(tmp_path, partition="batch", qos="high", account="lab 42",
                       extra_directives=["--constraint=haswell", "--no-requeue"])
    script = plugin.job_script(task)
    assert script == SlurmScheduler.job_script(plugin, task)  # the CLI plugin's own rendering
    assert isinstance(plugin, SlurmRestScheduler)
    assert plugin.environment["SLURM_UMASK"] == f"{os.umask(os.umask(0o22)):04o}"
    body = submission(script, ENV, user_environment=False)
    assert body["script"] == script
    assert body["job"] == {
        "environment": ENV, "name": "18c1b2e4d5f6a7b8c9d", "standard_output": output_pattern(f"{odd}/o %j.txt"),
        "standard_error": f"{workdir}/stderr", "current_working_directory": str(workdir), "nodes": [1, 1],
        "tasks": 1, "cpus_per_task": 2, "memory_per_node": 300, "time_limit": 2, "partition": "batch",
        "account": "lab 42", "qos": "high", "constraints": "haswell", "requeue": False,
    }
    assert submission(script, ENV, user_environment=True)["job"]["get_user_environment"] == "10"


def test_options_without_a_rest_counterpart_are_refused() -> None:
    with pytest.raises(ValueError, match="--wrap has no counterpart"):
        job_properties("#!/bin/bash\n#SBATCH --wrap=true\n", ENV)
    with pytest.raises(ValueError, match="--mem=lots"):
        job_properties("#!/bin/bash\n#SBATCH --mem=lots\n", ENV)
    # sbatch stops reading directives at the first command
    assert "cpus_per_task" not in job_properties("#!/bin/bash\n# c\n\ntrue\n#SBATCH --cpus-per-task=4\n", ENV)
    assert job_properties("#!/bin/bash\n#SBATCH -c 3 -J x --time=1-0\n", ENV) == {
        "environment": ENV, "cpus_per_task": 3, "name": "x", "time_limit": 1440}


def test_a_captured_job_reads_as_over_squeue(tmp_path: Path) -> None:
    answer = json.loads((CAPTURED / "slurmrestd-22.05-job-exit3.json").read_text())
    jobs = parse_jobs(answer)
    (job,) = jobs.values()
    assert (job.job_id, job.name, job.state, job.status, job.signal, job.exit_code, job.time_limit) == (
        "21103", "jp-capture-exit3", "FAILED", 3, 0, 3, "0:01:00")
    assert job.started is not None and job.finished is not None
    workdir = tmp_path / "w"
    workdir.mkdir()
    task = task_from_document({"user": "u", "cmd": "exit 3"}, "18c1b2e4d5f6a7b8c9d", str(workdir))
    status = job_status(task, job)
    assert status is not None
    assert (status.state, status.exit_code, status.description) == (TaskState.EXECUTOR_ERROR, 3, "exit code 3")
    assert parse_jobs(answer, lambda j: j.name == "other") == {}


def test_slurms_errors_in_its_own_words() -> None:
    answer = json.loads((CAPTURED / "slurmrestd-22.05-no-such-job.json").read_text())
    assert error_text(answer["errors"]) == "Invalid job id specified (Unable to find JobId=99999999)"
    assert error_text([{"error_code": 2005, "error": "More processors requested than permitted"}]) == \
        "More processors requested than permitted"
    assert error_text([]) == "no message"


def test_tokens_signed_with_a_key_carry_slurms_claims() -> None:
    token = sign(b"k" * 32, "alice", 600, now=1_000_000)
    assert token.count(".") == 2
    assert expiry(token) == 1_000_600
    assert printed_token(f"SLURM_JWT={token}\n") == token and printed_token(token) == token
    assert printed_token("no token here\n") == ""


async def test_token_sources(tmp_path: Path) -> None:
    folder = tmp_path / "tokens"
    folder.mkdir()
    first = sign(b"k", "bob", 3600)
    (folder / "bob.jwt").write_text(f"SLURM_JWT={first}\n")
    tokens = Tokens(command=[], file=str(folder / "{user}.jwt"), key_file=None, lifespan=60, timeout=5)
    assert await tokens.token("bob") == first
    second = sign(b"k", "bob", 7200)
    time.sleep(0.01)
    (folder / "bob.jwt").write_text(second)  # renewed by the site: read again
    assert await tokens.token("bob") == second
    command = Tokens(command=["/bin/echo", "SLURM_JWT=t-{user}-{lifespan}"], file=None, key_file=None,
                     lifespan=90, timeout=5)
    assert await command.token("carol") == "t-carol-90"
    (tmp_path / "key").write_bytes(b"secret")
    keyed = Tokens(command=[], file=None, key_file=str(tmp_path / "key"), lifespan=120, timeout=5)
    assert abs((expiry(await keyed.token("dave")) or 0) - time.time() - 120) < 5


async def test_slurmrestd_down_or_silent_is_unavailable(tmp_path: Path) -> None:
    """Nobody listening: 503-style SchedulerUnavailable naming slurmrestd; a listener that never
    answers: CommandTimeout after `command_timeout`. The gateway starts either way."""
    (tmp_path / "key").write_bytes(b"secret")
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen()
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    closed_port = closed.getsockname()[1]
    closed.close()
    workdir = tmp_path / "w"
    workdir.mkdir()
    task = task_from_document({"user": "u", "cmd": "true"}, "18c1b2e4d5f6a7b8c9d", str(workdir))
    try:
        for port, expected, problem in ((closed_port, SchedulerUnavailable, "cannot be reached"),
                                        (silent.getsockname()[1], CommandTimeout, "did not answer within 1 s")):
            plugin = scheduler(tmp_path, command_timeout=1,
                               rest={"url": f"http://127.0.0.1:{port}", "jwt_key_file": str(tmp_path / "key")})
            await plugin.start(lambda *_: None)
            started = time.monotonic()
            with pytest.raises(expected, match=problem):
                await plugin.submit(task)
            assert time.monotonic() - started < 3
            await plugin.close()
    finally:
        silent.close()
