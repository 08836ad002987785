"""Who is asking: bearer tokens mapped to users, and what each may see and do.

The site config stores only SHA-256 hashes of the tokens (`jobproxy token create` makes one and
prints it once). A token carries a user and an optional admin flag. With auth on, a request
without a valid token is answered 401 with `WWW-Authenticate`; users see and touch only their own
tasks (another user's task answers 404, exactly like an unknown one), admins see all. With auth
off, every caller is treated as an admin of a trusted single-user gateway: the gateway then
refuses to listen on any address but loopback unless the admin allows it explicitly.

Both `Authorization: Bearer TOKEN` and Basic credentials (user name, token as password; as py-tes
sends them) are accepted.
"""
from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import secrets
from dataclasses import dataclass
from typing import Awaitable, Callable, Mapping, Sequence

from aiohttp import web

from . import pages
from .responses import ApiError

#: Paths anyone may read: health check, API descriptions, the pages (the dashboard asks for a token
#: itself); /metrics checks its own scrape token.
PUBLIC_PATHS = frozenset({"/v1/jobproxy/ping", "/v1/openapi.json", "/ga4gh/tes/v1/service-info", "/v1/service-info",
                          "/metrics"}) | pages.PUBLIC
TOKEN_PREFIX = "jp_"
CHALLENGE = {"WWW-Authenticate": 'Bearer realm="jobproxy", charset="UTF-8"'}


@dataclass(frozen=True)
class Identity:
    """The caller. `user` is None when auth is off (a trusted, single-user gateway)."""

    user: str | None
    admin: bool

    def may_see(self, owner: str) -> bool:
        return self.admin or self.user == owner

    def submitter(self, requested: str | None) -> str:
        """The user a new task runs for: the caller, or whoever an admin names."""
        if requested is None:
            if self.user is None:
                raise ApiError(400, "the task names no user")
            return self.user
        if not self.admin and requested != self.user:
            raise ApiError(403, f"you are {self.user!r} and may submit tasks only for yourself, not for {requested!r}")
        return requested


ANYONE = Identity(None, admin=True)


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def new_token() -> str:
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


class Authenticator:
    """Checks credentials against the configured token hashes."""

    def __init__(self, tokens: Sequence[Mapping[str, object]]) -> None:
        self._by_hash = {str(t["sha256"]).lower(): Identity(str(t["user"]), bool(t.get("admin", False))) for t in tokens}

    def identify(self, authorization: str | None) -> Identity | None:
        if not authorization:
            return None
        scheme, _, credentials = authorization.partition(" ")
        credentials = credentials.strip()
        claimed: str | None = None
        if scheme.lower() == "basic":
            try:
                claimed, _, credentials = base64.b64decode(credentials, validate=True).decode("utf-8").partition(":")
            except (binascii.Error, UnicodeDecodeError):
                return None
        elif scheme.lower() != "bearer":
            return None
        digest = hash_token(credentials)
        for known, identity in self._by_hash.items():
            if hmac.compare_digest(known, digest):
                return identity if claimed in (None, identity.user) else None
        return None


IDENTITY_KEY = web.RequestKey("identity", Identity)


def identity(request: web.Request) -> Identity:
    return request.get(IDENTITY_KEY, ANYONE)


def middleware(authenticator: Authenticator | None) -> Callable[..., Awaitable[web.StreamResponse]]:
    @web.middleware
    async def authenticate(request: web.Request,
                           handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> web.StreamResponse:
        if authenticator is not None and request.path not in PUBLIC_PATHS:
            found = authenticator.identify(request.headers.get("Authorization"))
            if found is None:
                raise ApiError(401, "authentication required: send 'Authorization: Bearer <token>'", headers=CHALLENGE)
            request[IDENTITY_KEY] = found
        return await handler(request)

    return authenticate
