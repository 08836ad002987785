"""The Slurm backend of the contract suite over slurmrestd (`api = "rest"`): the same dev cluster
of etc/dev/slurm.sh, reached through its slurmrestd with tokens from `scontrol token`."""
from __future__ import annotations

import os
from typing import Any

from .conftest import cluster_env


def prepare() -> tuple[str, dict[str, Any]]:
    """Start the dev cluster (once per session; skips where it cannot run, fails in CI) and answer
    the Slurm plugin's options for its REST API. SLURM_CONF is still set: `scontrol token` needs it."""
    env = cluster_env("slurm")
    os.environ.update(env)
    return "slurm", {"api": "rest", "rest": {"url": env["JOBPROXY_SLURMRESTD_URL"]}, "command_timeout": 30}
