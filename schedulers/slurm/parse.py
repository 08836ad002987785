"""The pure half of the Slurm plugin: the `#SBATCH` lines of a task, the command lines, and the
reading of what `sbatch`, `squeue` and `scontrol` print, as functions without side effects.
`schedulers.slurm` runs the commands; tests/test_slurm_render.py checks everything here against
captured Slurm 22.05 output.

References: sbatch(1) (options, "filename pattern"), squeue(1) ("JOB STATE CODES", `--Format`),
scontrol(1) (`show job`).
"""
from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime

from .. import outcome
from ..base import JobStatus, TaskRefused
from ..script import quote
from ..task import Task, TaskState
from ..units import walltime_for_cputime, whole_minutes

#: squeue `--Format` fields, in output order: width 0 = untruncated, `|` separates. The job name
#: comes last because it is the only free text a user chooses (it may itself contain `|`).
SQUEUE_FIELDS = ("JobID", "State", "exit_code", "StartTime", "EndTime", "TimeLimit", "Reason", "Name")
SQUEUE_FORMAT = ",".join(f"{name}:0|" for name in SQUEUE_FIELDS[:-1]) + f",{SQUEUE_FIELDS[-1]}:0"

#: Above this many characters, one `--jobs=` list would near the kernel's limit for one argument
#: (128 KiB): the ids are then split over several squeue calls, about 12,000 ids each.
MAX_ID_LIST = 100_000

#: Slurm's job states (squeue(1), "JOB STATE CODES") in the common vocabulary. A state missing here
#: becomes UNKNOWN, with a log line.
STATES: dict[str, TaskState] = {
    "PENDING": TaskState.QUEUED,
    "REQUEUED": TaskState.QUEUED,
    "REQUEUE_FED": TaskState.QUEUED,
    "REQUEUE_HOLD": TaskState.QUEUED,
    "RESV_DEL_HOLD": TaskState.QUEUED,
    "CONFIGURING": TaskState.INITIALIZING,
    "RUNNING": TaskState.RUNNING,
    "COMPLETING": TaskState.RUNNING,
    "RESIZING": TaskState.RUNNING,
    "SIGNALING": TaskState.RUNNING,
    "STAGE_OUT": TaskState.RUNNING,
    "SUSPENDED": TaskState.PAUSED,
    "STOPPED": TaskState.PAUSED,
    "COMPLETED": TaskState.COMPLETE,
    "FAILED": TaskState.EXECUTOR_ERROR,
    "OUT_OF_MEMORY": TaskState.EXECUTOR_ERROR,
    "TIMEOUT": TaskState.EXECUTOR_ERROR,
    "DEADLINE": TaskState.EXECUTOR_ERROR,
    "SPECIAL_EXIT": TaskState.EXECUTOR_ERROR,
    "CANCELLED": TaskState.CANCELED,
    "PREEMPTED": TaskState.PREEMPTED,
    "NODE_FAIL": TaskState.SYSTEM_ERROR,
    "BOOT_FAIL": TaskState.SYSTEM_ERROR,
}

#: Words in a Slurm command's error that mean "Slurm cannot answer now", not "Slurm says no".
_UNAVAILABLE = re.compile(
    r"unable to contact|timed? ?out|temporar|try again|connect|communication|zero bytes|"
    r"authentication|munge|controller|not responding|shutting down", re.IGNORECASE)
_NO_SUCH_JOB = re.compile(r"invalid job id", re.IGNORECASE)
_NOT_SET = frozenset({"", "N/A", "NONE", "UNKNOWN", "(NULL)"})


# ---- the job script ------------------------------------------------------------------------------

def output_pattern(path: str) -> str:
    """A path as sbatch's `--output`/`--error` take it: `%` starts a replacement there (`%j`: the
    job id), so a literal one is written `%%`.

    >>> output_pattern("/data/100%/out-%j")
    '/data/100%%/out-%%j'
    """
    return path.replace("%", "%%")


def directive_problem(value: str) -> str | None:
    """Why `value` cannot be written into an `#SBATCH` line, or None. sbatch reads those lines
    with its own parser: a directive ends at a newline, and a backslash escapes the next character
    even inside quotes, so neither survives quoting for bash."""
    if "\n" in value or "\r" in value:
        return "contains a line break"
    if "\\" in value:
        return "contains a backslash"
    return None


