"""What a site admin reads: start-up failures as one line naming the setting (real `jobproxy serve`
and `jobproxy check-config` processes), and `[log] format = "json"` lines."""
from __future__ import annotations

import errno
import json
import logging
import os
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, cast

import pytest

from gateway import cli, logs
from gateway import config as configuration

from .conftest import Gateway, free_port

ROOT = Path(__file__).resolve().parent.parent


def _jobproxy(tmp_path: Path, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """Run `jobproxy ARGS` from this checkout in `tmp_path`."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "gateway.cli", *args], capture_output=True, text=True,
                          cwd=tmp_path, env=env, timeout=timeout)


def _errors(result: subprocess.CompletedProcess[str]) -> list[str]:
    """The lines of stderr that are not log records (those start with a date)."""
    return [line for line in result.stderr.splitlines() if line.startswith("jobproxy:")]


def test_serve_on_a_port_in_use_says_so_in_one_line(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        (tmp_path / "jobproxy.toml").write_text(f'[gateway]\nport = {port}\nstate_dir = "state"\n')
        result = _jobproxy(tmp_path, "serve", "--config", "jobproxy.toml")
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    assert _errors(result) == [f"jobproxy: cannot listen on 127.0.0.1:{port} ([gateway] host/port, or --host/--port): "
                               "address already in use"]


def test_serve_with_a_state_folder_that_cannot_be_made_names_it(tmp_path: Path) -> None:
    (tmp_path / "jobproxy.toml").write_text(f'[gateway]\nport = {free_port()}\nstate_dir = "/proc/jp"\n')
    result = _jobproxy(tmp_path, "serve", "--config", "jobproxy.toml")
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    [line] = _errors(result)
    assert line.startswith("jobproxy: configuration error: jobproxy.toml: cannot open the task store "
                           "/proc/jp/jobproxy.db ([store] path, in [gateway] state_dir = '/proc/jp'): ")


def test_serve_with_a_task_root_that_cannot_be_made_names_it(tmp_path: Path) -> None:
    (tmp_path / "jobproxy.toml").write_text(f'[gateway]\nport = {free_port()}\nstate_dir = "state"\n'
                                            'task_root = "/proc/jp-tasks"\n')
    result = _jobproxy(tmp_path, "serve", "--config", "jobproxy.toml")
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    [line] = _errors(result)
    assert "cannot create the task root /proc/jp-tasks ([gateway] task_root): " in line


def test_check_config_lists_every_schema_problem(tmp_path: Path) -> None:
    """Three mistakes of different kinds: an unknown key, a wrong type, a value out of an enum."""
    (tmp_path / "three.toml").write_text('[gateway]\nport = "8080"\nbogus = 1\n[log]\nlevel = "LOUD"\n')
    result = _jobproxy(tmp_path, "check-config", "three.toml")
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 3, lines
    assert all(line.startswith("jobproxy: configuration error: three.toml: $.") for line in lines)
    assert {line.split(": ")[3] for line in lines} == {"$.gateway", "$.gateway.port", "$.log.level"}
    assert any("unknown field(s): 'bogus'" in line for line in lines), lines


def test_check_config_lists_every_cross_field_problem(tmp_path: Path) -> None:
    (tmp_path / "cross.toml").write_text('[gateway]\nhost = "0.0.0.0"\npage_size = 500\nmax_page_size = 100\n'
                                         '[[tes.images]]\nmatch = "*"\n')
    result = _jobproxy(tmp_path, "check-config", "cross.toml")
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    lines = result.stderr.splitlines()
    assert [line.split(": ")[3] for line in lines] == ["$.gateway.host", "$.gateway.page_size (500) exceeds "
                                                       "max_page_size (100)", "$.tes.images[0]"], lines


def test_cross_field_problems_come_together(tmp_path: Path) -> None:
    with pytest.raises(configuration.ConfigError) as raised:
        configuration.from_document({"gateway": {"host": "192.0.2.1", "http": False}}, tmp_path, "t")
    assert str(raised.value).splitlines() == [
        "t: $.gateway.host: refusing to listen on 192.0.2.1 with auth off: anyone who reaches it could run commands. "
        "Turn auth on ([auth] enabled = true), listen on 127.0.0.1, or set [gateway] allow_remote_without_auth = true",
        "t: $.gateway: with http = false, [gateway.https] or socket must be configured"]


def test_json_formatter_carries_extras_and_exceptions_on_one_line() -> None:
    formatter = logs.formatter("json")
    record = logging.LogRecord("gateway.service", logging.INFO, __file__, 1, "task %s done", ("t1",), None)
    record.task_id, record.user = "t1", "alice"
    assert json.loads(formatter.format(record)) | {"time": "-"} == {
        "time": "-", "level": "INFO", "logger": "gateway.service", "message": "task t1 done",
        "task_id": "t1", "user": "alice"}
    try:
        raise ValueError("boom")
    except ValueError:
        failed = logging.LogRecord("gateway", logging.ERROR, __file__, 1, "failed", (), sys.exc_info())
    line = formatter.format(failed)
    assert "\n" not in line and "ValueError: boom" in json.loads(line)["exc"] and "user" not in json.loads(line)


def test_text_formatter_writes_what_logging_formatter_writes() -> None:
    """The text format keeps its time stamp for a second: every line is still logging's own."""
    ours, theirs = logs.formatter("text"), logging.Formatter(logs.TEXT_FORMAT)
    start = time.time()
    for moment in [start + step / 7 for step in range(40)] + [start - 86_400.5, start]:  # across seconds, and back
        record = logging.LogRecord("gateway.service", logging.INFO, __file__, 1, "task %s", ("t1",), None)
        record.created, record.msecs = moment, int((moment - int(moment)) * 1000)
        assert ours.format(record) == theirs.format(record)


def test_serve_logs_json_lines_with_task_id_and_user(tmp_path: Path) -> None:
    config = '[log]\nformat = "json"\n[scheduler]\ntype = "local"\npoll_interval = 0.2\n'
    gateway = Gateway(tmp_path, config, {"PYTHONPATH": str(ROOT)})
    stderr = tmp_path / "stderr.log"
    with open(stderr, "wb") as err, open(tmp_path / "stdout.log", "wb") as out:
        gateway.process = subprocess.Popen(
            [sys.executable, "-m", "gateway.cli", "serve", *gateway.config_args, "--port", str(gateway.port)],
            stdout=out, stderr=err, cwd=tmp_path, env=gateway.env)
    try:
        deadline = time.monotonic() + 30
        while True:
            assert gateway.process.poll() is None, stderr.read_text()
            try:
                gateway.request("GET", "/v1/jobproxy/ping")
                break
            except OSError:
                assert time.monotonic() < deadline, stderr.read_text()
                time.sleep(0.1)
        task_id = gateway.submit({"user": "alice", "cmd": ["/bin/true"]})
        gateway.wait(task_id)
        assert gateway.request("DELETE", f"/v1/jobproxy/delete/{task_id}")[0] == 204
    finally:
        gateway.stop()
    lines: list[dict[str, Any]] = [json.loads(line) for line in stderr.read_text().splitlines()]
    assert lines and all({"time", "level", "logger", "message"} <= set(line) for line in lines)
    submitted = [line for line in lines if line.get("task_id") == task_id and "submitted" in line["message"]]
    assert len(submitted) == 1 and submitted[0]["user"] == "alice" and submitted[0]["level"] == "INFO", lines
    assert any(line.get("task_id") == task_id and "deleted" in line["message"] for line in lines), lines


def test_serve_with_a_store_newer_than_this_jobproxy_names_it(tmp_path: Path) -> None:
    (tmp_path / "state").mkdir()
    with sqlite3.connect(tmp_path / "state" / "jobproxy.db") as db:
        db.execute("PRAGMA user_version = 999")
    (tmp_path / "jobproxy.toml").write_text(f'[gateway]\nport = {free_port()}\nstate_dir = "state"\n')
    result = _jobproxy(tmp_path, "serve", "--config", "jobproxy.toml")
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    [line] = _errors(result)
    assert "([store] path, in [gateway] state_dir" in line and "schema version 999" in line, line


class _RefusedSite:
    """A site whose start() fails as binding port 80 without the right does."""

    async def start(self) -> None:
        raise PermissionError(errno.EACCES,
                              "error while attempting to bind on address ('0.0.0.0', 80): permission denied")


async def test_a_refused_low_port_is_one_line_naming_the_setting() -> None:
    with pytest.raises(cli.StartupError) as raised:
        await cli._start(cast(Any, _RefusedSite()), "http://0.0.0.0:80/v1", "[gateway] host/port, or --host/--port")
    assert str(raised.value) == "cannot listen on 0.0.0.0:80 ([gateway] host/port, or --host/--port): permission denied"
