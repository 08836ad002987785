"""The scheduler backends the contract suite runs against: `local`, plus one module
`tests/backend_<name>.py` per batch scheduler, whose `prepare()` starts its dev cluster (through
`conftest.cluster_env`, which skips where it cannot run, or fails in CI) and answers the plugin
type and options to test with."""
from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

NAMES = ["local", *sorted(p.stem.removeprefix("backend_") for p in Path(__file__).parent.glob("backend_*.py"))]


def prepare(name: str) -> tuple[str, dict[str, Any]]:
    """Make backend `name` ready and answer (plugin type, options)."""
    if name == "local":
        return "local", {}
    module = importlib.import_module(f"{__package__}.backend_{name}")
    kind, options = module.prepare()
    return str(kind), dict(options)
