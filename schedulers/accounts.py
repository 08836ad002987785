"""Users' entries in the account database, read at most once per `TTL` seconds each: a look-up
(files, LDAP or whatever NSS is set to) costs more than most of what a submit or a job's start
does with it, and a changed account is still seen soon.

The local job launcher, a script that imports nothing of this package, keeps its own cache.
"""
from __future__ import annotations

import pwd
import time

#: Seconds a user's entry is reused before the account database is read again.
TTL = 10.0
#: The most entries kept; past that all are dropped and read again as needed.
MOST = 10_000

_known: dict[str, tuple[float, pwd.struct_passwd]] = {}


def entry(user: str) -> pwd.struct_passwd:
    """The account database's entry of `user` (KeyError if there is none), at most `TTL` s old."""
    moment = time.monotonic()
    known = _known.get(user)
    if known is None or moment - known[0] >= TTL:
        if len(_known) >= MOST:
            _known.clear()
        known = _known[user] = (moment, pwd.getpwnam(user))
    return known[1]
