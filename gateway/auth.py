"""Who is asking: bearer tokens mapped to users, and what each may see and do.

The site config stores only SHA-256 hashes of the tokens (`jobproxy token create` makes one and
prints it once). A token carries a user and an optional admin flag. With auth on, a request
without a valid token is answered 401 with `WWW-Authenticate`; users see and touch only their own
tasks (another user's task answers 404, exactly like an unknown one), admins see all. With auth
off, every caller is treated as an admin of a trusted single-user gateway: the gateway then
refuses to listen on any address but loopback unless the admin allows it explicitly.

Both `Authorization: Bearer TOKEN` and Basic credentials (user name, token as password; as py-tes
sends them) are accepted.

A request over the gateway's Unix socket (`[gateway] socket`) needs no token: the kernel says who
is asking (SO_PEERCRED of the connection), and that user's login name is the caller, with or
without auth. Root (and the gateway's own account) is an admin there; everyone else is an ordinary
user who submits only for themselves and sees only their own tasks.
"""
from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
import secrets
import socket
import struct
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass

from aiohttp import web

from schedulers import accounts

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
    """The caller. `user` is None when auth is off and the kernel did not say who is asking (a
    trusted, single-user gateway over TCP)."""

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
        self._by_hash = {str(t["sha256"]).lower(): Identity(str(t["user"]), bool(t["admin"])) for t in tokens}

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
    """Who sent `request`, as the middleware found; ANYONE where it found nobody (auth off, a
    public path) or did not run."""
    try:
        return request[IDENTITY_KEY]
    except KeyError:
        return ANYONE


_PEERCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid


def peer_uid(request: web.Request) -> int | None:
    """The uid of the process at the other end of a Unix-socket connection (None over TCP)."""
    transport = request.transport
    sock = transport.get_extra_info("socket") if transport is not None else None
    if sock is None or sock.family != socket.AF_UNIX:
        return None
    _, uid, _ = _PEERCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size))
    return int(uid)


def peer_identity(uid: int) -> Identity:
    """The caller behind a Unix-socket connection: the login name of `uid`; root and the
    gateway's own account are admins."""
    try:
        name = accounts.entry_of_uid(uid).pw_name
    except KeyError:
        raise ApiError(403, f"uid {uid} has no login name on this machine, so it cannot own tasks") from None
    return Identity(name, admin=uid in (0, os.geteuid()))


def middleware(authenticator_of: Callable[[web.Request], Authenticator | None]
               ) -> Callable[..., Awaitable[web.StreamResponse]]:
    """Identify each request; `authenticator_of` finds the app's current Authenticator (None: auth
    off), read anew for every request so that a reload's tokens apply from the next one on."""

    @web.middleware
    async def authenticate(request: web.Request,
                           handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> web.StreamResponse:
        uid = peer_uid(request)
        if uid is not None:
            if request.path not in PUBLIC_PATHS:
                request[IDENTITY_KEY] = peer_identity(uid)
        elif (authenticator := authenticator_of(request)) is not None and request.path not in PUBLIC_PATHS:
            found = authenticator.identify(request.headers.get("Authorization"))
            if found is None:
                raise ApiError(401, "authentication required: send 'Authorization: Bearer <token>'", headers=CHALLENGE)
            request[IDENTITY_KEY] = found
        else:  # known now, so that each later look-up is a plain one
            request[IDENTITY_KEY] = ANYONE
        return await handler(request)

    return authenticate
