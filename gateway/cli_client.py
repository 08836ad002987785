"""The client subcommands of `jobproxy`: submit, state, wait, logs, cancel, delete.

They talk to `--url` (or $JOBPROXY_URL, default http://127.0.0.1:8080; `unix:/path` for the
gateway's Unix socket) with `--token` (or $JOBPROXY_TOKEN), through `gateway.client`. A failure
prints the server's message on one line and exits 1; a usage mistake exits 2; `wait` (and
`submit --wait`) exits with the task's exit code, or 1 if any of several tasks did not complete,
or 124 when `--timeout` ran out.
"""
from __future__ import annotations

import argparse
import getpass
import json
import os
import sys
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from .client import FINAL, Client, ClientError, WaitTimeout

TIMED_OUT = 124


def _connection_options(parser: argparse.ArgumentParser, default: Any) -> None:
    parser.add_argument("--url", default=default, help="the gateway (default: $JOBPROXY_URL or "
                        "http://127.0.0.1:8080; unix:/PATH for its Unix socket)")
    parser.add_argument("--token", default=default, help="API token (default: $JOBPROXY_TOKEN)")


def register(parser: argparse.ArgumentParser, commands: Any) -> None:
    """Add the client subcommands to the `jobproxy` parser and its subparsers (`commands`);
    `--url` and `--token` may come before the subcommand or after it."""
    _connection_options(parser, None)
    common = argparse.ArgumentParser(add_help=False)
    _connection_options(common, argparse.SUPPRESS)  # after the subcommand, without hiding one given before it

    submit = commands.add_parser("submit", parents=[common], help="submit a task; prints its id",
                                 usage="%(prog)s [options] -- CMD [ARG...]  |  %(prog)s --file task.json")
    submit.add_argument("--file", help="submit this JSON or XML task document as it is ('-': standard input)")
    submit.add_argument("--user", help="the user the task runs for (default: your login name)")
    submit.add_argument("--cores", type=int, help="CPU cores")
    submit.add_argument("--memory", type=int, metavar="MiB", help="memory limit in MiB")
    submit.add_argument("--cputime", type=int, metavar="S", help="CPU-time limit in CPU seconds")
    submit.add_argument("--stdout", metavar="PATH", help="file for the standard output (absolute path)")
    submit.add_argument("--stderr", metavar="PATH", help="file for the standard error (absolute path)")
    submit.add_argument("--image", help="run in this container image")
    submit.add_argument("--volume", action="append", default=[], metavar="HOST:CONTAINER[:ro]",
                        help="mount a host folder in the container (repeatable)")
    submit.add_argument("--port", action="append", default=[], metavar="HOST:CONTAINER",
                        help="publish a container port (repeatable)")
    submit.add_argument("--wait", action="store_true", help="wait for the task, print its output, exit with its code")
    submit.add_argument("--timeout", type=float, metavar="S", help="with --wait: give up after S seconds")
    submit.add_argument("cmd", nargs=argparse.REMAINDER, help="the command and its arguments, after --")
    submit.set_defaults(run=_submit, parser=submit)

    state = commands.add_parser("state", parents=[common], help="show tasks: a table, or JSON")
    state.add_argument("ids", nargs="*", metavar="ID", help="these tasks (default: all of yours, paged through)")
    state.add_argument("--user", help="an admin: only this user's tasks")
    state.add_argument("--state", action="append", default=[], help="only tasks in this state (repeatable; a,b)")
    state.add_argument("--json", action="store_true", help="print a JSON array of State documents")
    state.set_defaults(run=_state)

    wait = commands.add_parser("wait", parents=[common], help="wait until tasks are final; exit with the task's code")
    wait.add_argument("ids", nargs="+", metavar="ID")
    wait.add_argument("--timeout", type=float, metavar="S", help="give up after S seconds (exit 124)")
    wait.set_defaults(run=_wait)

    logs = commands.add_parser("logs", parents=[common], help="print a task's output")
    logs.add_argument("id", metavar="ID")
    logs.add_argument("--stderr", action="store_true", help="the standard error instead of the standard output")
    logs.add_argument("--follow", "-f", action="store_true", help="keep printing what is written until the task ends")
    logs.add_argument("--tail", type=int, metavar="N", help="only the last N bytes")
    logs.set_defaults(run=_logs)

    for name, text in (("cancel", "stop tasks, keep their records (CANCELED)"),
                       ("delete", "stop tasks if they run, and forget them")):
        each = commands.add_parser(name, parents=[common], help=text)
        each.add_argument("ids", nargs="+", metavar="ID")
        each.set_defaults(run=_cancel if name == "cancel" else _delete)


def run(args: argparse.Namespace) -> int:
    """Run one client subcommand: its exit status; errors one line on stderr, never a traceback."""
    try:
        client = Client(args.url, args.token)
        status: int = args.run(client, args)
        return status
    except WaitTimeout as exc:
        _error(str(exc))
        return TIMED_OUT
    except ClientError as exc:
        _error(str(exc))
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # e.g. `jobproxy logs ID | head`: the reader has all it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit
        return 0


def _error(message: str) -> None:
    print(f"jobproxy: {message}", file=sys.stderr)


def _submit(client: Client, args: argparse.Namespace) -> int:
    command = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
    if args.file is not None:
        if command:
            args.parser.error("give either --file or a command, not both")
        try:
            body = sys.stdin.buffer.read() if args.file == "-" else Path(args.file).read_bytes()
        except OSError as exc:
            raise ClientError(f"cannot read {args.file}: {exc.strerror}") from None
        xml = args.file.endswith(".xml") or body.lstrip().startswith(b"<")
        task_id = client.submit(body, "application/xml" if xml else "application/json")
    else:
        if not command:
            args.parser.error("no command: jobproxy submit [options] -- CMD [ARG...]")
        task_id = client.submit(_document(args, command, args.parser.error))
    if not args.wait:
        print(task_id)
        return 0
    print(task_id, file=sys.stderr)
    state = client.wait([task_id], timeout=args.timeout)[task_id]
    for stream, out in (("stdout", sys.stdout), ("stderr", sys.stderr)):
        out.flush()
        out.buffer.write(client.logs(task_id, stream))
        out.buffer.flush()
    return _exit_status(state)


