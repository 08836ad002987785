"""What the local scheduler asks its launcher to run for a task: the command itself (direct exec)
when the built-in job script would do nothing bash alone can, else a job script run by bash.

The built-in script (local.sh around script.run_block) enters the task's folder, sets RLIMIT_CPU,
runs the command and writes its exit status to the exit-code file: the launcher does all of that
itself for a direct job (see launcher.py). A site template, or a command that needs bash around
it (a container runtime's stop trap or its lines after the command), keeps the job script.
"""
from __future__ import annotations

from typing import Any

from ..base import Task
from ..script import Command, describe_request, exit_file, quote, render, run_block
from ..units import cpu_rlimit, mib_to_bytes
from .cgpool import Lease


def is_direct(command: Command, builtin_template: bool) -> bool:
    """Whether the job of `command` runs without its job script."""
    return builtin_template and bool(command.argv) and not command.on_stop and not command.after


def script(template: str, task: Task, command: Command) -> str:
    """The job script of `task`, from `template`."""
    return render(template, {
        "task_id": quote(task.id),
        "workdir": quote(task.workdir),
        "resources": describe_request(task),
        "run": run_block(task, command),
    })


def run_request(task: Task, cpus: tuple[int, ...], lease: Lease | None, *, command: Command | None,
                script_path: str | None, account: str | None, env: dict[str, str] | None,
                can_spawn: bool, gpus: tuple[str, ...] | None = None, after: str | None = None) -> dict[str, Any]:
    """The launcher's `run` request: `command` run directly, or the job script at `script_path`.
    `env` None: the launcher's own environment; without `lease` (no cgroups) memory is limited by
    RLIMIT_AS. A direct job may be spawned (launcher.py: vfork and exec from inside its cgroups)
    when `can_spawn` (cgroup v1, or none) and it needs no limit of its own process (CPU time,
    address space) and no memory limit (the launcher never enters a limited memory
    cgroup, where it could meet the OOM killer). `gpus`: the ids of the GPUs the job holds, which
    it sees as CUDA_VISIBLE_DEVICES (set empty when it holds none, so it sees no GPU), or None on a
    machine without GPUs for tasks (the variable is left as it is). `after`: the task whose job
    must end before this one starts (the launcher holds the request until then)."""
    request: dict[str, Any] = {
        "op": "run", "id": task.id, "join": list(lease.procs) if lease else [], "cpus": list(cpus),
        "rlimit_as": 0 if lease or not task.memory else mib_to_bytes(task.memory), "user": account,
        "stdout": task.stdout, "stderr": task.stderr, "env": env, "cwd": task.workdir,
        "gpus": None if gpus is None else list(gpus),
    }
    if after is not None:
        request["after"] = after
    if command is not None:
        request["argv"] = list(command.argv)
        request["cputime"] = list(cpu_rlimit(task.cputime)) if task.cputime else None
        request["exit_file"] = exit_file(task)
        request["spawn"] = (can_spawn and not request["rlimit_as"] and not task.cputime
                            and not (lease and task.memory))
    else:
        request["script"] = script_path
    return request
