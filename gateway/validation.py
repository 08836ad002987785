"""JSON Schema validation with errors as data: one line per problem, each with its JSON path.

A validator is built once per schema. A failing `oneOf`/`anyOf` is reported through the branch that
came closest (python-jsonschema's `best_match`), unless the schema gives its own message for that
keyword in an `x-error` annotation, e.g. `"x-error": {"pattern": "must be an absolute path"}`.
"""
from __future__ import annotations

import copy
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import jsonschema_rs
from jsonschema import Draft202012Validator
from jsonschema.exceptions import ValidationError, best_match
from referencing import Registry, Resource

import schemas


@dataclass(frozen=True)
class Problem:
    """One reason why a document is invalid."""

    path: str
    message: str
    keyword: str

    def as_dict(self) -> dict[str, str]:
        return {"path": self.path, "message": self.message}


def _registry() -> Registry[Any]:
    """The schemas of `schemas/`, by their `$id`, for `$ref`s between them."""
    registry: Registry[Any] = Registry()
    for name in ("task", "state", "config"):
        resource: Resource[Any] = Resource.from_contents(schemas.load(name))
        registry = registry.with_resource(str(resource.id()), resource)
    return registry


def _fast_validator(schema: dict[str, Any]) -> Any:
    """jsonschema-rs's compiled validator for `schema`: it says whether a document is valid about a
    hundred times faster, so a valid request costs microseconds; python-jsonschema still explains
    every invalid one (paths, `x-error` messages). None where it cannot compile the schema."""
    resources = [(str(schemas.load(name)["$id"]), schemas.load(name)) for name in ("task", "state", "config")]
    try:
        return jsonschema_rs.validator_for(schema, registry=jsonschema_rs.Registry(resources))
    except (ValueError, jsonschema_rs.ReferencingError):
        return None


class SchemaValidator:
    """A compiled validator for one schema of `schemas/` (or any schema dict)."""

    def __init__(self, schema: dict[str, Any]) -> None:
        Draft202012Validator.check_schema(schema)
        self.schema = schema
        self._validator = Draft202012Validator(schema, registry=_registry())
        self._fast = _fast_validator(schema)

    @classmethod
    def named(cls, name: str) -> SchemaValidator:
        return cls(schemas.load(name))

    def with_defaults(self, document: dict[str, Any]) -> dict[str, Any]:
        """A copy of a valid `document` with the schema's `default`s filled in where a property
        is absent, in nested objects too (through local `$ref`s): each default is written once,
        in the schema."""
        return _filled(self.schema, document, self.schema)

    def problems(self, document: Any) -> list[Problem]:
        """All problems with `document`, sorted by path; empty when it is valid."""
        if self._fast is not None and self._fast.is_valid(document):
            return []
        found = {(p.path, p.message): p for p in _flatten(self._validator.iter_errors(document))}
        return sorted(found.values(), key=lambda p: (p.path, p.message))


def _resolved(schema: dict[str, Any], root: dict[str, Any]) -> dict[str, Any]:
    """`schema` with a local `$ref` (`#/...` in `root`) replaced by what it points to, its own
    other keywords kept beside."""
    ref = schema.get("$ref")
    if not isinstance(ref, str) or not ref.startswith("#/"):
        return schema
    target: Any = root
    for part in ref[2:].split("/"):
        target = target[part.replace("~1", "/").replace("~0", "~")]
    return {**_resolved(target, root), **{k: v for k, v in schema.items() if k != "$ref"}}


def _filled(schema: dict[str, Any], document: dict[str, Any], root: dict[str, Any]) -> dict[str, Any]:
    """`document` with the `default` of each absent property of `schema`, recursively: into present
    (or just filled) objects, the objects of arrays (`items`) and of maps (`additionalProperties`).
    Defaults are copied, so a filled document never shares a list or table with the schema."""
    schema = _resolved(schema, root)
    filled = dict(document)
    properties = schema.get("properties", {})
    for key, sub in properties.items():
        if not isinstance(sub, dict):
            continue
        if key not in filled and "default" in sub:
            filled[key] = copy.deepcopy(sub["default"])
        if key in filled:
            filled[key] = _filled_value(sub, filled[key], root)
    extra = schema.get("additionalProperties")
    if isinstance(extra, dict):
        for key in filled.keys() - properties.keys():
            filled[key] = _filled_value(extra, filled[key], root)
    return filled


