"""The account database's cached look-ups (`schedulers.accounts`), against this machine's real
one: what was read is answered again within `TTL`, read again after it."""
from __future__ import annotations

import grp
import os
import pwd

import pytest

from schedulers import accounts


@pytest.fixture(autouse=True)
def empty_tables() -> None:
    for table in (accounts._known, accounts._by_uid, accounts._groups):
        table.clear()


def test_entries_by_name_and_by_uid_are_kept_for_the_ttl() -> None:
    me = pwd.getpwuid(os.geteuid())
    assert accounts.entry(me.pw_name) == me and accounts.entry_of_uid(me.pw_uid) == me
    moment, _ = accounts._by_uid[me.pw_uid]
    stale = pwd.struct_passwd((me.pw_name, "x", me.pw_uid, me.pw_gid, "", "/stale", "/bin/sh"))
    accounts._by_uid[me.pw_uid] = (moment, stale)
    assert accounts.entry_of_uid(me.pw_uid).pw_dir == "/stale"  # within the TTL: what was read
    accounts._by_uid[me.pw_uid] = (moment - accounts.TTL, stale)
    assert accounts.entry_of_uid(me.pw_uid) == me


def test_missing_accounts_are_asked_again_each_time() -> None:
    with pytest.raises(KeyError):
        accounts.entry("no-such-user-here")
    with pytest.raises(KeyError):
        accounts.entry_of_uid(2**31 - 2)
    assert "no-such-user-here" not in accounts._known and not accounts._by_uid


def test_group_names_are_the_users_groups_kept_for_the_ttl() -> None:
    me = pwd.getpwuid(os.geteuid())
    primary = grp.getgrgid(me.pw_gid).gr_name
    found = accounts.group_names(me.pw_name)
    assert primary in found
    assert found == {grp.getgrgid(g).gr_name for g in os.getgrouplist(me.pw_name, me.pw_gid)}
    moment, _ = accounts._groups[me.pw_name]
    accounts._groups[me.pw_name] = (moment, frozenset({"left-long-ago"}))
    assert accounts.group_names(me.pw_name) == {"left-long-ago"}  # within the TTL: what was read
    accounts._groups[me.pw_name] = (moment - accounts.TTL, frozenset({"left-long-ago"}))
    assert accounts.group_names(me.pw_name) == found
    assert accounts.group_names("no-such-user-here") == frozenset()


def test_the_tables_are_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(accounts, "MOST", 2)
    for user in ("root", "nobody", "daemon"):
        accounts.entry(user)
    assert list(accounts._known) == ["daemon"]
