"""The Slurm scheduler: each task becomes one Slurm batch job, driven through Slurm's own commands.

- submit: the job script (slurm.sh, or the admin's `template`) carries the task's name,
  files and limits as `#SBATCH` lines, then the common body (`run_block`: CPU-time ulimit, the
  command, the exit-code file); `sbatch --parsable --job-name=<task id>` reads it on stdin (no
  file is written per task) and answers the job id. The job name is the task id, so `find`
  recovers a job by name after a crash; the script also writes its job id to the task's folder,
  for jobs Slurm has already forgotten.
- submit: at most `submit_concurrency` sbatch calls run at once; more submissions wait their turn.
- status: one `squeue --jobs=ID,...` call per poll, asking about the gateway's active jobs only, in
  every state (split over several calls only for many thousands of ids). A job squeue no longer
  lists is resolved from the exit-code file its script wrote, else `scontrol`. Jobs are matched by
  id *and* name, so a job id Slurm reuses is never taken for ours. `find` asks by name.
- cancel: `scancel --name=<task id> <job id>`, which cannot hit another job.
- GPUs: `--gres=gpu:N` (Slurm exports CUDA_VISIBLE_DEVICES to the job); the task's `slurm.*`
  backend parameters (partition, account, qos, constraint, reservation) take the place of the
  site's options. A preempted job is PREEMPTED, final, unless `requeue` lets Slurm requeue it
  (where its partition's PreemptMode is REQUEUE): it is then QUEUED again.
- `--time`: from the task's `cputime` (× `time_factor`, + the CPU-time grace, in whole minutes,
  see `units.walltime_for_cputime`), else the admin's `default_time`, else the partition's default.

Every command is an argv list run with a timeout (`commands.run`). Slurm's own message reaches the user:
`TaskRefused` (400) when Slurm says no, `SchedulerUnavailable` (503) when it cannot answer.
"""
from __future__ import annotations

import asyncio
import logging
import os
import shutil
import time
from collections.abc import Coroutine, Mapping, Sequence
from pathlib import Path
from typing import Any

from .. import accounts, outcome
from ..base import (
    TEMPLATE_OPTION,
    JobRef,
    JobStatus,
    Report,
    Scheduler,
    SchedulerError,
    SchedulerUnavailable,
    TaskRefused,
)
from ..commands import CommandTimeout, run
from ..files import recorded_exit
from ..script import EXIT_FILE, describe_request, quote, render, run_block
from ..task import Task, TaskState
from .parse import (
    STATES,
    SlurmJob,
    check_task_paths,
    directives,
    error_message,
    job_status,
    no_such_job,
    parse_scontrol,
    parse_squeue,
    parse_submit,
    refused_path,
    squeue_argvs,
    squeue_name_argv,
    time_limit_minutes,
    unavailable,
)

log = logging.getLogger(__name__)

COMMANDS = ("sbatch", "squeue", "scontrol", "scancel")
PLACEHOLDERS = ("task_id", "workdir", "resources", "directives", "run")
#: Written by the job script into the task's folder: the job id, for `find` after Slurm forgot it.
JOB_ID_FILE = "slurm_job_id"

