"""sd_notify through a real Unix datagram socket, and `jobproxy serve` under a fake service manager:
READY=1 once it listens, STOPPING=1 and a clean exit on SIGTERM."""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from gateway import sdnotify

from .conftest import Gateway


@pytest.fixture
def manager(tmp_path: Path) -> Iterator[tuple[str, socket.socket]]:
    """A datagram socket standing in for systemd's notification socket."""
    path = str(tmp_path / "notify.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(path)
        sock.settimeout(60)
        yield path, sock


def test_notify_sends_one_datagram(manager: tuple[str, socket.socket]) -> None:
    path, sock = manager
    assert sdnotify.notify("READY=1\nSTATUS=up", {"NOTIFY_SOCKET": path})
    assert sock.recv(4096) == b"READY=1\nSTATUS=up"


def test_abstract_socket() -> None:
    name = f"jobproxy-test-{os.getpid()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(10)
        assert sdnotify.notify("READY=1", {"NOTIFY_SOCKET": "@" + name})
        assert sock.recv(4096) == b"READY=1"


def test_nothing_without_a_manager(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    assert not sdnotify.notify("READY=1", {})
    assert not sdnotify.notify("READY=1", {"NOTIFY_SOCKET": str(tmp_path / "nobody-listens")})
    assert "could not notify the service manager" in caplog.text
    assert not sdnotify.notify("READY=1", {"NOTIFY_SOCKET": "vsock:2:1234"})


@pytest.mark.e2e
def test_serve_notifies_ready_then_stopping(manager: tuple[str, socket.socket], tmp_path: Path,
                                            gateway_factory: Callable[..., Gateway]) -> None:
    path, sock = manager
    gateway = gateway_factory('[scheduler]\ntype = "local"\n', {"NOTIFY_SOCKET": path})
    command = shutil.which("jobproxy", path=str(Path(sys.executable).parent)) or "jobproxy"
    with open(gateway.log, "ab") as log:
        gateway.process = subprocess.Popen([command, "serve", *gateway.config_args, "--port", str(gateway.port)],
                                           stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path, env=gateway.env)
    ready = sock.recv(4096).decode()
    assert ready.startswith("READY=1\n") and f"STATUS=serving http://127.0.0.1:{gateway.port}/v1" in ready
    status, _, _ = gateway.request("GET", "/v1/jobproxy/ping")  # listening once READY=1 is sent: no retry
    assert status == 200
    for path in ("/metrics", "/ui", "/ui/app.js", "/v1/docs", "/v1/docs/swagger-ui-bundle.js"):
        status, _, body = gateway.request("GET", path)  # what a real process serves, package data included
        assert status == 200 and body, path
    gateway.process.send_signal(signal.SIGTERM)
    assert sock.recv(4096) == b"STOPPING=1"
    assert gateway.process.wait(timeout=60) == 0, gateway.log.read_text()
    assert "Traceback" not in gateway.log.read_text()
