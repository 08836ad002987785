"""The pure half of the DRMAA plugin: a task's limits -> native specification, and what the DRM
says about a job -> the common JobStatus. No DRMAA library here: data in, data out, tested on
captured answers (tests/test_drmaa_render.py).

Native specification. DRMAA v1 has no attributes for cores, memory or CPU time, so the plugin
passes them in `nativeSpecification`, built from a template the admin sets per site (option
`native_spec`): a list of pieces such as "-l h_vmem={memory_per_slot_kib}K". A piece is kept
when every placeholder in it has a value for the task and left out otherwise (a task without a
memory limit gets no h_vmem), so one template serves every task. The values are numbers,
admin-set names checked at start-up, and the task's `sge.queue` and `sge.project` backend
parameters, which the task schema's patterns allow only letters, digits
and `_ . @ , -` (no space, quote or shell character); they still pass through `script.quote`.
GPUs: `-l {gpu_resource}={gpus}`, the site's consumable (define it `consumable JOB`, so the
count is per job, not per slot).
Grid Engine counts h_vmem and h_cpu per slot, so the default template asks for each limit
divided by the slots, rounded up: the job gets what the task asked for in total (at most
slots-1 KiB or seconds more), not that much times its cores.

CPU time: like every scheduler's, the job script enforces the task's limit per process with the
rlimit pair of `units.cpu_rlimit` (SIGXCPU at `cputime`, SIGKILL 5 s later), so the outcome can
say "CPU time limit exceeded". Grid Engine turns h_cpu into a per-process hard rlimit that the
job script cannot raise, so the default h_cpu is that hard limit (`{cputime_hard_per_slot}`):
a process still gets the script's SIGXCPU first, and the DRM caps the CPU time of the job as a
whole (all its processes together) there.
"""
from __future__ import annotations

import logging
import re
import signal
import string
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from .. import outcome
from ..base import JobStatus
from ..script import Command, describe_request, quote, render, run_block
from ..task import Task, TaskState
from ..units import bytes_to_mib, cpu_rlimit, mib_to_bytes, share

log = logging.getLogger(__name__)

#: The placeholders a native-specification piece may use, and what each one is.
NATIVE_FIELDS: dict[str, str] = {
    "slots": "the task's cores (1 when it asks none)",
    "parallel_slots": "the task's cores when more than 1; pieces using it are left out for 1 core",
    "pe": "option parallel_environment",
    "queue": "the task's sge.queue, else option queue; pieces using it are left out when neither is set",
    "project": "the task's sge.project; pieces using it are left out when it has none",
    "gpus": "the task's GPUs; pieces using it are left out for a task without GPUs",
    "gpu_resource": "option gpu_resource, the site's consumable for GPUs (e.g. gpu)",
    "memory": "the task's memory limit in MiB",
    "memory_kib": "the task's memory limit in KiB",
    "memory_per_slot": "memory / slots in MiB, rounded up",
    "memory_per_slot_kib": "memory / slots in KiB, rounded up",
    "cputime": "the task's CPU-time limit in seconds",
    "cputime_per_slot": "cputime / slots in seconds, rounded up",
    "cputime_hard": "the job script's hard CPU-time limit in seconds: cputime + 5 (SIGKILL; SIGXCPU at cputime)",
    "cputime_hard_per_slot": "cputime_hard / slots in seconds, rounded up",
}

#: Grid Engine: refuse at submit what can never run (-w e), cores as a parallel environment,
#: memory as h_vmem and CPU time as h_cpu, both per slot.
GRID_ENGINE_SPEC: tuple[str, ...] = (
    "-w e",
    "-pe {pe} {parallel_slots}",
    "-l h_vmem={memory_per_slot_kib}K",
    "-l h_cpu={cputime_hard_per_slot}",
    "-q {queue}",
    "-P {project}",
    "-l {gpu_resource}={gpus}",
)

