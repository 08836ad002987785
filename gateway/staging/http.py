"""http:// and https://: inputs fetched with GET, outputs sent with PUT (`[staging.http] allow_put`).

Bodies stream in chunks both ways (aiohttp reads a file body off the event loop). A 5xx or 429
answer, a broken connection or a timeout is a passing failure, worth another try; other answers
(404, 403...) are final. No directories: HTTP has no listing. Only the hosts `reach` allows are
connected to; a GET follows at most MAX_REDIRECTS redirects, each checked the same way.
"""
from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
from yarl import URL

from ..config import StagingSettings
from . import local
from .reach import Reach, Refused, refusal
from .runner import Budget, StagingError

CHUNK = 1 << 20
MAX_REDIRECTS = 10
REDIRECTS = (301, 302, 303, 307, 308)


class Http:
    """One client session for all of the gateway's HTTP transfers."""

    def __init__(self, settings: StagingSettings) -> None:
        self.settings = settings
        self.reach = Reach(settings.http.allow_hosts)
        self._session: aiohttp.ClientSession | None = None

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None:
            timeout = aiohttp.ClientTimeout(total=None, connect=self.settings.connect_timeout,
                                            sock_read=self.settings.connect_timeout)
            connector = aiohttp.TCPConnector(resolver=self.reach.resolver())
            self._session = aiohttp.ClientSession(timeout=timeout, auto_decompress=False, connector=connector)
        return self._session

    @contextlib.asynccontextmanager
    async def _get(self, url: str) -> AsyncIterator[aiohttp.ClientResponse]:
        """GET `url`, following redirects to hosts within reach."""
        for _ in range(MAX_REDIRECTS + 1):
            self.reach.check_url(url)
            async with self._client().get(url, allow_redirects=False) as response:
                location = response.headers.get("Location")
                if response.status not in REDIRECTS or location is None:
                    yield response
                    return
                url = str(URL(url).join(URL(location)))
        raise StagingError(f"more than {MAX_REDIRECTS} redirects")

    async def fetch(self, url: str, target: Path, budget: Budget) -> int:
        """GET `url` into `target`; answers the bytes written."""
        try:
            async with self._get(url) as response:
                _check(response)
                if response.content_length is not None:
                    budget.check(response.content_length)
                size = 0
                async with local.writing(target) as out:
                    async for chunk in response.content.iter_chunked(CHUNK):
                        budget.take(len(chunk))
                        size += len(chunk)
                        await out.write(chunk)
                if response.content_length is not None and size != response.content_length:
                    raise StagingError(f"the server sent {size} of {response.content_length} bytes", passing=True)
                return size
        except (TimeoutError, aiohttp.ClientError, Refused) as exc:
            raise _failure(exc) from None

    async def send(self, source: Path, size: int, url: str) -> None:
        """PUT the file `source` (of `size` bytes) to `url`."""
        with local.open_file(source) as body:
            try:
                self.reach.check_url(url)
                async with self._client().put(url, data=body, headers={"Content-Length": str(size)}) as response:
                    _check(response)
            except (TimeoutError, aiohttp.ClientError, Refused) as exc:
                raise _failure(exc) from None

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()


def _check(response: aiohttp.ClientResponse) -> None:
    if response.status >= 300:
        raise StagingError(f"HTTP {response.status} {response.reason or ''}".rstrip(),
                           passing=response.status >= 500 or response.status == 429)


def _failure(exc: BaseException) -> StagingError:
    refused = refusal(exc)
    if refused is not None:
        return StagingError(f"not fetched or sent: {refused}")
    if isinstance(exc, aiohttp.InvalidURL):
        return StagingError(f"not a valid URL: {exc}")
    if isinstance(exc, TimeoutError):
        return StagingError("no answer in time ([staging] connect_timeout)", passing=True)
    return StagingError(f"{type(exc).__name__}: {exc}".rstrip(": "), passing=True)
