"""Users' entries in the account database, read at most once per `TTL` seconds each: a look-up
(files, LDAP or whatever NSS is set to) costs more than most of what a submit or a job's start
does with it, and with a directory service it can take milliseconds on the event loop; a changed
account (or group membership) is still seen soon.

The local job launcher, a script that imports nothing of this package, keeps its own cache.
"""
from __future__ import annotations

import grp
import os
import pwd
import time
from collections.abc import Callable
from typing import TypeVar

#: Seconds a user's entry is reused before the account database is read again.
TTL = 10.0
#: The most entries kept in each table; past that all are dropped and read again as needed.
MOST = 10_000

K = TypeVar("K")
V = TypeVar("V")

_known: dict[str, tuple[float, pwd.struct_passwd]] = {}
_by_uid: dict[int, tuple[float, pwd.struct_passwd]] = {}
_groups: dict[str, tuple[float, frozenset[str]]] = {}


def _fresh(table: dict[K, tuple[float, V]], key: K, read: Callable[[K], V]) -> V:
    """`read(key)`, or what it answered less than `TTL` s ago (its exceptions are not kept)."""
    moment = time.monotonic()
    known = table.get(key)
    if known is None or moment - known[0] >= TTL:
        if len(table) >= MOST:
            table.clear()
        known = table[key] = (moment, read(key))
    return known[1]


def entry(user: str) -> pwd.struct_passwd:
    """The account database's entry of `user` (KeyError if there is none), at most `TTL` s old."""
    return _fresh(_known, user, pwd.getpwnam)


def entry_of_uid(uid: int) -> pwd.struct_passwd:
    """The account database's entry of `uid` (KeyError if there is none), at most `TTL` s old."""
    return _fresh(_by_uid, uid, pwd.getpwuid)


def group_names(user: str) -> frozenset[str]:
    """The names of the Unix groups `user` is in (none for a user without an account here), at
    most `TTL` s old."""
    return _fresh(_groups, user, _read_group_names)


def _read_group_names(user: str) -> frozenset[str]:
    try:
        account = entry(user)
    except KeyError:
        return frozenset()
    names = set()
    for gid in os.getgrouplist(user, account.pw_gid):
        try:
            names.add(grp.getgrgid(gid).gr_name)
        except KeyError:
            continue
    return frozenset(names)