#: DRMAA job states (drmaa.JobState) of jobs that have not ended, per the DRMAA v1 spec (GFD.133).
ACTIVE_STATES: dict[str, TaskState] = {
    "queued_active": TaskState.QUEUED,
    "system_on_hold": TaskState.PAUSED,
    "user_on_hold": TaskState.PAUSED,
    "user_system_on_hold": TaskState.PAUSED,
    "running": TaskState.RUNNING,
    "system_suspended": TaskState.PAUSED,
    "user_suspended": TaskState.PAUSED,
    "user_system_suspended": TaskState.PAUSED,
    "undetermined": TaskState.UNKNOWN,
}
ENDED_STATES = frozenset({"done", "failed"})

#: What a program prints when an allocation fails at an address-space limit (Python, C, C++,
#: Java, Go, R, numpy, bash).
_ALLOCATION_FAILED = re.compile(
    r"MemoryError|std::bad_alloc|OutOfMemoryError|Cannot allocate memory|cannot allocate|"
    r"[Uu]nable to allocate|[Oo]ut of memory")
#: Slack when comparing the DRM's sampled usage with a limit it enforced.
_NEAR = 0.95


def check_native_spec(pieces: Sequence[str]) -> None:
    """Raise ValueError, naming the piece, for a template piece that cannot be rendered."""
    for piece in pieces:
        for name in _fields(piece):
            if name not in NATIVE_FIELDS:
                raise ValueError(f"native_spec piece {piece!r}: unknown placeholder {{{name}}}; known: "
                                 + ", ".join("{" + n + "}" for n in NATIVE_FIELDS))


def _fields(piece: str) -> list[str]:
    try:
        parsed = list(string.Formatter().parse(piece))
    except ValueError as exc:
        raise ValueError(f"native_spec piece {piece!r}: {exc} (write {{{{ and }}}} for literal braces)") from None
    names = []
    for _, name, spec, conversion in parsed:
        if name is None:
            continue
        if spec or conversion or not name:
            raise ValueError(f"native_spec piece {piece!r}: placeholders are plain names, like {{slots}}")
        names.append(name)
    return names


def native_values(task: Task, pe: str, queue: str | None, *, job_memory: bool = True,
                  gpu_resource: str | None = None) -> dict[str, str | None]:
    """The placeholder values for `task`; None where the task or the site has none.

    `job_memory` False: the memory limit is not the job's to carry (a Docker or Podman container
    runs outside the job and the runtime enforces it; an address-space limit such as h_vmem would
    only break the runtime's client), so the memory placeholders have no value.
    """
    slots = task.cores or 1
    memory = task.memory if job_memory else None
    memory_kib = mib_to_bytes(memory) // 1024 if memory else None
    hard = cpu_rlimit(task.cputime)[1] if task.cputime else None
    return {
        "slots": str(slots),
        "parallel_slots": str(slots) if slots > 1 else None,
        "pe": pe,
        "queue": _quoted(task.backend_parameters.get("sge.queue")) or queue,
        "project": _quoted(task.backend_parameters.get("sge.project")),
        "gpus": str(task.gpus) if task.gpus else None,
        "gpu_resource": gpu_resource,
        "memory": _str(memory),
        "memory_kib": _str(memory_kib),
        "memory_per_slot": _str(memory and share(memory, slots)),
        "memory_per_slot_kib": _str(memory_kib and share(memory_kib, slots)),
        "cputime": _str(task.cputime),
        "cputime_per_slot": _str(task.cputime and share(task.cputime, slots)),
        "cputime_hard": _str(hard),
        "cputime_hard_per_slot": _str(hard and share(hard, slots)),
    }


def native_spec(pieces: Iterable[str], values: Mapping[str, str | None]) -> str:
    """The pieces whose placeholders all have values, filled in and joined by spaces."""
    kept = []
    for piece in pieces:
        if all(values.get(name) is not None for name in _fields(piece)):
            kept.append(piece.format(**{k: v for k, v in values.items() if v is not None}).strip())
    return " ".join(p for p in kept if p)


def _quoted(value: str | None) -> str | None:
    return None if value is None else quote(value)


