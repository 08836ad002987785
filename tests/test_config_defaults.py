"""Every default of the site configuration is written once, in schemas/config.schema.json.

These tests fail when a default appears anywhere else: as a field default of the typed sections, as
a `.get(key, default)` on a config table in gateway/, or as a value the sections have for a key the
schema leaves without a default. They also check that the filled-in defaults are the schema's.
"""
from __future__ import annotations

import ast
import copy
import dataclasses
import tomllib
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest

import schemas
from gateway import config as configuration
from gateway.validation import SchemaValidator

ROOT = Path(__file__).resolve().parent.parent
SCHEMA = schemas.load("config")
TABLES = SCHEMA["properties"]


def _dataclasses(cls: type, seen: set[type] | None = None) -> Iterator[type]:
    """`cls` and every dataclass its fields' annotations name (the whole tree of sections)."""
    seen = seen if seen is not None else set()
    if cls in seen:
        return
    seen.add(cls)
    yield cls
    for field in dataclasses.fields(cls):
        for name in str(field.type).replace("|", " ").replace("[", " ").replace("]", " ").replace(",", " ").split():
            candidate = getattr(configuration, name, None)
            if isinstance(candidate, type) and dataclasses.is_dataclass(candidate):
                yield from _dataclasses(candidate, seen)


def test_sections_have_no_defaults_of_their_own() -> None:
    classes = list(_dataclasses(configuration.Config))
    assert configuration.Sections in classes and configuration.TesSettings in classes and len(classes) >= 14
    for cls in classes:
        for field in dataclasses.fields(cls):
            assert field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING, \
                f"{cls.__name__}.{field.name} has a default: defaults belong in schemas/config.schema.json"


def test_every_table_has_a_section_and_every_key_a_field() -> None:
    sections = {f.name: f for f in dataclasses.fields(configuration.Sections)}
    assert set(sections) == set(TABLES)
    built = configuration.from_document({}, Path("/site"), "t").sections
    for table, schema in TABLES.items():
        if "properties" not in schema:
            continue  # a map or a list of tables: their item types are checked below
        fields = {f.name for f in dataclasses.fields(getattr(built, table))}
        keys = set(schema["properties"])
        assert fields == keys, f"[{table}]: section fields {sorted(fields)} != schema keys {sorted(keys)}"
    items = {configuration.SchedulerSettings: TABLES["scheduler"], configuration.RouteRule: TABLES["routes"]["items"]}
    for cls, schema in items.items():
        assert {f.name for f in dataclasses.fields(cls)} == set(schema["properties"]), cls.__name__


def _schema_defaults() -> Iterator[tuple[str, str, Any, dict[str, Any]]]:
    for table, schema in TABLES.items():
        if "properties" not in schema:
            continue  # [schedulers] and [[routes]]: tables filled as items of a map or a list
        assert schema.get("default") == {}, f"[{table}] needs \"default\": {{}} so its keys' defaults are filled in"
        for key, sub in schema["properties"].items():
            yield table, key, sub.get("default", dataclasses.MISSING), sub


