"""The JSON Schemas of JobProxy (draft 2020-12), shipped as package data."""
from __future__ import annotations

import json
from functools import cache
from importlib import resources
from typing import Any


@cache
def load(name: str) -> dict[str, Any]:
    """Return the schema `<name>.schema.json` (or `<name>.json`) as a dict."""
    folder = resources.files(__name__)
    for candidate in (f"{name}.schema.json", f"{name}.json"):
        path = folder / candidate
        if path.is_file():
            loaded: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
            return loaded
    raise FileNotFoundError(f"no schema named {name!r}")
