"""The aiohttp application factory."""
from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import sqlite3
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path

from aiohttp import web

from schedulers.base import Scheduler, SchedulerError

from . import api_v1, audit, auth, events, metrics, output, pages, plugins, policy, quota, reload, responses, task_logs
from .active import ActiveSet
from .config import Config, ConfigError
from .folders import FolderPool
from .idempotency import Keys
from .keys import (
    ACTIVE,
    CONFIG,
    FOLDERS,
    KEYS,
    POLLERS,
    QUOTAS,
    ROUTER,
    SCHEDULERS,
    STAGER,
    STORE,
    TASK_ROOT,
    TASK_VALIDATOR,
)
from .model import now
from .poller import Poller
from .quota import Quotas
from .retention import periodic as purge_finished
from .routing import Router
from .staging.stager import Stager
from .taskstore import StoreUnavailable, TaskStore, open_store
from .tes import api as tes_api
from .validation import SchemaValidator

log = logging.getLogger(__name__)


class SchedulerStartError(SchedulerError):
    """A scheduler instance's `start` refused: `name` is the instance, the message its reason."""

    def __init__(self, name: str, reason: SchedulerError) -> None:
        super().__init__(str(reason))
        self.name = name


def create_app(config: Config) -> web.Application:
    """Build the gateway for `config`. The scheduler instances are created (and their options
    checked) here, so a configuration mistake stops the start before anything listens."""
    app = web.Application(client_max_size=config.max_body_bytes, middlewares=[
        metrics.middleware, responses.errors, auth.middleware(lambda request: request.app[reload.LIVE].authenticator)])
    app[reload.LIVE] = reload.live(config)  # what SIGHUP replaces: tokens, quotas, limits, log level
    if config.sections.quotas.requests_per_second:
        app.middlewares.append(quota.middleware(lambda request: request.app.get(QUOTAS)))
    app[CONFIG] = config
    audit.configure(config.sections.log)
    app[SCHEDULERS] = plugins.create_schedulers(config)
    app[ROUTER] = Router(config.sections.routes, list(config.instances))
    app[TASK_VALIDATOR] = SchemaValidator.named("task")
    app.add_routes(api_v1.routes)
    app.add_routes(tes_api.routes)
    app.add_routes(output.routes)
    app.add_routes(task_logs.routes)
    pages.add_routes(app)
    app.cleanup_ctx.append(_lifecycle)
    events.setup(app)  # after _lifecycle: it listens to the pollers made there
    metrics.setup(app)  # after _lifecycle: it observes the store and the poller made there
    return app


def _prepare_task_root(config: Config, account: str | None) -> None:
    """Create the task root. When jobs run as their users (or as one other `account`), they must be
    able to pass through it (and the state folder above it) to reach their own task folder: mode
    o+x, never o+r. The fixed account must reach it, or the gateway does not start."""
    root = Path(config.task_root)
    root.mkdir(parents=True, exist_ok=True)
    if config.run_as.get("enabled") or account:
        for folder in (root, *(p for p in root.parents
                               if p == Path(config.state_dir) or Path(config.state_dir) in p.parents)):
            folder.chmod(folder.stat().st_mode | 0o111)
    if account:
        policy.check_reachable(account, root.resolve(), config.source)


def _path_error(config: Config, what: str, path: Path, setting: str, exc: Exception) -> ConfigError:
    """A one-line ConfigError for a state path that cannot be created or opened, naming its setting
    (and the state folder's, when the path lies in it)."""
    state_dir = Path(config.state_dir)
    if Path(path) == state_dir or state_dir in Path(path).parents:
        setting += f", in [gateway] state_dir = {str(state_dir)!r}"
    reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
    failed = f" ({exc.filename})" if isinstance(exc, OSError) and exc.filename else ""
    return ConfigError(f"{config.source}: cannot {what} {path} ({setting}): {reason}{failed}")


async def _expire_keys(store: TaskStore, retention: timedelta) -> None:
    """Forget idempotency keys older than `retention`, now and then once an hour."""
    while True:
        try:
            expired = await store.expire_keys(now() - retention)
            if expired:
                log.info("forgot %d idempotency keys older than %s", expired, retention)
        except Exception:  # the next hour tries again
            log.exception("could not expire idempotency keys")
        await asyncio.sleep(3600)


