"""The Slurm backend of the contract suite: the single-node dev cluster of etc/dev/slurm.sh."""
from __future__ import annotations

import os
from typing import Any

from .conftest import cluster_env


def prepare() -> tuple[str, dict[str, Any]]:
    """Start the dev cluster (once per session; skips where it cannot run, fails in CI) and make
    Slurm's commands, run by the plugin in this process, find its configuration."""
    os.environ.update(cluster_env("slurm"))
    return "slurm", {"command_timeout": 30}
