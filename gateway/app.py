"""The aiohttp application factory."""
from __future__ import annotations

import asyncio
import contextlib
import logging
from pathlib import Path
from typing import AsyncIterator

from aiohttp import web

from . import api_v1, auth, plugins, policy, responses
from .tes import api as tes_api
from .config import Config
from .keys import CONFIG, POLLER, SCHEDULER, STORE, TASK_VALIDATOR
from .poller import Poller
from .store import Store
from .validation import SchemaValidator

log = logging.getLogger(__name__)


def create_app(config: Config) -> web.Application:
    """Build the gateway for `config`. The scheduler plugin is created (and its options checked)
    here, so a configuration mistake stops the start before anything listens."""
    authenticator = auth.Authenticator(config.tokens) if config.auth_enabled else None
    app = web.Application(client_max_size=config.max_body_bytes,
                          middlewares=[responses.errors, auth.middleware(authenticator)])
    app[CONFIG] = config
    app[SCHEDULER] = plugins.create_scheduler(config)
    app[TASK_VALIDATOR] = SchemaValidator.named("task")
    app.add_routes(api_v1.routes)
    app.add_routes(tes_api.routes)
    app.cleanup_ctx.append(_lifecycle)
    return app


def _prepare_task_root(config: Config, account: str | None) -> None:
    """Create the task root. When jobs run as their users (or as one other `account`), they must be
    able to pass through it (and the state folder above it) to reach their own task folder: mode
    o+x, never o+r. The fixed account must reach it, or the gateway does not start."""
    root = Path(config.task_root)
    root.mkdir(parents=True, exist_ok=True)
    if config.run_as.get("enabled") or account:
        for folder in (root, *(p for p in root.parents if p == Path(config.state_dir) or Path(config.state_dir) in p.parents)):
            folder.chmod(folder.stat().st_mode | 0o111)
    if account:
        policy.check_reachable(account, root.resolve(), config.source)


async def _lifecycle(app: web.Application) -> AsyncIterator[None]:
    config, scheduler = app[CONFIG], app[SCHEDULER]
    store = Store(config.store_path)
    app[STORE] = store
    _prepare_task_root(config, scheduler.account)
    poller = Poller(store, scheduler, config.poll_interval)
    app[POLLER] = poller
    await scheduler.start(poller.report)
    await poller.poll_once()  # reconcile what happened while the gateway was down, before serving
    runner = asyncio.create_task(poller.run(), name=f"poller-{scheduler.name}")
    log.info("gateway ready: scheduler %s, store %s (%d tasks)", scheduler.name, config.store_path, store.count())
    yield
    runner.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await runner
    await scheduler.close()
    store.close()
