"""README.md tells what the code does: checks that fail when the two drift apart.

- The capability table is rendered from the installed plugins' class attributes (entry points
  `jobproxy.schedulers` and `jobproxy.containers`: `supports_run_as`, `reports_changes`,
  `supports_ports`, `limits_memory`, the keys of `options_schema`); the README must contain exactly
  it. After changing a plugin, rewrite the table with `python -m tests.test_readme --write`.
- The layout section names every module and job-script template of gateway/ and schedulers/.
- etc/jobproxy.toml, "an example with every option explained", names every key of the config schema.
"""
from __future__ import annotations

import re
import sys
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

import schemas
from gateway.plugins import CONTAINERS, SCHEDULERS

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
BEGIN = "<!-- capabilities: rendered from the plugins by tests/test_readme.py (python -m tests.test_readme --write) -->"
END = "<!-- end of capabilities -->"


def _plugins(group: str) -> list[tuple[str, str, Any]]:
    """(name, "module:Class", class) of each plugin registered in `group`, by name."""
    return [(ep.name, ep.value, ep.load()) for ep in sorted(entry_points(group=group), key=lambda ep: ep.name)]


def _options(cls: Any) -> str:
    return ", ".join(f"`{key}`" for key in sorted(cls.options_schema.get("properties", {}))) or "none"


def capability_table() -> str:
    """The README's capability table, from the plugins' class attributes."""
    lines = [BEGIN, "",
             "| `[scheduler] type` | class | `[run_as]` | job changes | `[scheduler.options]` |",
             "| --- | --- | --- | --- | --- |"]
    for name, where, cls in _plugins(SCHEDULERS):
        run_as = "yes" if cls.supports_run_as else "no: the gateway refuses to start with it"
        changes = ("reported as they happen (polled at start-up)" if cls.reports_changes
                   else "polled every `poll_interval`")
        lines.append(f"| `{name}` | `{where}` | {run_as} | {changes} | {_options(cls)} |")
    lines += ["",
              "| `[scheduler.container] runtime` | class | `ports` | memory limit | options |",
              "| --- | --- | --- | --- | --- |"]
    for name, where, cls in _plugins(CONTAINERS):
        ports = "published" if cls.supports_ports else "none: a task with `ports` gets 400"
        memory = ("by the runtime (`--memory`)" if cls.limits_memory
                  else "by the job script and the scheduler, around the runtime")
        lines.append(f"| `{name}` | `{where}` | {ports} | {memory} | {_options(cls)} |")
    return "\n".join([*lines, "", END])


def _block(text: str) -> str:
    start, end = text.find(BEGIN), text.find(END)
    assert start != -1 and end > start, f"README.md has no capability table between {BEGIN!r} and {END!r}"
    return text[start:end + len(END)]


def test_readme_capability_table_is_the_plugins() -> None:
    text = README.read_text(encoding="utf-8")
    assert text.count(BEGIN) == 1
    assert _block(text) == capability_table(), \
        "README.md's capability table is stale: python -m tests.test_readme --write"


def test_the_table_says_what_the_classes_say() -> None:
    """The renderer itself: a plugin's attributes change its row."""
    table = capability_table()
    rows = {row.split("|")[1].strip(): row for row in table.splitlines() if row.startswith("| `")}
    for name, _, cls in _plugins(SCHEDULERS):
        assert ("| yes |" in rows[f"`{name}`"]) == cls.supports_run_as
        for key in cls.options_schema.get("properties", {}):
            assert f"`{key}`" in rows[f"`{name}`"]
    for name, _, cls in _plugins(CONTAINERS):
        assert ("| published |" in rows[f"`{name}`"]) == cls.supports_ports
    assert {"`local`", "`slurm`", "`drmaa`", "`docker`", "`podman`", "`singularity`", "`apptainer`"} <= set(rows)


def _layout() -> str:
    text = README.read_text(encoding="utf-8")
    match = re.search(r"^## Layout\n(.*?)^## ", text, re.S | re.M)
    assert match, "README.md has no ## Layout section"
    return match.group(1)


def _layout_blocks() -> dict[str, str]:
    """The layout section's text for each folder it lists (a line starting with the folder, and
    the indented lines after it)."""
    blocks: dict[str, str] = {}
    folder = None
    for line in _layout().splitlines():
        match = re.match(r"^([\w./-]+/)\s", line)
        if match:
            folder = match.group(1)
            blocks[folder] = line[len(folder):]
        elif folder is not None and line.startswith(" "):
            blocks[folder] += " " + line.strip()
        else:
            folder = None
    return blocks


def test_layout_names_every_module_and_template() -> None:
    blocks = _layout_blocks()
    for folder in ("gateway/", "gateway/tes/", "schedulers/", "schedulers/local/", "schedulers/slurm/",
                   "schedulers/drmaa/", "schemas/", "etc/", "tests/", "bench/"):
        assert folder in blocks, f"README.md's layout has no line for {folder}"
    missing = []
    for folder in ("gateway", "schedulers"):
        for path in sorted((ROOT / folder).rglob("*")):
            if path.suffix not in (".py", ".sh") or path.name == "__init__.py" or "__pycache__" in path.parts:
                continue
            block = blocks.get(str(path.parent.relative_to(ROOT)) + "/", "")
            if not re.search(rf"(?<![\w/]){re.escape(path.name)}\b", block):
                missing.append(str(path.relative_to(ROOT)))
    assert missing == [], f"README.md's layout does not name, in its folder's line: {', '.join(missing)}"


def test_example_config_names_every_key() -> None:
    """Each table of the config schema appears as `[table]` (commented out or not), each key as
    `key =`; the free-form tables (plugin options, a runtime's options, TES service-info) as headers."""
    example = (ROOT / "etc" / "jobproxy.toml").read_text(encoding="utf-8")
    missing = []
    for table, schema in schemas.load("config")["properties"].items():
        if f"[{table}]" not in example:
            missing.append(f"[{table}]")
        keys = schema["properties"] if "properties" in schema else schema.get("items", {}).get("properties", {})
        for key, sub in keys.items():  # [[routes]]: the keys of a rule
            header = f"[{table}.{key}]"
            if header in example:
                continue
            if not re.search(rf"\b{re.escape(key)}\s*=", example):
                missing.append(header if sub.get("type") == "object" and "properties" in sub else f"{table}.{key}")
    assert missing == [], f"etc/jobproxy.toml explains no {', '.join(missing)}"


def write() -> None:
    """Rewrite the capability table in README.md."""
    text = README.read_text(encoding="utf-8")
    README.write_text(text.replace(_block(text), capability_table()), encoding="utf-8")


if __name__ == "__main__":
    if sys.argv[1:] != ["--write"]:
        sys.exit("usage: python -m tests.test_readme --write")
    write()
