"""The DRMAA scheduler: every task becomes a DRMAA v1 job (the `drmaa` package over the site's
libdrmaa), tested against Grid Engine.

Job. The task's job script (drmaa.sh, written into the task's folder, which compute
hosts must see) is the remote command: it sets the CPU-time rlimit, runs the command and writes
the exit-code file, like every scheduler's. The job is named after the task id and carries it in
its environment; cores, memory and CPU time go in the native specification, rendered from the
admin's template (mapping.py). DRMAA calls run in the process's one session and worker thread
(drmaa_session.py); its errors become TaskRefused (the DRM refuses the job: 400) or
SchedulerUnavailable (it cannot be reached or did not answer: 503).

States. With `drm = "gridengine"`, each poll makes one `qstat -xml -u '*'` call, which gives
the state of every job Grid Engine still has (gridengine.py); DRMAA is asked nothing about those.
A job qstat no longer lists has finished: a job that ended in this session is reaped with wait()
(no state query), which says how it ended; a job submitted before a restart is unknown to the
new session: its exit-code file says how it ended, else its accounting record (qacct). With
`drm = "other"`, each poll asks DRMAA for the state of every active job, in one trip to the
worker, with the same fallbacks (no accounting). The exit-code file also wins when it has existed
for a while but the DRM still lists the job as active, or cannot tell (both seen after a qmaster
restart). Jobs the gateway terminated are CANCELED, marked by a
file in the plugin's state folder, since DRMAA reports them as failed like jobs that could not
start. If the DRM cannot be reached when the gateway starts, it starts anyway and answers 503
until the DRM can be reached.

Memory. The default template asks Grid Engine for h_vmem, an address-space limit: an allocation
over it fails and the program usually exits on its own (exit 1 with MemoryError, say) rather than
being killed, so the exit status alone cannot say "memory". The outcome names the memory limit
only with evidence: the DRM killed the job with its peak memory at the limit (Grid Engine does
when processes together exceed it), or the job failed with a peak near the limit, or with the
words of a failed allocation (MemoryError, std::bad_alloc, ...) at the end of its stderr. That
last one is a heuristic, and the description says which evidence it rests on. A memory cgroup
would be exact, but a job script cannot count on one where jobs run as users. A task in a Docker
or Podman container gets no memory in its native specification: the container runs outside the
job, the runtime limits its memory, and h_vmem would only break the runtime's client.
"""
from __future__ import annotations

import asyncio
import logging
import os
import re
import shutil
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from .. import outcome
from ..base import (
    TEMPLATE_OPTION,
    JobRef,
    JobStatus,
    Report,
    Scheduler,
    SchedulerConfigError,
    SchedulerError,
    SchedulerUnavailable,
    TaskRefused,
)
from ..files import recorded_exit, tail
from ..task import Task, TaskState
from . import gridengine, mapping
from .endings import Endings
from .session import shared

log = logging.getLogger(__name__)

SCRIPT_NAME = "drmaa-job.sh"
_NAME = r"^[^\s'\"\\{}]+$"
_NAME_ERROR = {"pattern": "must be a Grid Engine name: no spaces, quotes, backslashes or braces"}
#: Seconds an exit-code file may exist while the DRM still lists the job as active (none: "undetermined").
_SETTLE = 10.0
_TAIL = 16384  # bytes of stderr searched for the words of a failed allocation
_REFUSALS = ("DeniedByDrmException", "InvalidAttributeValueException", "InvalidAttributeFormatException",
             "ConflictingAttributeValuesException", "InvalidArgumentException", "UnsupportedAttributeException")


