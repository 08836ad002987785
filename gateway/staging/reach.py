"""Which hosts http(s) staging may reach: a task's URL is the client's choice, the connection is
the gateway's, so a URL must not turn the gateway into a way into its own network.

A host is reached only at public addresses (`ipaddress` calls them global: not loopback, private,
link-local, shared or reserved), unless `[staging.http] allow_hosts` names it (`data.example.org`,
or `*.example.org` for its subdomains) or an address range it resolves into (`10.1.0.0/16`,
`127.0.0.1`). The check is made on the addresses the connection is opened to (the resolver hands
aiohttp only the allowed ones, so a name cannot resolve one way for the check and another for the
connection), on IP literals in URLs, and on every redirect.
"""
from __future__ import annotations

import ipaddress
import socket
from collections.abc import Sequence
from typing import Any

import aiohttp
from aiohttp.abc import AbstractResolver, ResolveResult
from yarl import URL

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


class Refused(OSError):
    """A host the policy does not let staging reach (a final failure, never retried)."""


def split(entries: Sequence[str]) -> tuple[tuple[str, ...], tuple[Network, ...]]:
    """`allow_hosts` as host names (lower case; `*.` kept) and address ranges. ValueError names an
    entry that is neither."""
    names: list[str] = []
    networks: list[Network] = []
    for entry in entries:
        try:
            networks.append(ipaddress.ip_network(entry, strict=False))
        except ValueError:
            if "/" in entry or ":" in entry:
                raise ValueError(f"{entry!r} is neither a host name nor an IP address or network") from None
            names.append(entry.lower().rstrip("."))
    return tuple(names), tuple(networks)


class Reach:
    """The policy of `[staging.http] allow_hosts`."""

    def __init__(self, allow_hosts: Sequence[str]) -> None:
        self.names, self.networks = split(allow_hosts)

    def named(self, host: str) -> bool:
        """Whether `allow_hosts` names `host` (then any of its addresses will do)."""
        host = host.lower().rstrip(".")
        return any(host == name or (name.startswith("*.") and host.endswith(name[1:])) for name in self.names)

    def address_allowed(self, address: str) -> bool:
        ip = ipaddress.ip_address(address.split("%")[0])  # an IPv6 zone index is no part of the address
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        return ip.is_global or any(ip in network for network in self.networks)

    def check_url(self, url: str) -> None:
        """Refuse a URL whose host is an IP address out of reach (names are checked as they resolve)."""
        host = URL(url).host or ""
        try:
            ipaddress.ip_address(host.split("%")[0])
        except ValueError:
            return
        if not self.named(host) and not self.address_allowed(host):
            raise Refused(f"{host} is not a public address, and [staging.http] allow_hosts does not name it")

    def resolver(self) -> AbstractResolver:
        return _Resolver(self)


class _Resolver(AbstractResolver):
    """aiohttp's threaded resolver, answering only the addresses the policy allows."""

    def __init__(self, reach: Reach) -> None:
        self.reach = reach
        self.inner = aiohttp.ThreadedResolver()

    async def resolve(self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
                      ) -> list[ResolveResult]:
        found = await self.inner.resolve(host, port, family)
        if self.reach.named(host):
            return found
        kept = [address for address in found if self.reach.address_allowed(address["host"])]
        if not kept:
            shown = ", ".join(sorted({address["host"] for address in found}))
            raise Refused(f"{host} resolves to {shown}, not a public address, and [staging.http] allow_hosts "
                          "does not name it")
        return kept

    async def close(self) -> None:
        await self.inner.close()


def refusal(exc: BaseException) -> Refused | None:
    """The policy's refusal behind an aiohttp connection error, if that is what it is."""
    seen: Any = exc
    for _ in range(4):
        if isinstance(seen, Refused):
            return seen
        seen = getattr(seen, "os_error", None) or seen.__cause__
        if seen is None:
            return None
    return None
