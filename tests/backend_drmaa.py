"""The DRMAA backend of the contract suite: the dev Grid Engine (etc/dev/gridengine.sh) through
libdrmaa. libdrmaa reads its environment when it loads, and GLIBC_TUNABLES only counts when the
process starts, so the variables must already be in this process's environment: run the tests
through tests/run.sh, or `eval "$(bash etc/dev/gridengine.sh env)"` before pytest."""
from __future__ import annotations

import os
from typing import Any

import pytest

from .conftest import IN_CI, cluster_env

#: What `etc/dev/gridengine.sh env` prints that libdrmaa needs in this process.
NEEDED = ("SGE_ROOT", "SGE_CELL", "DRMAA_LIBRARY_PATH", "GLIBC_TUNABLES")


def environment() -> dict[str, str]:
    """Start the dev cluster (once per session) and answer its environment; skip (fail in CI) if
    this process was not started with it."""
    env = cluster_env("gridengine")
    wrong = [name for name in NEEDED if os.environ.get(name) != env.get(name)]
    if wrong:
        reason = (f"DRMAA tests need {', '.join(wrong)} as `etc/dev/gridengine.sh env` prints them in the "
                  "environment pytest starts with: run them through tests/run.sh")
        if IN_CI:
            pytest.fail(reason)
        pytest.skip(reason)
    return env


def prepare() -> tuple[str, dict[str, Any]]:
    environment()
    return "drmaa", {"cancel_timeout": 30}
