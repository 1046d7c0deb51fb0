"""Blob store on Amazon S3 (or anything speaking its API: MinIO, LocalStack, moto), via aiobotocore.

URL: ``s3://bucket[/key-prefix][?endpoint=http://127.0.0.1:4566][&region=us-east-1][&prefix=key-prefix]``

- No ``endpoint``: AWS itself, credentials from the standard chain. With an ``endpoint`` and no
  ``AWS_ACCESS_KEY_ID``/``AWS_PROFILE`` in the environment, dummy credentials ``test``/``test`` are used, and
  requests use path-style addressing and only the checksums S3 requires (what emulators understand).
- The key prefix (URL path or ``prefix=``, not both) namespaces every key: ``prefix/key``.
- ``startup`` creates the bucket if it is missing (and ``put`` recreates it if it disappears later).

S3 gives the semantics of :mod:`libs.blobs.base` directly: a PUT is atomic (readers see the old object or the
new one) and strongly read-after-write consistent; DELETE of a missing key succeeds.
"""

from __future__ import annotations

import re
from collections.abc import AsyncGenerator, Callable
from contextlib import AsyncExitStack
from typing import IO, Any
from urllib.parse import parse_qsl, urlsplit

from botocore.exceptions import ClientError

from dsched.libs import logs
from dsched.libs.aws import create_client, default_region, error_code, start_client
from dsched.libs.blobs.base import BlobNotFound, BlobStore
from dsched.libs.errors import BackendConfigError
from dsched.libs.settings import Settings

__all__ = ["S3BlobStore", "S3Unavailable"]

logger = logs.get("blobs.s3")

_BUCKET = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")
_MISSING_KEY = {"NoSuchKey", "404", "NotFound"}
_MISSING_BUCKET = {"NoSuchBucket", "404", "NotFound"}


class S3Unavailable(ConnectionError):
    """The S3 endpoint could not be reached."""


