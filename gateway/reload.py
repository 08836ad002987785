"""Reloading the site configuration while the gateway serves (`kill -HUP`).

`jobproxy serve` re-reads its config file on SIGHUP (`on_sighup`). A file that does not load (bad
TOML, a schema mistake, contradicting settings: `ConfigError`) is refused: the running
configuration stays, and one log line says why. A file that loads replaces what can change
without dropping a request:

- `[auth]`: the tokens and `enabled`; an unknown or revoked token answers 401 from the next
  request on (the auth middleware reads its `Authenticator` from the app's `Live` holder);
- `[quotas]`: the settings the running `Quotas` reads (except turning `requests_per_second` on
  when it was 0 at start, since the rate middleware is installed only then);
- `[limits]`: what a task may ask for, checked at submit against `Live.config`;
- `[log] level`.

Every other changed key (host, port, the scheduler instances and their options, the routing
rules, state_dir, ...) keeps its
running value, with a log line naming it as needing a restart. The check of these is generic over
the typed sections, so a key added later needs a restart until it is listed in `RELOADABLE`.
A request in flight keeps the identity and settings it started with; the swap happens between two
steps of the event loop, so no request sees half of it.
"""
from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from . import auth
from .config import Config, ConfigError, QuotaSettings, Sections
from .keys import QUOTAS

log = logging.getLogger("jobproxy.reload")

#: Sections reloaded whole, and (section, key) pairs reloaded one by one.
RELOADABLE_SECTIONS = frozenset({"auth", "quotas", "limits"})
RELOADABLE = frozenset({("log", "level")})


@dataclass
class Live:
    """What a reload replaces while the gateway serves: the effective configuration (the running
    one with the reloadable keys of the last good file), the authenticator made from its `[auth]`
    (None: auth off), and how to read the config file again (None: no file, nothing to reload)."""

    config: Config
    authenticator: auth.Authenticator | None
    loader: Callable[[], Config] | None = None


LIVE = web.AppKey("live", Live)


def authenticator_of(config: Config) -> auth.Authenticator | None:
    """The Authenticator of `config`'s `[auth]`, None with auth off."""
    return auth.Authenticator(config.tokens) if config.auth_enabled else None


def live(config: Config) -> Live:
    """The holder for a gateway starting with `config`."""
    return Live(config, authenticator_of(config))


def restart_needed(running: Sections, new: Sections) -> list[str]:
    """The keys, as `[section] key`, whose value in `new` differs from the running one and that a
    reload does not change."""
    changed = []
    for section in dataclasses.fields(running):
        if section.name in RELOADABLE_SECTIONS:
            continue
        old_table, new_table = getattr(running, section.name), getattr(new, section.name)
        if not dataclasses.is_dataclass(old_table):  # [schedulers.NAME] tables, [[routes]]: compared whole
            if old_table != new_table:
                changed.append(f"[[{section.name}]]" if isinstance(old_table, tuple) else f"[{section.name}]")
            continue
        for key in dataclasses.fields(old_table):
            if (section.name, key.name) not in RELOADABLE and getattr(old_table, key.name) != getattr(new_table,
                                                                                                      key.name):
                changed.append(f"[{section.name}] {key.name}")
    if not running.quotas.requests_per_second and new.quotas.requests_per_second:
        changed.append("[quotas] requests_per_second (from 0)")
    return changed


def merged(running: Config, new: Config) -> Config:
    """`running` with the reloadable keys of `new`."""
    old = running.sections
    quotas = new.sections.quotas
    if not old.quotas.requests_per_second:  # no rate middleware runs: the rate stays off
        quotas = dataclasses.replace(quotas, requests_per_second=old.quotas.requests_per_second)
    sections = dataclasses.replace(
        old, auth=new.sections.auth, quotas=quotas, limits=new.sections.limits,
        log=dataclasses.replace(old.log, level=new.sections.log.level))
    return Config(sections=sections, source=running.source)


def reload(app: web.Application) -> bool:
    """Read the config file again and apply what can change safely; False (and a log line) when
    the file is refused or there is no file."""
    holder = app[LIVE]
    if holder.loader is None:
        log.warning("SIGHUP: the gateway runs on the built-in defaults, without a config file: nothing to reload")
        return False
    try:
        new = holder.loader()
    except ConfigError as exc:
        log.error("SIGHUP: config not reloaded, the running one stays: %s", exc)
        return False
    running = holder.config
    for key in restart_needed(running.sections, new.sections):
        log.warning("SIGHUP: %s changed in %s; it takes effect only after a restart", key, new.source)
    effective = merged(running, new)
    _apply(app, holder, effective)
    log.info("SIGHUP: reloaded %s: %d tokens (auth %s), quotas, limits, log level %s", new.source,
             len(effective.sections.auth.tokens), "on" if effective.auth_enabled else "off", effective.log_level)
    return True


def _apply(app: web.Application, holder: Live, effective: Config) -> None:
    """Swap the running pieces over to `effective`."""
    holder.authenticator = authenticator_of(effective)
    holder.config = effective
    quotas: Any = app.get(QUOTAS)
    if quotas is not None:
        settings: QuotaSettings = effective.sections.quotas
        quotas.settings = settings
    logging.getLogger().setLevel(effective.log_level)


def on_sighup(app: web.Application) -> None:
    """The SIGHUP handler: reload, never raise (an exception would end up in the loop's handler)."""
    try:
        reload(app)
    except Exception:  # a bug here must not stop the gateway
        log.exception("SIGHUP: reload failed; the running config stays")
