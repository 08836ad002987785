"""The Slurm plugin without a cluster: job scripts for edge cases against expected lines, and the
reading of squeue / scontrol / sbatch output captured from Slurm 22.05 (etc/dev/slurm.sh)."""
from __future__ import annotations

import doctest
import json
import pwd
import subprocess
from pathlib import Path
from typing import Any

import pytest

from gateway import config as configuration
from gateway.config import ConfigError
from gateway.model import task_from_document
from gateway.plugins import create_scheduler
from gateway.validation import SchemaValidator
from schedulers.base import SchedulerError, Task, TaskRefused, TaskState
from schedulers.commands import CommandTimeout
from schedulers.script import EXIT_FILE
from schedulers.slurm import parse as slurm_parse
from schedulers.slurm.parse import SlurmJob, job_status, parse_scontrol, parse_squeue
from schedulers.slurm.plugin import JOB_ID_FILE, SlurmScheduler

# ---- job scripts ---------------------------------------------------------------------------------


def scheduler(tmp_path: Path, **options: Any) -> SlurmScheduler:
    """The plugin with `options` as the gateway hands them over: checked, defaults filled in."""
    validator = SchemaValidator(SlurmScheduler.options_schema)
    assert validator.problems(options) == []
    return SlurmScheduler("slurm", validator.with_defaults(options), tmp_path / "state")


def task(workdir: Path, **fields: Any) -> Task:
    workdir.mkdir(parents=True, exist_ok=True)
    return task_from_document({"user": "u", "cmd": "true", **fields}, "18c1b2e4d5f6a7b8c9d", str(workdir))


def sbatch_lines(script: str) -> list[str]:
    return [line for line in script.splitlines() if line.startswith("#SBATCH ")]


def test_doctests() -> None:
    failures, tried = doctest.testmod(slurm_parse)
    assert tried > 0 and failures == 0


def test_no_limits(tmp_path: Path) -> None:
    t = task(tmp_path / "w")
    script = scheduler(tmp_path).job_script(t)
    w = t.workdir
    assert sbatch_lines(script) == [
        "#SBATCH --propagate=NONE",
        "#SBATCH --job-name=18c1b2e4d5f6a7b8c9d",
        f"#SBATCH --output={w}/stdout",
        f"#SBATCH --error={w}/stderr",
        f"#SBATCH --chdir={w}",
        "#SBATCH --nodes=1",
        "#SBATCH --ntasks=1",
        "#SBATCH --cpus-per-task=1",
    ]
    assert "ulimit" not in script
    assert script.startswith("#!/bin/bash\n") and "requested: cores 1, memory unlimited, CPU time unlimited" in script


def test_smallest_limits(tmp_path: Path) -> None:
    script = scheduler(tmp_path).job_script(task(tmp_path / "w", cores=1, memory=1, cputime=1))
    assert {"#SBATCH --cpus-per-task=1", "#SBATCH --mem=1M", "#SBATCH --time=1"} <= set(sbatch_lines(script))
    assert "jobproxy_hard=6" in script and "? jobproxy_hard : 1 ))" in script


def test_huge_limits(tmp_path: Path) -> None:
    script = scheduler(tmp_path).job_script(task(tmp_path / "w", cores=100000, memory=1073741824, cputime=31536000000))
    # 31536000000 s × 2 + 5 s = 63072000005 s, in whole minutes rounded up
    assert {"#SBATCH --cpus-per-task=100000", "#SBATCH --mem=1073741824M",
            "#SBATCH --time=1051200001"} <= set(sbatch_lines(script))
    assert "jobproxy_hard=31536000005" in script and "? jobproxy_hard : 31536000000 ))" in script


