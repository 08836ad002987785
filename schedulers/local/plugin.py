"""The local scheduler: runs tasks on the gateway's own machine, with their limits enforced.

Long-lived launcher processes (launcher.py, see client.py) start the jobs, each in its own
session; a job's launcher is chosen by its first CPU, so several start jobs side by side (option
`launchers`). The launcher joins the job's cgroup (memory limit, CPU quota, cpuset) where a
hierarchy is writable, pins the job to its CPUs, falls back to an address-space rlimit for memory
where no cgroup is, and becomes the task's user. With the built-in template and a command that
needs no bash around it, the launcher then execs the command itself, with the CPU-time rlimit the
job script would set, and writes the exit-code file when it reaps the job (launch.py); else it
runs the job script (local.sh), which does both. Cgroups are reused from job to job, one pool per CPU set (cgpool.py).

Everything is driven by events, not polls: a task starts at submit time if its cores and memory
are free, else it waits in an in-memory queue (admission.py); when the launcher says a job ended,
its outcome comes with the notice (or from the job's files), is reported at once, and the next
task that fits starts. The head of the queue is also sent ahead to the launcher of a running job
that holds the cores it asks for, as a request to run after that job: the launcher starts it as
it reaps the job, with no round trip through the gateway between the two (a cancel takes the
request back). Jobs that outlive the gateway (or the launcher) are watched through a pidfd; the
launcher stays until its jobs ended and records their exit statuses. A direct job whose
launcher was killed before the job ended has no exit status: it ends as a SYSTEM_ERROR ("ended
without recording an exit status"). The spool (spool.py) lets a restarted gateway find its jobs
again when it reconciles with `status`.
"""
from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import os
import signal
from collections.abc import Mapping, Sequence
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
    Task,
    TaskRefused,
    TaskState,
)
from ..files import recorded_exit
from ..units import mib_to_bytes
from . import cgroups, launch, lifecycle, proc, recovery
from .admission import Admission, Slot
from .cgpool import CgroupPool, prefix_for
from .client import LauncherClient
from .spool import PidRecord, Spool

log = logging.getLogger(__name__)

#: How many final states are kept in memory for repeated `status` calls; older ones are read again
#: from the task's files.
FINAL_CACHE = 10_000
#: Seconds a cancel waits for the launcher to answer a start, or for the exit notice of a job it
#: killed, before it goes on without.
CANCEL_WAIT = 10.0
#: Seconds after its start that a job's pid file is written, unless it ended: most short jobs
#: never need one. A job a crash catches before is still found (spool.adopt).
PID_FILE_DELAY = 0.1
#: The most launchers the scheduler starts unless option `launchers` says otherwise: each is a small
#: interpreter (about 13 MiB resident) that sleeps while no job starts or ends.
DEFAULT_LAUNCHERS = 4
#: Seconds a watched job that ended may stay a zombie of its launcher, which writes its exit-code
#: file before it reaps it, before its end is taken as it is.
REAP_WAIT = 5.0


def _machine_memory_mib() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) // 1024
    raise SchedulerConfigError("cannot read MemTotal from /proc/meminfo")