def _normalized(value: Any) -> Any:
    """A section value in the shape of the TOML document: tuples as lists, mappings as dicts,
    dataclasses as tables."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):  # keys the schema leaves unset: None
        return {k: _normalized(v) for k, v in dataclasses.asdict(value).items() if v is not None}
    if isinstance(value, Mapping):
        return {k: _normalized(v) for k, v in value.items()}
    if isinstance(value, (tuple, list)):
        return [_normalized(v) for v in value]
    return value


@pytest.mark.parametrize("table, key, default, sub", list(_schema_defaults()),
                         ids=[f"{t}.{k}" for t, k, _, _ in _schema_defaults()])
def test_filled_defaults_are_the_schemas(tmp_path: Path, table: str, key: str, default: Any,
                                         sub: dict[str, Any]) -> None:
    site = configuration.from_document({}, tmp_path, "t").sections
    value = getattr(getattr(site, table), key)
    if default is dataclasses.MISSING:
        assert value is None, f"[{table}] {key} has no default in the schema, but the section says {value!r}"
        return
    assert SchemaValidator(sub).problems(default) == [], f"the default of [{table}] {key} is not valid"
    if isinstance(value, Path):
        expected: Any = tmp_path / str(default).replace("{state_dir}", str(tmp_path / TABLES["gateway"]["properties"]
                                                                           ["state_dir"]["default"]))
    elif (table, key) == ("gateway", "umask"):
        expected = int(default, 8)
    elif sub.get("type") == "object" and "properties" in sub:  # a nested table: its keys' defaults filled in
        expected = SchemaValidator(sub).with_defaults(default)
    else:
        expected = default
    assert _normalized(value) == expected


def test_nested_defaults_are_filled_in_arrays_and_maps() -> None:
    token = {"user": "a", "sha256": "0" * 64}
    config = configuration.from_document({"auth": {"tokens": [token]}}, Path("/site"), "t")
    assert config.sections.auth.tokens == (configuration.Token("a", "0" * 64, False),)
    assert config.tokens == ({"user": "a", "sha256": "0" * 64, "admin": False},)
    schema = {"type": "object", "properties": {
        "list": {"type": "array", "items": {"type": "object", "properties": {"x": {"default": [1]}}}},
        "map": {"type": "object", "additionalProperties": {"type": "object", "properties": {"y": {"default": 2}}}}}}
    before = copy.deepcopy(schema)
    filled = SchemaValidator(schema).with_defaults({"list": [{}, {"x": [3]}], "map": {"a": {}, "b": {"y": 4}}})
    assert filled == {"list": [{"x": [1]}, {"x": [3]}], "map": {"a": {"y": 2}, "b": {"y": 4}}}
    filled["list"][0]["x"].append(9)  # a filled default is a copy: the schema stays as it was
    assert schema == before


def test_state_dir_placeholder_and_relative_paths(tmp_path: Path) -> None:
    default = configuration.from_document({"gateway": {"state_dir": "var"}}, tmp_path, "t")
    assert default.task_root == tmp_path / "var" / "tasks" and default.store_path == tmp_path / "var" / "jobproxy.db"
    chosen = configuration.from_document(
        {"gateway": {"task_root": "{state_dir}/jobs"}, "store": {"path": "db/x.db"}}, tmp_path, "t")
    assert chosen.task_root == tmp_path / "jobproxy-state" / "jobs" and chosen.store_path == tmp_path / "db" / "x.db"


def test_overrides_are_checked_like_the_file(tmp_path: Path) -> None:
    assert configuration.from_document({}, tmp_path, "t", port=9000, host=None).port == 9000
    with pytest.raises(configuration.ConfigError, match=r"^t: \$\.gateway\.port: must be <= 65535"):
        configuration.from_document({}, tmp_path, "t", port=70000)
    with pytest.raises(TypeError, match="not \\[gateway\\] settings: colour"):
        configuration.from_document({}, tmp_path, "t", colour=1)


def test_flat_names_delegate_to_the_sections(tmp_path: Path) -> None:
    document: dict[str, Any] = {"gateway": {"page_size": 7, "https": {"port": 8443, "cert": "c.pem", "key": "k.pem"}},
                "scheduler": {"type": "local", "poll_interval": 2, "options": {"cores": 1}},
                "run_as": {"deny": ["x"]}, "paths": {"roots": ["/home/{user}"]}, "limits": {"memory": 5},
                "tes": {"images": [{"match": "*", "image": "i"}], "url_schemes": {"https": {"get": ["curl"]}}},
                "log": {"level": "DEBUG"}}
    with pytest.raises(configuration.ConfigError, match="image rules need a container runtime"):
        configuration.from_document(document, tmp_path, "t")
    document["scheduler"]["container"] = {"runtime": "docker"}
    config = configuration.from_document(document, tmp_path, "t")
    local = config.instances["local"]
    assert (config.page_size, config.max_page_size, local.poll_interval, list(config.instances)) == (7, 10000, 2.0,
                                                                                                    ["local"])
    assert config.https == {"port": 8443, "cert": str(tmp_path / "c.pem"), "key": str(tmp_path / "k.pem")}
    assert local.options == {"cores": 1} and local.container == {"runtime": "docker"} and config.containers
    assert config.run_as == {"enabled": False, "min_uid": 1000, "deny": ["x"], "account": None,
                             "allow_root_jobs": False}
    assert config.path_roots == ("/home/{user}",) and config.limits == {"memory": 5} and config.log_level == "DEBUG"
    assert config.tes == {"images": [{"match": "*", "image": "i"}], "host_readable": [], "host_writable": [],
                          "url_schemes": {"https": {"get": ["curl"]}},
                          "backend_parameters": ["cputime", "gpus", "slurm.partition", "slurm.account", "slurm.qos",
                                                 "slurm.constraint", "slurm.reservation", "sge.queue", "sge.project"],
                          "log_tail_bytes": 65536, "service_info": {}}
    assert (config.umask, config.http, config.auth_enabled, config.tokens) == (0o077, True, False, ())


#: Names in a receiver whose `.get(key, default)` reads a config table (as do names containing
#: "config"): a default there repeats the schema's. In gateway/config.py every `.get` counts.
CONFIG_RECEIVERS = ("CONFIG", "cfg", "run_as", "tes", "limits", "gateway", "scheduler", "sections")


def _config_gets(path: Path) -> Iterator[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    in_config_module = path.name == "config.py"
    for node in ast.walk(tree):
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "get"):
            continue
        has_default = len(node.args) >= 2 or any(k.arg == "default" for k in node.keywords)
        names = {n.id for n in ast.walk(node.func.value) if isinstance(n, ast.Name)}
        names |= {n.attr for n in ast.walk(node.func.value) if isinstance(n, ast.Attribute)}
        if has_default and (in_config_module or names & set(CONFIG_RECEIVERS) or any("config" in n for n in names)):
            yield f"{path}:{node.lineno}: {ast.unparse(node)}"


def test_no_default_is_repeated_downstream() -> None:
    found = [hit for path in sorted((ROOT / "gateway").rglob("*.py")) for hit in _config_gets(path)]
    assert found == [], "defaults belong in schemas/config.schema.json:\n" + "\n".join(found)


def test_the_scan_finds_a_repeated_default(tmp_path: Path) -> None:
    sample = tmp_path / "api.py"
    sample.write_text('x = app[CONFIG].tes.get("log_tail_bytes", 65536)\ny = config.run_as.get("enabled")\n'
                      'z = request.query.get("view", "MINIMAL")\n')
    assert [hit.split(": ", 1)[1] for hit in _config_gets(sample)] == ["app[CONFIG].tes.get('log_tail_bytes', 65536)"]
    (tmp_path / "config.py").write_text('port = table.get("port", 8080)\n')
    assert len(list(_config_gets(tmp_path / "config.py"))) == 1


def test_the_example_config_shows_the_defaults() -> None:
    """etc/jobproxy.toml says it shows the embedded defaults: each value it sets (but state_dir,
    its one example path) is the schema's default."""
    example = tomllib.loads((ROOT / "etc" / "jobproxy.toml").read_text(encoding="utf-8"))
    checked = 0
    for table, values in example.items():
        for key, value in values.items():
            sub = TABLES[table]["properties"][key]
            if (table, key) == ("gateway", "state_dir") or "default" not in sub or isinstance(value, dict):
                continue
            assert value == sub["default"], \
                f"etc/jobproxy.toml [{table}] {key} = {value!r}, the default is {sub['default']!r}"
            checked += 1
    assert checked >= 10
