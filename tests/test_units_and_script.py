"""Unit conversions and job-script rendering: pure functions, edge cases."""
from __future__ import annotations

import doctest
import subprocess
from pathlib import Path

import pytest

from gateway.model import task_from_document
from schedulers import outcome, script, units
from schedulers.base import JobStatus, Task


def test_unit_doctests() -> None:
    failures, tried = doctest.testmod(units)
    assert tried > 0 and failures == 0


@pytest.mark.parametrize("seconds, minutes", [(1, 1), (59, 1), (60, 1), (61, 2), (10**9, 16666667)])
def test_whole_minutes_round_up(seconds: int, minutes: int) -> None:
    assert units.whole_minutes(seconds) == minutes


def test_cpu_rlimit_refuses_zero() -> None:
    with pytest.raises(ValueError):
        units.cpu_rlimit(0)


def test_huge_memory_in_bytes() -> None:
    assert units.mib_to_bytes(1073741824) == 2**50


def _task(tmp_path: Path, **fields: object) -> Task:
    return task_from_document({"user": "u", **fields}, "t1", str(tmp_path))


ODD = ["", "it's", '"double"', "$HOME", "`id`", "$(id)", "a\nb", "back\\slash", "; rm -rf /", "*", "ü é", "-n"]


def _run(text: str, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    path = tmp_path / "job.sh"
    path.write_text(text)
    assert subprocess.run(["bash", "-n", str(path)]).returncode == 0, text
    return subprocess.run(["bash", str(path)], capture_output=True, text=True, timeout=30)


def test_every_value_arrives_unchanged(tmp_path: Path) -> None:
    args = ["python3", "-c", "import json, sys; print(json.dumps(sys.argv[1:]))", *ODD]
    task = _task(tmp_path, cmd=args)
    result = _run(script.render("{{run}}", {"run": script.run_block(task, script.command_argv(task))}), tmp_path)
    import json
    assert json.loads(result.stdout) == ODD
    assert (tmp_path / script.EXIT_FILE).read_text() == "0\n"


def test_string_command_runs_through_sh(tmp_path: Path) -> None:
    task = _task(tmp_path, cmd="echo $((1+2)) | tr 3 x; exit 7")
    assert script.command_argv(task) == ["/bin/sh", "-c", "echo $((1+2)) | tr 3 x; exit 7"]
    result = _run(script.run_block(task, script.command_argv(task)), tmp_path)
    assert result.stdout == "x\n" and result.returncode == 7
    assert (tmp_path / script.EXIT_FILE).read_text() == "7\n"


def test_cputime_line_and_no_limits(tmp_path: Path) -> None:
    limited = script.run_block(_task(tmp_path, cmd="true", cputime=10), ["true"])
    assert "jobproxy_hard=15" in limited and "ulimit -S -t $(( jobproxy_hard < 10 ? jobproxy_hard : 10 ))" in limited
    assert "ulimit" not in script.run_block(_task(tmp_path, cmd="true"), ["true"])


@pytest.mark.parametrize("inherited, expected", [("unlimited", "10 15"), ("12", "10 12"), ("7", "7 7")])
def test_cputime_never_raises_a_lower_hard_limit(tmp_path: Path, inherited: str, expected: str) -> None:
    task = _task(tmp_path, cmd=["sh", "-c", "echo $(ulimit -S -t) $(ulimit -H -t)"], cputime=10)
    body = script.run_block(task, script.command_argv(task))
    limit = "" if inherited == "unlimited" else f"ulimit -t {inherited}\n"
    result = _run(limit + body, tmp_path)
    assert result.stdout.strip() == expected and result.returncode == 0, result.stderr


def test_odd_workdir_is_quoted(tmp_path: Path) -> None:
    odd = tmp_path / "dir with 'quote' and $x"
    odd.mkdir()
    task = task_from_document({"user": "u", "cmd": "pwd"}, "t1", str(odd))
    result = _run(script.run_block(task, script.command_argv(task)), tmp_path)
    assert result.stdout == f"{odd}\n"
    assert (odd / script.EXIT_FILE).read_text() == "0\n"


def test_template_placeholders_are_checked() -> None:
    script.check_template("{{run}} {{task_id}}", ["run", "task_id"], "t")
    with pytest.raises(ValueError, match=r"unknown placeholder\(s\) \{\{nodes\}\}"):
        script.check_template("{{run}} {{nodes}}", ["run"], "site.sh")


def test_builtin_local_template_renders(tmp_path: Path) -> None:
    task = _task(tmp_path, cmd="echo hi", cores=2, memory=1, cputime=1)
    text = script.render(script.load_template("schedulers.local"), {
        "task_id": "t1", "workdir": str(tmp_path), "resources": script.describe_request(task),
        "run": script.run_block(task, script.command_argv(task))})
    assert text.startswith("#!/bin/bash\n") and "cores 2, memory 1 MiB, CPU time 1 s" in text
    assert _run(text, tmp_path).stdout == "hi\n"


@pytest.mark.parametrize("code, oom, fields, expected", [
    (0, False, {}, ("COMPLETE", "exit code 0")),
    (3, False, {}, ("EXECUTOR_ERROR", "exit code 3")),
    (152, False, {"cputime": 5}, ("EXECUTOR_ERROR", "killed: CPU time limit of 5 s exceeded")),
    (152, False, {}, ("EXECUTOR_ERROR", "killed by SIGXCPU")),
    (137, True, {"memory": 200}, ("EXECUTOR_ERROR", "killed: memory limit of 200 MiB exceeded")),
    (137, False, {}, ("EXECUTOR_ERROR", "killed by SIGKILL")),
    (200, False, {}, ("EXECUTOR_ERROR", "killed by signal 72")),
])
def test_outcome_wording(tmp_path: Path, code: int, oom: bool, fields: dict[str, int],
                         expected: tuple[str, str]) -> None:
    status: JobStatus = outcome.from_exit_code(_task(tmp_path, cmd="x", **fields), code, oom=oom)
    assert (status.state.value, status.description) == expected and status.exit_code == code