class LocalScheduler(Scheduler):
    """Runs each task as a local process tree with its cores, memory and CPU time enforced."""

    supports_run_as = True
    reports_changes = True
    makes_task_folders = True  # the launcher makes a job's folder as it starts it

    options_schema = {
        "type": "object",
        "additionalProperties": False,
        "properties": {
            "cores": {"type": "integer", "minimum": 1,
                      "description": "CPU cores tasks may use in all (default: all usable CPUs)"},
            "memory": {"type": "integer", "minimum": 1,
                       "description": "MiB tasks may use in all (default: 90% of the machine's)"},
            "gpus": {"type": "array", "default": [], "uniqueItems": True,
                      "items": {"type": "string", "pattern": "^[A-Za-z0-9_:.-]+$",
                                "x-error": {"pattern": "must be a GPU id as CUDA_VISIBLE_DEVICES takes it (an index "
                                                       "or a UUID such as GPU-5a3c...)"}},
                      "description": "ids of the GPUs tasks may use, each given to one task at a time and exported "
                                     "to it as CUDA_VISIBLE_DEVICES (default: none)"},
            "template": TEMPLATE_OPTION,
            "cgroups": {"enum": ["auto", "off"], "default": "auto",
                        "description": "use a writable cgroup hierarchy for memory and CPU limits"},
            "launchers": {"type": "integer", "minimum": 1, "maximum": 64,
                          "description": "job launcher processes that start and reap jobs side by side, each "
                                         "serving the jobs of some of the CPUs (default: one per core, at most "
                                         f"{DEFAULT_LAUNCHERS})"},
            "kill_grace": {"type": "number", "minimum": 0, "maximum": 600, "default": 5,
                           "description": "seconds between SIGTERM and SIGKILL when a task is deleted"},
        },
    }

    def __init__(self, name: str, options: Mapping[str, Any], state_dir: Path, **contract: Any) -> None:
        super().__init__(name, options, state_dir, **contract)
        usable = sorted(os.sched_getaffinity(0))
        # cores and memory default to what the machine has: computed here, so no schema default
        self.cores = int(self.options.get("cores", len(usable)))
        if self.cores > len(usable):
            raise SchedulerConfigError(f"scheduler.options.cores = {self.cores}, but this machine lets the gateway "
                                       f"use {len(usable)} CPUs")
        self.memory = int(self.options.get("memory", _machine_memory_mib() * 9 // 10))
        self.kill_grace = float(self.options["kill_grace"])
        self.template = self.job_template(("task_id", "workdir", "run", "resources"), required=())
        self.builtin_template = "template" not in self.options
        self.cgroups = cgroups.detect() if self.options["cgroups"] == "auto" else None
        self.pool = CgroupPool(self.cgroups, prefix_for(state_dir)) if self.cgroups else None
        self.spool = Spool(state_dir)
        self.gpus: tuple[str, ...] = tuple(self.options["gpus"])
        self.admission = Admission(tuple(usable[: self.cores]), self.memory, self.gpus)
        self.launchers = [LauncherClient(self, index)
                          for index in range(int(self.options.get("launchers", min(self.cores, DEFAULT_LAUNCHERS))))]
        self._final: collections.OrderedDict[str, JobStatus] = collections.OrderedDict()
        self._dispatching = False
        self._dispatch_again = False

    async def start(self, report: Report) -> None:
        await super().start(report)
        self.state_dir.mkdir(parents=True, exist_ok=True)
        for launcher in self.launchers:
            await launcher.start()
        memory_how = f"cgroup {self.cgroups.version}" if self.cgroups else "RLIMIT_AS (no writable cgroup)"
        cpu_how = f"CPU pinning + cgroup {self.cgroups.version} CPU quota" if self.cgroups else "CPU pinning"
        log.info("local scheduler %s: %d cores %s, %d MiB; memory limits by %s, cores by %s, CPU time by RLIMIT_CPU",
                 self.name, self.cores, list(self.admission.cpu_pool), self.memory, memory_how, cpu_how)

    async def close(self) -> None:
        # A start asked of a launcher and not answered yet would happen after this instance stopped
        # listening, without a pid file, and the next instance could queue the task again before
        # the job shows in /proc: the answers are waited for (bounded), so their pid files are
        # written below. A request held behind a running job is dropped by the launcher instead.
        starting = [slot.launched.wait() for slot in self.admission.slots.values()
                    if slot.launcher is not None and not slot.launched.is_set()
                    and (slot.after is None or slot.after not in self.admission.slots)]
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.gather(*starting), CANCEL_WAIT)
        loop = asyncio.get_running_loop()
        for slot in self.admission.slots.values():
            self._record(slot)
            if slot.pidfd is not None:
                loop.remove_reader(slot.pidfd)
                os.close(slot.pidfd)
                slot.pidfd = None
        for launcher in self.launchers:
            await launcher.close()
        self.spool.close()
        if self.pool is not None:
            self.pool.close()

    # ---- the contract ----

    def admit(self, task: Task) -> None:
        cores = task.cores or 1
        if cores > self.cores:
            raise TaskRefused(f"the task asks for {cores} cores; this scheduler has {self.cores} in all", "$.cores")
        if task.memory and task.memory > self.memory:
            raise TaskRefused(f"the task asks for {task.memory} MiB of memory; this scheduler has {self.memory} MiB "
                              "in all", "$.memory")
        if task.gpus > len(self.gpus):
            raise TaskRefused(f"the task asks for {task.gpus} GPU(s); this scheduler has {len(self.gpus)} in all",
                              "$.gpus")

    async def submit(self, task: Task) -> str:
        command = self.job_command(task)
        try:
            if launch.is_direct(command, self.builtin_template):
                self.spool.write_marker(task.id)
            else:
                self.spool.write_script(task.id, launch.script(self.template, task, command))
        except OSError as exc:
            raise SchedulerUnavailable(f"the local scheduler cannot write the job script: {exc.strerror}") from None
        self.admission.enqueue(task)
        self._dispatch()
        slot = self.admission.slots.get(task.id)
        if task.id in self.admission.queue or (slot is not None and slot.after is not None):
            self._emit(task.id, self.admission.waiting(task))
        try:
            self.spool.compact(self._needed)
        except OSError as exc:  # the journal only grows meanwhile
            log.warning("local scheduler %s: cannot compact the spool journal: %s", self.name, exc)
        return task.id

    def _needed(self) -> list[str]:
        """The tasks the plugin may still be asked about: queued, running, ended lately."""
        return [*self.admission.queue, *self.admission.slots, *self._final]

    async def find(self, task: Task) -> str | None:
        return task.id if self.spool.known(task.id) else None

    async def status(self, jobs: Sequence[JobRef]) -> dict[str, JobStatus]:
        """What is known of `jobs`, from memory; a job not known yet (after a restart) is adopted from
        its spool and files. A job whose start is under way is left out: its RUNNING is reported."""
        answers: dict[str, JobStatus] = {}
        unknown: list[JobRef] = []
        for job in jobs:
            task_id = job.task_id
            if task_id in self.admission.queue:
                answers[task_id] = self.admission.waiting(job.task)
            elif task_id in self.admission.slots:
                status = self.admission.slots[task_id].status
                if status is not None:
                    answers[task_id] = status
            elif task_id in self._final:
                answers[task_id] = self._final[task_id]
            else:
                unknown.append(job)
        self.spool.inherited = None  # the gateway reconciles with its first call: the jobs it asked for are known now
        if unknown:
            answers.update(recovery.reconcile(self, unknown))
            self._dispatch()
            for job in unknown:
                if job.task_id in self.admission.slots and self.admission.slots[job.task_id].status is None:
                    answers.pop(job.task_id, None)  # started just now: its RUNNING is reported
        return answers

    async def cancel(self, job: JobRef) -> None:
        task_id = job.task_id
        self.spool.mark_cancelled(task_id)
        canceled = JobStatus(TaskState.CANCELED, outcome.CANCELED_ON_REQUEST, finished=lifecycle.now())
        if self.admission.queue.pop(task_id, None) is not None:
            self._conclude(task_id, canceled)
            return
        slot = self.admission.slots.get(task_id)
        if slot is None:
            if task_id not in self._final:  # not adopted yet: whatever its pid file names
                record = self.spool.read_pid(task_id)
                if record is not None:
                    await lifecycle.terminate(task_id, record.pid, record.started_at, self.kill_grace, self.cgroups,
                                              record.cgroup)
                self._conclude(task_id, canceled)
            return
        slot.canceling = True
        if slot.pid is None and slot.launcher is not None:
            self.launchers[slot.launcher].drop(task_id)  # answered at once if held behind another job
        if slot.pid is None:
            await _wait(slot.launched, CANCEL_WAIT)
        if slot.pid is not None:
            await lifecycle.terminate(task_id, slot.pid, slot.started_at, self.kill_grace, self.cgroups,
                                      slot.lease.name if slot.lease else None)
            await _wait(slot.ended, CANCEL_WAIT)
        if not slot.ended.is_set():
            self._ended(slot, None)

    async def release(self, job: JobRef) -> None:
        task_id = job.task_id
        self.admission.queue.pop(task_id, None)
        self._final.pop(task_id, None)
        self.spool.remove(task_id)

    # ---- launcher events (client.Events) ----

    def launched(self, task_id: str, pid: int, start_time: int | None) -> None:
        """The launcher started the job: record its pid, report RUNNING."""
        slot = self.admission.slots.get(task_id)
        if slot is None:  # canceled while the launcher did not answer: stop what it started late
            log.warning("task %s: the launcher started a job (pid %d) nobody waits for; killing it", task_id, pid)
            if proc.alive(pid, start_time):
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(pid, signal.SIGKILL)
            return
        if slot.pid is not None:
            return
        slot.pid, slot.started_at = pid, start_time
        slot.launched.set()
        asyncio.get_running_loop().call_later(PID_FILE_DELAY, self._record, slot)
        slot.status = lifecycle.running(pid, slot.cpus, lifecycle.now())
        if log.isEnabledFor(logging.INFO):
            how = lifecycle.how_limited(slot, self.cgroups, self.job_account(slot.task))
            log.info("task %s started as pid %d: %s", task_id, pid, how)
        self._emit(task_id, slot.status)

    def _record(self, slot: Slot) -> None:
        """Write the pid file of a job that still runs (or is adopted)."""
        if slot.recorded or slot.pid is None or self.admission.slots.get(slot.task_id) is not slot:
            return
        slot.recorded = True
        lease = slot.lease
        try:
            self.spool.write_pid(slot.task_id, PidRecord(slot.pid, slot.started_at, slot.cpus, slot.memory,
                                                         lease.name if lease else None, lease.oom_base if lease else 0,
                                                         slot.gpus))
        except OSError as exc:
            log.warning("task %s: cannot write its pid file: %s", slot.task_id, exc)

    def launch_failed(self, task_id: str, error: str) -> None:
        """The launcher could not start the job: it ends as a SYSTEM_ERROR."""
        slot = self.admission.slots.get(task_id)
        if slot is None or slot.pid is not None:
            return
        slot.launched.set()
        if slot.recalled and not slot.canceling:  # taken back from behind a job (`_recall`)
            self._requeue(slot)
            self._dispatch()
            return
        if not slot.canceling:
            log.warning("task %s: could not start its job: %s", task_id, error)
        self._ended(slot, None, _not_started(error))

    def exited(self, task_id: str, pid: int, status: int, code: int | None, busy: bool | None) -> None:
        """A job the launcher started ended (`code`: what the launcher recorded as its exit status;
        `busy`: whether its cgroup still held a process then, if the launcher looked)."""
        slot = self.admission.slots.get(task_id)
        if slot is not None and slot.pid == pid:
            self._ended(slot, status, code=code, busy=busy)

    def launcher_lost(self, index: int, unanswered: list[str]) -> None:
        """A new launcher replaced launcher `index`, which died: watch its jobs by pidfd; find the
        ones it may have started without saying so, and put the others back at the front of the
        queue."""
        for slot in list(self.admission.slots.values()):
            if slot.pid is not None and slot.pidfd is None and slot.launcher == index:
                self._watch(slot)
        lost = [self.admission.slots[task_id] for task_id in unanswered
                if task_id in self.admission.slots and self.admission.slots[task_id].pid is None]
        recovery.adopt(self, [slot.task_id for slot in lost], {slot.task_id: slot.memory for slot in lost})
        for slot in reversed(lost):
            record = self.spool.read_pid(slot.task_id)
            if record is not None:
                self.launched(slot.task_id, record.pid, record.started_at)
                self._watch(slot)
            elif recorded_exit(slot.task)[0] is not None:
                self._ended(slot, None)
            else:
                self._requeue(slot)
        self._dispatch()

    def _requeue(self, slot: Slot) -> None:
        """Put the task of `slot`, whose job never started, back at the front of the queue."""
        self._give_back(slot)
        self.admission.free(slot.task_id)
        self.admission.enqueue(slot.task, front=True)

    # ---- inside ----

    def _dispatch(self) -> None:
        """Start every queued task that fits now. A start that fails at once frees its slot and asks
        for another round, which the running one makes (no recursion)."""
        if self._dispatching:
            self._dispatch_again = True
            return
        self._dispatching = True
        try:
            again = True
            while again:
                self._dispatch_again = False
                for slot in self.admission.admissible():
                    self._launch(slot)
                if self.admission.queue:
                    self._send_ahead()
                again = self._dispatch_again
            if not self.admission.queue:
                self._recall()
        finally:
            self._dispatching = False

    def _send_ahead(self) -> None:
        """Place the head of the queue behind each job whose launcher started it (or is starting
        it) and that nothing waits behind yet, when the head asks for that job's cores. Never to a
        launcher being replaced: its successor would not know the job to wait for."""
        for ahead in list(self.admission.slots.values()):
            if ahead.launcher is None or ahead.pidfd is not None or ahead.canceling \
                    or not self.launchers[ahead.launcher].running:
                continue
            slot = self.admission.take_behind(ahead)
            if slot is not None:
                self._launch(slot)
            if not self.admission.queue:
                return

    def _recall(self) -> None:
        """Take back from their launchers (`drop`) the tasks sent ahead behind a running job that
        idle CPUs could start now, with nothing else queued for them. The launcher answers a drop
        with an error, on which the task is queued again, first (`launch_failed`); if the job ahead
        ended first, the task has started there and the drop does nothing."""
        for slot in self.admission.movable():
            if slot.launcher is not None and self.launchers[slot.launcher].running:
                slot.recalled = True
                self.launchers[slot.launcher].drop(slot.task_id)

    def _launch(self, slot: Slot) -> None:
        task = slot.task
        try:
            command = self.job_command(task)
            direct = launch.is_direct(command, self.builtin_template)
            script = None
            if not direct:
                script = self.spool.script(task.id)
                if not script.exists():  # a legacy spool, or a task queued before the template changed
                    legacy = self.spool.legacy_script(task.id)
                    script = legacy if legacy.exists() else script
                    if not script.exists():
                        self.spool.write_script(task.id, launch.script(self.template, task, command))
            if self.pool is not None:
                slot.lease = self.pool.take(slot.cpus, mib_to_bytes(task.memory) if task.memory else None)
            account = self.job_account(task)
            env = lifecycle.clean_environment(account) if account else None
        except (OSError, KeyError, SchedulerError) as exc:
            self._ended(slot, None, _not_started(str(exc)))
            return
        slot.launcher = self.admission.cpu_pool.index(slot.cpus[0]) % len(self.launchers)
        self.launchers[slot.launcher].send(launch.run_request(
            task, slot.cpus, slot.lease, command=command if direct else None, script_path=str(script),
            account=account, env=env, gpus=slot.gpus if self.gpus else None,
            can_spawn=self.cgroups is None or self.cgroups.version == "v1", after=slot.after))

    def _watch(self, slot: Slot) -> None:
        """Watch a job that is not the launcher's child through a pidfd."""
        assert slot.pid is not None
        try:
            fd = os.pidfd_open(slot.pid)
        except ProcessLookupError:
            asyncio.get_running_loop().call_soon(self._ended_if_watched, slot)
            return
        slot.pidfd = fd
        if not proc.alive(slot.pid, slot.started_at):  # ended, or the pid was reused
            asyncio.get_running_loop().call_soon(self._ended_if_watched, slot)
            return
        asyncio.get_running_loop().add_reader(fd, self._ended_if_watched, slot)

    def _ended_if_watched(self, slot: Slot, since: float | None = None) -> None:
        """A watched job ended. While it is the zombie of a launcher (not of init), that launcher
        may still write its exit-code file, which it does before it reaps the job: wait for that."""
        if self.admission.slots.get(slot.task_id) is not slot:
            return
        loop = asyncio.get_running_loop()
        since = loop.time() if since is None else since
        if slot.pid is not None and proc.zombie_of_launcher(slot.pid, slot.started_at) \
                and loop.time() - since < REAP_WAIT:
            if slot.pidfd is not None:
                loop.remove_reader(slot.pidfd)
            loop.call_later(0.02, self._ended_if_watched, slot, since)
            return
        self._ended(slot, None)

    def _ended(self, slot: Slot, wait_status: int | None, status: JobStatus | None = None,
               code: int | None = None, busy: bool | None = None) -> None:
        """The job of `slot` is over: read its outcome, free what it held, report, start the next."""
        task_id = slot.task_id
        if slot.pidfd is not None:
            asyncio.get_running_loop().remove_reader(slot.pidfd)
            os.close(slot.pidfd)
            slot.pidfd = None
        oom = self._give_back(slot, busy)  # before the next start: that one may take the same group
        if status is None or slot.canceling:
            started = slot.status.started if slot.status is not None else None
            status = lifecycle.final_status(slot.task, wait_status, self.spool, oom=oom, code=code,
                                            canceled=slot.canceling, started=started)
        self.admission.free(task_id)
        slot.launched.set()
        slot.ended.set()
        self._conclude(task_id, status)
        self._dispatch()

    def _give_back(self, slot: Slot, busy: bool | None = None) -> bool:
        """Return the job's cgroup to the pool (`busy`: whether a process is still in it, if known);
        whether the memory limit killed a process of it."""
        lease, slot.lease = slot.lease, None
        if lease is None or self.pool is None:
            return False
        return self.pool.finish(lease, slot.cpus, busy) > 0

    def _conclude(self, task_id: str, status: JobStatus) -> None:
        self._remember(task_id, status)
        self._emit(task_id, status)

    def _remember(self, task_id: str, status: JobStatus) -> None:
        self._final[task_id] = status
        if len(self._final) > FINAL_CACHE:
            self._final.popitem(last=False)

    def _emit(self, task_id: str, status: JobStatus) -> None:
        """Report a change, from the event loop, after whatever call is running now."""
        asyncio.get_running_loop().call_soon(self.report, task_id, status)


async def _wait(event: asyncio.Event, timeout: float) -> None:
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(event.wait(), timeout)


def _not_started(why: str) -> JobStatus:
    return JobStatus(TaskState.SYSTEM_ERROR, f"could not start the job: {why}", finished=lifecycle.now())
