"""The OpenAPI document the gateway serves: valid OpenAPI 3.1, self-contained, in step with the
schema files, and exact about what the server accepts."""
from __future__ import annotations

import base64
import json
import re
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from openapi_spec_validator import validate

import schemas
from gateway import config as configuration
from gateway.app import create_app
from gateway.openapi import STATES, document, state_list_pattern
from gateway.tes.api import PAGE_TOKEN_PATTERN, _encode_token

from .conftest import make_config
from .openapi_check import check

DEFAULTS = configuration.from_document({}, Path.cwd(), "defaults")


def _refs(node: Any) -> list[str]:
    if isinstance(node, dict):
        own = [node["$ref"]] if isinstance(node.get("$ref"), str) else []
        return own + [r for v in node.values() for r in _refs(v)]
    if isinstance(node, list):
        return [r for v in node for r in _refs(v)]
    return []


def _operation(spec: dict[str, Any], operation_id: str) -> dict[str, Any]:
    found = [op for path in spec["paths"].values() for op in path.values() if op.get("operationId") == operation_id]
    assert len(found) == 1, operation_id
    return dict(found[0])


def _parameter(operation: dict[str, Any], name: str, spec: dict[str, Any]) -> dict[str, Any]:
    for parameter in operation["parameters"]:
        if "$ref" in parameter:
            parameter = spec["components"]["parameters"][parameter["$ref"].rsplit("/", 1)[1]]
        if parameter["name"] == name:
            return dict(parameter)
    raise AssertionError(f"{operation['operationId']} has no parameter {name}")


def test_valid_openapi_31_and_self_contained() -> None:
    spec = document(DEFAULTS)
    validate(spec)  # openapi-spec-validator: OpenAPI 3.1, and every $ref resolves
    assert spec["openapi"].startswith("3.1")
    refs = _refs(spec)
    assert refs and all(ref.startswith("#/components/") for ref in refs), [r for r in refs if not r.startswith("#/")]
    assert "urn:jobproxy" not in json.dumps(spec) and "$id" not in json.dumps(spec)


def test_components_are_the_schema_files() -> None:
    """One source: each inlined component is its schema file, `$defs` hoisted and `$ref`s rewritten
    (with a container runtime and no [limits], only the TES resources, inputs and outputs carry site rules)."""
    spec = document(configuration.from_document({"scheduler": {"container": {"runtime": "docker"}}},
                                                Path.cwd(), "with a runtime"))
    components = spec["components"]["schemas"]
    for component, name in (("Task", "task"), ("State", "state"), ("TesTaskRequest", "tes.task")):
        source = schemas.load(name)
        names = {key: component + key[0].upper() + key[1:] for key in source.get("$defs", {})}
        text = json.dumps({k: v for k, v in source.items() if k not in ("$schema", "$id", "$defs")})
        parts = {names[key]: json.dumps(value) for key, value in source.get("$defs", {}).items()}
        for key, new in names.items():
            text = text.replace(f'"#/$defs/{key}"', f'"#/components/schemas/{new}"')
            parts = {n: t.replace(f'"#/$defs/{key}"', f'"#/components/schemas/{new}"') for n, t in parts.items()}
        assert components[component] == json.loads(text), component
        for part, part_text in parts.items():
            if part not in ("TesTaskRequestResources", "TesTaskRequestInput", "TesTaskRequestOutput"):
                assert components[part] == json.loads(part_text), part
    resources = components["TesTaskRequestResources"]
    allowed = ["cputime", "gpus", "slurm.partition", "slurm.account", "slurm.qos", "slurm.constraint",
               "slurm.reservation", "sge.queue", "sge.project"]
    assert resources["then"] == {"properties": {"backend_parameters": {"propertyNames": {"enum": allowed}}}}
    parameters = resources["properties"]["backend_parameters"]["properties"]
    assert parameters["slurm.qos"]["pattern"] == schemas.load("task")["$defs"]["name"]["pattern"]
    assert set(parameters) == set(allowed)


def test_page_sizes_and_limits_follow_the_config(tmp_path: Path) -> None:
    config = configuration.from_document(
        {"gateway": {"page_size": 7, "max_page_size": 77}, "limits": {"cores": 2, "memory": 512, "cputime": 60}},
        tmp_path, "test")
    spec = document(config)
    size = _parameter(_operation(spec, "v1States"), "page_size", spec)["schema"]
    assert size == {"type": "integer", "minimum": 1, "maximum": 77, "default": 7}
    for operation_id in ("tesListTasks", "tesListTasksV1"):
        assert _parameter(_operation(spec, operation_id), "page_size", spec)["schema"]["maximum"] == 2047
    task = spec["components"]["schemas"]["Task"]["properties"]
    assert (task["cores"]["maximum"], task["memory"]["maximum"], task["cputime"]["maximum"]) == (2, 512, 60)
    assert "container" not in task  # no container runtime configured
    resources = spec["components"]["schemas"]["TesTaskRequestResources"]["properties"]
    assert resources["cpu_cores"]["maximum"] == 2 and resources["ram_gb"]["maximum"] == 512 * 1048576 / 1e9