class DrmaaScheduler(Scheduler):
    """Runs each task as a DRMAA job with its cores, memory and CPU time in the native specification."""

    options_schema = {
        "type": "object",
        "additionalProperties": False,
        "properties": {
            "drm": {"enum": ["gridengine", "other"], "default": "gridengine",
                    "description": "gridengine: check SGE_ROOT/SGE_CELL, default native_spec, qacct after restarts"},
            "library_path": {"type": "string", "minLength": 1,
                             "description": "libdrmaa (default: $DRMAA_LIBRARY_PATH)"},
            "sge_root": {"type": "string", "minLength": 1, "description": "Grid Engine root (default: $SGE_ROOT)"},
            "sge_cell": {"type": "string", "minLength": 1,
                         "description": "Grid Engine cell (default: $SGE_CELL, else default)"},
            "contact": {"type": "string", "default": "",
                        "description": "DRMAA contact string (default: the DRM's default)"},
            "native_spec": {"type": "array", "items": {"type": "string"},
                            "description": "native-specification pieces with placeholders; see mapping.NATIVE_FIELDS"},
            "parallel_environment": {"type": "string", "pattern": _NAME, "x-error": _NAME_ERROR, "default": "smp"},
            "queue": {"type": "string", "pattern": _NAME, "x-error": _NAME_ERROR},
            "gpu_resource": {"type": "string", "pattern": _NAME, "x-error": _NAME_ERROR,
                             "description": "the consumable complex that counts GPUs (-l NAME=N), defined `consumable "
                                            "JOB`; without it tasks asking for GPUs are refused"},
            "max_gpus": {"type": "integer", "minimum": 1,
                         "description": "the most GPUs one job can get (e.g. the most one host has); more is refused"},
            "template": TEMPLATE_OPTION,
            "environment": {
                "type": "object", "default": {}, "additionalProperties": {"type": "string"},
                "propertyNames": {"pattern": "^[A-Za-z_][A-Za-z0-9_]*$", "x-error": {
                    "pattern": "must be a variable name: letters, digits and '_', not starting with a digit"}},
                "description": "variables added to every job's environment"},
            "call_timeout": {"type": "number", "minimum": 1, "maximum": 600, "default": 5,
                             "description": "seconds a DRMAA call may take before the request answers 503"},
            "cancel_timeout": {"type": "number", "minimum": 0, "maximum": 600, "default": 30,
                               "description": "seconds a DELETE waits for the DRM to end the job"},
            "lost_after": {"type": "number", "minimum": 0, "default": 120,
                           "description": "seconds before a job the DRM forgot without any exit record is a "
                                          "SYSTEM_ERROR"},
            "bin_dir": {"type": "string", "pattern": "^/", "x-error": {"pattern": "must be an absolute path"},
                        "description": "gridengine: folder of qstat and qacct (default: PATH)"},
        },
        "if": {"properties": {"drm": {"const": "other"}}, "required": ["drm"]},
        "then": {"required": ["native_spec"]},
    }

    def __init__(self, name: str, options: Mapping[str, Any], state_dir: Path, **contract: Any) -> None:
        super().__init__(name, options, state_dir, **contract)
        o = self.options
        self.grid_engine = o["drm"] == "gridengine"
        self.drm_name = "Grid Engine" if self.grid_engine else "the DRM"
        self.library = o.get("library_path") or os.environ.get("DRMAA_LIBRARY_PATH", "")
        if not self.library:
            raise SchedulerConfigError("DRMAA_LIBRARY_PATH is not set: set it in the gateway's environment or set "
                                 "scheduler.options.library_path to the site's libdrmaa "
                                 "(Grid Engine on Debian: /usr/lib/gridengine-drmaa/lib/libdrmaa.so.1.0)")
        if not Path(self.library).is_file():
            raise SchedulerConfigError(f"libdrmaa {self.library} does not exist (DRMAA_LIBRARY_PATH or "
                                       "scheduler.options.library_path)")
        self.env = {"DRMAA_LIBRARY_PATH": self.library}
        if self.grid_engine:
            root = o.get("sge_root") or os.environ.get("SGE_ROOT", "")
            cell = o.get("sge_cell") or os.environ.get("SGE_CELL") or "default"
            problem = gridengine.environment_problem(root, cell)
            if problem:
                raise SchedulerConfigError(problem)
            self.env.update(SGE_ROOT=root, SGE_CELL=cell)
        self.pieces = tuple(o.get("native_spec", mapping.GRID_ENGINE_SPEC))
        mapping.check_native_spec(self.pieces)
        self.template = self.job_template(mapping.SCRIPT_PLACEHOLDERS, required=())
        self.timeout = float(o["call_timeout"])
        self.qstat: str | None = None  # gridengine: the paths of qstat and qacct, found by start()
        self.qacct: str | None = None
        self._missing: dict[str, float] = {}  # task id -> when its job was first found gone without a record
        # task id -> when qstat first no longer listed a job that the session still has as active
        self._lagging: dict[str, float] = {}
        self._unknown_seen: set[tuple[str, str]] = set()
        self._endings = Endings(self._still_active)  # the jobs cancels wait for, probed together

    async def start(self, report: Report) -> None:
        await super().start(report)
        self.state_dir.mkdir(parents=True, exist_ok=True)
        os.environ.update(self.env)  # libdrmaa reads them when it loads and when the session opens
        if self.grid_engine:
            where = self.options.get("bin_dir")
            search = where or os.environ.get("PATH", os.defpath)
            self.qstat, self.qacct = shutil.which("qstat", path=search), shutil.which("qacct", path=search)
            if self.qstat is None:
                raise SchedulerConfigError(f"the Grid Engine command qstat was not found in {where or 'PATH'}: install "
                                           "Grid Engine's client commands (Debian: gridengine-client) or set "
                                           "scheduler.options.bin_dir")
        drm = shared()
        drm.contact = self.options["contact"]
        await drm.call(self.timeout, drm.load, self.library)
        try:
            drms = await drm.call(self.timeout, drm.open)
        except (drm.lib.errors.DrmCommunicationException, SchedulerUnavailable) as exc:
            log.warning("drmaa scheduler %s: %s cannot be reached yet (%s); tasks are answered 503 until it can",
                        self.name, self.drm_name, _message(exc))
            return
        except drm.lib.errors.DrmaaException as exc:
            raise SchedulerError(f"cannot open a DRMAA session with {self.library}: {_message(exc)}") from None
        log.info("drmaa scheduler %s: %s via %s; native specification %s; CPU time also by RLIMIT_CPU in the job "
                 "script; job states from %s", self.name, drms, self.library, " ".join(self.pieces) or "(none)",
                 f"{self.qstat} -xml" if self.qstat else "DRMAA, one call per job")

    # ---- the contract ----

    def admit(self, task: Task) -> None:
        if task.gpus and "gpu_resource" not in self.options:
            raise TaskRefused(f"the task asks for {task.gpus} GPU(s); this scheduler has none (no gpu_resource)",
                              "$.gpus")
        most = self.options.get("max_gpus")
        if most is not None and task.gpus > most:
            raise TaskRefused(f"the task asks for {task.gpus} GPUs; a job here gets at most {most}", "$.gpus")
        for key, path in (("stdout", task.stdout), ("stderr", task.stderr)):
            if "$" in path:
                raise TaskRefused(f"cannot write output to {path}: DRMAA takes $...$ in a path for a placeholder; "
                                  "choose a path without '$'", f"$.{key}")

    def native_specification(self, task: Task) -> str:
        """The native specification of `task`'s job: the site's pieces with the task's values."""
        runtime_limits_memory = task.container is not None and self.runtime is not None and self.runtime.limits_memory
        values = mapping.native_values(task, self.options["parallel_environment"], self.options.get("queue"),
                                       job_memory=not runtime_limits_memory,
                                       gpu_resource=self.options.get("gpu_resource"))
        return mapping.native_spec(self.pieces, values)

    async def submit(self, task: Task) -> str:
        script = Path(task.workdir) / SCRIPT_NAME
        text = mapping.job_script(self.template, task, self.job_command(task))
        try:
            self._spool(task.id).mkdir(parents=True, exist_ok=True)
            partial = script.with_name(SCRIPT_NAME + ".part")
            partial.write_text(text, encoding="utf-8")
            partial.chmod(0o700)
            partial.replace(script)
        except OSError as exc:
            raise SchedulerUnavailable(f"the DRMAA scheduler cannot write the job script: {exc.strerror}") from None
        fields = mapping.job_template(task, str(script), self.native_specification(task),
                                      self.options["environment"])
        abandoned = threading.Event()
        try:
            job_id = await self._call(shared().run_job, fields, self._spool(task.id) / "job_id", abandoned,
                                      doing="take the job")
            return str(job_id)
        except (SchedulerUnavailable, asyncio.CancelledError):
            abandoned.set()
            raise

    async def find(self, task: Task) -> str | None:
        try:
            return (self._spool(task.id) / "job_id").read_text().strip() or None
        except OSError:
            return None

    async def status(self, jobs: Sequence[JobRef]) -> dict[str, JobStatus]:
        if not jobs:
            return {}
        if self.grid_engine:
            probes = await self._qstat_probes(jobs)
        else:
            probes = await self._call(shared().probe, [j.native_id for j in jobs], doing="report job states")
        answers = {}
        for job in jobs:
            found = await self._judge(job, *probes[job.native_id])
            if found is not None:
                answers[job.task_id] = found
        return answers

    async def cancel(self, job: JobRef) -> None:
        marker = self._spool(job.task_id) / "cancelled"
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.touch()
        try:
            active = await self._call(shared().terminate, job.native_id, doing="terminate the job")
        except SchedulerError:
            marker.unlink(missing_ok=True)
            raise
        if active:  # until the DRM has really ended it
            active = not await self._endings.wait(job, float(self.options["cancel_timeout"]))
        if active:
            log.warning("task %s: DRMAA job %s is still active after terminate", job.task_id, job.native_id)
        else:
            log.info("task %s: DRMAA job %s terminated", job.task_id, job.native_id)

    async def close(self) -> None:
        await self._endings.close()
        await super().close()

    async def release(self, job: JobRef) -> None:
        shared().forget(job.native_id)
        self._missing.pop(job.task_id, None)
        self._lagging.pop(job.task_id, None)
        shutil.rmtree(self._spool(job.task_id), ignore_errors=True)

    # ---- inside ----

    def _spool(self, task_id: str) -> Path:
        return self.state_dir / task_id

    async def _call(self, fn: Callable[..., Any], *args: Any, doing: str) -> Any:
        """`fn` in the DRMAA thread; DRMAA errors become TaskRefused (the DRM refuses the job as
        asked) or SchedulerUnavailable (it cannot be reached or did not answer)."""
        drm = shared()
        if drm.lib is None:
            raise SchedulerUnavailable("the DRMAA scheduler has not started")
        try:
            return await drm.call(self.timeout, fn, *args)
        except SchedulerError:
            raise
        except Exception as exc:
            drmaa_error = (isinstance(exc, drm.lib.errors.DrmaaException)
                           or (type(exc) is Exception and str(exc).startswith("code ")))
            if not drmaa_error:
                raise
            if type(exc).__name__ in _REFUSALS:
                raise TaskRefused(f"{self.drm_name} refused the job: {_message(exc)}") from None
            log.warning("DRMAA call to %s failed: %s", doing, exc)
            raise SchedulerUnavailable(f"{self.drm_name} cannot {doing} right now: {_message(exc)}") from None

    async def _still_active(self, jobs: Sequence[JobRef]) -> set[str]:
        """The native ids of those of `jobs` the DRM still has as active (`Endings`' probe)."""
        if self.grid_engine:
            probes = await self._qstat_probes(jobs)
        else:
            probes = await self._call(shared().probe, [j.native_id for j in jobs], doing="report the jobs' states")
        return {native for native, (kind, _) in probes.items() if kind == "qstat" or kind in mapping.ACTIVE_STATES}

    async def _qstat_probes(self, jobs: Sequence[JobRef]) -> dict[str, tuple[str, Any]]:
        """Grid Engine: one qstat call for the state of every listed job; the jobs it no longer
        lists are reaped (DrmaaSession.reap), without a state query. Per native id, like
        DrmaaSession.probe: ("qstat", QueuedJob) for a listed job, else what `reap` says."""
        assert self.qstat is not None
        listed = await gridengine.listing(self.qstat, self.timeout)
        probes: dict[str, tuple[str, Any]] = {}
        for job in jobs:
            found = listed.get(job.native_id)
            if found is not None and found.name == mapping.job_name(job.task_id):  # not a reused id
                probes[job.native_id] = ("qstat", found)
        gone = [job.native_id for job in jobs if job.native_id not in probes]
        if gone:
            probes.update(await self._call(shared().reap, gone, doing="report how jobs ended"))
        return probes

    def _listed(self, job: JobRef, found: gridengine.QueuedJob) -> JobStatus:
        """The status of a job qstat lists."""
        mapped = gridengine.job_state(found.state)
        if mapped is None:
            if (job.task_id, found.state) not in self._unknown_seen:
                self._unknown_seen.add((job.task_id, found.state))
                log.warning("task %s: Grid Engine job %s is in state %r, which JobProxy does not know; reporting "
                            "UNKNOWN", job.task_id, found.job_id, found.state)
            return JobStatus(TaskState.UNKNOWN, f"Grid Engine reports job {found.job_id} in state {found.state}")
        state, words = mapped
        started = found.started if state in (TaskState.RUNNING, TaskState.PAUSED) else None
        return JobStatus(state, f"{words} as Grid Engine job {found.job_id}", started=started)

    async def _judge(self, job: JobRef, kind: str, data: Any) -> JobStatus | None:
        """The status of `job` from what the DRM said (`kind`, `data`: see DrmaaSession.probe and
        `_qstat_probes`) and its files."""
        task = job.task
        exit_code, exit_time = recorded_exit(task)
        cancelled = (self._spool(job.task_id) / "cancelled").exists()
        if kind == "error":
            log.warning("task %s: DRMAA job %s: %s", job.task_id, job.native_id, data)
            return None
        if kind == "qstat" or kind in mapping.ACTIVE_STATES:
            settled = exit_time is not None and (kind == "undetermined"
                                                 or time.time() - exit_time.timestamp() > _SETTLE)
            if not settled:
                if cancelled:
                    return JobStatus(TaskState.CANCELING, "terminating")
                return self._listed(job, data) if kind == "qstat" else mapping.active_status(job.native_id, kind)
            data = None  # the DRM is behind: the job script has ended
        elif kind == "lagging" and not cancelled:
            first = self._lagging.setdefault(job.task_id, time.monotonic())
            if time.monotonic() - first < _SETTLE:
                return None  # the session's news of how the job ended is on its way
        self._lagging.pop(job.task_id, None)
        if cancelled:
            return JobStatus(TaskState.CANCELED, outcome.CANCELED_ON_REQUEST, finished=exit_time)
        ending = mapping.ending_from_jobinfo(data) if data is not None else None
        wants_record = (ending is None and exit_code is None) or (ending is not None and ending.aborted)
        if self.qacct is not None and wants_record:
            recorded = await gridengine.accounting(self.qacct, job.native_id, mapping.job_name(task.id), self.timeout)
            ending = recorded or ending
        if exit_code is None and ending is None:
            first = self._missing.setdefault(job.task_id, time.monotonic())
            if time.monotonic() - first < float(self.options["lost_after"]):
                return None  # the exit file or the accounting record may still be on its way
        self._missing.pop(job.task_id, None)
        words = tail(task.stderr, _TAIL) if task.memory and exit_code not in (None, 0) else ""
        return mapping.conclude(task, job.native_id, exit_code=exit_code, ending=ending, stderr_tail=words,
                                  exit_time=exit_time)


def _message(exc: BaseException) -> str:
    """A DRMAA error's own words, without drmaa-python's "code N: " prefix."""
    return re.sub(r"^code \d+: ", "", str(exc)).strip()