def _document(args: argparse.Namespace, command: list[str], usage: Callable[[str], Any]) -> dict[str, Any]:
    task: dict[str, Any] = {"user": args.user or getpass.getuser(), "cmd": command}
    for key in ("cores", "memory", "cputime", "stdout", "stderr"):
        if getattr(args, key) is not None:
            task[key] = getattr(args, key)
    if args.image is None:
        if args.volume or args.port:
            usage("--volume and --port need --image")
        return task
    volumes = []
    for volume in args.volume:
        host, _, rest = volume.partition(":")
        inside, _, mode = rest.partition(":")
        if not host or not inside or mode not in ("", "ro", "rw"):
            usage(f"--volume {volume!r}: HOST:CONTAINER or HOST:CONTAINER:ro")
        volumes.append({"host": host, "container": inside, "mode": "RO" if mode == "ro" else "RW"})
    ports = []
    for port in args.port:
        host, _, inside = port.partition(":")
        if not (host.isdigit() and inside.isdigit()):
            usage(f"--port {port!r}: HOST:CONTAINER, two port numbers")
        ports.append({"host": int(host), "container": int(inside)})
    task["container"] = {"image": args.image, "volumes": volumes, "ports": ports}
    return task


def _state(client: Client, args: argparse.Namespace) -> int:
    failed = False
    if args.ids:
        found = []
        for task_id in args.ids:
            try:
                found.append(client.state(task_id))
            except ClientError as exc:
                if exc.status is None:
                    raise
                _error(str(exc))
                failed = True
    else:
        found = list(client.states(args.user, [s for value in args.state for s in value.split(",") if s]))
    if args.json:
        print(json.dumps(found, indent=2))
    elif found or not args.ids:
        _table(found)
    return 1 if failed else 0


def _table(states: list[dict[str, Any]]) -> None:
    rows = [("ID", "STATE", "USER", "SCHEDULER", "EXIT", "AGE")]
    for s in states:
        exit_code = "" if s.get("exit_code") is None else str(s["exit_code"])
        rows.append((s["id"], s["code"], s["user"], s.get("scheduler") or "", exit_code, _age(s.get("created"))))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip())


def _age(created: str | None) -> str:
    if not created:
        return ""
    seconds = int((datetime.now(UTC) - datetime.fromisoformat(created.replace("Z", "+00:00"))).total_seconds())
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit}"
    return f"{max(seconds, 0)}s"


def _wait(client: Client, args: argparse.Namespace) -> int:
    ids = list(dict.fromkeys(args.ids))
    if len(ids) > 1 and sys.stderr.isatty():
        done = _wait_with_progress(client, ids, args.timeout)
    else:
        done = client.wait(ids, timeout=args.timeout)
    if len(ids) == 1:
        return _exit_status(done[ids[0]])
    for task_id in ids:
        state = done[task_id]
        if state["code"] != "COMPLETE":
            _error(f"task {task_id}: {state['code']} ({state.get('description') or 'no description'})")
    return 0 if all(done[t]["code"] == "COMPLETE" for t in ids) else 1


def _wait_with_progress(client: Client, ids: list[str], timeout: float | None) -> dict[str, dict[str, Any]]:
    """`Client.wait` with a progress bar of the tasks that are final (rich, on stderr)."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    finished: set[str] = set()
    columns = (TextColumn("waiting"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.description}"),
               TimeElapsedColumn())
    with Progress(*columns, console=Console(stderr=True), transient=False) as progress:
        bar = progress.add_task("", total=len(ids))

        def changed(state: dict[str, Any]) -> None:
            if state["code"] in FINAL:
                finished.add(state["id"])
            progress.update(bar, completed=len(finished), description=f"{state['id']} {state['code']}")

        return client.wait(ids, timeout=timeout, on_change=changed)


def _exit_status(state: dict[str, Any]) -> int:
    """The shell's exit status for a final task: its exit code (0..255), else 1 unless COMPLETE."""
    code = state.get("exit_code")
    if isinstance(code, int) and 0 < code <= 255:
        return code
    return 0 if state["code"] == "COMPLETE" else 1


def _logs(client: Client, args: argparse.Namespace) -> int:
    stream = "stderr" if args.stderr else "stdout"
    out = sys.stdout.buffer
    if args.follow:
        for chunk in client.follow(args.id, stream, args.tail):
            out.write(chunk)
            out.flush()
    else:
        out.write(client.logs(args.id, stream, args.tail))
        out.flush()
    return 0


def _cancel(client: Client, args: argparse.Namespace) -> int:
    return _each(args.ids, lambda task_id: print(f"{task_id} {client.cancel(task_id)['code']}"))


def _delete(client: Client, args: argparse.Namespace) -> int:
    def delete(task_id: str) -> None:
        client.delete(task_id)
        print(f"{task_id} deleted")

    return _each(args.ids, delete)


def _each(ids: list[str], action: Callable[[str], Any]) -> int:
    """Do `action` to every id; an id that fails is told and the others still done."""
    failed = False
    for task_id in ids:
        try:
            action(task_id)
        except ClientError as exc:
            if exc.status is None:
                raise
            _error(str(exc))
            failed = True
    return 1 if failed else 0
