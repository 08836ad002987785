"""Schemathesis hooks for tests/test_fuzz.py (loaded through SCHEMATHESIS_HOOKS).

They teach the fuzzer the one rule of the TES list that OpenAPI cannot say (a `tag_value` needs a
`tag_key`; the server answers it 400, as documented), and add a check of our own: the gateway's own
schema validation must never refuse a request the OpenAPI document calls valid, and every refusal
must say what was wrong.
"""
from __future__ import annotations

import json
import re
from collections.abc import Iterator
from typing import Any

import schemathesis

#: The first words of a refusal by the gateway's schema validator (v1 and TES).
SCHEMA_REFUSALS = ("invalid task:", "invalid TES task:")


#: Characters XML 1.0 cannot carry; the gateway's XML reading also trims the ends of every text.
_NOT_IN_XML = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ud800-\udfff\ufffe\uffff\r]")


def _count(value: Any) -> int:
    if value is None:
        return 0
    return len(value) if isinstance(value, list) else 1


def _strings(value: Any) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for key, item in value.items():
            yield str(key)
            yield from _strings(item)
    elif isinstance(value, list):
        for item in value:
            yield from _strings(item)


def _xml_cannot_say(body: Any) -> bool:
    """True when an XML body would not arrive as generated: text with characters XML cannot
    carry, or with spaces at its ends (trimmed when read)."""
    return any(_NOT_IN_XML.search(text) or text != text.strip() for text in _strings(body))


@schemathesis.hook
def filter_case(context: Any, case: Any) -> bool:
    """Drop the cases that cannot say what they mean: a TES list with more `tag_value`s than
    `tag_key`s (the n-th value belongs to the n-th key; the server answers 400, as documented),
    XML bodies whose text XML cannot carry as generated, and negative XML bodies (the JSON bodies,
    read by the same validator, carry those)."""
    query = case.query or {}
    if case.method.upper() == "GET" and case.operation.path.endswith("/tasks") \
            and _count(query.get("tag_value")) > _count(query.get("tag_key")):
        return False
    if "xml" not in str(case.media_type or ""):
        return True
    # XML text has no types: a negative case's null, number or list item would arrive as valid text
    negative = case.meta is not None and not case.meta.generation.mode.is_positive
    return not negative and not _xml_cannot_say(case.body)


@schemathesis.check
def refusals_explained(ctx: Any, response: Any, case: Any) -> bool | None:
    """A 4xx answer (JSON) names the problem; valid data is never refused by the gateway's schema."""
    if not 400 <= response.status_code < 500 or "json" not in response.headers.get("Content-Type", [""])[0]:
        return None
    try:
        body = json.loads(response.content)
    except ValueError:
        raise AssertionError(f"{response.status_code} answer is not JSON: {response.content[:200]!r}") from None
    message = body.get("error") if isinstance(body, dict) else None
    if not isinstance(message, str) or not message:
        raise AssertionError(f"{response.status_code} answer without an error message: {body!r}")
    meta = getattr(case, "meta", None)
    positive = meta is not None and meta.generation.mode.is_positive
    if positive and response.status_code == 400 and message.startswith(SCHEMA_REFUSALS):
        raise AssertionError(f"the gateway's schema refused a request the OpenAPI document allows: {body!r}")
    return None
