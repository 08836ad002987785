"""How the local scheduler adopts what it did not start itself: the jobs of a gateway (or plugin
instance) before it, found through their spool files, exit-code files and /proc, when the gateway
reconciles with `status` after a restart, or when a launcher died without answering."""
from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from ..base import JobRef, JobStatus, TaskState
from ..files import recorded_exit
from . import cgroups, lifecycle, proc
from .admission import Slot
from .spool import PidRecord

if TYPE_CHECKING:
    from .plugin import LocalScheduler


def reconcile(plugin: LocalScheduler, jobs: Sequence[JobRef]) -> dict[str, JobStatus]:
    """Adopt jobs this process does not know (a restart): what their spool and files say."""
    answers: dict[str, JobStatus] = {}
    marked = plugin.spool.marked()  # a task without a pid file or a cancel mark needs no look for them
    marked.update(adopt(plugin, [job.task_id for job in jobs], {job.task_id: job.task.memory or 0 for job in jobs},
                        marked))
    for job in jobs:
        task, task_id = job.task, job.task_id
        record = plugin.spool.read_pid(task_id) if task_id in marked else None
        cancelled = task_id in marked and plugin.spool.cancelled(task_id) is not None
        if cancelled or recorded_exit(task)[0] is not None:
            status = lifecycle.final_status(task, None, plugin.spool, oom=oom(plugin, record), canceled=cancelled)
        elif record is not None and proc.alive(record.pid, record.started_at):
            slot = plugin.admission.hold(Slot(task, record.cpus, record.memory, record.pid, record.started_at,
                                            recorded=True, gpus=record.gpus))
            if plugin.pool is not None and record.cgroup is not None:
                slot.lease = plugin.pool.adopt(record.cgroup, record.oom_base)
            slot.status = lifecycle.running(record.pid, record.cpus, plugin.spool.pid_written(task_id))
            slot.launched.set()
            plugin._watch(slot)
            answers[task_id] = slot.status
            continue
        elif record is not None:
            status = lifecycle.final_status(task, None, plugin.spool, oom=oom(plugin, record))
        elif plugin.spool.known(task_id):
            plugin.admission.enqueue(task)
            answers[task_id] = plugin.admission.waiting(task)
            continue
        else:
            status = JobStatus(TaskState.SYSTEM_ERROR, "the local scheduler has no job script for this task",
                               finished=lifecycle.now())
        plugin._remember(task_id, status)
        answers[task_id] = status
    return answers


def adopt(plugin: LocalScheduler, task_ids: list[str], memory: dict[str, int],
          marked: set[str] | None = None) -> list[str]:
    """Write the pid files of jobs that run without one (spool.adopt); answers their tasks."""
    hierarchy = plugin.cgroups
    if hierarchy is None:
        return plugin.spool.adopt(task_ids, memory, lambda pid: None, lambda name: 0, marked)
    return plugin.spool.adopt(task_ids, memory, lambda pid: proc.group_under(pid, cgroups.PARENT),
                              hierarchy.oom_kills, marked)


def oom(plugin: LocalScheduler, record: PidRecord | None) -> bool:
    """Whether the memory limit killed a process of the ended job of `record`."""
    if record is None or record.cgroup is None or plugin.cgroups is None:
        return False
    return plugin.cgroups.oom_kills(record.cgroup) > record.oom_base
