"""Paging of the list endpoints: the one parser of page sizes (and other whole-number query
parameters) for the v1 API and the TES API.

Each API keeps its own default, maximum and error shape: it catches `OutOfRange` and answers in
its own terms, e.g. `page_size: must be a whole number from 1 to 2047, not 'x'`.
"""
from __future__ import annotations

#: The most digits a whole-number parameter may have: more is out of range without being read
#: (Python refuses to read integers of thousands of digits).
MAX_DIGITS = 19


class OutOfRange(ValueError):
    """A query parameter that is not a whole number from `low` to `high`."""

    def __init__(self, name: str, raw: str, low: int, high: int) -> None:
        self.name, self.raw, self.low, self.high = name, raw, low, high
        super().__init__(f"{name}: {self.rule}, not {raw!r}")

    @property
    def rule(self) -> str:
        """What the parameter must be, without the value given."""
        return f"must be a whole number from {self.low} to {self.high}"


def whole_number(raw: str | None, name: str, default: int, low: int, high: int) -> int:
    """`raw` (a query parameter's value) as an int from `low` to `high`; `default` when it is
    absent or empty. Only ASCII digits count: no sign, no spaces, no other scripts' digits."""
    if raw is None or raw == "":
        return default
    if not (raw.isascii() and raw.isdigit()) or len(raw) > MAX_DIGITS or not low <= int(raw) <= high:
        raise OutOfRange(name, raw, low, high)
    return int(raw)


def page_size(raw: str | None, default: int, maximum: int) -> int:
    """The `page_size` parameter: from 1 to `maximum`, `default` when not given."""
    return whole_number(raw, "page_size", default, 1, maximum)