@pytest.mark.parametrize("cputime, factor, default_time, minutes", [
    (55, 1, None, 1),      # 55 + 5 = 60 s: one minute
    (56, 1, None, 2),      # 61 s: Slurm counts whole minutes, so two
    (2, 2, None, 1),
    (600, 2, None, 21),    # 1205 s
    (None, 2, 90, 2),      # no cputime: the admin's default
    (30, 2, 3600, 2),      # cputime wins over the default
    (None, 2, None, None),  # neither: the partition's default, no --time at all
])
def test_time_limit(tmp_path: Path, cputime: int | None, factor: float, default_time: int | None,
                    minutes: int | None) -> None:
    options: dict[str, Any] = {"time_factor": factor}
    if default_time:
        options["default_time"] = default_time
    fields = {"cputime": cputime} if cputime else {}
    lines = sbatch_lines(scheduler(tmp_path, **options).job_script(task(tmp_path / "w", **fields)))
    times = [line for line in lines if line.startswith("#SBATCH --time=")]
    assert times == ([f"#SBATCH --time={minutes}"] if minutes else [])


def test_site_options_are_quoted(tmp_path: Path) -> None:
    s = scheduler(tmp_path, partition="debug", account="proj 42", qos="it's",
                  extra_directives=["--constraint=a&b", "--exclusive"])
    assert sbatch_lines(s.job_script(task(tmp_path / "w")))[-5:] == [
        "#SBATCH --partition=debug",
        "#SBATCH --account='proj 42'",
        "#SBATCH --qos='it'\"'\"'s'",
        "#SBATCH '--constraint=a&b'",
        "#SBATCH --exclusive",
    ]


ODD_DIR = "/tmp/out 100% it's $HOME `id` \"q\" #x ü"


def test_odd_paths_are_quoted_and_percent_escaped(tmp_path: Path) -> None:
    t = task(tmp_path / "w", stdout=f"{ODD_DIR}/o %j.txt", stderr="/tmp/plain/err")
    lines = sbatch_lines(scheduler(tmp_path).job_script(t))
    assert "#SBATCH --output='/tmp/out 100%% it'\"'\"'s $HOME `id` \"q\" #x ü/o %%j.txt'" in lines
    assert "#SBATCH --error=/tmp/plain/err" in lines


@pytest.mark.parametrize("field, value", [("stdout", "/tmp/back\\slash"), ("stderr", "/tmp/not\\na-newline")])
def test_paths_sbatch_cannot_carry_are_refused(tmp_path: Path, field: str, value: str) -> None:
    t = task(tmp_path / "w", **{field: value})
    with pytest.raises(TaskRefused, match=rf"\$\.{field}: .* contains a backslash"):
        scheduler(tmp_path).admit(t)


def test_missing_output_folder_is_refused(tmp_path: Path) -> None:
    with pytest.raises(TaskRefused, match="does not exist") as refused:
        scheduler(tmp_path).admit_task(task(tmp_path / "w", stdout=str(tmp_path / "nowhere" / "out")))
    assert refused.value.path == "$.stdout"


ODD_ARGS = ["", "it's", '"double"', "$HOME", "`id`", "$(id)", "a\nb", "back\\slash", "; rm -rf /", "*", "ü é",
            "-n", "#SBATCH --mem=1"]


def test_the_script_body_runs_every_argument_unchanged(tmp_path: Path) -> None:
    """The directives are comments to bash: the script runs as it is, outside Slurm too."""
    t = task(tmp_path / "w d", cmd=["python3", "-c", "import json, sys; print(json.dumps(sys.argv[1:]))", *ODD_ARGS])
    path = tmp_path / "job.sh"
    path.write_text(scheduler(tmp_path).job_script(t))
    assert subprocess.run(["bash", "-n", str(path)]).returncode == 0
    result = subprocess.run(["bash", str(path)], capture_output=True, text=True, timeout=30,
                            env={"PATH": "/usr/bin:/bin", "SLURM_JOB_ID": "4242"})
    assert json.loads(result.stdout) == ODD_ARGS
    assert (Path(t.workdir) / EXIT_FILE).read_text() == "0\n"
    assert (Path(t.workdir) / JOB_ID_FILE).read_text() == "4242\n"
    # sbatch reads directives only up to the first command: an argument that looks like one is not
    assert sbatch_lines(path.read_text())[-1] == "#SBATCH --cpus-per-task=1"