def check_task_paths(task: Task) -> None:
    """Refuse (400) a task whose paths cannot be handed to sbatch unchanged."""
    for field, value in (("stdout", task.stdout), ("stderr", task.stderr), ("workdir", task.workdir)):
        problem = directive_problem(value)
        if problem:
            where = f"$.{field}" if field != "workdir" else "the task's folder"
            raise TaskRefused(f"{where}: {value!r} {problem}, which Slurm's job-script directives cannot carry")


def time_limit_minutes(task: Task, default_time: int | None, factor: float) -> int | None:
    """`--time` in whole minutes: derived from the task's CPU time, else the admin's default."""
    if task.cputime:
        return whole_minutes(walltime_for_cputime(task.cputime, factor))
    if default_time:
        return whole_minutes(default_time)
    return None


#: The task's `slurm.*` backend parameters and the sbatch option each one sets.
PARAMETER_OPTIONS = {"slurm.partition": "partition", "slurm.account": "account", "slurm.qos": "qos",
                     "slurm.constraint": "constraint", "slurm.reservation": "reservation"}


def directives(task: Task, *, time_minutes: int | None = None, partition: str | None = None,
               account: str | None = None, qos: str | None = None, extra: Sequence[str] = (),
               requeue: bool = False) -> list[str]:
    """The `#SBATCH` lines carrying the task's name, files and limits, every value quoted.

    `--mem` is in MiB (Slurm's `M` is 1024² bytes), the whole task on its one node; the CPU-time
    limit is no sbatch option: the job script sets it (`run_block`). GPUs are a generic resource
    (`--gres=gpu:N`). The task's `slurm.*` backend parameters (PARAMETER_OPTIONS) take the place
    of the site's `partition`, `account` and `qos`; `requeue` lets Slurm requeue the job when it
    is preempted (or its node fails). Other plugins that submit Slurm batch jobs (through
    slurmrestd, say) call this too.
    """
    check_task_paths(task)
    options = [
        f"--job-name={quote(task.id)}",
        f"--output={quote(output_pattern(task.stdout))}",
        f"--error={quote(output_pattern(task.stderr))}",
        f"--chdir={quote(task.workdir)}",
        "--nodes=1",
        "--ntasks=1",
        f"--cpus-per-task={quote(task.cores or 1)}",
    ]
    if task.memory:
        options.append(f"--mem={quote(f'{task.memory}M')}")
    if task.gpus:
        options.append(f"--gres={quote(f'gpu:{task.gpus}')}")
    if time_minutes:
        options.append(f"--time={quote(time_minutes)}")
    chosen = {"partition": partition, "account": account, "qos": qos}
    for key, name in PARAMETER_OPTIONS.items():
        value = task.backend_parameters.get(key)
        if value is not None:
            problem = directive_problem(value)
            if problem:
                raise TaskRefused(f"$.options.{key}: {value!r} {problem}", f"$.options.{key}")
            chosen[name] = value
    for name, value in chosen.items():
        if value:
            options.append(f"--{name}={quote(value)}")
    if requeue:
        options.append("--requeue")
    options += [quote(option) for option in extra]
    return [f"#SBATCH {option}" for option in options]


# ---- command lines -------------------------------------------------------------------------------

#: What every squeue call asks for: no header, hidden partitions too, every state, SQUEUE_FORMAT.
_SQUEUE_OPTIONS = ("--noheader", "--all", "--states=all", f"--Format={SQUEUE_FORMAT}")


def squeue_argvs(squeue: str, job_ids: Iterable[str]) -> list[list[str]]:
    """The squeue calls that list just `job_ids`, in every state Slurm still knows: one call,
    unless the ids are too many for one argument (MAX_ID_LIST). Ids that are not numbers are left out."""
    chunks: list[list[str]] = []
    size = MAX_ID_LIST + 1
    for job_id in job_ids:
        if not job_id.isdigit():
            continue
        if size + len(job_id) + 1 > MAX_ID_LIST:
            chunks.append([])
            size = 0
        chunks[-1].append(job_id)
        size += len(job_id) + 1
    return [[squeue, f"--jobs={','.join(chunk)}", *_SQUEUE_OPTIONS] for chunk in chunks]


def squeue_name_argv(squeue: str, name: str) -> list[str]:
    """The squeue call that lists the jobs named `name` (a task id), for `find` after a crash."""
    return [squeue, f"--name={name}", *_SQUEUE_OPTIONS]