def _str(value: int | None) -> str | None:
    return None if value is None else str(value)


# ---- what the DRM says -> JobStatus ----------------------------------------------------------


@dataclass(frozen=True)
class Ending:
    """How the DRM says a job ended: DRMAA's JobInfo, or its accounting after a gateway restart."""

    exit_status: int | None = None   # the job script's exit status, when it exited
    signal: str | None = None        # the signal that ended the job script, e.g. "SIGKILL"
    aborted: bool = False            # ended without running to its end: terminated, or never started
    cpu: float | None = None         # CPU seconds used
    maxvmem: float | None = None     # peak virtual memory, bytes
    reason: str = ""                 # the DRM's own words, where it gave any
    finished: datetime | None = None


def ending_from_jobinfo(info: Any) -> Ending:
    """An Ending from drmaa-python's JobInfo (fields hasExited, exitStatus, hasSignal,
    terminatedSignal, wasAborted, resourceUsage: a dict of numbers as strings)."""
    usage = info.resourceUsage or {}
    end = _number(usage.get("end_time"))
    return Ending(
        exit_status=int(info.exitStatus) if info.hasExited else None,
        signal=(info.terminatedSignal or "an unknown signal") if info.hasSignal else None,
        aborted=bool(info.wasAborted) and not info.hasExited and not info.hasSignal,
        cpu=_number(usage.get("cpu")),
        maxvmem=_number(usage.get("maxvmem")),
        finished=datetime.fromtimestamp(end, UTC) if end else None,
    )


def _number(text: Any) -> float | None:
    try:
        return float(text)
    except (TypeError, ValueError):
        return None


def active_status(native_id: str, drm_state: str) -> JobStatus:
    """The status of a job the DRM still has (any DRMAA state but done and failed)."""
    state = ACTIVE_STATES.get(drm_state, TaskState.UNKNOWN)
    if state == TaskState.UNKNOWN:
        log.warning("DRMAA job %s: state %r cannot be determined or is not in the state map", native_id, drm_state)
        return JobStatus(state, f"the DRM reports job {native_id} as {drm_state}")
    words = {TaskState.QUEUED: "queued", TaskState.RUNNING: "running"}.get(state, drm_state.replace("_", " "))
    return JobStatus(state, f"{words} as DRMAA job {native_id}")


def allocation_failure(text: str) -> str | None:
    """The words on a job's stderr that say an allocation failed, or None.

    >>> allocation_failure("Traceback ...\\nMemoryError\\n")
    'MemoryError'
    >>> allocation_failure("terminate called after throwing an instance of 'std::bad_alloc'")
    'std::bad_alloc'
    >>> allocation_failure("error: no such file") is None
    True
    """
    found = _ALLOCATION_FAILED.findall(text)
    return found[-1] if found else None