def test_admin_template(tmp_path: Path) -> None:
    site = tmp_path / "site.sh"
    site.write_text("#!/bin/bash\n#SBATCH --comment=site\n{{directives}}\nmodule load x\n{{run}}\n")
    script = scheduler(tmp_path, template=str(site)).job_script(task(tmp_path / "w"))
    assert script.startswith("#!/bin/bash\n#SBATCH --comment=site\n#SBATCH --job-name=")
    assert "module load x\nprintf" in script


def _config(tmp_path: Path, options: dict[str, Any]) -> configuration.Config:
    document = {"gateway": {"state_dir": str(tmp_path / "state")}, "scheduler": {"type": "slurm", "options": options}}
    return configuration.from_document(document, tmp_path, "site.toml")


@pytest.mark.parametrize("options, message", [
    ({"extra_directives": ["--mail-user=a\n#SBATCH --mem=1"]}, r"extra_directives\[0\]: must be one sbatch option"),
    ({"extra_directives": ["constraint=x"]}, r"extra_directives\[0\]: must be one sbatch option"),
    ({"partition": "a\\b"}, r"\$\.scheduler\.options\.partition: must be one line without backslashes"),
    ({"command_timeout": 0}, r"command_timeout: must be > 0"),
    ({"time_factor": 0.5}, r"time_factor: must be >= 1"),
    ({"bin_dir": "bin"}, r"bin_dir: must be an absolute path"),
    ({"colour": "red"}, r"unknown field\(s\): 'colour'"),
])
def test_bad_options_stop_the_start(tmp_path: Path, options: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        create_scheduler(_config(tmp_path, options))


def test_bad_templates_stop_the_start(tmp_path: Path) -> None:
    unknown, lacking = tmp_path / "unknown.sh", tmp_path / "lacking.sh"
    unknown.write_text("{{directives}}\n{{nodes}}\n{{run}}\n")
    lacking.write_text("#!/bin/bash\n{{run}}\n")
    with pytest.raises(ConfigError, match=r"unknown placeholder\(s\) \{\{nodes\}\}"):
        create_scheduler(_config(tmp_path, {"template": str(unknown)}))
    with pytest.raises(ConfigError, match=r"lacks \{\{directives\}\}"):
        create_scheduler(_config(tmp_path, {"template": str(lacking)}))
    with pytest.raises(ConfigError, match="No such file"):
        create_scheduler(_config(tmp_path, {"template": str(tmp_path / "missing.sh")}))


async def test_missing_commands_are_a_clear_error(tmp_path: Path) -> None:
    empty = tmp_path / "bin"
    empty.mkdir()
    with pytest.raises(SchedulerError,
                       match=r"the Slurm command 'sbatch' was not found in .*/bin: install Slurm's client"):
        await scheduler(tmp_path, bin_dir=str(empty)).start(lambda *_: None)


# ---- command lines -------------------------------------------------------------------------------


def test_one_squeue_call_asks_for_just_the_gateways_jobs() -> None:
    argvs = slurm_parse.squeue_argvs("/usr/bin/squeue", ["101", "102", "103", "102"])
    assert argvs == [["/usr/bin/squeue", "--jobs=101,102,103,102", "--noheader", "--all", "--states=all",
                      f"--Format={slurm_parse.SQUEUE_FORMAT}"]]
    assert argvs[0][-1].startswith("--Format=JobID:0|,State:0|") and argvs[0][-1].endswith(",Name:0")
    assert slurm_parse.squeue_argvs("squeue", []) == []
    assert slurm_parse.squeue_argvs("squeue", ["12", "not-a-number"])[0][1] == "--jobs=12"


def test_thousands_of_ids_are_split_over_few_calls_each_within_one_argument() -> None:
    ids = [str(10_000_000 + i) for i in range(30_000)]
    argvs = slurm_parse.squeue_argvs("squeue", ids)
    assert len(argvs) == 3
    lists = [argv[1].removeprefix("--jobs=") for argv in argvs]
    assert all(len(text) <= slurm_parse.MAX_ID_LIST for text in lists)
    assert ",".join(lists).split(",") == ids


def test_find_asks_by_name() -> None:
    argv = slurm_parse.squeue_name_argv("squeue", "18c1b2e4d5f6a7b8c9d")
    assert argv[:2] == ["squeue", "--name=18c1b2e4d5f6a7b8c9d"] and "--states=all" in argv


# ---- Slurm's output ------------------------------------------------------------------------------

# squeue --jobs=... --noheader --all --states=all --Format=<SQUEUE_FORMAT>, Slurm 22.05, cgroup v1
SQUEUE = """\
26|FAILED|768|2026-11-27T19:16:21|2026-11-27T19:16:21|UNLIMITED|NonZeroExitCode|cap-exit3
28|FAILED|35072|2026-11-27T19:16:22|2026-11-27T19:16:23|UNLIMITED|NonZeroExitCode|cap-cpu
27|OUT_OF_MEMORY|253|2026-11-27T19:16:21|2026-11-27T19:16:21|UNLIMITED|OutOfMemory|cap-oom
30|PENDING|0|N/A|N/A|UNLIMITED|Resources|cap-pend
29|RUNNING|0|2026-11-27T19:16:24|NONE|UNLIMITED|None|cap-run
32|COMPLETING|0|2026-11-27T19:16:24|2026-11-27T19:16:25|UNLIMITED|None|cap-completing
34|CANCELLED|15|2026-11-27T19:16:24|2026-11-27T19:16:25|UNLIMITED|None|cap-cancel
31|TIMEOUT|15|2026-11-27T19:16:26|2026-11-27T19:17:48|1:00|TimeLimit|cap-timeout
33|FAILED|9|2026-11-27T19:18:13|2026-11-27T19:18:14|UNLIMITED|JobLaunchFailure|cap-oom-none
35|COMPLETED|0|2026-11-27T19:13:38|2026-11-27T19:13:38|UNLIMITED|None|odd | name
"""

SCONTROL = (
    "JobId=26 JobName=cap-exit3 UserId=root(0) GroupId=root(0) MCS_label=N/A Priority=4294901734 Nice=0 "
    "Account=(null) QOS=(null) JobState=FAILED Reason=NonZeroExitCode Dependency=(null) Requeue=0 Restarts=0 "
    "BatchFlag=1 Reboot=0 ExitCode=3:0 RunTime=00:00:00 TimeLimit=UNLIMITED TimeMin=N/A "
    "SubmitTime=2026-11-27T19:16:20 EligibleTime=2026-11-27T19:16:20 AccrueTime=2026-11-27T19:16:20 "
    "StartTime=2026-11-27T19:16:21 EndTime=2026-11-27T19:16:21 Deadline=N/A Partition=debug NodeList=vm "
    "NumNodes=1 NumCPUs=1 NumTasks=1 CPUs/Task=1 TRES=cpu=1,mem=1G,node=1,billing=1 "
    "Command=/tmp/a dir/job.sh WorkDir=/tmp/a dir StdErr=/tmp/a dir/out StdOut=/tmp/a dir/out Power=\n"
)


def test_parse_squeue() -> None:
    jobs = parse_squeue(SQUEUE + "garbage line\nslurm_load_jobs error: x\n")
    assert len(jobs) == 10
    assert jobs["26"] == SlurmJob("26", "cap-exit3", "FAILED", "NonZeroExitCode", 3, 0,
                                  jobs["26"].started, jobs["26"].finished, "UNLIMITED")
    assert jobs["26"].started is not None and jobs["26"].started.strftime("%H:%M:%S") == "19:16:21"
    assert (jobs["28"].exit_code, jobs["27"].signal, jobs["33"].exit_code, jobs["31"].exit_code) == (137, 125, 137, 143)
    assert jobs["30"].started is None and jobs["29"].finished is None
    assert jobs["35"].name == "odd | name"


def test_parse_scontrol() -> None:
    job = parse_scontrol(SCONTROL)
    assert job is not None
    assert ((job.job_id, job.name, job.state, job.reason, job.exit_code)
            == ("26", "cap-exit3", "FAILED", "NonZeroExitCode", 3))
    assert parse_scontrol("slurm_load_jobs error: Invalid job id specified\n") is None
    cancelled = parse_scontrol("JobId=7 JobName=x JobState=CANCELLED Reason=None ExitCode=0:15")
    assert cancelled is not None and (cancelled.state, cancelled.exit_code) == ("CANCELLED", 143)


@pytest.mark.parametrize("job_id, recorded, fields, expected", [
    ("30", None, {}, ("QUEUED", "pending as Slurm job 30: Resources", None)),
    ("29", None, {}, ("RUNNING", "running as Slurm job 29", None)),
    ("32", None, {}, ("RUNNING", "running (completing) as Slurm job 32", None)),
    ("26", 3, {}, ("EXECUTOR_ERROR", "exit code 3", 3)),
    ("26", None, {}, ("EXECUTOR_ERROR", "exit code 3", 3)),
    ("28", 152, {"cputime": 2}, ("EXECUTOR_ERROR", "killed: CPU time limit of 2 s exceeded", 152)),
    ("27", 137, {"memory": 100}, ("EXECUTOR_ERROR", "killed: memory limit of 100 MiB exceeded", 137)),
    ("27", None, {"memory": 100}, ("EXECUTOR_ERROR", "killed: memory limit of 100 MiB exceeded", 253)),
    # no memory cgroup: OverMemoryKill ends the whole job with SIGKILL, nothing recorded
    ("33", None, {"memory": 100}, ("EXECUTOR_ERROR", "killed: memory limit of 100 MiB exceeded", 137)),
    ("33", None, {}, ("EXECUTOR_ERROR", "killed by SIGKILL", 137)),
    ("31", None, {}, ("EXECUTOR_ERROR", "killed: wall-clock time limit of 1 min exceeded", 143)),
    ("34", None, {}, ("CANCELED", "cancelled in Slurm", 143)),
    ("35", 0, {}, ("COMPLETE", "exit code 0", 0)),
])
def test_states_from_captured_squeue(tmp_path: Path, job_id: str, recorded: int | None, fields: dict[str, int],
                                     expected: tuple[str, str, int | None]) -> None:
    status = job_status(task(tmp_path / "w", **fields), parse_squeue(SQUEUE)[job_id], recorded)
    assert status is not None
    assert (status.state.value, status.description, status.exit_code) == expected
    if status.state.terminal:
        assert status.finished is not None


@pytest.mark.parametrize("state, expected", [
    ("PENDING", TaskState.QUEUED), ("RUNNING", TaskState.RUNNING), ("COMPLETING", TaskState.RUNNING),
    ("COMPLETED", TaskState.COMPLETE), ("FAILED", TaskState.EXECUTOR_ERROR),
    ("OUT_OF_MEMORY", TaskState.EXECUTOR_ERROR), ("TIMEOUT", TaskState.EXECUTOR_ERROR),
    ("CANCELLED", TaskState.CANCELED), ("PREEMPTED", TaskState.PREEMPTED), ("NODE_FAIL", TaskState.SYSTEM_ERROR),
    ("BOOT_FAIL", TaskState.SYSTEM_ERROR), ("DEADLINE", TaskState.EXECUTOR_ERROR),
    ("SUSPENDED", TaskState.PAUSED), ("CONFIGURING", TaskState.INITIALIZING), ("REQUEUED", TaskState.QUEUED),
])
def test_every_slurm_state(tmp_path: Path, state: str, expected: TaskState) -> None:
    status = job_status(task(tmp_path / "w"), SlurmJob("9", "n", state, "", 0, 0), None)
    assert status is not None and status.state == expected and status.description


def test_node_failures_say_which(tmp_path: Path) -> None:
    status = job_status(task(tmp_path / "w"), SlurmJob("9", "n", "NODE_FAIL", "NodeDown", 0, 9), None)
    assert status is not None and status.description == "the job's node failed (NodeDown)"


def test_unknown_state_is_none(tmp_path: Path) -> None:
    assert job_status(task(tmp_path / "w"), SlurmJob("9", "n", "WIBBLE", ""), None) is None


def test_parse_submit() -> None:
    assert slurm_parse.parse_submit("12\n") == "12"
    assert slurm_parse.parse_submit("12;cluster\n") == "12"
    with pytest.raises(ValueError, match="no job id"):
        slurm_parse.parse_submit("Submitted batch job 12\n")


@pytest.mark.parametrize("stderr, message, unavailable", [
    ("sbatch: error: Batch job submission failed: More processors requested than permitted\n",
     "More processors requested than permitted", False),
    ("sbatch: error: Memory specification can not be satisfied\n"
     "sbatch: error: Batch job submission failed: Requested node configuration is not available\n",
     "Memory specification can not be satisfied; Requested node configuration is not available", False),
    ("sbatch: error: Batch job submission failed: Invalid account or account/partition combination specified\n",
     "Invalid account or account/partition combination specified", False),
    ("sbatch: error: Batch job submission failed: Unable to contact slurm controller (connect failure)\n",
     "Unable to contact slurm controller (connect failure)", True),
    ("slurm_load_jobs error: Unable to contact slurm controller (connect failure)\n",
     "slurm_load_jobs error: Unable to contact slurm controller (connect failure)", True),
    ("sbatch: error: Batch job submission failed: Socket timed out on send/recv operation\n",
     "Socket timed out on send/recv operation", True),
    ("scancel: error: Kill job error on job id 10: Invalid job id specified\n",
     "Kill job error on job id 10: Invalid job id specified", False),
])
def test_error_messages(stderr: str, message: str, unavailable: bool) -> None:
    text = slurm_parse.error_message(stderr)
    assert text == message
    assert slurm_parse.unavailable(text) is unavailable


# ---- whose job ---------------------------------------------------------------------------------


def test_jobs_run_as_the_account_job_account_names(tmp_path: Path) -> None:
    """sbatch --uid/--gid for the account `job_account` answers: the fixed account, the task's
    user with run_as, nothing for the gateway's own."""
    options = SchemaValidator(SlurmScheduler.options_schema).with_defaults({})
    nobody = pwd.getpwnam("nobody")
    on_behalf = [f"--uid={nobody.pw_uid:d}", f"--gid={nobody.pw_gid:d}", "--export=NONE"]
    fixed = SlurmScheduler("slurm", options, tmp_path / "state", account="nobody")
    assert fixed._on_behalf(task(tmp_path / "w", user="alice")) == on_behalf
    as_user = SlurmScheduler("slurm", options, tmp_path / "state", run_as_user=True, account="root")
    assert as_user._on_behalf(task(tmp_path / "w", user="nobody")) == on_behalf
    assert scheduler(tmp_path)._on_behalf(task(tmp_path / "w")) == []
    with pytest.raises(TaskRefused, match="no Unix account 'jp-no-such-user'") as refused:
        as_user._on_behalf(task(tmp_path / "w", user="jp-no-such-user"))
    assert refused.value.path == "$.user"


async def test_cancel_by_name_retries_while_slurm_does_not_answer(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """After a timed-out sbatch, scancel --name is tried again while Slurm times out or is
    unreachable (a hung slurmctld may take the job when it wakes up), and not after a real answer."""
    plugin = scheduler(tmp_path)
    monkeypatch.setattr(plugin, "CANCEL_RETRY", 0.01)
    answers: list[Any] = [CommandTimeout("Slurm did not answer within 5 s (scancel)"),
                          (1, "", "scancel: error: Unable to contact slurm controller (connect failure)"),
                          (0, "", "")]
    calls: list[tuple[str, ...]] = []

    async def run(command: str, *args: str) -> tuple[int, str, str]:
        calls.append((command, *args))
        answer = answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return tuple(answer)

    monkeypatch.setattr(plugin, "_run", run)
    await plugin._cancel_by_name("t1")
    assert calls == [("scancel", "--name=t1")] * 3
    answers[:] = [(1, "", "scancel: error: Invalid user id")]
    await plugin._cancel_by_name("t2")
    assert calls[-1] == ("scancel", "--name=t2") and len(calls) == 4  # a real refusal: no retry
