"""s3://bucket/key through aiobotocore (`[staging.s3]`, else the standard AWS environment and files).

aiobotocore is botocore (the AWS SDK's own request signing, credential chain, regions and error
codes) on aiohttp, which the gateway already runs on: transfers stream in the event loop without
threads. Downloads stream the object's body in chunks; uploads of files larger than one part are
multipart uploads of `part_bytes` parts, aborted when anything fails, so no partial object ever
appears, and at most one part is in memory at a time. botocore's own retries are off: the runner
retries, with the site's backoff. A DIRECTORY input is every object under `key/`. aiobotocore and
botocore are imported when the first S3 transfer starts (or fails): a gateway that never stages
from S3 does not load them.
"""
from __future__ import annotations

import asyncio
import contextlib
import re
from pathlib import Path
from typing import Any

from ..config import StagingSettings
from . import local
from .runner import Budget, StagingError

CHUNK = 1 << 20
#: Error codes worth another try (S3's throttling and its own failures).
PASSING = {"SlowDown", "RequestTimeout", "InternalError", "ServiceUnavailable", "Throttling", "RequestTimeTooSkewed"}
BUCKET = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")


def split(url: str) -> tuple[str, str]:
    """The bucket and key of an s3:// URL (the key may be empty); ValueError when it is not one.

    >>> split("s3://my-bucket/a/b.txt"), split("s3://my-bucket")
    (('my-bucket', 'a/b.txt'), ('my-bucket', ''))
    """
    if not url.startswith("s3://"):
        raise ValueError("an S3 URL starts with s3://")
    bucket, _, key = url[len("s3://"):].partition("/")
    if not BUCKET.fullmatch(bucket):
        raise ValueError(f"{bucket!r} is not an S3 bucket name (3 to 63 of a-z, 0-9, '.' and '-')")
    return bucket, key


class S3:
    """One S3 client for all of the gateway's S3 transfers, made on first use."""

    def __init__(self, settings: StagingSettings) -> None:
        self.settings = settings
        self._client: Any = None
        self._stack = contextlib.AsyncExitStack()
        self._lock = asyncio.Lock()

    async def _get(self) -> Any:
        async with self._lock:
            if self._client is None:
                from aiobotocore.config import AioConfig
                from aiobotocore.session import AioSession

                s3 = self.settings.s3
                config = AioConfig(s3={"addressing_style": s3.addressing_style},
                                   retries={"total_max_attempts": 1, "mode": "standard"},
                                   connect_timeout=self.settings.connect_timeout,
                                   read_timeout=self.settings.connect_timeout,
                                   max_pool_connections=max(10, self.settings.parallel * 2))
                session = AioSession(profile=s3.profile)
                self._client = await self._stack.enter_async_context(session.create_client(
                    "s3", endpoint_url=s3.endpoint_url, region_name=s3.region, aws_access_key_id=s3.access_key_id,
                    aws_secret_access_key=s3.secret_access_key, config=config))
            return self._client

    async def listing(self, url: str) -> list[tuple[str, str]]:
        """(relative path, URL) of every object under the folder `url` (a prefix), sorted."""
        bucket, key = split(url)
        prefix = key.rstrip("/") + "/" if key.strip("/") else ""
        found = []
        try:
            client = await self._get()
            async for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
                for item in page.get("Contents", []):
                    relative = item["Key"][len(prefix):]
                    if relative and not relative.endswith("/"):  # "folder" markers have no content
                        found.append((relative, f"s3://{bucket}/{item['Key']}"))
        except _errors() as exc:
            raise _failure(exc) from None
        return sorted(found)

    async def fetch(self, url: str, target: Path, budget: Budget) -> int:
        """Download the object `url` into `target`; answers the bytes written."""
        bucket, key = split(url)
        try:
            client = await self._get()
            answer = await client.get_object(Bucket=bucket, Key=key)
            expected = int(answer["ContentLength"])
            budget.check(expected)
            size = 0
            async with answer["Body"] as body, local.writing(target) as out:
                async for chunk in body.iter_chunks(CHUNK):
                    budget.take(len(chunk))
                    size += len(chunk)
                    await out.write(chunk)
            if size != expected:
                raise StagingError(f"the server sent {size} of {expected} bytes", passing=True)
            return size
        except _errors() as exc:
            raise _failure(exc) from None

    async def send(self, source: Path, size: int, url: str) -> None:
        """Upload the file `source` (of `size` bytes) as the object `url`."""
        bucket, key = split(url)
        part_bytes = self.settings.s3.part_bytes
        try:
            client = await self._get()
            with local.open_file(source) as handle:
                if size <= part_bytes:
                    await client.put_object(Bucket=bucket, Key=key, Body=await asyncio.to_thread(handle.read))
                    return
                upload = (await client.create_multipart_upload(Bucket=bucket, Key=key))["UploadId"]
                try:
                    parts: list[dict[str, Any]] = []
                    while chunk := await asyncio.to_thread(handle.read, part_bytes):
                        number = len(parts) + 1
                        answer = await client.upload_part(Bucket=bucket, Key=key, UploadId=upload,
                                                          PartNumber=number, Body=chunk)
                        parts.append({"PartNumber": number, "ETag": answer["ETag"]})
                    await client.complete_multipart_upload(Bucket=bucket, Key=key, UploadId=upload,
                                                           MultipartUpload={"Parts": parts})
                except BaseException:
                    with contextlib.suppress(Exception):
                        await asyncio.shield(client.abort_multipart_upload(Bucket=bucket, Key=key, UploadId=upload))
                    raise
        except _errors() as exc:
            raise _failure(exc) from None

    async def close(self) -> None:
        await self._stack.aclose()
        self._client = None


def _errors() -> tuple[type[Exception], ...]:
    """What botocore raises (an `except` clause evaluates this only when something was raised)."""
    from botocore.exceptions import BotoCoreError, ClientError

    return ClientError, BotoCoreError


def _failure(exc: Exception) -> StagingError:
    from botocore.exceptions import ClientError, NoCredentialsError

    if isinstance(exc, NoCredentialsError):
        return StagingError("no S3 credentials: set [staging.s3] access_key_id and secret_access_key, "
                            "or the standard AWS environment")
    if isinstance(exc, ClientError):
        error = exc.response.get("Error", {})
        status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
        code = str(error.get("Code", status))
        message = str(error.get("Message") or "").strip()
        return StagingError(f"S3 {code}" + (f": {message}" if message else ""),
                            passing=code in PASSING or status >= 500)
    return StagingError(f"{type(exc).__name__}: {exc}", passing=True)
