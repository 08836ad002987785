"""The pure half of Slurm over slurmrestd (openapi/v0.0.38): the job's properties read from the
`#SBATCH` lines of the job script, Slurm's JSON answers as the `SlurmJob`s the CLI half reads
from squeue, and the messages in an answer's `errors`.

slurmctld never reads `#SBATCH` lines: sbatch does, and turns them into the job's description.
Over REST that description is the `job` object of `POST /job/submit`, so the same lines that
`parse.directives` writes for sbatch are read back here, with sbatch's own quoting rules, into
v0.0.38's property names. An option without a REST counterpart is refused, never dropped.

Reference: slurmrestd's OpenAPI description (`GET /openapi/v3`, schemas `v0.0.38_job_properties`
and `v0.0.38_job_response_properties`), Slurm 22.05.
"""
from __future__ import annotations

import re
import shlex
from collections.abc import Callable, Iterable, Mapping
from datetime import datetime
from typing import Any

from .parse import SlurmJob, _state

#: v0.0.38's answer when nothing changed since `update_time` (HTTP 304, no body).
NOT_MODIFIED = 304


def _integer(value: str) -> int:
    if not value.isdigit():
        raise ValueError(f"{value!r} is not a whole number")
    return int(value)


def _mebibytes(value: str) -> int:
    """sbatch's `--mem` (`300M`, `2G`, or a bare number of MiB) in MiB, as memory_per_node takes it."""
    match = re.fullmatch(r"(\d+)([KMGT]?)", value.strip().upper())
    if not match:
        raise ValueError(f"{value!r} is not a memory size")
    factor = {"K": 1 / 1024, "": 1, "M": 1, "G": 1024, "T": 1024 * 1024}[match.group(2)]
    return max(1, int(int(match.group(1)) * factor))


def _minutes(value: str) -> int:
    """sbatch's `--time` (`M`, `M:S`, `H:M:S`, `D-H`, `D-H:M`, `D-H:M:S`) in whole minutes, rounded up.

    >>> _minutes("2"), _minutes("1:30"), _minutes("2:00:00"), _minutes("1-0"), _minutes("1-0:0:1")
    (2, 2, 120, 1440, 1441)
    """
    days, dash, rest = value.strip().rpartition("-")
    parts = [_integer(p) for p in rest.split(":")]
    if dash and len(parts) <= 3:
        hours, minutes, seconds = [*parts, 0, 0][:3]
    elif not dash and len(parts) == 3:
        hours, minutes, seconds = parts
    elif not dash and len(parts) in (1, 2):
        hours, minutes, seconds = 0, parts[0], [*parts, 0][1]
    else:
        raise ValueError(f"{value!r} is not a time limit")
    return ((_integer(days) if dash else 0) * 24 + hours) * 60 + minutes + (1 if seconds else 0)


def _nodes(value: str) -> list[int]:
    low, _, high = value.partition("-")
    return [_integer(low), _integer(high or low)]


def _text(value: str) -> str:
    return value


#: sbatch long options (sbatch(1)) -> (v0.0.38 job property, conversion). None: an option with no
#: effect over REST (`--propagate`: slurmrestd hands a job no submitter's rlimits to propagate).
OPTIONS: dict[str, tuple[str, Callable[[str], Any]] | None] = {
    "job-name": ("name", _text),
    "output": ("standard_output", _text),
    "error": ("standard_error", _text),
    "input": ("standard_input", _text),
    "chdir": ("current_working_directory", _text),
    "nodes": ("nodes", _nodes),
    "ntasks": ("tasks", _integer),
    "cpus-per-task": ("cpus_per_task", _integer),
    "mem": ("memory_per_node", _mebibytes),
    "mem-per-cpu": ("memory_per_cpu", _mebibytes),
    "time": ("time_limit", _minutes),
    "time-min": ("time_minimum", _minutes),
    "partition": ("partition", _text),
    "account": ("account", _text),
    "qos": ("qos", _text),
    "reservation": ("reservation", _text),
    "constraint": ("constraints", _text),
    "comment": ("comment", _text),
    "gres": ("gres", _text),
    "gpus": ("gpus", _text),
    "gpus-per-node": ("gpus_per_node", _text),
    "gpus-per-task": ("gpus_per_task", _text),
    "cpus-per-gpu": ("cpus_per_gpu", _text),
    "licenses": ("licenses", _text),
    "wckey": ("wckey", _text),
    "mail-type": ("mail_type", _text),
    "mail-user": ("mail_user", _text),
    "nice": ("nice", _integer),
    "exclusive": ("exclusive", lambda v: v or "exclusive"),
    "requeue": ("requeue", lambda v: True),
    "no-requeue": ("requeue", lambda v: False),
    "propagate": None,
}
#: Options that take no value (or only an optional `=value`).
_FLAGS = frozenset({"exclusive", "requeue", "no-requeue"})
_SHORT = {"J": "job-name", "o": "output", "e": "error", "i": "input", "D": "chdir", "N": "nodes", "n": "ntasks",
          "c": "cpus-per-task", "t": "time", "p": "partition", "A": "account", "q": "qos", "C": "constraint",
          "G": "gpus"}


def check_options(options: Iterable[str]) -> None:
    """ValueError unless each of `options` (sbatch options, e.g. the admin's `extra_directives`)
    has a REST counterpart."""
    job_properties("#!/bin/bash\n" + "".join(f"#SBATCH {shlex.quote(option)}\n" for option in options), {})


