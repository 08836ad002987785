"""What the DRMAA plugin knows about Grid Engine in particular (used with `drm = "gridengine"`).

- The environment libdrmaa needs (SGE_ROOT, SGE_CELL), checked at start-up.
- The states of all jobs in one call: `qstat -xml -u '*'` lists every job Grid Engine still has
  (pending, running, suspended, held, in error) with its state letters; `parse_qstat` reads that
  with the standard library and `job_state` maps the letters to the common vocabulary. A job that
  has finished leaves the list.
- Accounting: after a gateway restart the new DRMAA session no longer knows the jobs the old one
  submitted, and a job that ended while the gateway was down left at most its exit-code file.
  `qacct -j ID` still has the job's record (exit status, how it failed, CPU time, peak memory),
  which `accounting` turns into the same `Ending` DRMAA's JobInfo gives.
"""
from __future__ import annotations

import logging
import re
import signal
import xml.etree.ElementTree as ElementTree
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from ..base import SchedulerUnavailable
from ..commands import run
from ..task import TaskState
from .mapping import Ending

log = logging.getLogger(__name__)

#: accounting(5) `failed` codes of jobs that ran and were ended by a signal (limits, qdel).
_ENDED_BY_SIGNAL = {37, 100}
_SIZE = re.compile(r"^([0-9.]+)\s*([KMGTP]?)B?$")
_UNITS = {"": 1, "K": 1024, "M": 1024**2, "G": 1024**3, "T": 1024**4, "P": 1024**5}


def environment_problem(sge_root: str | None, sge_cell: str) -> str | None:
    """What is missing for libdrmaa to reach this Grid Engine cell, or None."""
    if not sge_root:
        return ("SGE_ROOT is not set: set it in the gateway's environment or as scheduler.options.sge_root "
                "(the Grid Engine installation folder, e.g. /var/lib/gridengine)")
    common = Path(sge_root) / sge_cell / "common"
    if not (common / "act_qmaster").is_file():
        return (f"{common}/act_qmaster does not exist: SGE_ROOT={sge_root} with SGE_CELL={sge_cell} is not a "
                "Grid Engine cell (check SGE_ROOT and SGE_CELL, or scheduler.options.sge_root / sge_cell)")
    return None


def parse_size(text: str) -> float | None:
    """A qacct memory figure in bytes (K, M, G... are powers of 1024).

    >>> parse_size("1.5KB"), parse_size("0.000B"), parse_size("2.000G"), parse_size("n/a")
    (1536.0, 0.0, 2147483648.0, None)
    """
    found = _SIZE.match(text.strip())
    return float(found.group(1)) * _UNITS[found.group(2)] if found else None


def parse_seconds(text: str) -> float | None:
    """A qacct CPU time in seconds ("1.985s", "1.985", or "[D:]H:MM:SS" in some versions).

    >>> parse_seconds("1.985s"), parse_seconds("12"), parse_seconds("1:00:05"), parse_seconds("?")
    (1.985, 12.0, 3605.0, None)
    """
    text = text.strip().removesuffix("s")
    try:
        total = 0.0
        for part in text.split(":"):
            total = total * 60 + float(part)
        return total
    except ValueError:
        return None


def parse_qacct(text: str, job_name: str) -> dict[str, str] | None:
    """The fields of the last `qacct -j` record named `job_name` (job ids are reused after a wrap
    or a reinstall; the name carries the gateway's task id), or None."""
    records: list[dict[str, str]] = []
    for line in text.splitlines():
        if line.startswith("====="):
            records.append({})
        elif records and line.strip():
            key, _, value = line.partition(" ")
            records[-1][key] = value.strip()
    named = [r for r in records if r.get("jobname") == job_name]
    return named[-1] if named else None


def ending_from_record(record: dict[str, str]) -> Ending:
    """The Ending a qacct record describes (see accounting(5): `failed`, `exit_status`)."""
    code_text, _, why = record.get("failed", "0").partition(":")
    failed = int(code_text.strip() or 0) if code_text.strip().isdigit() else -1
    exit_status = int(record.get("exit_status", "0").split()[0] or 0)
    finished = _date(record.get("end_time", ""))
    cpu, maxvmem = parse_seconds(record.get("cpu", "")), parse_size(record.get("maxvmem", ""))
    if failed in _ENDED_BY_SIGNAL and exit_status > 128:
        try:
            name = signal.Signals(exit_status - 128).name
        except ValueError:
            name = f"signal {exit_status - 128}"
        return Ending(signal=name, cpu=cpu, maxvmem=maxvmem, reason=why.strip(), finished=finished)
    if failed == 0:
        return Ending(exit_status=exit_status, cpu=cpu, maxvmem=maxvmem, finished=finished)
    reason = " ".join(record.get("failed", "").split())
    return Ending(aborted=True, cpu=cpu, maxvmem=maxvmem, reason=reason, finished=finished)


def _date(text: str) -> datetime | None:
    try:
        return datetime.strptime(text.strip(), "%a %b %d %H:%M:%S %Y").astimezone()
    except ValueError:
        return None


