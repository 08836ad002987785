"""Typed keys of what the application holds (aiohttp AppKeys instead of module globals)."""
from __future__ import annotations

from pathlib import Path

from aiohttp import web

from schedulers.base import Scheduler

from .active import ActiveSet
from .config import Config
from .idempotency import Keys
from .poller import Poller
from .quota import Quotas
from .taskstore import TaskStore
from .validation import SchemaValidator

CONFIG = web.AppKey("config", Config)
STORE: web.AppKey[TaskStore] = web.AppKey("store")
ACTIVE = web.AppKey("active", ActiveSet)
KEYS = web.AppKey("idempotency_keys", Keys)
QUOTAS = web.AppKey("quotas", Quotas)
TASK_ROOT = web.AppKey("task_root", Path)  # resolved once
SCHEDULER = web.AppKey("scheduler", Scheduler)
POLLER = web.AppKey("poller", Poller)
TASK_VALIDATOR = web.AppKey("task_validator", SchemaValidator)