#: `[scheduler.options.rest]`: slurmrestd's address and where its JWT tokens come from (token.py).
REST_OPTIONS: dict[str, Any] = {
    "type": "object", "additionalProperties": False, "default": {},
    "description": "with api = \"rest\": slurmrestd and its tokens",
    "properties": {
        "url": {"type": "string", "pattern": "^https?://[^\\s/]+", "x-error": {"pattern": "must be an http(s) URL"},
                "description": "slurmrestd's address, e.g. http://slurm-head:6820 (required with api = \"rest\")"},
        "user": {"type": "string", "minLength": 1, "pattern": "^[^\\s:]+$",
                 "description": "Slurm user of the status queries and of jobs that run as the gateway's own "
                                "account (default: the gateway's Unix user name)"},
        "token_command": {"type": "array", "minItems": 1, "items": {"type": "string"},
                          "default": ["scontrol", "token", "username={user}", "lifespan={lifespan}"],
                          "description": "argv printing a token ({user}, {lifespan} replaced); used unless "
                                         "token_file or jwt_key_file is set"},
        "token_file": {"type": "string", "pattern": "^/", "x-error": {"pattern": "must be an absolute path"},
                       "description": "file holding the token ({user} in the path: one file per user), re-read "
                                      "when it changes"},
        "jwt_key_file": {"type": "string", "pattern": "^/", "x-error": {"pattern": "must be an absolute path"},
                         "description": "the cluster's JWT key (slurm.conf AuthAltParameters=jwt_key): the gateway "
                                        "signs its own tokens"},
        "token_lifespan": {"type": "integer", "minimum": 60, "maximum": 31536000, "default": 1800,
                           "description": "seconds a new token is valid; renewed before it expires"},
        "listing_timeout": {"type": "number", "exclusiveMinimum": 0, "maximum": 3600, "default": 60,
                            "description": "seconds a listing of Slurm's whole job table (the status query, "
                                           "recovery) may take; other requests take command_timeout"},
        "environment": {"type": "object", "additionalProperties": {"type": "string"},
                        "default": {"PATH": "/usr/local/bin:/usr/bin:/bin"},
                        "description": "the environment of jobs that run as the gateway's own account (jobs of "
                                       "other accounts get their login environment)"},
    },
}

_ONE_LINE = {"type": "string", "minLength": 1, "pattern": "^[^\\u0000-\\u001f\\\\]*$",
             "x-error": {"pattern": "must be one line without backslashes"}}


