"""What the DRMAA plugin knows about Grid Engine in particular (used with `drm = "gridengine"`).

- The environment libdrmaa needs (SGE_ROOT, SGE_CELL), checked at start-up.
- Accounting: after a gateway restart the new DRMAA session no longer knows the jobs the old one
  submitted, and a job that ended while the gateway was down left at most its exit-code file.
  `qacct -j ID` still has the job's record (exit status, how it failed, CPU time, peak memory),
  which `accounting` turns into the same `Ending` DRMAA's JobInfo gives.
"""
from __future__ import annotations

import asyncio
import logging
import re
import shutil
import signal
from datetime import datetime
from pathlib import Path

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
    return Ending(aborted=True, cpu=cpu, maxvmem=maxvmem, reason=" ".join(record.get("failed", "").split()), finished=finished)


def _date(text: str) -> datetime | None:
    try:
        return datetime.strptime(text.strip(), "%a %b %d %H:%M:%S %Y").astimezone()
    except ValueError:
        return None


async def accounting(job_id: str, job_name: str, timeout: float = 30) -> Ending | None:
    """The Ending recorded for job `job_id` named `job_name`, or None (no qacct, no record yet)."""
    qacct = shutil.which("qacct")
    if qacct is None:
        return None
    try:
        process = await asyncio.create_subprocess_exec(qacct, "-j", job_id, stdout=asyncio.subprocess.PIPE,
                                                       stderr=asyncio.subprocess.DEVNULL)
    except OSError as exc:
        log.warning("qacct -j %s could not run: %s", job_id, exc)
        return None
    try:
        out, _ = await asyncio.wait_for(process.communicate(), timeout)
    except asyncio.TimeoutError:
        process.kill()
        await process.wait()
        log.warning("qacct -j %s did not answer within %s s", job_id, timeout)
        return None
    if process.returncode != 0:  # "error: job id N not found": the record is not (yet) there
        return None
    record = parse_qacct(out.decode(errors="replace"), job_name)
    return ending_from_record(record) if record else None
