"""The one exception every handler raises for an answer that is not a success."""
from __future__ import annotations

from collections.abc import Mapping


class ApiError(Exception):
    """An error answered to the client: status, a one-line message and optional per-path details."""

    def __init__(self, status: int, message: str, details: list[dict[str, str]] | None = None,
                 headers: Mapping[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.details = details or []
        self.headers = dict(headers or {})
