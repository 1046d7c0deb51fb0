"""S3-specific blob store checks: key prefixes, concurrent bucket creation, a server that lost its bucket."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from dsched.libs.blobs.base import BlobNotFound
from dsched.libs.blobs.s3 import S3BlobStore
from dsched.libs.servers import MotoServer
from tests.helpers import backends


def _s3(endpoint: str, tmp_path: Path, bucket: str, prefix: str = "") -> S3BlobStore:
    url = f"s3://{bucket}/{prefix}?endpoint={endpoint}&region=us-east-1"
    return S3BlobStore.from_url(url, backends.test_settings(tmp_path, blobs_url=url))


@contextlib.asynccontextmanager
async def _started(*stores: S3BlobStore) -> AsyncIterator[None]:
    await asyncio.gather(*(s.startup() for s in stores))  # concurrent: both may try to create the bucket
    try:
        yield
    finally:
        for store in stores:
            await store.shutdown()


async def test_s3_prefixes_isolate_stores_sharing_a_bucket(moto_server: MotoServer, tmp_path: Path) -> None:
    bucket = backends.unique("b")
    a = _s3(moto_server.endpoint, tmp_path, bucket, "cluster-a")
    b = _s3(moto_server.endpoint, tmp_path, bucket, "cluster-b")
    async with _started(a, b):
        await a.put("k", b"from a")
        with pytest.raises(BlobNotFound):
            await b.get("k")
        await b.put("k", b"from b")
        assert await a.get("k") == b"from a"
        assert await b.get("k") == b"from b"
        await b.delete("k")
        assert await a.get("k") == b"from a"


@pytest.fixture(scope="module")
def own_moto() -> Iterator[MotoServer]:
    with MotoServer() as server:
        yield server


async def test_s3_recreates_its_bucket_after_the_server_lost_it(own_moto: MotoServer, tmp_path: Path) -> None:
    store = _s3(own_moto.endpoint, tmp_path, backends.unique("b"))
    async with _started(store):
        await store.put("k", b"before")
        await asyncio.to_thread(own_moto.reset)
        with pytest.raises(Exception):  # noqa: B017 (NoSuchBucket: the data is gone, and not silently)
            await store.get("k")
        await store.put("k", b"after")
        assert await store.get("k") == b"after"