def sbatch_lines(script: str) -> list[str]:
    """The `#SBATCH` options of `script`, as sbatch reads them: from the lines before the first
    command (blank lines and other comments do not end the block), each line split with shell
    quoting; a `#` word starts a comment."""
    options: list[str] = []
    for line in script.splitlines()[1:]:
        stripped = line.strip()
        if stripped.startswith("#SBATCH"):
            words = shlex.split(stripped[len("#SBATCH"):], comments=True)
            options += words
        elif stripped and not stripped.startswith("#"):
            break
    return options


def job_properties(script: str, environment: Mapping[str, str]) -> dict[str, Any]:
    """The `job` object of `POST /job/submit` for `script`: its `#SBATCH` options as v0.0.38
    properties, and `environment` (v0.0.38 requires one). ValueError names an option that has no
    REST counterpart or a value that does not parse."""
    job: dict[str, Any] = {"environment": dict(environment)}
    words = iter(sbatch_lines(script))
    for word in words:
        if word.startswith("--"):
            name, equals, value = word[2:].partition("=")
            has_value = bool(equals)
        elif re.fullmatch(r"-[A-Za-z].*", word) and word[1] in _SHORT:
            name, has_value, value = _SHORT[word[1]], bool(word[2:]), word[2:]
        else:
            raise ValueError(f"#SBATCH {word!r} is not an sbatch option")
        if name not in OPTIONS:
            raise ValueError(f"#SBATCH --{name} has no counterpart in Slurm's REST API (v0.0.38)")
        target = OPTIONS[name]
        if not has_value and name not in _FLAGS:
            value = next(words, "")
        if target is None:
            continue
        key, convert = target
        try:
            job[key] = convert(value)
        except (ValueError, TypeError) as exc:
            raise ValueError(f"#SBATCH --{name}={value}: {exc}") from None
    return job


def submission(script: str, environment: Mapping[str, str], user_environment: bool) -> dict[str, Any]:
    """The body of `POST /job/submit`: the whole script (its `#SBATCH` lines are comments to
    slurmctld) and its properties; `user_environment` asks for the user's login environment
    on the node, as sbatch's `--export=NONE` does for jobs submitted on another's behalf."""
    job = job_properties(script, environment)
    if user_environment:
        # sbatch's --get-user-env=10: the login environment, read within 10 s (v0.0.38 takes
        # sbatch's string, not the boolean its description announces)
        job["get_user_environment"] = "10"
    return {"script": script, "job": job}


# ---- reading answers -------------------------------------------------------------------------------

def _when(epoch: Any) -> datetime | None:
    return datetime.fromtimestamp(epoch).astimezone() if isinstance(epoch, int) and epoch > 0 else None


def _limit(minutes: Any) -> str:
    """v0.0.38's time_limit (minutes; null or huge: unlimited) in squeue's `H:MM:SS`."""
    if not isinstance(minutes, int) or minutes <= 0 or minutes >= 0xFFFFFFFE:
        return "UNLIMITED"
    return f"{minutes // 60}:{minutes % 60:02d}:00"


def parse_job(entry: Mapping[str, Any]) -> SlurmJob | None:
    """One entry of `jobs` in a v0.0.38 answer as a SlurmJob; None if it has no job id.
    `exit_code` is the batch script's wait(2) status, as squeue's `exit_code` field."""
    job_id = entry.get("job_id")
    if not isinstance(job_id, int):
        return None
    raw = entry.get("exit_code")
    raw = raw if isinstance(raw, int) and raw >= 0 else None
    return SlurmJob(
        job_id=str(job_id), name=str(entry.get("name") or ""), state=_state(str(entry.get("job_state") or "")),
        reason=str(entry.get("state_reason") or ""),
        status=None if raw is None else raw >> 8 & 0xFF, signal=0 if raw is None else raw & 0x7F,
        started=_when(entry.get("start_time")), finished=_when(entry.get("end_time")),
        time_limit=_limit(entry.get("time_limit")),
    )


def parse_jobs(answer: Mapping[str, Any], wanted: Callable[[SlurmJob], bool] = lambda job: True) -> dict[str, SlurmJob]:
    """The jobs of a `GET /jobs` or `GET /job/{id}` answer that `wanted` keeps, by job id."""
    jobs: dict[str, SlurmJob] = {}
    entries = answer.get("jobs")
    for entry in entries if isinstance(entries, list) else []:
        job = parse_job(entry) if isinstance(entry, dict) else None
        if job is not None and wanted(job):
            jobs[job.job_id] = job
    return jobs


def error_text(errors: Iterable[Any]) -> str:
    """Slurm's words from an answer's `errors`: each `error`, with its `description` when that
    says more (e.g. `Invalid job id specified (Unable to find JobId=7)`)."""
    said = []
    for item in errors:
        if not isinstance(item, dict):
            continue
        error, description = str(item.get("error") or "").strip(), str(item.get("description") or "").strip()
        text = error if not description or description in error else (
            f"{error} ({description})" if error else description)
        if text and text not in said:
            said.append(text)
    return "; ".join(said) or "no message"


def error_numbers(errors: Iterable[Any]) -> set[int]:
    return {item["error_number"] for item in errors if isinstance(item, dict)
            and isinstance(item.get("error_number"), int)}
