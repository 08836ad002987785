"""The local scheduler: runs tasks on the gateway's own machine, with their limits enforced.

Each task becomes a job script (local.sh) run by `launch.py` in its own session: the
launcher joins the task's cgroups (memory limit, CPU quota, cpuset) where a hierarchy is writable,
pins the task to its CPUs, falls back to an address-space rlimit for memory where no cgroup is,
and executes the script; the script sets the CPU-time rlimit and records the exit status.

A task waits QUEUED until its cores and memory fit into what is free. The plugin's spool
(`<state_dir>/<task id>/`: job.sh, pid, cancelled) lives on disk, so a restarted gateway finds its
running jobs again and starts the queued ones.
"""
from __future__ import annotations

import asyncio
import logging
import os
import pwd
import signal
import subprocess
import sys
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Mapping, Sequence

from ..task import Task, TaskState

from .. import outcome
from . import cgroups, launcher, proc
from ..base import JobRef, Report, JobStatus, Scheduler, SchedulerConfigError, SchedulerError, SchedulerUnavailable, TaskRefused, TEMPLATE_OPTION
from ..script import EXIT_FILE, describe_request, quote, render, run_block
from ..units import mib_to_bytes

log = logging.getLogger(__name__)


@dataclass
class _Slot:
    """What a running job holds."""

    pid: int
    started_at: int | None
    cpus: tuple[int, ...]
    memory: int


def _machine_memory_mib() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) // 1024
    raise SchedulerConfigError("cannot read MemTotal from /proc/meminfo")


