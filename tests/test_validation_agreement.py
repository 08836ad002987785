"""The fast validity check (jsonschema-rs) never disagrees with python-jsonschema, which explains
the invalid documents: a document one accepts and the other refuses would let bad input through,
or refuse good input."""
from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import schemas
from gateway import codec
from gateway.validation import SchemaValidator

CASES = Path(__file__).parent / "cases"
SCALARS = st.none() | st.booleans() | st.integers(-2**40, 2**40) | st.floats(allow_nan=False) | st.text(max_size=12)
VALUES = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner,
                                                                                              max_size=3), max_leaves=8)
TASK_SEEDS: list[dict[str, Any]] = [
    {"user": "u", "cmd": ["/bin/true"]},
    {"user": "u", "cmd": "echo hi", "cores": 2, "memory": 100, "cputime": 5, "stdout": "/tmp/o", "stderr": "/tmp/e"},
    {"user": "u", "container": {"image": "busybox", "ports": [{"host": 8080, "container": 80}],
                                "volumes": [{"host": "/data", "container": "/d", "mode": "RO"}]}},
    {"user": "u", "container": {"image": "busybox", "ports": {"port": [8080, 80]},
                                "volumes": {"mount": {"host": "/a", "container": "/b"}}}},
]
TES_SEEDS: list[dict[str, Any]] = [
    {"executors": [{"image": "ubuntu", "command": ["echo", "hi"]}]},
    {"name": "n", "tags": {"k": "v"}, "resources": {"cpu_cores": 2, "ram_gb": 0.5},
     "inputs": [{"path": "/in/a", "content": "x"}], "outputs": [{"path": "/out/b", "url": "file:///tmp/b"}],
     "executors": [{"image": "ubuntu", "command": ["cat", "/in/a"], "stdout": "/out/log", "env": {"A": "1"}}]},
]


def _agree(validator: SchemaValidator, document: Any) -> None:
    explained = list(validator._validator.iter_errors(document))
    assert validator._fast is not None
    assert validator._fast.is_valid(document) == (not explained), (json.dumps(document)[:500], explained[:3])


def _mutations(seed: dict[str, Any]) -> st.SearchStrategy[Any]:
    """`seed` with one field (possibly nested) replaced by any JSON value, or removed."""
    paths: list[tuple[Any, ...]] = []

    def walk(value: Any, path: tuple[Any, ...]) -> None:
        paths.append(path)
        if isinstance(value, dict):
            for key, inner in value.items():
                walk(inner, (*path, key))
        elif isinstance(value, list):
            for index, inner in enumerate(value):
                walk(inner, (*path, index))

    walk(seed, ())

    def apply(path: tuple[Any, ...], replacement: Any, remove: bool) -> Any:
        if not path:
            return replacement
        document = copy.deepcopy(seed)
        parent = document
        for step in path[:-1]:
            parent = parent[step]
        if remove and isinstance(parent, dict):
            del parent[path[-1]]
        else:
            parent[path[-1]] = replacement
        return document

    return st.builds(apply, st.sampled_from(paths), VALUES, st.booleans())


def test_the_fast_check_is_used() -> None:
    for name in ("task", "tes.task", "config"):
        assert SchemaValidator.named(name)._fast is not None, name


@pytest.mark.parametrize("path", sorted((CASES / "valid").iterdir()) + sorted((CASES / "invalid").iterdir()),
                         ids=lambda p: p.name)
def test_cases_agree(path: Path) -> None:
    if path.name == "expected.json":
        return
    kind = "application/xml" if path.suffix == ".xml" else "application/json"
    try:
        document = codec.decode(path.read_bytes(), kind, schemas.load("task"))[0]
    except codec.DecodeError:
        return
    _agree(SchemaValidator.named("task"), document)


@settings(max_examples=300, derandomize=True, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(*(_mutations(seed) for seed in TASK_SEEDS)))
def test_task_documents_agree(document: Any) -> None:
    _agree(SchemaValidator.named("task"), document)


@settings(max_examples=150, derandomize=True, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(*(_mutations(seed) for seed in TES_SEEDS)))
def test_tes_documents_agree(document: Any) -> None:
    _agree(SchemaValidator.named("tes.task"), document)


@settings(max_examples=100, derandomize=True, deadline=None)
@given(VALUES)
def test_any_value_agrees(document: Any) -> None:
    _agree(SchemaValidator.named("task"), document)
