"""The scheduler backends the contract and end-to-end suites run against, and how to reach them."""
from __future__ import annotations

from typing import Any

from .conftest import cluster_env

NAMES = ["local"]


def prepare(name: str) -> tuple[str, dict[str, Any]]:
    """Make backend `name` ready (start its dev cluster) and answer (plugin type, options)."""
    if name == "local":
        return "local", {}
    cluster_env(name)
    raise ValueError(f"unknown backend {name}")