# ---- reading Slurm's answers ---------------------------------------------------------------------

@dataclass(frozen=True)
class SlurmJob:
    """What squeue or scontrol says about one job."""

    job_id: str
    name: str
    state: str
    reason: str = ""
    status: int | None = None  # the batch script's exit status ...
    signal: int = 0            # ... or the signal that killed it
    started: datetime | None = None
    finished: datetime | None = None
    time_limit: str = ""

    @property
    def exit_code(self) -> int | None:
        """As a shell reports it: the status, or 128 + the signal."""
        if self.signal:
            return 128 + self.signal
        return self.status


def parse_time(text: str) -> datetime | None:
    """A Slurm timestamp (local time, `2026-11-27T19:11:16`) as an aware datetime; None if unset."""
    if text.strip().upper() in _NOT_SET:
        return None
    try:
        return datetime.strptime(text.strip(), "%Y-%m-%dT%H:%M:%S").astimezone()
    except ValueError:
        return None


def parse_duration(text: str) -> int | None:
    """A Slurm time limit (`[D-]H:MM:SS`, `MM:SS`, or `UNLIMITED`) in seconds.

    >>> parse_duration("1:00"), parse_duration("2:00:00"), parse_duration("1-00:00:05"), parse_duration("UNLIMITED")
    (60, 7200, 86405, None)
    """
    match = re.fullmatch(r"(?:(\d+)-)?(?:(\d+):)?(\d+):(\d+)", text.strip())
    if not match:
        return None
    days, hours, minutes, seconds = (int(g) if g else 0 for g in match.groups())
    return ((days * 24 + hours) * 60 + minutes) * 60 + seconds


def _state(text: str) -> str:
    """`CANCELLED by 0` or `COMPLETING+` -> the bare state name."""
    word = text.strip().split(" ")[0].upper()
    return word.rstrip("+*")


def parse_squeue(text: str) -> dict[str, SlurmJob]:
    """squeue output in SQUEUE_FORMAT, by job id. Lines that do not parse are skipped."""
    jobs: dict[str, SlurmJob] = {}
    for line in text.splitlines():
        parts = line.split("|", len(SQUEUE_FIELDS) - 1)
        if len(parts) != len(SQUEUE_FIELDS) or not parts[0].strip().isdigit():
            continue
        job_id, state, raw_exit, start, end, limit, reason, name = (p.strip() for p in parts)
        raw = int(raw_exit) if raw_exit.isdigit() else None  # a wait(2) status
        jobs[job_id] = SlurmJob(
            job_id=job_id, name=name, state=_state(state), reason=reason,
            status=None if raw is None else raw >> 8 & 0xFF, signal=0 if raw is None else raw & 0x7F,
            started=parse_time(start), finished=parse_time(end), time_limit=limit,
        )
    return jobs


def _field(text: str, key: str) -> str:
    match = re.search(rf"(?:^|\s){key}=(\S*)", text)
    return match.group(1) if match else ""


def parse_scontrol(text: str) -> SlurmJob | None:
    """`scontrol --oneliner show job ID` output; None if it describes no job."""
    job_id = _field(text, "JobId")
    if not job_id.isdigit():
        return None
    status, _, signal = _field(text, "ExitCode").partition(":")
    return SlurmJob(
        job_id=job_id, name=_field(text, "JobName"), state=_state(_field(text, "JobState")),
        reason=_field(text, "Reason"), status=int(status) if status.isdigit() else None,
        signal=int(signal) if signal.isdigit() else 0, started=parse_time(_field(text, "StartTime")),
        finished=parse_time(_field(text, "EndTime")), time_limit=_field(text, "TimeLimit"),
    )


def parse_submit(stdout: str) -> str:
    """The job id from `sbatch --parsable` (`ID` or `ID;cluster`)."""
    first = stdout.strip().splitlines()[0] if stdout.strip() else ""
    job_id = first.split(";")[0].strip()
    if not job_id.isdigit():
        raise ValueError(f"sbatch printed no job id: {stdout.strip()[:200]!r}")
    return job_id


def error_message(stderr: str, stdout: str = "") -> str:
    """The gist of a failed Slurm command, for an end user: its `error:` lines, prefixes removed."""
    lines = [line.strip() for line in (stderr + "\n" + stdout).splitlines() if line.strip()]
    errors = [re.sub(r"^(?:\w+: )?error: ", "", line) for line in lines if "error" in line.lower()]
    text = "; ".join(errors or lines) or "no message"
    text = text.replace("Batch job submission failed: ", "")
    return text if len(text) <= 500 else text[:497] + "..."