async def accounting(qacct: str, job_id: str, job_name: str, timeout: float = 30) -> Ending | None:
    """The Ending recorded for job `job_id` named `job_name`, or None (qacct cannot run or does not
    answer, or there is no record yet). `qacct` is the command's path."""
    try:
        done = await run([qacct, "-j", job_id], timeout, service="Grid Engine")
    except SchedulerUnavailable as exc:
        log.warning("qacct -j %s: %s", job_id, exc)
        return None
    if done.status != 0:  # "error: job id N not found": the record is not (yet) there
        return None
    record = parse_qacct(done.stdout, job_name)
    return ending_from_record(record) if record else None


# ---- qstat: the state of every job Grid Engine still has -------------------------------------------

#: The one qstat call per poll: every user's jobs (the gateway's may run under several accounts), as XML.
QSTAT_ARGS = ("-xml", "-u", "*")

#: qstat(1), OUTPUT FORMATS: the state of a job is "a combination of d(eletion), E(rror), h(old),
#: q(ueued), r(unning), R(estarted), s(uspended), S(uspended), t(ransfering), T(hreshold), w(aiting)
#: or z(ombie)". d: qdel has been used on it; t and r: about to run or running; s: suspended by
#: qmod, S: its queue is suspended, T: a suspend threshold of its queue was exceeded; q/w and h
#: appear only for pending jobs (h: held by qhold, qalter, qsub -h, or a job dependency); E: a
#: pending job that could not be started due to its properties (qstat -j says why; it stays until
#: `qmod -cj` clears it or it is deleted); R: restarted (with the letters of its current state);
#: z: finished (listed only with -s z). The first letter in this table that a state has decides.
STATE_LETTERS: tuple[tuple[str, TaskState, str], ...] = (
    ("d", TaskState.CANCELING, "being deleted"),
    ("E", TaskState.PAUSED, "in error state (Grid Engine could not start it; qstat -j says why)"),
    ("h", TaskState.PAUSED, "on hold"),
    ("s", TaskState.PAUSED, "suspended"),
    ("S", TaskState.PAUSED, "suspended with its queue"),
    ("T", TaskState.PAUSED, "suspended at a load threshold of its queue"),
    ("t", TaskState.INITIALIZING, "being transferred to its host"),
    ("r", TaskState.RUNNING, "running"),
    ("q", TaskState.QUEUED, "queued"),
    ("w", TaskState.QUEUED, "queued"),
)
#: Every letter qstat(1) documents; a state with any other is not understood.
KNOWN_LETTERS = frozenset("dEhqrRsStTwz")


@dataclass(frozen=True)
class QueuedJob:
    """One job of qstat's list."""

    job_id: str
    name: str
    state: str                       # qstat's letters, e.g. "qw", "r", "Eqw"
    owner: str = ""
    started: datetime | None = None  # when it started running (running and suspended jobs)


def job_state(letters: str) -> tuple[TaskState, str] | None:
    """A qstat state in the common vocabulary, with words for it; None for a state not understood.

    >>> [job_state(s)[0].value for s in ("qw", "hqw", "Eqw", "Rr", "t", "dr", "S")]
    ['QUEUED', 'PAUSED', 'PAUSED', 'RUNNING', 'INITIALIZING', 'CANCELING', 'PAUSED']
    >>> job_state("X"), job_state("R"), job_state("")
    (None, None, None)
    """
    if not letters or not set(letters) <= KNOWN_LETTERS:
        return None
    for letter, state, words in STATE_LETTERS:
        if letter in letters:
            return state, words
    return None  # only R or z: not a state of its own


def parse_qstat(text: str) -> dict[str, QueuedJob]:
    """`qstat -xml` output, by job id: running jobs (queue_info) and pending ones (job_info).
    Raises ValueError for text that is not qstat's XML."""
    try:
        root = ElementTree.fromstring(text)
    except ElementTree.ParseError as exc:
        raise ValueError(f"qstat printed no XML ({exc})") from None
    if root.tag != "job_info":
        raise ValueError(f"qstat printed <{root.tag}>, not <job_info>")
    jobs: dict[str, QueuedJob] = {}
    for entry in root.iter("job_list"):
        job_id = (entry.findtext("JB_job_number") or "").strip()
        if not job_id.isdigit() or job_id in jobs:  # an array job lists one entry per task
            continue
        jobs[job_id] = QueuedJob(job_id=job_id, name=(entry.findtext("JB_name") or "").strip(),
                                 state=(entry.findtext("state") or "").strip(),
                                 owner=(entry.findtext("JB_owner") or "").strip(),
                                 started=_iso(entry.findtext("JAT_start_time") or ""))
    return jobs


def _iso(text: str) -> datetime | None:
    """qstat's local timestamp (2026-12-01T06:21:42) as an aware datetime."""
    try:
        return datetime.strptime(text.strip(), "%Y-%m-%dT%H:%M:%S").astimezone()
    except ValueError:
        return None


async def listing(qstat: str, timeout: float) -> dict[str, QueuedJob]:
    """Every job Grid Engine still has, from one `qstat -xml -u '*'` call (`qstat`: the command's
    path). SchedulerUnavailable if qstat fails, does not answer, or prints something else."""
    done = await run([qstat, *QSTAT_ARGS], timeout, service="Grid Engine")
    words = " ".join((done.stderr or done.stdout).split())[:300]
    if done.status != 0:
        raise SchedulerUnavailable(f"Grid Engine cannot list its jobs right now (qstat): {words or 'no message'}")
    try:
        return parse_qstat(done.stdout)
    except ValueError as exc:
        raise SchedulerUnavailable(f"Grid Engine gave an unreadable job list: {exc}") from None
