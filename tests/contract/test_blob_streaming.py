"""put_file / iter_chunks on every blob store: the streaming paths run outputs use."""

from __future__ import annotations

import io

import pytest

from dsched.libs.blobs.base import BlobNotFound, BlobStore


async def test_put_file_stores_the_rest_of_the_file(blobs: BlobStore) -> None:
    data = bytes(range(256)) * 1000
    source = io.BytesIO(b"skipped" + data)
    source.seek(len(b"skipped"))
    await blobs.put_file("outputs/stream-1", source)
    assert await blobs.get("outputs/stream-1") == data


async def test_iter_chunks_returns_the_blob_in_bounded_chunks(blobs: BlobStore) -> None:
    data = b"0123456789" * 10_000
    await blobs.put("outputs/stream-2", data)
    chunks = [chunk async for chunk in blobs.iter_chunks("outputs/stream-2", 4096)]
    assert b"".join(chunks) == data
    assert all(0 < len(chunk) <= 4096 for chunk in chunks)
    await blobs.put("outputs/stream-empty", b"")
    assert [chunk async for chunk in blobs.iter_chunks("outputs/stream-empty")] == []


async def test_iter_chunks_of_a_missing_key_raises_before_any_chunk(blobs: BlobStore) -> None:
    chunks = blobs.iter_chunks("outputs/missing")
    with pytest.raises(BlobNotFound):
        await anext(chunks)