def unavailable(message: str) -> bool:
    """Does this error mean Slurm cannot answer right now (503) rather than a refusal (400)?"""
    return bool(_UNAVAILABLE.search(message))


def refused_path(task: Task, message: str) -> str:
    """The JSON path of the part of `task` a Slurm refusal `message` is about: `$.gpus` when a task
    with GPUs is refused for its gres or an impossible node configuration, else `$`."""
    gres = task.gpus and any(word in message.lower() for word in ("gres", "node configuration"))
    return "$.gpus" if gres else "$"


def no_such_job(message: str) -> bool:
    return bool(_NO_SUCH_JOB.search(message))


# ---- Slurm's answer in the common vocabulary -----------------------------------------------------

def walltime_exceeded(limit: str) -> str:
    seconds = parse_duration(limit)
    if seconds is None:
        return "killed: wall-clock time limit exceeded"
    return f"killed: wall-clock time limit of {-(-seconds // 60)} min exceeded"


def job_status(task: Task, job: SlurmJob, recorded: int | None = None, *, requeue: bool = False) -> JobStatus | None:
    """The status of `task` whose Slurm job is `job`; `recorded` is the exit code the job script
    wrote to its exit-code file, if it did. None for a state JobProxy does not know.

    PREEMPTED is final. A job Slurm requeues when it is preempted (submitted with --requeue,
    `requeue`, in a partition whose PreemptMode is REQUEUE) never shows PREEMPTED: it is PENDING
    (REQUEUED while it ends) at once, so QUEUED. A --requeue job that shows PREEMPTED was cancelled
    (PreemptMode CANCEL) and does not run again. (Slurm gives a preempted job no reason of its
    own: Reason stays None, ExitCode 0:15, the SIGTERM it got.)"""
    state = STATES.get(job.state)
    if state is None:
        return None
    reason = job.reason if job.reason.upper() not in _NOT_SET else ""
    if not state.terminal:
        words = {TaskState.QUEUED: "pending", TaskState.INITIALIZING: "configuring",
                 TaskState.PAUSED: "suspended", TaskState.RUNNING: "running"}[state]
        if job.state not in ("PENDING", "RUNNING", "CONFIGURING", "SUSPENDED"):
            words += f" ({job.state.lower()})"
        description = f"{words} as Slurm job {job.job_id}" + (f": {reason}" if reason else "")
        started = job.started if state in (TaskState.RUNNING, TaskState.PAUSED) else None
        return JobStatus(state, description, started=started)

    code = recorded if recorded is not None else job.exit_code
    if job.state == "FAILED" and recorded is None and job.signal == 9 and task.memory:
        # Killed as a whole by SIGKILL before it could record an exit code: without a memory
        # cgroup, that is how Slurm's memory enforcement (OverMemoryKill) ends a job.
        description = outcome.memory_exceeded(task)
    elif job.state == "COMPLETED" or (job.state == "FAILED" and code):
        ended = outcome.from_exit_code(task, code or 0)
        state, description = ended.state, ended.description
    elif job.state == "FAILED":
        description = "failed in Slurm" + (f": {reason}" if reason else "")
    elif job.state == "OUT_OF_MEMORY":
        description = outcome.memory_exceeded(task)
    elif job.state == "TIMEOUT":
        description = walltime_exceeded(job.time_limit)
    elif job.state == "DEADLINE":
        description = "killed: the job's deadline passed"
    elif job.state == "CANCELLED":
        description = "cancelled in Slurm"
    elif job.state == "PREEMPTED":
        description = f"preempted by Slurm (job {job.job_id}): a job of higher priority took its resources" \
            + (f" ({reason})" if reason else "") \
            + ("; Slurm cancelled it rather than requeue it (its partition's PreemptMode is not REQUEUE)"
               if requeue else "")
    else:
        which = {"NODE_FAIL": "the job's node failed", "BOOT_FAIL": "the job's node failed to boot"}
        description = which.get(job.state, f"Slurm ended the job: {job.state}") + (f" ({reason})" if reason else "")
    return JobStatus(state, description, code, started=job.started, finished=job.finished)
