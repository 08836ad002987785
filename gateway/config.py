"""Site configuration: a TOML file validated against schemas/config.schema.json at start-up.

No file at all means the embedded default: the local scheduler, state in ./jobproxy-state,
listening on 127.0.0.1:8080. Relative paths in a file are taken relative to that file's folder.
"""
from __future__ import annotations

import ipaddress
import os
import shutil
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .validation import SchemaValidator, summary


class ConfigError(Exception):
    """A configuration mistake; the message names the file and the path of the mistake."""


@dataclass(frozen=True)
class Config:
    host: str = "127.0.0.1"
    port: int = 8080
    max_body_bytes: int = 1024 * 1024
    state_dir: Path = Path("jobproxy-state")
    task_root: Path = Path("jobproxy-state/tasks")
    store_path: Path = Path("jobproxy-state/jobproxy.db")
    page_size: int = 1000
    max_page_size: int = 10000
    scheduler: str = "local"
    poll_interval: float = 1.0
    scheduler_options: dict[str, Any] = field(default_factory=dict)
    container: dict[str, Any] | None = None
    log_level: str = "INFO"
    auth_enabled: bool = False
    tokens: tuple[dict[str, Any], ...] = ()
    allow_remote_without_auth: bool = False
    http: bool = True
    https: dict[str, Any] | None = None
    socket: Path | None = None
    umask: int = 0o077
    limits: dict[str, int] = field(default_factory=dict)
    run_as: dict[str, Any] = field(default_factory=dict)
    path_roots: tuple[str, ...] | None = None
    tes: dict[str, Any] = field(default_factory=dict)
    source: str = "built-in defaults"


def load(path: str | Path | None = None, **overrides: Any) -> Config:
    """Read and validate the config file (or the defaults), then apply `overrides` (e.g. host)."""
    if path is None:
        document: dict[str, Any] = {}
        base, source = Path.cwd(), "built-in defaults"
    else:
        file = Path(path)
        try:
            document = tomllib.loads(file.read_text(encoding="utf-8"))
        except OSError as exc:
            raise ConfigError(f"cannot read config file {file}: {exc.strerror}") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{file}: not valid TOML: {exc}") from None
        base, source = file.resolve().parent, str(file)
    return from_document(document, base, source, **overrides)


def from_document(document: dict[str, Any], base: Path, source: str, **overrides: Any) -> Config:
    problems = SchemaValidator.named("config").problems(document)
    if problems:
        raise ConfigError(f"{source}: {summary(problems)}")
    gateway = document.get("gateway", {})
    scheduler = document.get("scheduler", {})
    state_dir = base / gateway.get("state_dir", "jobproxy-state")
    values: dict[str, Any] = {
        "host": gateway.get("host", "127.0.0.1"),
        "port": gateway.get("port", 8080),
        "max_body_bytes": gateway.get("max_body_bytes", 1024 * 1024),
        "state_dir": state_dir,
        "task_root": base / gateway["task_root"] if "task_root" in gateway else state_dir / "tasks",
        "store_path": base / document["store"]["path"] if "path" in document.get("store", {}) else state_dir / "jobproxy.db",
        "page_size": gateway.get("page_size", 1000),
        "max_page_size": gateway.get("max_page_size", 10000),
        "scheduler": scheduler.get("type", "local"),
        "poll_interval": float(scheduler.get("poll_interval", 1.0)),
        "scheduler_options": scheduler.get("options", {}),
        "container": scheduler.get("container"),
        "log_level": document.get("log", {}).get("level", "INFO"),
        "auth_enabled": document.get("auth", {}).get("enabled", False),
        "tokens": tuple(document.get("auth", {}).get("tokens", ())),
        "allow_remote_without_auth": gateway.get("allow_remote_without_auth", False),
        "http": gateway.get("http", True),
        "https": _https(gateway.get("https"), base),
        "socket": base / gateway["socket"] if "socket" in gateway else None,
        "umask": int(gateway.get("umask", "077"), 8),
        "limits": document.get("limits", {}),
        "run_as": document.get("run_as", {}),
        "path_roots": tuple(document["paths"]["roots"]) if "roots" in document.get("paths", {}) else None,
        "tes": document.get("tes", {}),
        "source": source,
    }
    values.update({k: v for k, v in overrides.items() if v is not None})
    if not values["auth_enabled"] and not values["allow_remote_without_auth"] and not _loopback(values["host"]):
        raise ConfigError(
            f"{source}: refusing to listen on {values['host']} with auth off: anyone who reaches it could run "
            "commands. Turn auth on ([auth] enabled = true), listen on 127.0.0.1, or set "
            "[gateway] allow_remote_without_auth = true")
    if values["page_size"] > values["max_page_size"]:
        raise ConfigError(f"{source}: $.gateway.page_size ({values['page_size']}) exceeds max_page_size ({values['max_page_size']})")
    if values["run_as"].get("enabled") and os.geteuid() != 0:
        raise ConfigError(f"{source}: $.run_as.enabled: running jobs as their users needs the gateway to run as root")
    if not values["http"] and not values["https"] and not values["socket"]:
        raise ConfigError(f"{source}: $.gateway: with http = false, [gateway.https] or socket must be configured")
    _check_tes(values["tes"], values["container"], source)
    return Config(**values)


def _https(table: dict[str, Any] | None, base: Path) -> dict[str, Any] | None:
    """The [gateway.https] table with its file paths made absolute."""
    if table is None:
        return None
    return {key: (str(base / value) if key != "port" else value) for key, value in table.items()}


def _check_tes(tes: dict[str, Any], container: dict[str, Any] | None, source: str) -> None:
    """[tes] images: each rule either runs on the host (bubblewrap must be installed) or names a
    local image (a container runtime must be configured)."""
    for index, rule in enumerate(tes.get("images", [])):
        where = f"{source}: $.tes.images[{index}]"
        if ("run" in rule) == ("image" in rule):
            raise ConfigError(f"{where}: give exactly one of run = \"host\" or image = \"...\"")
        if "run" in rule and shutil.which("bwrap") is None:
            raise ConfigError(f"{where}: running images on the host needs bubblewrap (bwrap), which is not installed")
        if "image" in rule and container is None:
            raise ConfigError(f"{where}: image rules need a container runtime ([scheduler.container])")


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
