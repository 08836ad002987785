"""Which hosts http(s) staging reaches (gateway/staging/reach.py), against a real HTTP server on
this machine's loopback address: refused by default, reached when `[staging.http] allow_hosts`
names the host or its address range, redirects checked like the first URL."""
from __future__ import annotations

import re
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aiohttp import web

from gateway import config as configuration
from gateway.staging.http import Http
from gateway.staging.runner import Budget, StagingError


@pytest.fixture
async def server() -> AsyncIterator[str]:
    """http://127.0.0.1:PORT: /data answers b"payload", /hop redirects to the URL in ?to= (else to
    itself)."""
    async def data(_: web.Request) -> web.Response:
        return web.Response(body=b"payload")

    async def hop(request: web.Request) -> web.Response:
        raise web.HTTPFound(request.query.get("to", "/hop"))

    app = web.Application()
    app.add_routes([web.get("/data", data), web.get("/hop", hop)])
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    yield f"http://127.0.0.1:{port}"
    await runner.cleanup()


def http(tmp_path: Path, allow_hosts: list[str] | None = None) -> Http:
    staging: dict[str, object] = {"http": {"allow_hosts": allow_hosts}} if allow_hosts is not None else {}
    return Http(configuration.from_document({"staging": staging}, tmp_path, "t").sections.staging)


async def fetch(client: Http, url: str, target: Path) -> bytes:
    try:
        await client.fetch(url, target, Budget(0))
    finally:
        await client.close()
    return target.read_bytes()


async def test_loopback_is_refused_by_default_by_address_and_by_name(server: str, tmp_path: Path) -> None:
    for url in (f"{server}/data", server.replace("127.0.0.1", "localhost") + "/data"):
        with pytest.raises(StagingError, match=re.escape("not a public address, and [staging.http] "
                                                         "allow_hosts does not name it")) as refused:
            await fetch(http(tmp_path), url, tmp_path / "in")
        assert not refused.value.passing  # final: no retries
        assert not (tmp_path / "in").exists()


async def test_allow_hosts_names_or_ranges(server: str, tmp_path: Path) -> None:
    named = server.replace("127.0.0.1", "localhost") + "/data"
    assert await fetch(http(tmp_path, ["LOCALHOST"]), named, tmp_path / "a") == b"payload"
    assert await fetch(http(tmp_path, ["127.0.0.0/8"]), named, tmp_path / "b") == b"payload"
    assert await fetch(http(tmp_path, ["127.0.0.1"]), f"{server}/data", tmp_path / "c") == b"payload"
    with pytest.raises(StagingError, match="not a public address"):
        await fetch(http(tmp_path, ["10.0.0.0/8", "*.example.org"]), f"{server}/data", tmp_path / "d")


async def test_redirects_are_checked_like_the_first_url(server: str, tmp_path: Path) -> None:
    named = server.replace("127.0.0.1", "localhost")
    # allowed by name, then sent to an address nobody allowed
    with pytest.raises(StagingError, match=re.escape("127.0.0.1 is not a public address")):
        await fetch(http(tmp_path, ["localhost"]), f"{named}/hop?to={server}/data", tmp_path / "a")
    # a redirect within reach is followed
    assert await fetch(http(tmp_path, ["127.0.0.1", "localhost"]), f"{named}/hop?to={server}/data",
                       tmp_path / "b") == b"payload"
    with pytest.raises(StagingError, match="more than 10 redirects"):
        await fetch(http(tmp_path, ["127.0.0.1"]), f"{server}/hop", tmp_path / "c")


async def test_outputs_are_not_sent_out_of_reach(server: str, tmp_path: Path) -> None:
    source = tmp_path / "out.txt"
    source.write_bytes(b"result")
    client = http(tmp_path)
    try:
        with pytest.raises(StagingError, match=re.escape("127.0.0.1 is not a public address")):
            await client.send(source, 6, f"{server}/data")
    finally:
        await client.close()


@pytest.mark.parametrize("entry", ["10.0.0.0/33", "fe80::/200", "a/b"])
def test_a_bad_entry_stops_the_start_with_its_path(tmp_path: Path, entry: str) -> None:
    with pytest.raises(configuration.ConfigError, match=r"\$\.staging\.http\.allow_hosts\[1\]: .* is neither a host "
                                                        r"name nor an IP address or network"):
        configuration.from_document({"staging": {"http": {"allow_hosts": ["ok.example.org", entry]}}}, tmp_path, "t")
