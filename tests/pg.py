"""PostgreSQL for the tests: the dev cluster of etc/dev/postgresql.sh, a fresh database per test,
and `store_factory`, which opens the store a test runs against (SQLite, then PostgreSQL)."""
from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import psycopg
import pytest

from gateway.pgstore import PgStore, conninfo
from gateway.store import Store
from gateway.taskstore import TaskStore

from .conftest import cluster_env


def server() -> tuple[str, Path]:
    """The dev cluster's URL (without a password) and its password file; skips where it cannot run."""
    env = cluster_env("postgresql")
    return env["JOBPROXY_TEST_PG_URL"], Path(env["JOBPROXY_TEST_PG_PASSWORD_FILE"])


def admin(url: str, password_file: Path) -> psycopg.Connection[tuple[object, ...]]:
    return psycopg.connect(conninfo(url, password_file), autocommit=True)


_made: list[str] = []


@pytest.fixture(scope="session", autouse=True)
def _drop_test_databases() -> Iterator[None]:
    """The databases the tests made are dropped at the end of the session (a gateway under test
    may still hold a connection when its test's own fixtures end)."""
    yield
    if _made:
        url, password_file = server()
        with admin(url, password_file) as db:
            for name in _made:
                db.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


@pytest.fixture
def database() -> tuple[str, Path]:
    """A fresh, empty database on the dev cluster: its URL and password file."""
    url, password_file = server()
    name = f"jobproxy_test_{uuid.uuid4().hex[:10]}"
    with admin(url, password_file) as db:
        db.execute(f"CREATE DATABASE {name}")
    _made.append(name)
    return url.rsplit("/", 1)[0] + "/" + name, password_file


@pytest.fixture(params=["sqlite", "postgresql"])
def store_factory(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Callable[[], TaskStore]]:
    """Opens the store under test: a SQLite file in `tmp_path`, or a fresh PostgreSQL database.
    Each call opens the same one again (as a restarted gateway would)."""
    if request.param == "sqlite":
        yield lambda: Store(tmp_path / "db" / "s.db")
        return
    url, password_file = request.getfixturevalue("database")
    yield lambda: PgStore(url, password_file=password_file)


@pytest.fixture(params=["sqlite", "postgresql"])
def store_section(request: pytest.FixtureRequest) -> dict[str, str]:
    """The `[store]` table of a gateway under test: SQLite (empty: the default), or a fresh
    PostgreSQL database."""
    if request.param == "sqlite":
        return {}
    url, password_file = request.getfixturevalue("database")
    return {"url": url, "password_file": str(password_file)}


def execute(config_store: dict[str, str] | None, sqlite_path: Path, sql: str, args: tuple[object, ...]) -> None:
    """Run one statement on a gateway's store from a second connection, as an admin would; `sql`
    is written with `?` marks."""
    if config_store and "url" in config_store:
        with admin(config_store["url"], Path(config_store["password_file"])) as db:
            db.execute(sql.replace("?", "%s").encode(), args)
        return
    import sqlite3
    with sqlite3.connect(sqlite_path) as db:
        db.execute(sql, args)