async def start_instance(app: web.Application, scheduler: Scheduler) -> Poller:
    """Start one scheduler instance with its own poller: the plugin's `start`; the caller then
    reconciles what happened to the instance's tasks while the gateway was down (`Poller.reconcile`,
    or the replicas' lease holder), before serving; that also stages again the inputs a crash
    interrupted (`Poller.restage`)."""
    interval = app[CONFIG].instances[scheduler.name].poll_interval
    poller = Poller(app[STORE], scheduler, app[ACTIVE], interval)
    stager = app[STAGER]
    stager.attach(poller)
    app[POLLERS][scheduler.name] = poller  # the stager finds a task's poller here
    try:
        await scheduler.start(poller.report)
    except SchedulerError as exc:
        raise SchedulerStartError(scheduler.name, exc) from None
    return poller


def _warn_unconfigured(active: ActiveSet, configured: dict[str, Scheduler]) -> None:
    """Active tasks of an instance no longer configured stay as they are (nothing polls them; a
    cancel answers 503) until an instance of that name is configured again: one warning each."""
    missing = collections.Counter(r.scheduler for r in active.all() if r.scheduler not in configured)
    for name, count in sorted(missing.items()):
        log.warning("%d active tasks belong to scheduler instance %r, which is not configured (configured: %s): "
                    "they keep their last state until it is configured again", count, name, ", ".join(configured))


async def _lifecycle(app: web.Application) -> AsyncIterator[None]:
    config, schedulers = app[CONFIG], app[SCHEDULERS]
    settings = config.sections.store
    try:
        store = open_store(settings.url, config.store_path, settings.password_file)
    except StoreUnavailable as exc:
        raise ConfigError(f"{config.source}: cannot open the task store {settings.url} ([store] url): "
                          f"{exc.message}") from None
    except (OSError, sqlite3.Error, RuntimeError) as exc:  # RuntimeError: a store newer than this JobProxy
        where = ("[store] url", settings.url) if settings.url else ("[store] path", config.store_path)
        raise _path_error(config, "open the task store", Path(where[1]), where[0], exc) from None
    app[STORE] = store
    try:
        for account in sorted({s.account for s in schedulers.values()}, key=str):
            _prepare_task_root(config, account)
    except OSError as exc:
        store.close()
        raise _path_error(config, "create the task root", config.task_root, "[gateway] task_root", exc) from None
    app[TASK_ROOT] = Path(config.task_root).resolve()
    app[FOLDERS] = folders = FolderPool(app[TASK_ROOT])
    folders.start()
    app[ACTIVE] = active = ActiveSet(store.active())  # the one full read of active tasks
    _warn_unconfigured(active, schedulers)
    app[POLLERS] = pollers = {}
    app[STAGER] = stager = Stager(app)
    replication = None
    try:
        for name, scheduler in schedulers.items():
            pollers[name] = await start_instance(app, scheduler)
        if settings.url is not None:  # PostgreSQL, maybe shared by replicas (psycopg is loaded only then)
            from .pgstore import PgStore
            from .replicas import Replication
            assert isinstance(store, PgStore)
            replication = Replication(store, pollers)
            await replication.start()  # the holder of each instance's lease reconciles it
        else:
            for poller in pollers.values():
                await poller.reconcile()  # what happened while the gateway was down, before serving
    except BaseException:
        for started in pollers.values():
            await started.scheduler.close()
        await stager.close()
        folders.close()
        store.close()
        raise
    app[KEYS] = Keys(store)
    app[QUOTAS] = Quotas(config.sections.quotas, active)
    runners = [asyncio.create_task(poller.run(), name=f"poller-{name}") for name, poller in pollers.items()]
    retention = timedelta(hours=config.sections.store.idempotency_hours)
    expiry = asyncio.create_task(_expire_keys(store, retention), name="idempotency-expiry")
    purge = asyncio.create_task(purge_finished(app), name="retention-purge")
    log.info("gateway ready: scheduler %s, store %s (%d tasks, %d active)", ", ".join(schedulers),
             settings.url or config.store_path, store.count(), len(active))
    yield
    for background in (*runners, expiry, purge):
        background.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await background
    if replication is not None:
        await replication.close()
    await stager.close()
    for scheduler in schedulers.values():
        await scheduler.close()
    folders.close()
    await store.flush()
    store.close()