class SlurmScheduler(Scheduler):
    """Runs each task as a Slurm batch job with its cores, memory, CPU time and wall time."""

    supports_run_as = True

    options_schema = {
        "type": "object",
        "additionalProperties": False,
        "properties": {
            "partition": {**_ONE_LINE, "description": "sbatch --partition (default: Slurm's default partition)"},
            "account": {**_ONE_LINE, "description": "sbatch --account"},
            "qos": {**_ONE_LINE, "description": "sbatch --qos"},
            "extra_directives": {
                "type": "array", "default": [],
                "description": "more sbatch options, one per item, each written as an #SBATCH line",
                "items": {"type": "string", "pattern": "^-[^\\u0000-\\u001f\\\\]*$",
                          "x-error": {"pattern": "must be one sbatch option starting with '-' (e.g. "
                                                 "\"--constraint=haswell\"), on one line, without backslashes"}},
            },
            "requeue": {"type": "boolean", "default": False,
                        "description": "let Slurm requeue a preempted job (sbatch --requeue): where the job's "
                                       "partition has PreemptMode REQUEUE it is then QUEUED again, not "
                                       "PREEMPTED, which is otherwise final"},
            "default_time": {"type": "integer", "minimum": 1, "maximum": 31536000000,
                             "description": "wall-clock limit in seconds of tasks without cputime "
                                            "(default: the partition's)"},
            "time_factor": {"type": "number", "minimum": 1, "maximum": 1000, "default": 2,
                            "description": "with cputime: --time = cputime × time_factor + 5 s, in whole minutes"},
            "template": TEMPLATE_OPTION,
            "command_timeout": {"type": "number", "exclusiveMinimum": 0, "maximum": 3600, "default": 5,
                                "description": "seconds a Slurm command may take before Slurm counts as unreachable"},
            "submit_concurrency": {"type": "integer", "minimum": 1, "maximum": 256, "default": 8,
                                   "description": "sbatch calls that may run at once; more submissions wait"},
            "bin_dir": {"type": "string", "pattern": "^/", "x-error": {"pattern": "must be an absolute path"},
                        "description": "folder of sbatch, squeue, scontrol and scancel (default: PATH)"},
            "api": {"enum": ["cli", "rest"], "default": "cli",
                    "description": "how to reach Slurm: its commands (cli), or slurmrestd (rest, see `rest`)"},
            "rest": REST_OPTIONS,
        },
    }

    def __new__(cls, name: str, options: Mapping[str, Any], state_dir: Path, **contract: Any) -> SlurmScheduler:
        """With `api = "rest"`, the plugin is its REST variant (rest.py): same options, job script
        and state mapping, requests to slurmrestd instead of Slurm's commands."""
        if cls is SlurmScheduler and options.get("api") == "rest":
            from .rest import SlurmRestScheduler
            return super().__new__(SlurmRestScheduler)
        return super().__new__(cls)

    def __init__(self, name: str, options: Mapping[str, Any], state_dir: Path, **contract: Any) -> None:
        super().__init__(name, options, state_dir, **contract)
        self.partition: str | None = self.options.get("partition")
        self.slurm_account: str | None = self.options.get("account")
        self.qos: str | None = self.options.get("qos")
        self.extra: list[str] = list(self.options["extra_directives"])
        self.default_time: int | None = self.options.get("default_time")
        self.requeue = bool(self.options["requeue"])
        self.time_factor = float(self.options["time_factor"])
        self.timeout = float(self.options["command_timeout"])
        self.bin_dir: str | None = self.options.get("bin_dir")
        self._submit_slots = asyncio.Semaphore(int(self.options["submit_concurrency"]))
        self.template = self.job_template(PLACEHOLDERS, required=("directives", "run"))
        self.commands: dict[str, str] = {}
        self._unknown_seen: set[tuple[str, str]] = set()
        self._background: set[asyncio.Task[None]] = set()

    async def start(self, report: Report) -> None:
        await super().start(report)
        where = self.bin_dir or "PATH"
        for command in COMMANDS:
            found = shutil.which(command, path=self.bin_dir or os.environ.get("PATH", os.defpath))
            if found is None:
                raise SchedulerError(f"the Slurm command {command!r} was not found in {where}: install Slurm's client "
                                     "commands (Debian: slurm-client) or set scheduler.options.bin_dir")
            self.commands[command] = found
        self.state_dir.mkdir(parents=True, exist_ok=True)
        wall = (f"cputime × {self.time_factor:g} + 5 s" + (f", else {self.default_time} s" if self.default_time
                                                            else ", else the partition's default"))
        log.info("slurm scheduler %s: commands from %s; partition %s; --time from %s; CPU time by ulimit in the "
                 "job script", self.name, where, self.partition or "(Slurm's default)", wall)

    async def close(self) -> None:
        for pending in list(self._background):
            pending.cancel()

    # ---- the contract ----

    def admit(self, task: Task) -> None:
        check_task_paths(task)

    def job_script(self, task: Task) -> str:
        """The job script of `task`: the template filled with its directives and the common body."""
        lines = directives(task, time_minutes=time_limit_minutes(task, self.default_time, self.time_factor),
                           partition=self.partition, account=self.slurm_account, qos=self.qos, extra=self.extra,
                           requeue=self.requeue)
        record = f"printf '%s\\n' \"$SLURM_JOB_ID\" > {quote(f'{task.workdir}/{JOB_ID_FILE}')}"
        return render(self.template, {
            "task_id": quote(task.id),
            "workdir": quote(task.workdir),
            "resources": describe_request(task),
            "directives": "\n".join(lines),
            "run": record + "\n" + run_block(task, self.job_command(task)),
        })

    async def submit(self, task: Task) -> str:
        return await self._sbatch(task, self.job_script(task))

    async def find(self, task: Task) -> str | None:
        named = sorted(await self._named(task.id), key=int)
        if len(named) > 1:
            log.warning("task %s: Slurm has several jobs named after it (%s); taking %s", task.id, ", ".join(named),
                        named[0])
        if named:
            return named[0]
        try:
            recorded = (Path(task.workdir) / JOB_ID_FILE).read_text().strip()
        except OSError:
            return None
        return recorded if recorded.isdigit() else None

    async def _named(self, name: str) -> list[str]:
        """The ids of the jobs Slurm knows by the name `name` (a task's id)."""
        argv = squeue_name_argv(self._path("squeue"), name)
        return [j.job_id for j in (await self._squeue(argv)).values() if j.name == name]

    async def status(self, jobs: Sequence[JobRef]) -> dict[str, JobStatus]:
        if not jobs:
            return {}
        listed: dict[str, SlurmJob] = {}
        for argv in squeue_argvs(self._path("squeue"), dict.fromkeys(job.native_id for job in jobs)):
            listed.update(await self._squeue(argv))
        return await self._answers(jobs, listed)

    async def _answers(self, jobs: Sequence[JobRef], listed: Mapping[str, SlurmJob]) -> dict[str, JobStatus]:
        """Each job's status: from `listed` (Slurm's listing, by job id) where it is there under
        its task's name, else as a job Slurm no longer lists."""
        answers: dict[str, JobStatus] = {}
        for job in jobs:
            found = listed.get(job.native_id)
            if found is not None and found.name == job.task_id:
                answers[job.task_id] = self._status(job, found)
            else:
                answers[job.task_id] = await self._unlisted(job)
        return answers

    async def cancel(self, job: JobRef) -> None:
        code, out, err = await self._run("scancel", f"--name={job.task_id}", job.native_id)
        message = error_message(err, out)
        if code == 0 or no_such_job(message) or "already completing or completed" in message.lower():
            log.info("task %s: cancelled Slurm job %s", job.task_id, job.native_id)
            return
        if unavailable(message):
            raise SchedulerUnavailable(f"Slurm cannot cancel job {job.native_id} now: {message}")
        raise SchedulerError(f"Slurm could not cancel job {job.native_id}: {message}")

    async def release(self, job: JobRef) -> None:
        shutil.rmtree(self.state_dir / job.task_id, ignore_errors=True)  # the job script older versions kept

    # ---- inside ----

    async def _sbatch(self, task: Task, script: str) -> str:
        """Submit the job script `script` of `task` on sbatch's stdin (Slurm keeps its own copy)."""
        argv = [self._path("sbatch"), "--parsable", f"--job-name={task.id}", *self._on_behalf(task)]
        try:
            async with self._submit_slots:
                done = await run(argv, self.timeout, service="Slurm", input=script.encode("utf-8"))
            code, out, err = done.status, done.stdout, done.stderr
        except CommandTimeout:  # slurmctld may have taken the job all the same: it must not run unseen
            self._later(self._cancel_by_name(task.id))
            raise
        if code != 0:
            message = error_message(err, out)
            if unavailable(message):
                raise SchedulerUnavailable(f"Slurm cannot take the task now: {message}")
            raise TaskRefused(f"Slurm refused the task: {message}", refused_path(task, message))
        if err.strip():
            log.warning("task %s: sbatch said: %s", task.id, err.strip())
        try:
            return parse_submit(out)
        except ValueError as exc:
            self._later(self._cancel_by_name(task.id))
            raise SchedulerUnavailable(f"Slurm gave an unexpected answer: {exc}") from None

    def _on_behalf(self, task: Task) -> list[str]:
        """For a job that runs as another account (`job_account`): submit as root on its behalf,
        with a clean login environment."""
        account = self.job_account(task)
        if account is None:
            return []
        try:
            entry = accounts.entry(account)
        except KeyError:
            raise TaskRefused(f"there is no Unix account {account!r} on the gateway's host to run the job as",
                              "$.user" if self.run_as_user else "$") from None
        return [f"--uid={entry.pw_uid}", f"--gid={entry.pw_gid}", "--export=NONE"]

    def _status(self, job: JobRef, found: SlurmJob) -> JobStatus:
        state = STATES.get(found.state)
        recorded = recorded_exit(job.task)[0] if state is None or state.terminal else None
        status = job_status(job.task, found, recorded, requeue=self.requeue)
        if status is not None:
            return status
        if (job.task_id, found.state) not in self._unknown_seen:
            self._unknown_seen.add((job.task_id, found.state))
            log.warning("task %s: Slurm job %s is in state %s, which JobProxy does not know; reporting UNKNOWN",
                        job.task_id, found.job_id, found.state)
        return JobStatus(TaskState.UNKNOWN, f"Slurm job {found.job_id} is in state {found.state}")

    async def _unlisted(self, job: JobRef) -> JobStatus:
        """A job squeue no longer lists: its exit-code file, else scontrol, else it is lost."""
        recorded, finished = recorded_exit(job.task)
        if recorded is not None:
            return outcome.from_exit_code(job.task, recorded, finished=finished)
        found = await self._scontrol(job.native_id)
        if found is not None and found.name == job.task_id:
            return self._status(job, found)
        return JobStatus(TaskState.SYSTEM_ERROR, f"Slurm no longer knows job {job.native_id}, and the job left no "
                                                 f"exit code in {job.task.workdir}/{EXIT_FILE}")

    async def _squeue(self, argv: list[str]) -> dict[str, SlurmJob]:
        code, out, err = await self._argv(argv)
        if code != 0:
            message = error_message(err, out)
            if no_such_job(message):  # squeue asked about one job id only, which Slurm has forgotten
                return {}
            self._fail("squeue", message)
        return parse_squeue(out)

    async def _scontrol(self, job_id: str) -> SlurmJob | None:
        code, out, err = await self._run("scontrol", "--oneliner", "show", "job", job_id)
        if code != 0:
            message = error_message(err, out)
            if no_such_job(message):
                return None
            self._fail("scontrol", message)
        return parse_scontrol(out)

    @staticmethod
    def _fail(command: str, message: str) -> None:
        if unavailable(message):
            raise SchedulerUnavailable(f"Slurm cannot answer now ({command}): {message}")
        raise SchedulerError(f"{command} failed: {message}")

    #: After a submit whose outcome is unknown: seconds between tries to cancel the job it may have
    #: left while Slurm does not answer, and how long to keep trying.
    CANCEL_RETRY = 2.0
    CANCEL_FOR = 600.0

    async def _cancel_by_name(self, task_id: str) -> None:
        """Cancel whatever job carries `task_id`, best effort (after a submit whose outcome is unknown).
        A hung slurmctld may take the job when it wakes up, so scancel is tried again while Slurm
        cannot answer (a timeout, or it is unreachable), for up to `CANCEL_FOR` seconds."""
        deadline = time.monotonic() + self.CANCEL_FOR
        while True:
            try:
                code, out, err = await self._run("scancel", f"--name={task_id}")
                retry = code != 0 and unavailable(error_message(err, out))
            except SchedulerUnavailable as exc:
                code, out, err, retry = -1, "", str(exc), True
            except SchedulerError as exc:
                code, out, err, retry = -1, "", str(exc), False
            if not retry or time.monotonic() + self.CANCEL_RETRY > deadline:
                break
            await asyncio.sleep(self.CANCEL_RETRY)
        if code == 0:
            log.warning("task %s: its submission failed; cancelled the Slurm job it may have left", task_id)
        else:
            log.error("task %s: its submission failed, and the Slurm job it may have left could not be cancelled: %s",
                      task_id, error_message(err, out))

    def _later(self, work: Coroutine[Any, Any, None]) -> None:
        pending = asyncio.get_running_loop().create_task(work)
        self._background.add(pending)
        pending.add_done_callback(self._background.discard)

    def _path(self, command: str) -> str:
        return self.commands.get(command, command)

    async def _run(self, command: str, *args: str) -> tuple[int, str, str]:
        """Run the Slurm command `command` (sbatch, squeue, ...) with `args`: exit status, stdout, stderr."""
        return await self._argv([self._path(command), *args])

    async def _argv(self, argv: list[str]) -> tuple[int, str, str]:
        done = await run(argv, self.timeout, service="Slurm")
        return done.status, done.stdout, done.stderr