class S3BlobStore(BlobStore):
    def __init__(
        self, bucket: str, *, prefix: str = "", endpoint: str | None = None, region: str = "us-east-1"
    ) -> None:
        if not _BUCKET.fullmatch(bucket) or ".." in bucket:
            raise BackendConfigError(f"S3 bucket name {bucket!r}: 3-63 lowercase letters, digits, '.', '-'")
        self.bucket = bucket
        self.prefix = prefix
        self.endpoint = endpoint
        self.region = region
        self._stack: AsyncExitStack | None = None
        self._client: Any = None

    @classmethod
    def from_url(cls, url: str, settings: Settings) -> S3BlobStore:
        """Parse ``s3://bucket[/prefix]?endpoint=…&region=…&prefix=…`` (see the module docstring)."""
        parts = urlsplit(url)
        if parts.scheme != "s3":
            raise BackendConfigError(f"S3 URL {url!r}: scheme must be s3://")
        if not parts.netloc:
            raise BackendConfigError(f"S3 URL {url!r}: expected s3://bucket?endpoint=…&region=…")
        params: dict[str, str] = {}
        for name, value in parse_qsl(parts.query, keep_blank_values=True):
            if name not in ("endpoint", "region", "prefix"):
                raise BackendConfigError(
                    f"S3 URL {url!r}: unknown parameter {name!r} (known: endpoint, prefix, region)"
                )
            params[name] = value
        path_prefix = parts.path.strip("/")
        if path_prefix and params.get("prefix"):
            raise BackendConfigError(f"S3 URL {url!r}: give the key prefix as the path or as prefix=, not both")
        prefix = (path_prefix or params.get("prefix", "")).strip("/")
        return cls(
            parts.netloc,
            prefix=f"{prefix}/" if prefix else "",
            endpoint=_endpoint(url, params.get("endpoint")),
            region=params.get("region") or default_region(),
        )

    # -- lifecycle

    async def startup(self) -> None:
        """Open the client and create the bucket if missing; :class:`S3Unavailable` if unreachable."""

        async def setup(client: Any) -> None:
            self._client = client
            await self._ensure_bucket()

        try:
            self._stack, self._client = await start_client(
                _create_client(self.endpoint, self.region),
                setup,
                what="S3",
                endpoint=self.endpoint,
                region=self.region,
                unavailable=S3Unavailable,
            )
        except BaseException:
            self._client = None
            raise

    async def shutdown(self) -> None:
        stack, self._stack = self._stack, None
        self._client = None
        if stack is not None:
            await stack.aclose()

    async def _ensure_bucket(self) -> None:
        try:
            await self._client.head_bucket(Bucket=self.bucket)
            return
        except ClientError as exc:
            if error_code(exc) not in _MISSING_BUCKET:
                raise
        kwargs: dict[str, Any] = {"Bucket": self.bucket}
        if self.region != "us-east-1":  # us-east-1 refuses an explicit LocationConstraint
            kwargs["CreateBucketConfiguration"] = {"LocationConstraint": self.region}
        try:
            await self._client.create_bucket(**kwargs)
            logger.info("s3_bucket_created", bucket=self.bucket)
        except ClientError as exc:
            if error_code(exc) != "BucketAlreadyOwnedByYou":  # created concurrently by another process
                raise

    # -- blobs

    async def put(self, key: str, data: bytes) -> None:
        """Write ``key`` atomically; a bucket that vanished (an emulator restarted) is recreated once."""
        await self._put_object(self._key(key), data, rewind=lambda: None)

    async def get(self, key: str) -> bytes:
        try:
            reply = await self._s3().get_object(Bucket=self.bucket, Key=self._key(key))
        except ClientError as exc:
            if error_code(exc) in _MISSING_KEY:
                raise BlobNotFound(key) from None
            raise
        async with reply["Body"] as stream:
            data: bytes = await stream.read()
        return data

    async def put_file(self, key: str, file: IO[bytes]) -> None:
        """One PUT whose body is read from ``file`` (from its current position) as it is sent."""
        start = file.tell()
        await self._put_object(self._key(key), file, rewind=lambda: file.seek(start))

    async def _put_object(self, full_key: str, body: bytes | IO[bytes], rewind: Callable[[], object]) -> None:
        """One PUT; a bucket that vanished (an emulator restarted) is recreated once, ``rewind`` readies the body
        to be sent again."""
        try:
            await self._s3().put_object(Bucket=self.bucket, Key=full_key, Body=body)
            return
        except ClientError as exc:
            if error_code(exc) != "NoSuchBucket":
                raise
        logger.warning("s3_bucket_missing", bucket=self.bucket)
        await self._ensure_bucket()
        rewind()
        await self._s3().put_object(Bucket=self.bucket, Key=full_key, Body=body)

    async def iter_chunks(self, key: str, chunk_bytes: int = 65536) -> AsyncGenerator[bytes, None]:
        """Streams the object's body (one GET; nothing but the current chunk is held in memory)."""
        try:
            reply = await self._s3().get_object(Bucket=self.bucket, Key=self._key(key))
        except ClientError as exc:
            if error_code(exc) in _MISSING_KEY:
                raise BlobNotFound(key) from None
            raise
        async with reply["Body"] as stream:
            while chunk := await stream.read(chunk_bytes):
                yield chunk

    async def delete(self, key: str) -> None:
        await self._s3().delete_object(Bucket=self.bucket, Key=self._key(key))

    def _s3(self) -> Any:
        if self._client is None:
            raise RuntimeError(f"S3 blob store {self.bucket} is not started")
        return self._client

    def _key(self, key: str) -> str:
        if not key or "\x00" in key:
            raise ValueError(f"invalid blob key {key!r}")
        return self.prefix + key


def _endpoint(url: str, value: str | None) -> str | None:
    if not value:
        return None
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise BackendConfigError(f"S3 URL {url!r}: endpoint must be http(s)://host:port, got {value!r}")
    try:
        parts.port  # noqa: B018 (validates the port)
    except ValueError:
        raise BackendConfigError(f"S3 URL {url!r}: bad port in endpoint {value!r}") from None
    return value.rstrip("/")


def _create_client(endpoint: str | None, region: str) -> Any:
    if not endpoint:
        return create_client("s3", endpoint, region)
    # Emulators: bucket in the path (no bucket.host DNS), and no optional CRC checksums older ones reject.
    return create_client(
        "s3",
        endpoint,
        region,
        s3={"addressing_style": "path"},
        request_checksum_calculation="when_required",
        response_checksum_validation="when_required",
    )
