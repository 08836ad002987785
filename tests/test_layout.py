"""The architecture's one rule: the plugin side never imports the gateway."""
from __future__ import annotations

import ast
from pathlib import Path

SCHEDULERS = Path(__file__).resolve().parent.parent / "schedulers"


def _imported_modules(path: Path) -> list[str]:
    found: list[str] = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            found += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append(node.module)
    return found


def test_schedulers_never_import_gateway() -> None:
    modules = sorted(SCHEDULERS.rglob("*.py"))
    assert len(modules) > 10
    offenders = [f"{path.relative_to(SCHEDULERS.parent)} imports {name}"
                 for path in modules for name in _imported_modules(path)
                 if name == "gateway" or name.startswith("gateway.")]
    assert offenders == []
