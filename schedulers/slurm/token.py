"""JWT tokens for slurmrestd (Slurm's `auth/jwt`), per Slurm user, renewed before they expire.

Three sources, the site's choice (`[scheduler.options.rest]`):
- `token_command` (the default): an argv run through `commands.run`, `{user}` and `{lifespan}`
  replaced, printing the token or `SLURM_JWT=<token>`: `scontrol token username={user}
  lifespan={lifespan}` on a host that may ask slurmctld for tokens (root or SlurmUser for
  other users' tokens).
- `token_file`: a file holding the token (`{user}` in its path for one file per user), written
  by whatever renews it; read again when it changes or its token is about to expire.
- `jwt_key_file`: the cluster's JWT key itself (slurm.conf `AuthAltParameters=jwt_key=`): the
  gateway signs its own HS256 tokens with the claims `scontrol token` writes (`sun`, `iat`,
  `exp`), so it needs no Slurm command at all.

A token is renewed when less than a fifth of its life (at most 5 minutes) is left; its expiry
is read from the token's own `exp` claim where it has one.
"""
from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import os
import pwd
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from ..base import SchedulerConfigError, SchedulerUnavailable
from ..commands import run


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def sign(key: bytes, user: str, lifespan: int, now: float | None = None) -> str:
    """An HS256 token for `user`, valid `lifespan` seconds, as slurmctld's auth/jwt checks it."""
    issued = int(time.time() if now is None else now)
    header = _b64(json.dumps({"alg": "HS256", "typ": "JWT"}, separators=(",", ":")).encode())
    claims = _b64(json.dumps({"exp": issued + lifespan, "iat": issued, "sun": user}, separators=(",", ":")).encode())
    signature = hmac.new(key, f"{header}.{claims}".encode(), hashlib.sha256).digest()
    return f"{header}.{claims}.{_b64(signature)}"


def expiry(token: str) -> float | None:
    """The `exp` claim of a JWT (seconds since the epoch), None if it has none or is no JWT."""
    parts = token.split(".")
    if len(parts) != 3:
        return None
    try:
        claims = json.loads(base64.urlsafe_b64decode(parts[1] + "=" * (-len(parts[1]) % 4)))
    except ValueError:
        return None
    exp = claims.get("exp") if isinstance(claims, dict) else None
    return float(exp) if isinstance(exp, int | float) else None


def printed_token(output: str) -> str:
    """The token in what a token command printed: `SLURM_JWT=<token>` or the bare token."""
    for line in output.splitlines():
        word = line.strip().removeprefix("export ").strip()
        if word.startswith("SLURM_JWT="):
            return word.removeprefix("SLURM_JWT=")
    words = output.split()
    return words[0] if len(words) == 1 else ""


@dataclass
class _Held:
    token: str
    renew_at: float
    stamp: float | None = None  # token_file: the file's mtime when read


class Tokens:
    """Where tokens come from, and the current one of each user."""

    def __init__(self, *, command: Sequence[str], file: str | None, key_file: str | None, lifespan: int,
                 timeout: float) -> None:
        self.command = list(command)
        self.file = file
        self.key: bytes | None = None
        self.lifespan = lifespan
        self.timeout = timeout
        self._held: dict[str, _Held] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        if key_file is not None:
            try:
                self.key = Path(key_file).read_bytes()
            except OSError as exc:
                raise SchedulerConfigError(f"cannot read the JWT key {key_file}: {exc.strerror}") from None
            if not self.key:
                raise SchedulerConfigError(f"the JWT key {key_file} is empty")

    @property
    def source(self) -> str:
        """The source, in words for the log."""
        if self.key is not None:
            return "tokens signed with the JWT key"
        if self.file is not None:
            return f"tokens from {self.file}"
        return "tokens from `" + " ".join(self.command) + "`"

    def _renew_at(self, token: str, now: float) -> float:
        ends = expiry(token) or now + self.lifespan
        return ends - min(300.0, max(1.0, (ends - now) / 5))

    async def token(self, user: str) -> str:
        """The current token of `user`, renewed first if it is about to expire."""
        held = self._held.get(user)
        now = time.time()
        if held is not None and now < held.renew_at and not self._file_changed(user, held):
            return held.token
        async with self._locks.setdefault(user, asyncio.Lock()):
            held = self._held.get(user)
            if held is None or time.time() >= held.renew_at or self._file_changed(user, held):
                held = await self._fetch(user)
                self._held[user] = held
            return held.token

    def forget(self, user: str) -> None:
        """Drop `user`'s token (slurmrestd refused it): the next request fetches a new one."""
        self._held.pop(user, None)

    def _path(self, user: str) -> Path:
        assert self.file is not None
        return Path(self.file.replace("{user}", user))

    def _file_changed(self, user: str, held: _Held) -> bool:
        if self.file is None:
            return False
        try:
            return self._path(user).stat().st_mtime != held.stamp
        except OSError:
            return True

    async def _fetch(self, user: str) -> _Held:
        now = time.time()
        if self.key is not None:
            token = sign(self.key, user, self.lifespan, now)
            return _Held(token, self._renew_at(token, now))
        if self.file is not None:
            path = self._path(user)
            try:
                stamp = path.stat().st_mtime
                token = path.read_text(encoding="utf-8").strip()
            except OSError as exc:
                raise SchedulerUnavailable(f"cannot read the Slurm token file {path}: {exc.strerror}") from None
            token = printed_token(token) or token
            if not token:
                raise SchedulerUnavailable(f"the Slurm token file {path} is empty")
            return _Held(token, self._renew_at(token, now), stamp)
        argv = [word.replace("{user}", user).replace("{lifespan}", str(self.lifespan)) for word in self.command]
        done = await run(argv, self.timeout, service="Slurm")
        token = printed_token(done.stdout) if done.status == 0 else ""
        if not token:
            said = (done.stderr.strip() or done.stdout.strip() or f"exit status {done.status}")[:300]
            raise SchedulerUnavailable(f"no Slurm token for {user!r} from {argv[0]}: {said}")
        return _Held(token, self._renew_at(token, now))


def own_user() -> str:
    """The Unix name of the gateway's own account."""
    try:
        return pwd.getpwuid(os.geteuid()).pw_name
    except KeyError:
        return str(os.geteuid())
