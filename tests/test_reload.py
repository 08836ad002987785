"""SIGHUP reloads the config of a running `jobproxy serve`: tokens, quotas, limits, log level;
a config that does not load is refused and the running one stays (gateway/reload.py)."""
from __future__ import annotations

import functools
import json
import logging
import signal
import threading
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from gateway import auth, reload
from gateway import config as configuration

from .conftest import Gateway

TOKENS = {name: auth.new_token() for name in ("alice", "bob", "carol")}


def site(*users: str, extra: str = "") -> str:
    """A config with auth on and tokens for `users` (carol, who is always there, is an admin)."""
    lines = [f'{{ user = "{u}", sha256 = "{auth.hash_token(TOKENS[u])}" }}' for u in users]
    lines.append(f'{{ user = "carol", sha256 = "{auth.hash_token(TOKENS["carol"])}", admin = true }}')
    entries = ",\n  ".join(lines)
    return f"[auth]\nenabled = true\ntokens = [\n  {entries},\n]\n{extra}"


def status_of(gateway: Gateway, user: str, method: str = "GET", path: str = "/v1/jobproxy/state",
              body: dict[str, object] | None = None) -> int:
    headers = {"Authorization": f"Bearer {TOKENS[user]}", "Content-Type": "application/json"}
    return gateway.request(method, path, json.dumps(body).encode() if body is not None else None, headers)[0]


def hup(gateway: Gateway, line: str, count: int = 1) -> None:
    """SIGHUP the gateway and wait until its log holds `line` `count` times."""
    assert gateway.process is not None
    gateway.process.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 30
    while gateway.log.read_text().count(line) < count:
        assert time.monotonic() < deadline, f"no {line!r} in the log:\n{gateway.log.read_text()[-3000:]}"
        assert gateway.process.poll() is None, gateway.log.read_text()
        time.sleep(0.05)


def test_sighup_swaps_tokens_keeps_requests_and_refuses_a_bad_file(gateway_factory: Callable[..., Gateway]) -> None:
    gateway = gateway_factory(site("alice")).start()
    assert (status_of(gateway, "alice"), status_of(gateway, "bob")) == (200, 401)

    answers: list[int | str] = []
    done = threading.Event()

    def traffic() -> None:  # carol keeps asking throughout the reload: every request must be answered
        while not done.is_set():
            try:
                answers.append(status_of(gateway, "carol"))
            except OSError as exc:
                answers.append(repr(exc))

    worker = threading.Thread(target=traffic)
    worker.start()
    try:
        time.sleep(0.2)
        gateway.config_path.write_text(site("bob"))
        hup(gateway, "SIGHUP: reloaded")
        time.sleep(0.2)
    finally:
        done.set()
        worker.join(timeout=60)
    assert answers and set(answers) == {200}, answers
    assert (status_of(gateway, "alice"), status_of(gateway, "bob")) == (401, 200)

    gateway.config_path.write_text(site("alice") + "[limits]\ncores = 'many'\n")
    hup(gateway, "SIGHUP: config not reloaded, the running one stays")
    assert "$.limits.cores" in gateway.log.read_text()
    assert (status_of(gateway, "alice"), status_of(gateway, "bob")) == (401, 200)

    gateway.config_path.write_text("[auth\n")  # not even TOML
    hup(gateway, "SIGHUP: config not reloaded, the running one stays", count=2)
    assert "not valid TOML" in gateway.log.read_text()
    assert status_of(gateway, "bob") == 200


def test_sighup_applies_limits_and_names_keys_that_need_a_restart(gateway_factory: Callable[..., Gateway]) -> None:
    gateway = gateway_factory(site("alice")).start()
    task = {"user": "alice", "cmd": "true", "cores": 2}
    assert status_of(gateway, "alice", "POST", "/v1/jobproxy/submit", {**task, "cores": 1}) == 200
    gateway.config_path.write_text(site("alice", extra="[limits]\ncores = 1\n[gateway]\npage_size = 7\n"))
    hup(gateway, "SIGHUP: reloaded")
    assert status_of(gateway, "alice", "POST", "/v1/jobproxy/submit", task) == 400
    log = gateway.log.read_text()
    assert "[gateway] page_size changed" in log and "takes effect only after a restart" in log
    assert "[gateway] port changed" not in log  # --port on the command line applies to the reload too


def test_reload_without_a_file_keeps_everything(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A gateway on the built-in defaults has no file to read again: the reload says so."""
    from gateway.app import create_app

    app = create_app(configuration.load(None))
    assert reload.reload(app) is False
    assert "nothing to reload" in caplog.text


def test_restart_needed_ignores_reloadable_keys(tmp_path: Path) -> None:
    (tmp_path / "a.toml").write_text('[limits]\ncores = 2\n[log]\nlevel = "DEBUG"\n[scheduler]\npoll_interval = 3\n')
    running, new = configuration.load(None), configuration.load(tmp_path / "a.toml")
    changed = reload.restart_needed(running.sections, new.sections)
    assert "[scheduler] poll_interval" in changed
    assert not [key for key in changed if key.startswith(("[limits]", "[log] level", "[auth]"))]
    effective = reload.merged(running, new)
    assert (effective.limits, effective.log_level) == ({"cores": 2}, "DEBUG")
    assert effective.sections.scheduler == running.sections.scheduler


async def test_reload_swaps_quota_settings_and_log_level(aiohttp_client: Callable[..., Awaitable[Any]],
                                                         tmp_path: Path) -> None:
    """In process: the running Quotas gets the new [quotas], the root logger the new level."""
    from gateway.app import create_app
    from gateway.keys import QUOTAS

    path = tmp_path / "site.toml"
    path.write_text('[gateway]\nstate_dir = "state"\n[quotas]\nactive_tasks = 1\n')
    app = create_app(configuration.load(path))
    app[reload.LIVE].loader = functools.partial(configuration.load, path)
    await aiohttp_client(app)
    root = logging.getLogger()
    level = root.level
    try:
        path.write_text('[gateway]\nstate_dir = "state"\n[quotas]\nactive_tasks = 5\n[log]\nlevel = "DEBUG"\n')
        assert reload.reload(app) is True
        assert app[QUOTAS].settings.active_tasks == 5
        assert root.level == logging.DEBUG
        assert app[reload.LIVE].config.sections.quotas.active_tasks == 5
    finally:
        root.setLevel(level)