def _filled_value(schema: dict[str, Any], value: Any, root: dict[str, Any]) -> Any:
    """`value` (of a property, an array item or a map entry) with the defaults of `schema` filled in."""
    schema = _resolved(schema, root)
    if isinstance(value, dict):
        return _filled(schema, value, root)
    items = schema.get("items")
    if isinstance(value, list) and isinstance(items, dict):
        return [_filled_value(items, item, root) for item in value]
    return value


def _flatten(errors: Iterable[ValidationError]) -> Iterator[Problem]:
    for error in errors:
        custom = error.schema.get("x-error", {}).get(error.validator) if isinstance(error.schema, dict) else None
        if error.validator == "x-type":
            yield Problem(_json_path(error), error.message, "type")
        elif custom:
            yield Problem(error.json_path, custom, str(error.validator))
        elif error.context:
            yield from _flatten(_closest_branch(error.context))
        else:
            yield Problem(error.json_path, _message(error), str(error.validator))


def _closest_branch(context: list[ValidationError]) -> list[ValidationError]:
    """The errors of the one `oneOf`/`anyOf` branch whose type fits the instance, else the best match."""
    branches: dict[Any, list[ValidationError]] = {}
    for error in context:
        branches.setdefault(error.relative_schema_path[0], []).append(error)
    fitting = [
        errors for errors in branches.values()
        if not any(e.validator == "type" and not e.relative_path for e in errors)
    ]
    if len(fitting) == 1:
        return fitting[0]
    if not fitting:
        wanted = [e.validator_value for errors in branches.values() for e in errors if e.validator == "type"]
        names = sorted({name for value in wanted for name in _names(value)})
        first = context[0]
        return [ValidationError(
            f"must be of type {' or '.join(names)}, not {type(first.instance).__name__}",
            validator="x-type", path=list(first.absolute_path), schema={},
        )]
    return [best_match(context)]


def _names(value: Any) -> list[str]:
    """The type name(s) of a `type` keyword's value: one name or a list of them."""
    return [value] if isinstance(value, str) else [str(name) for name in value]


def _json_path(error: ValidationError) -> str:
    path = "$"
    for part in error.path:
        path += f"[{part}]" if isinstance(part, int) else f".{part}"
    return path


def _message(error: ValidationError) -> str:
    """The validator's message, without repeating a possibly huge instance."""
    if error.validator == "additionalProperties":
        schema = error.schema if isinstance(error.schema, Mapping) else {}
        instance = error.instance if isinstance(error.instance, Mapping) else {}
        extra = sorted(set(instance) - set(schema.get("properties", {})))
        return "unknown field(s): " + ", ".join(repr(name) for name in extra)
    if error.validator == "required":
        return error.message.replace(" is a required property", " is required")
    if error.validator == "type":
        return f"must be of type {_types(error.validator_value)}, not {type(error.instance).__name__}"
    if error.validator in ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"):
        relation = {"minimum": ">=", "maximum": "<=", "exclusiveMinimum": ">", "exclusiveMaximum": "<"}
        return f"must be {relation[str(error.validator)]} {error.validator_value} (got {error.instance!r})"
    if error.validator == "enum":
        values = error.validator_value if isinstance(error.validator_value, list) else []
        return "must be one of " + ", ".join(repr(v) for v in values)
    if error.validator in ("minLength", "maxLength", "minItems", "maxItems"):
        return _size_message(error)
    return error.message


def _types(value: Any) -> str:
    return " or ".join(_names(value))


def _size_message(error: ValidationError) -> str:
    unit = "characters" if "Length" in str(error.validator) else "items"
    if str(error.validator).startswith("min"):
        return "must not be empty" if error.validator_value == 1 else f"needs at least {error.validator_value} {unit}"
    return f"is too long: at most {error.validator_value} {unit}"


def summary(problems: list[Problem]) -> str:
    """A one-line summary of a list of problems."""
    first = problems[0]
    more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
    return f"{first.path}: {first.message}{more}"
