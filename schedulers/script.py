"""Job scripts: one template per scheduler, one quoting helper for every value that enters one.

A template is a bash script with `{{name}}` placeholders. Every template gets `{{task_id}}`,
`{{workdir}}` and `{{run}}`; `{{run}}` is the part common to all schedulers: it enters the task's
directory, sets the CPU-time limit, runs the command, and writes the command's exit status to the
task's exit-code file, so a job the scheduler has forgotten can still be resolved. Schedulers add
their own placeholders (e.g. `{{directives}}` for `#SBATCH` lines). Admins may replace a template
by a file of their own (option `template`).
"""
from __future__ import annotations

import re
import shlex
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from .task import Task
from .units import cpu_rlimit

EXIT_FILE = "exit_code"
#: Created by a job script (e.g. after a container's OOM kill) to say the memory limit killed it.
OOM_FILE = "oom_killed"
_PLACEHOLDER = re.compile(r"\{\{\s*([a-z_]+)\s*\}\}")


def quote(value: str | int) -> str:
    """Quote one value for bash. Every value that enters a job script goes through here."""
    return shlex.quote(str(value))


def quote_argv(argv: Iterable[str]) -> str:
    return " ".join(quote(arg) for arg in argv)


def exit_file(task: Task) -> str:
    return f"{task.workdir}/{EXIT_FILE}"


def command_argv(task: Task) -> list[str]:
    """The task's command as argv: a string runs through `/bin/sh -c`, a list is argv itself."""
    if task.cmd is None:
        return []
    if isinstance(task.cmd, str):
        return ["/bin/sh", "-c", task.cmd]
    return list(task.cmd)


@dataclass(frozen=True)
class Command:
    """What a job script runs: an argv, and optionally what stops it from outside (run when the job
    gets SIGTERM) and bash lines to run after it ended (e.g. to mark an OOM kill in OOM_FILE)."""

    argv: Sequence[str]
    on_stop: Sequence[str] | None = None
    after: Sequence[str] = field(default_factory=tuple)


def stoppable(command_line: str, on_stop: Sequence[str], child: str, status: str) -> list[str]:
    """Bash lines that run `command_line` in the background, run `on_stop` and pass SIGTERM on
    when the job is told to stop, and leave the command's exit status in `$status`."""
    stop = quote_argv(on_stop) + f' >/dev/null 2>&1; kill -TERM "${child}" 2>/dev/null'
    return [
        f"{command_line} &",
        f"{child}=$!",
        f"trap {quote(stop)} TERM INT HUP",
        f'wait "${child}"; {status}=$?',
        f'while kill -0 "${child}" 2>/dev/null; do wait "${child}"; {status}=$?; done',
    ]


def run_block(task: Task, command: Command | Sequence[str]) -> str:
    """The common body of every job script (see the module docstring)."""
    if not isinstance(command, Command):
        command = Command(command)
    lines = [
        f"export JOBPROXY_TASK_ID={quote(task.id)}",
        f"cd {quote(task.workdir)} || exit 1",
    ]
    if task.cputime:
        soft, hard = cpu_rlimit(task.cputime)
        # never raise a hard limit the scheduler already set lower (Grid Engine's h_cpu does)
        lines += [
            'jobproxy_hard=$(ulimit -H -t); '
            f'[ "$jobproxy_hard" = unlimited ] || [ "$jobproxy_hard" -gt {hard} ] && jobproxy_hard={hard}',
            f'ulimit -S -t $(( jobproxy_hard < {soft} ? jobproxy_hard : {soft} )) && '
            'ulimit -H -t "$jobproxy_hard" || exit 1',
        ]
    if command.on_stop:
        lines += stoppable(quote_argv(command.argv), command.on_stop, "jobproxy_child", "jobproxy_status")
    else:
        lines += [quote_argv(command.argv), "jobproxy_status=$?"]
    done = exit_file(task)
    lines += [
        *command.after,
        f"printf '%s\\n' \"$jobproxy_status\" > {quote(done + '.part')} && mv -f {quote(done + '.part')} {quote(done)}",
        'exit "$jobproxy_status"',
    ]
    return "\n".join(lines)


def describe_request(task: Task) -> str:
    """The task's request in words, for a comment line of the job script."""
    memory = f"{task.memory} MiB" if task.memory else "unlimited"
    cputime = f"{task.cputime} s" if task.cputime else "unlimited"
    return f"cores {task.cores or 1}, memory {memory}, CPU time {cputime}"


def load_template(package: str, override: str | None = None) -> str:
    """The admin's template file if given, else the built-in one beside the scheduler's module:
    `<name>.sh` in the package `package` (e.g. `schedulers.slurm`)."""
    if override:
        return Path(override).read_text(encoding="utf-8")
    name = package.rsplit(".", 1)[-1]
    return (resources.files(package) / f"{name}.sh").read_text(encoding="utf-8")


def placeholders(template: str) -> set[str]:
    return set(_PLACEHOLDER.findall(template))


def check_template(template: str, known: Iterable[str], origin: str) -> None:
    """Fail early (at start-up) on a template that uses a placeholder no scheduler fills."""
    unknown = placeholders(template) - set(known)
    if unknown:
        names = ", ".join("{{" + n + "}}" for n in sorted(unknown))
        raise ValueError(f"job-script template {origin}: unknown placeholder(s) {names}; known: "
                         + ", ".join("{{" + n + "}}" for n in sorted(known)))


def render(template: str, values: dict[str, str]) -> str:
    """Fill the placeholders of `template`. Values must already be quoted where they need it."""
    return _PLACEHOLDER.sub(lambda m: values[m.group(1)], template)