class LocalScheduler(Scheduler):
    """Runs each task as a local process tree with its cores, memory and CPU time enforced."""

    supports_run_as = True

    options_schema = {
        "type": "object",
        "additionalProperties": False,
        "properties": {
            "cores": {"type": "integer", "minimum": 1, "description": "CPU cores tasks may use in all (default: all usable CPUs)"},
            "memory": {"type": "integer", "minimum": 1, "description": "MiB tasks may use in all (default: 90% of the machine's)"},
            "template": TEMPLATE_OPTION,
            "cgroups": {"enum": ["auto", "off"], "default": "auto", "description": "use a writable cgroup hierarchy for memory and CPU limits"},
            "kill_grace": {"type": "number", "minimum": 0, "maximum": 600, "default": 5, "description": "seconds between SIGTERM and SIGKILL when a task is deleted"},
        },
    }

    def __init__(self, name: str, options: Mapping[str, Any], state_dir: Path, **contract: Any) -> None:
        super().__init__(name, options, state_dir, **contract)
        usable = sorted(os.sched_getaffinity(0))
        self.cores = int(self.options.get("cores", len(usable)))
        if self.cores > len(usable):
            raise SchedulerConfigError(f"scheduler.options.cores = {self.cores}, but this machine lets the gateway use {len(usable)} CPUs")
        self.cpu_pool = tuple(usable[: self.cores])
        self.memory = int(self.options.get("memory", _machine_memory_mib() * 9 // 10))
        self.kill_grace = float(self.options.get("kill_grace", 5))
        self.template = self.job_template(("task_id", "workdir", "run", "resources"), required=())
        self.cgroups = cgroups.detect() if self.options.get("cgroups", "auto") == "auto" else None
        self._slots: dict[str, _Slot] = {}
        self._children: dict[str, subprocess.Popen[bytes]] = {}
        self._seen: set[str] = set()  # tasks whose spool this process has already reconciled
        self._waiting: set[str] = set()  # queued tasks known not to have started: no files to read

    async def start(self, report: Report) -> None:
        await super().start(report)
        self.state_dir.mkdir(parents=True, exist_ok=True)
        memory_how = f"cgroup {self.cgroups.version}" if self.cgroups else "RLIMIT_AS (no writable cgroup)"
        cpu_how = f"CPU pinning + cgroup {self.cgroups.version} CPU quota" if self.cgroups else "CPU pinning"
        log.info("local scheduler %s: %d cores %s, %d MiB; memory limits by %s, cores by %s, CPU time by RLIMIT_CPU",
                 self.name, self.cores, list(self.cpu_pool), self.memory, memory_how, cpu_how)

    # ---- the contract ----

    def admit(self, task: Task) -> None:
        cores = task.cores or 1
        if cores > self.cores:
            raise TaskRefused(f"the task asks for {cores} cores; this scheduler has {self.cores} in all")
        if task.memory and task.memory > self.memory:
            raise TaskRefused(f"the task asks for {task.memory} MiB of memory; this scheduler has {self.memory} MiB in all")

    async def submit(self, task: Task) -> str:
        spool = self._spool(task.id)
        script = render(self.template, {
            "task_id": quote(task.id),
            "workdir": quote(task.workdir),
            "resources": describe_request(task),
            "run": run_block(task, self.job_command(task)),
        })
        try:
            spool.mkdir(parents=True, exist_ok=True)
            partial = spool / "job.sh.part"
            partial.write_text(script, encoding="utf-8")
            partial.replace(spool / "job.sh")
        except OSError as exc:
            raise SchedulerUnavailable(f"the local scheduler cannot write the job script: {exc.strerror}") from None
        self._seen.add(task.id)
        self._waiting.add(task.id)
        return task.id

    async def find(self, task: Task) -> str | None:
        return task.id if (self._spool(task.id) / "job.sh").exists() else None

    async def status(self, jobs: Sequence[JobRef]) -> dict[str, JobStatus]:
        answers: dict[str, JobStatus] = {}
        queued: list[JobRef] = []
        self._adopt([job for job in jobs if job.task_id not in self._seen])
        for job in jobs:
            found = None if job.task_id in self._waiting else self._inspect(job)
            if found is None:
                queued.append(job)
            else:
                answers[job.task_id] = found
        for job in queued:
            answers[job.task_id] = self._try_start(job)
            if answers[job.task_id].state == TaskState.QUEUED:
                self._waiting.add(job.task_id)
        return answers

    async def cancel(self, job: JobRef) -> None:
        spool = self._spool(job.task_id)
        if spool.is_dir():
            (spool / "cancelled").touch()
        slot = self._slots.get(job.task_id) or self._read_pidfile(job.task_id)
        if slot is not None:
            await self._terminate(job.task_id, slot)
        self._finish(job.task_id)

    async def release(self, job: JobRef) -> None:
        self._finish(job.task_id)
        spool = self._spool(job.task_id)
        for name in ("job.sh", "pid", "cancelled", "job.sh.part", "pid.part", "launch.log"):
            (spool / name).unlink(missing_ok=True)
        if spool.is_dir():
            spool.rmdir()

    # ---- inside ----

    def _spool(self, task_id: str) -> Path:
        return self.state_dir / task_id

    def _inspect(self, job: JobRef) -> JobStatus | None:
        """The job's state from its spool and process, or None if it has not started."""
        task_id, spool = job.task_id, self._spool(job.task_id)
        if (spool / "cancelled").exists():
            self._finish(task_id)
            return JobStatus(TaskState.CANCELED, outcome.CANCELED_ON_REQUEST, finished=_mtime(spool / "cancelled"))
        exit_path = Path(job.task.workdir) / EXIT_FILE
        slot = self._slots.get(task_id) or self._read_pidfile(task_id)
        if exit_path.exists():
            oom = self._oom(task_id)
            self._finish(task_id)
            try:
                code = int(exit_path.read_text().strip())
            except ValueError:
                return JobStatus(TaskState.SYSTEM_ERROR, f"unreadable exit-code file {exit_path}")
            return outcome.from_exit_code(job.task, code, oom=oom, finished=_mtime(exit_path))
        if slot is None:
            return None
        child = self._children.get(task_id)
        if child is not None:
            child.poll()
        if proc.alive(slot.pid, slot.started_at):
            self._slots[task_id] = slot
            return JobStatus(TaskState.RUNNING, f"running as pid {slot.pid} on CPUs {_cpus(slot.cpus)}",
                             started=_mtime(spool / "pid"))
        oom = self._oom(task_id)
        self._finish(task_id)
        if oom:
            return JobStatus(TaskState.EXECUTOR_ERROR, outcome.memory_exceeded(job.task), finished=_mtime(spool / "pid"))
        reason = _tail(spool / "launch.log") or "it was killed, or ended without recording an exit status"
        return JobStatus(TaskState.SYSTEM_ERROR, f"the job did not finish normally: {reason}")

    def _try_start(self, job: JobRef) -> JobStatus:
        task = job.task
        busy = {cpu for slot in self._slots.values() for cpu in slot.cpus}
        free = [cpu for cpu in self.cpu_pool if cpu not in busy]
        cores, memory = task.cores or 1, task.memory or 0
        used_memory = sum(slot.memory for slot in self._slots.values())
        if cores > len(free) or used_memory + memory > self.memory:
            return JobStatus(TaskState.QUEUED, f"waiting for {cores} free cores and {memory} MiB")
        try:
            slot = self._spawn(task, tuple(free[:cores]))
        except OSError as exc:
            self._finish(task.id)
            return JobStatus(TaskState.SYSTEM_ERROR, f"could not start the job: {exc}")
        self._slots[task.id] = slot
        self._waiting.discard(task.id)
        return JobStatus(TaskState.RUNNING, f"running as pid {slot.pid} on CPUs {_cpus(slot.cpus)}",
                         started=_mtime(self._spool(task.id) / "pid"))

    def _spawn(self, task: Task, cpus: tuple[int, ...]) -> _Slot:
        spool = self._spool(task.id)
        argv = [sys.executable, "-I", launcher.__file__, "--cpus", ",".join(map(str, cpus))]
        how = [f"pinned to CPUs {_cpus(cpus)}"]
        memory_bytes = mib_to_bytes(task.memory) if task.memory else None
        if self.cgroups:
            for procs in self.cgroups.create(task.id, memory_bytes=memory_bytes, cpus=cpus):
                argv += ["--join", str(procs)]
            how.append(f"cgroup {self.cgroups.version} ({len(cpus)} CPU quota"
                       + (f", memory {task.memory} MiB)" if task.memory else ")"))
        elif memory_bytes:
            argv += ["--rlimit-as", str(memory_bytes)]
            how.append(f"RLIMIT_AS {task.memory} MiB")
        if task.cputime:
            how.append(f"RLIMIT_CPU {task.cputime} s")
        env = dict(os.environ)
        account = self.job_account(task)
        if account:
            argv += ["--user", account]
            how.append(f"as user {account}")
            env = _clean_environment(account)
        env["JOBPROXY_TASK_ID"] = task.id
        argv += ["--stdout", task.stdout, "--stderr", task.stderr, "--script", str(spool / "job.sh")]
        with open(spool / "launch.log", "wb") as launch_log:
            child = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=launch_log, stderr=launch_log, env=env,
                                     cwd=task.workdir, start_new_session=True, close_fds=True)
        slot = _Slot(child.pid, proc.start_time(child.pid), cpus, task.memory or 0)
        self._children[task.id] = child
        partial = spool / "pid.part"
        partial.write_text(f"{slot.pid} {slot.started_at} {_cpus(cpus)} {slot.memory}\n")
        partial.replace(spool / "pid")
        log.info("task %s started as pid %d: %s", task.id, child.pid, ", ".join(how))
        return slot

    def _read_pidfile(self, task_id: str) -> _Slot | None:
        try:
            pid, started, cpus, memory = (self._spool(task_id) / "pid").read_text().split()
        except (OSError, ValueError):
            return None
        return _Slot(int(pid), None if started == "None" else int(started),
                     tuple(int(c) for c in cpus.split(",") if c.isdigit()), int(memory))

    def _adopt(self, jobs: Sequence[JobRef]) -> None:
        """Once per task and process: a job spawned just before a crash, whose pid was never
        recorded, is found by the task id in its environment and its pid file written."""
        self._seen.update(job.task_id for job in jobs)
        lost = [job for job in jobs if not (self._spool(job.task_id) / "pid").exists()]
        running = _task_processes() if lost else {}
        for job in lost:
            leaders = [pid for pid in running.get(job.task_id, ()) if pid == _pgid(pid)]
            if leaders:
                pid = leaders[0]
                log.warning("task %s: found its job running as pid %d", job.task_id, pid)
                (self._spool(job.task_id) / "pid").write_text(f"{pid} {proc.start_time(pid)} - {job.task.memory or 0}\n")

    def _oom(self, task_id: str) -> bool:
        return bool(self.cgroups and self.cgroups.oom_kills(task_id))

    def _finish(self, task_id: str) -> None:
        """Free what a job held once it is over."""
        self._waiting.discard(task_id)
        self._slots.pop(task_id, None)
        child = self._children.pop(task_id, None)
        if child is not None:
            child.poll()
        if self.cgroups:
            self.cgroups.remove(task_id)

    async def _terminate(self, task_id: str, slot: _Slot) -> None:
        """SIGTERM the job's process group (and cgroup), then SIGKILL what is left after the grace time."""
        stragglers = _processes_of(task_id)
        for sig in (signal.SIGTERM, signal.SIGKILL):
            if proc.alive(slot.pid, slot.started_at):
                try:
                    os.killpg(slot.pid, sig)
                except ProcessLookupError:
                    pass
            for pid in stragglers:
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            if sig == signal.SIGKILL and self.cgroups:
                self.cgroups.kill(task_id)
            deadline = asyncio.get_running_loop().time() + (self.kill_grace if sig == signal.SIGTERM else 5)
            while asyncio.get_running_loop().time() < deadline:
                child = self._children.get(task_id)
                if child is not None:
                    child.poll()
                stragglers = _processes_of(task_id)
                if not proc.alive(slot.pid, slot.started_at) and not stragglers:
                    log.info("task %s: job stopped (%s)", task_id, sig.name)
                    return
                await asyncio.sleep(0.05)
        log.warning("task %s: processes %s survived SIGKILL", task_id, sorted(stragglers))


def _task_processes() -> dict[str, set[int]]:
    """Live processes by the JOBPROXY_TASK_ID in their environment, wherever their session."""
    found: dict[str, set[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            environ = (entry / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        for item in environ:
            if item.startswith(b"JOBPROXY_TASK_ID=") and proc.alive(int(entry.name), None):
                found.setdefault(item[17:].decode(errors="replace"), set()).add(int(entry.name))
    return found


def _processes_of(task_id: str) -> set[int]:
    return _task_processes().get(task_id, set())


def _pgid(pid: int) -> int | None:
    try:
        return os.getpgid(pid)
    except ProcessLookupError:
        return None


def _clean_environment(user: str) -> dict[str, str]:
    """The environment of a job run as `user`: nothing of the gateway's, as a login would set."""
    entry = pwd.getpwnam(user)
    return {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": entry.pw_dir, "USER": entry.pw_name,
            "LOGNAME": entry.pw_name, "SHELL": entry.pw_shell or "/bin/sh", "LANG": "C.UTF-8"}


def _tail(path: Path, limit: int = 500) -> str:
    try:
        return path.read_text(errors="replace").strip()[-limit:]
    except OSError:
        return ""


def _mtime(path: Path) -> datetime | None:
    try:
        return datetime.fromtimestamp(path.stat().st_mtime, timezone.utc)
    except OSError:
        return None


def _cpus(cpus: Sequence[int]) -> str:
    return ",".join(map(str, cpus)) or "-"