def conclude(task: Task, native_id: str, *, exit_code: int | None, ending: Ending | None,
             stderr_tail: str = "", exit_time: datetime | None = None) -> JobStatus:
    """The final status of a job that is no longer running.

    `exit_code` comes from the job script's exit-code file (None if it wrote none: the DRM ended
    the job script itself), `ending` from the DRM, `stderr_tail` is the end of the task's stderr.
    Memory: an address-space limit such as h_vmem makes the allocation fail; the program then
    exits on its own (exit 1 with MemoryError, say), so a non-zero exit counts as the memory limit
    only with evidence: the words of a failed allocation on stderr, or a peak near the limit.
    """
    peak = _peak_near_limit(task, ending)
    if exit_code is not None:
        status = outcome.from_exit_code(task, exit_code, finished=exit_time)
        if status.state != TaskState.EXECUTOR_ERROR or status.description in (
                outcome.cputime_exceeded(task), outcome.memory_exceeded(task)):
            return status
        if exit_code == 128 + signal.SIGKILL and _cpu_spent(task, ending):
            return JobStatus(status.state, outcome.cputime_exceeded(task), exit_code, finished=exit_time)
        evidence = peak or (f"{word} on stderr" if (word := allocation_failure(stderr_tail)) else None)
        if task.memory and evidence:
            return JobStatus(status.state, outcome.memory_limit_hit(task, evidence, exit_code), exit_code,
                             finished=exit_time)
        return status
    if ending is None:
        return JobStatus(TaskState.SYSTEM_ERROR, f"DRMAA job {native_id} ended without recording an exit status "
                         "(no exit-code file, and the DRM no longer knows the job)")
    finished = ending.finished
    if ending.signal is not None:
        number = _signal_number(ending.signal)
        code = 128 + number if number else None
        if peak:
            return JobStatus(TaskState.EXECUTOR_ERROR, outcome.memory_exceeded(task), code, finished=finished)
        if _cpu_spent(task, ending):
            return JobStatus(TaskState.EXECUTOR_ERROR, outcome.cputime_exceeded(task), code, finished=finished)
        return JobStatus(TaskState.EXECUTOR_ERROR, f"killed by {ending.signal}", code, finished=finished)
    if ending.exit_status is not None:
        # The job script exited before it could record its command's status (e.g. `cd` failed).
        status = outcome.from_exit_code(task, ending.exit_status, finished=finished)
        return status if ending.exit_status == 0 else JobStatus(
            status.state, f"{status.description} (the job script ended before recording it; see its stderr)",
            ending.exit_status, finished=finished)
    reason = f" ({ending.reason})" if ending.reason else ""
    return JobStatus(TaskState.SYSTEM_ERROR, f"the DRM aborted job {native_id}: it could not start, or was deleted "
                     f"outside the gateway{reason}", finished=finished)


def _cpu_spent(task: Task, ending: Ending | None) -> bool:
    """The job used its CPU time (the DRM's figure lags a little behind its own kill)."""
    return bool(task.cputime and ending and ending.cpu is not None
                and ending.cpu >= task.cputime - max(1.0, 0.05 * task.cputime))


def _peak_near_limit(task: Task, ending: Ending | None) -> str | None:
    if not (task.memory and ending and ending.maxvmem):
        return None
    if ending.maxvmem < _NEAR * mib_to_bytes(task.memory):
        return None
    return f"peak virtual memory {bytes_to_mib(int(ending.maxvmem)):.0f} MiB"


def _signal_number(name: str) -> int | None:
    try:
        return int(signal.Signals[name.upper()])
    except KeyError:
        return None


# ---- the job template ------------------------------------------------------------------------


#: The placeholders of the job-script template (drmaa.sh).
SCRIPT_PLACEHOLDERS = ("task_id", "job_name", "workdir", "resources", "run")


def job_script(template: str, task: Task, command: Command) -> str:
    """The job script of `task`: `template` filled in, every value quoted."""
    return render(template, {
        "task_id": quote(task.id),
        "job_name": quote(job_name(task.id)),
        "workdir": quote(task.workdir),
        "resources": describe_request(task),
        "run": run_block(task, command),
    })


def job_name(task_id: str) -> str:
    """The DRM's name for the job of task `task_id` (it carries the gateway's id)."""
    return f"jobproxy-{task_id}"


def job_template(task: Task, script: str, spec: str, environment: Mapping[str, str]) -> dict[str, Any]:
    """The DRMAA job template attributes (drmaa.JobTemplate names) for `task`, whose job script is
    `script`. Paths get DRMAA's "[host]:path" form with no host; the same file for stdout and
    stderr becomes joinFiles, so that the DRM does not open it twice."""
    fields: dict[str, Any] = {
        "remoteCommand": script,
        "jobName": job_name(task.id),
        "workingDirectory": task.workdir,
        "outputPath": ":" + task.stdout,
        "jobEnvironment": {**environment, "JOBPROXY_TASK_ID": task.id},
        "nativeSpecification": spec,
    }
    if task.stderr == task.stdout:
        fields["joinFiles"] = True
    else:
        fields["errorPath"] = ":" + task.stderr
    return fields
