"""Typed keys of what the application holds (aiohttp AppKeys instead of module globals)."""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from aiohttp import web

from schedulers.base import Scheduler

from .active import ActiveSet
from .config import Config
from .folders import FolderPool
from .idempotency import Keys
from .poller import Poller
from .quota import Quotas
from .routing import Router
from .taskstore import TaskStore
from .validation import SchemaValidator

if TYPE_CHECKING:
    from .staging.stager import Stager

CONFIG = web.AppKey("config", Config)
STORE: web.AppKey[TaskStore] = web.AppKey("store")
ACTIVE = web.AppKey("active", ActiveSet)
KEYS = web.AppKey("idempotency_keys", Keys)
QUOTAS = web.AppKey("quotas", Quotas)
TASK_ROOT = web.AppKey("task_root", Path)  # resolved once
FOLDERS = web.AppKey("folders", FolderPool)  # task folders made ahead under TASK_ROOT
SCHEDULERS = web.AppKey("schedulers", dict[str, Scheduler])  # the instances by name, in the config's order
POLLERS = web.AppKey("pollers", dict[str, Poller])  # one per instance, made when the gateway starts
ROUTER = web.AppKey("router", Router)
TASK_VALIDATOR = web.AppKey("task_validator", SchemaValidator)
STAGER: web.AppKey[Stager] = web.AppKey("stager")  # TES staging (gateway/staging), set at start-up
