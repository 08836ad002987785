"""Request bodies in, response bodies out: JSON and XML, chosen by Content-Type and Accept.

XML documents are read with xmltodict and then shaped by the JSON Schema they must satisfy: text
becomes an integer/number/boolean where the schema asks for one, and lists that the schema marks
`"xml": {"wrapped": true}` are unwrapped (`<cmd><arg>a</arg><arg>b</arg></cmd>` -> ["a", "b"]). The
result is then validated exactly like a JSON body, so both formats share one definition and one set
of error paths.
"""
from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from typing import Any
from xml.parsers.expat import ExpatError

import xmltodict

JSON = "application/json"
XML = "application/xml"
TEXT = "text/plain"
XML_TYPES = ("application/xml", "text/xml")


#: How deeply a request body may nest objects and lists (a task needs 5 levels).
MAX_DEPTH = 32


class DecodeError(ValueError):
    """A body that could not be read; `status` is 400 or 415."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


def media_type(content_type: str | None) -> str:
    return (content_type or "").split(";", 1)[0].strip().lower()


def decode(body: bytes, content_type: str | None, schema: Mapping[str, Any]) -> tuple[Any, str]:
    """Parse `body` by its content type; answers the document and the format ("json" or "xml")."""
    kind = media_type(content_type)
    if kind == JSON or kind.endswith("+json"):
        return _decode_json(body), "json"
    if kind in XML_TYPES or kind.endswith("+xml"):
        return _decode_xml(body, schema), "xml"
    shown = kind or "none"
    raise DecodeError(f"unsupported Content-Type {shown}: send {JSON} or {XML}", status=415)


def _decode_json(body: bytes) -> Any:
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DecodeError(f"body is not UTF-8: byte {exc.start} cannot be decoded") from None
    try:
        document = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DecodeError(f"body is not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}") from None
    except RecursionError:
        raise DecodeError(f"body nests deeper than {MAX_DEPTH} levels") from None
    _check_depth(document)
    return document


def _check_depth(document: Any) -> None:
    """Refuse bodies that nest objects/lists deeper than MAX_DEPTH (cheap, iterative)."""
    level: list[Any] = [document]
    for _ in range(MAX_DEPTH + 1):
        level = [child for item in level
                 for child in (item.values() if isinstance(item, dict) else item if isinstance(item, list) else ())]
        if not level:
            return
    raise DecodeError(f"body nests deeper than {MAX_DEPTH} levels")


def _decode_xml(body: bytes, schema: Mapping[str, Any]) -> Any:
    if re.search(rb"<!(DOCTYPE|ENTITY)", body, re.IGNORECASE):
        raise DecodeError("XML with a DOCTYPE or entity declarations is not accepted")
    try:
        parsed = xmltodict.parse(body, disable_entities=True)
    except ExpatError as exc:
        raise DecodeError(f"body is not valid XML: {exc}") from None
    _check_depth(parsed)
    root_name = schema.get("xml", {}).get("name")
    (name, content), = parsed.items()
    if root_name and name != root_name:
        raise DecodeError(f"XML root element must be <{root_name}>, not <{name}>")
    return shape(content if content is not None else {}, schema, schema)


def shape(value: Any, schema: Mapping[str, Any], root: Mapping[str, Any]) -> Any:
    """Give parsed XML text the types and list shapes that `schema` describes."""
    schema = _resolve(schema, root)
    kind = schema.get("type")
    branches = schema.get("oneOf") or schema.get("anyOf")
    if branches and not kind:
        return _shape_alternatives(value, branches, root)
    if kind == "object" and isinstance(value, dict):
        props = schema.get("properties", {})
        return {k: shape(v, props[k], root) if k in props else v for k, v in value.items()}
    if kind == "array":
        return _shape_array(value, schema, root)
    if isinstance(value, str):
        return _scalar(value.strip(), kind)
    if value is None and kind == "string":
        return ""
    return value


def _shape_alternatives(value: Any, branches: Sequence[Mapping[str, Any]], root: Mapping[str, Any]) -> Any:
    resolved = [_resolve(b, root) for b in branches]
    if isinstance(value, dict):
        for branch in resolved:
            if branch.get("type") == "array" and branch.get("xml", {}).get("wrapped"):
                item_name = _resolve(branch.get("items", {}), root).get("xml", {}).get("name") or _item_name(branch)
                if item_name in value and len(value) == 1:
                    return _shape_array(value, branch, root)
        for branch in resolved:
            if branch.get("type") == "object":
                return shape(value, branch, root)
    if isinstance(value, list):
        for branch in resolved:
            if branch.get("type") == "array":
                return _shape_array(value, branch, root)
    for branch in resolved:
        if branch.get("type") not in ("object", "array"):
            return shape(value, branch, root)
    return value


def _item_name(branch: Mapping[str, Any]) -> str:
    return str(branch.get("items", {}).get("xml", {}).get("name", "item"))


def _shape_array(value: Any, schema: Mapping[str, Any], root: Mapping[str, Any]) -> Any:
    items = schema.get("items", {})
    if schema.get("xml", {}).get("wrapped") and isinstance(value, dict) and len(value) == 1:
        value = next(iter(value.values()))
    if value is None:
        return []
    if not isinstance(value, list):
        value = [value]
    prefix = schema.get("prefixItems")
    if prefix:
        return [shape(v, prefix[i], root) if i < len(prefix) else v for i, v in enumerate(value)]
    return [shape(v, items, root) for v in value]


def _resolve(schema: Mapping[str, Any], root: Mapping[str, Any]) -> Mapping[str, Any]:
    """Follow local `$ref`s (`#/$defs/...`), keeping sibling keywords such as `xml`."""
    while "$ref" in schema and str(schema["$ref"]).startswith("#/"):
        target: Any = root
        for part in str(schema["$ref"])[2:].split("/"):
            target = target[part]
        schema = {**target, **{k: v for k, v in schema.items() if k != "$ref"}}
    return schema


def _scalar(text: str, kind: Any) -> Any:
    kinds = kind if isinstance(kind, list) else [kind]
    if "integer" in kinds and re.fullmatch(r"[+-]?\d+", text):
        return int(text)
    if "number" in kinds:
        try:
            return float(text) if not re.fullmatch(r"[+-]?\d+", text) else int(text)
        except ValueError:
            return text
    if "boolean" in kinds and text in ("true", "false"):
        return text == "true"
    return text


# ---- answers --------------------------------------------------------------------------------


def negotiate(accept: str | None, offers: Sequence[str]) -> str:
    """The offer the client's Accept header prefers; the first offer when it has no preference."""
    if not accept:
        return offers[0]
    best, best_q = offers[0], -1.0
    for part in accept.split(","):
        fields = part.strip().split(";")
        kind = fields[0].strip().lower()
        q = 1.0
        for param in fields[1:]:
            key, _, val = param.strip().partition("=")
            if key.strip() == "q":
                try:
                    q = float(val)
                except ValueError:
                    q = 0.0
        for offer in offers:
            if _matches(kind, offer) and q > best_q and q > 0:
                # an exact type beats a wildcard of the same weight
                best, best_q = offer, q + (0.0001 if kind == offer else 0.0)
    return best


def _matches(pattern: str, offer: str) -> bool:
    if pattern in ("*/*", offer):
        return True
    if pattern == "text/xml" and offer == XML:
        return True
    major, _, minor = pattern.partition("/")
    return minor == "*" and offer.startswith(major + "/")


def to_xml(root: str, value: Any, item_names: Mapping[str, str] | None = None) -> str:
    """Render a JSON-like value as an XML document with root element `root`.

    Lists become repeated elements named by `item_names[list_key]` (default: the key itself);
    None becomes an empty element.
    """
    names = dict(item_names or {})
    return str(xmltodict.unparse({root: _xml_value(value, names)}, pretty=False))


def _xml_value(value: Any, names: dict[str, str]) -> Any:
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for key, item in value.items():
            if isinstance(item, list) and key in names:
                out[key] = {names[key]: [_xml_value(v, names) for v in item]}
            else:
                out[key] = _xml_value(item, names)
        return out
    if isinstance(value, list):
        return [_xml_value(v, names) for v in value]
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return None
    return str(value)