def test_tes_state_is_an_enum_and_tag_value_needs_tag_key() -> None:
    spec = document(DEFAULTS)
    assert len(STATES) == 11
    for operation_id in ("tesListTasks", "tesListTasksV1"):
        operation = _operation(spec, operation_id)
        assert _parameter(operation, "state", spec)["schema"] == {"enum": list(STATES)}
        tag_value = _parameter(operation, "tag_value", spec)
        assert "Requires tag_key" in tag_value["description"] and "400" in tag_value["description"]
        assert operation["responses"]["400"] == {"$ref": "#/components/responses/Error"}


def test_idempotency_key_and_links_are_documented() -> None:
    spec = document(DEFAULTS)
    header = spec["components"]["parameters"]["IdempotencyKey"]
    assert header["in"] == "header" and "422" in header["description"]
    for create, targets in (("v1Submit", {"v1State", "v1Delete"}), ("tesCreateTask", {"tesGetTask", "tesCancelTask"}),
                            ("tesCreateTaskV1", {"tesGetTaskV1", "tesCancelTaskV1"})):
        operation = _operation(spec, create)
        assert {"$ref": "#/components/parameters/IdempotencyKey"} in operation["parameters"]
        assert operation["responses"]["422"] == {"$ref": "#/components/responses/IdempotencyConflict"}
        links = operation["responses"]["200"]["links"]
        assert {link["operationId"] for link in links.values()} == targets
        assert all(link["parameters"] == {"id": "$response.body#/id"} for link in links.values())


@settings(max_examples=300, deadline=None, derandomize=True)
@given(st.from_regex(f"^(?:{PAGE_TOKEN_PATTERN[1:-1]})?$", fullmatch=True))
def test_every_documented_tes_page_token_is_one_the_gateway_gives_out(token: str) -> None:
    if token:
        kind, _, seq = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)).decode().partition(":")
        assert kind == "tes" and seq.isdigit() and len(seq) <= 18


@pytest.mark.parametrize("seq", [1, 9, 10, 99, 123, 4567, 10**9 + 7, 10**17, 10**18 - 1])
def test_the_gateway_gives_out_documented_tokens(seq: int) -> None:
    assert re.fullmatch(PAGE_TOKEN_PATTERN, _encode_token(seq))


@pytest.mark.parametrize(("value", "valid"), [
    ("RUNNING", True), ("running,Queued", True), (",,complete,,", True), ("", True), ("CANCELED,CANCELING", True),
    ("RUNNINGQUEUED", False), ("RUNNıNG", False), ("DONE", False), ("RUNNING ", False),
])
async def test_v1_state_filter_pattern_is_what_the_server_accepts(aiohttp_client: Any, tmp_path: Path,
                                                                  value: str, valid: bool) -> None:
    assert bool(re.fullmatch(state_list_pattern(), value)) == valid
    client = await aiohttp_client(create_app(make_config(tmp_path)))
    response = await client.get("/v1/jobproxy/state", params={"state": value})
    check("GET", "/v1/jobproxy/state", response.status, response.headers["Content-Type"], await response.read())
    assert response.status == (200 if valid else 400)


async def test_served_document_reflects_the_running_config(aiohttp_client: Any, tmp_path: Path) -> None:
    client = await aiohttp_client(create_app(make_config(tmp_path, max_page_size=33, page_size=3)))
    response = await client.get("/v1/openapi.json")
    assert response.status == 200
    spec = await response.json()
    validate(spec)
    assert _parameter(_operation(spec, "v1States"), "page_size", spec)["schema"]["maximum"] == 33
    response = await client.get("/v1/jobproxy/state", params={"page_size": "34"})
    assert response.status == 400
    response = await client.get("/ga4gh/tes/v1/tasks", params={"tag_value": "x"})
    body = await response.json()
    check("GET", "/ga4gh/tes/v1/tasks", response.status, response.headers["Content-Type"], await response.read())
    assert response.status == 400 and body["details"] == [{"path": "tag_value",
                                                           "message": "every tag_value needs a tag_key before it"}]
