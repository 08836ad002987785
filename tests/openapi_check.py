"""Check real responses against the OpenAPI document the gateway serves (gateway/openapi.py): the
status and media type must be documented, and a JSON body must satisfy the documented schema."""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from jsonschema import Draft202012Validator
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012

from gateway import codec
from gateway import config as configuration
from gateway.openapi import document

#: The document a gateway with the default config serves (self-contained: no outside references).
SPEC = document(configuration.from_document({}, Path.cwd(), "defaults"))
SPEC_URI = "urn:jobproxy:openapi"
_REGISTRY = Registry().with_resources([(SPEC_URI, Resource.from_contents(SPEC, default_specification=DRAFT202012))])


def _operation(method: str, path: str) -> dict[str, Any]:
    for template, operations in SPEC["paths"].items():
        if re.fullmatch(re.sub(r"\{[^}]+\}", "[^/]+", template), path) and method.lower() in operations:
            return dict(operations[method.lower()])
    raise AssertionError(f"{method} {path} is not in the OpenAPI document")


def check(method: str, path: str, status: int, content_type: str, body: bytes) -> None:
    responses = _operation(method, path.split("?")[0])["responses"]
    assert str(status) in responses, f"{method} {path}: status {status} is not documented"
    response = responses[str(status)]
    if "$ref" in response:
        response = SPEC["components"]["responses"][response["$ref"].rsplit("/", 1)[1]]
    if not body:
        assert "content" not in response, f"{method} {path} {status}: documented with a body, answered none"
        return
    kind = codec.media_type(content_type)
    assert kind in response.get("content", {}), f"{method} {path}: {kind} is not documented for {status}"
    if kind != codec.JSON:
        return
    ref = response["content"][kind]["schema"].get("$ref")
    schema = {"$ref": f"{SPEC_URI}{ref}"} if ref else response["content"][kind]["schema"]
    errors = [f"{e.json_path}: {e.message}"
              for e in Draft202012Validator(schema, registry=_REGISTRY).iter_errors(json.loads(body))]
    assert not errors, f"{method} {path} {status}: {errors}"
