"""The task schema, JSON and XML alike, on the cases in tests/cases/: valid ones pass, invalid
ones fail with exactly the expected problems and JSON paths."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

import schemas
from gateway import codec
from gateway.model import task_from_document
from gateway.validation import SchemaValidator
from schedulers.base import Task

CASES = Path(__file__).parent / "cases"
VALIDATOR = SchemaValidator.named("task")
EXPECTED = json.loads((CASES / "invalid" / "expected.json").read_text())


def _load(path: Path) -> Any:  # any JSON value
    kind = "application/xml" if path.suffix == ".xml" else "application/json"
    return codec.decode(path.read_bytes(), kind, schemas.load("task"))[0]


@pytest.mark.parametrize("path", sorted((CASES / "valid").iterdir()), ids=lambda p: p.name)
def test_valid_case(path: Path) -> None:
    document = _load(path)
    assert VALIDATOR.problems(document) == []
    task = task_from_document(document, "t1", "/work/t1")
    assert task.user
    assert Task.from_json(task.to_json()) == task


@pytest.mark.parametrize("name", sorted(EXPECTED), ids=str)
def test_invalid_case(name: str) -> None:
    problems = VALIDATOR.problems(_load(CASES / "invalid" / name))
    expected = EXPECTED[name]
    assert [p.path for p in problems] == [path for path, _ in expected], problems
    for problem, (_, message) in zip(problems, expected, strict=True):
        assert message in problem.message


def test_every_invalid_case_has_expectations() -> None:
    files = {p.name for p in (CASES / "invalid").iterdir() if p.name != "expected.json"}
    assert files == set(EXPECTED)


def test_xml_and_json_forms_build_the_same_task() -> None:
    xml = _load(CASES / "valid" / "full.xml")
    assert xml["cores"] == 2 and xml["memory"] == 1024 and xml["cputime"] == 60
    task = task_from_document(xml, "t", "/w")
    assert task.cmd == ("/bin/echo", "hello world")
    assert task.container is not None
    assert [(p.host, p.container) for p in task.container.ports] == [(8080, 80)]
    assert [(m.host, m.read_only) for m in task.container.volumes] == [("/data", True), ("/scratch", False)]


def test_seed_shapes_and_pairs_normalise_alike() -> None:
    seed = task_from_document(_load(CASES / "valid" / "container-seed-shapes.json"), "t", "/w")
    lists = task_from_document(_load(CASES / "valid" / "container-lists.json"), "t", "/w")
    assert seed.container and lists.container
    assert [(p.host, p.container) for p in seed.container.ports] == [(8080, 80)]
    assert [(p.host, p.container) for p in lists.container.ports] == [(18080, 8080), (18081, 8081)]
    assert seed.container.volumes[0].read_only and not lists.container.volumes[1].read_only
