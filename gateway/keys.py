"""Typed keys of what the application holds (aiohttp AppKeys instead of module globals)."""
from __future__ import annotations

from aiohttp import web

from schedulers.base import Scheduler

from .config import Config
from .poller import Poller
from .store import Store
from .validation import SchemaValidator

CONFIG = web.AppKey("config", Config)
STORE = web.AppKey("store", Store)
SCHEDULER = web.AppKey("scheduler", Scheduler)
POLLER = web.AppKey("poller", Poller)
TASK_VALIDATOR = web.AppKey("task_validator", SchemaValidator)
