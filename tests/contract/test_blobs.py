"""Blob store contract (S3's shape): atomic put/overwrite, get, delete; every backend must pass these."""

from __future__ import annotations

import asyncio
import os

import pytest

from dsched.libs.blobs.base import BlobNotFound, BlobStore


async def test_put_then_get_returns_the_bytes(blobs: BlobStore) -> None:
    await blobs.put("payloads/job-1", b"hello")
    assert await blobs.get("payloads/job-1") == b"hello"


async def test_put_overwrites_an_existing_key(blobs: BlobStore) -> None:
    await blobs.put("k", b"old value, longer than the new one")
    await blobs.put("k", b"new")
    assert await blobs.get("k") == b"new"


async def test_get_of_a_missing_key_raises_blob_not_found(blobs: BlobStore) -> None:
    with pytest.raises(BlobNotFound):
        await blobs.get("never/written")
    # BlobNotFound is a KeyError, so `except KeyError` callers work too.
    with pytest.raises(KeyError):
        await blobs.get("never/written")


async def test_delete_removes_the_key_and_deleting_a_missing_key_is_fine(blobs: BlobStore) -> None:
    await blobs.put("outputs/run-1", b"x")
    await blobs.delete("outputs/run-1")
    with pytest.raises(BlobNotFound):
        await blobs.get("outputs/run-1")
    await blobs.delete("outputs/run-1")
    await blobs.delete("never/written")


async def test_binary_and_empty_data_round_trip_exactly(blobs: BlobStore) -> None:
    data = bytes(range(256)) * 64 + os.urandom(1024)
    await blobs.put("bin", data)
    await blobs.put("empty", b"")
    assert await blobs.get("bin") == data
    assert await blobs.get("empty") == b""


async def test_keys_are_independent(blobs: BlobStore) -> None:
    await asyncio.gather(*(blobs.put(f"many/{i}", str(i).encode()) for i in range(10)))
    got = await asyncio.gather(*(blobs.get(f"many/{i}") for i in range(10)))
    assert got == [str(i).encode() for i in range(10)]


async def test_a_concurrent_reader_sees_old_or_new_bytes_never_a_mix(blobs: BlobStore) -> None:
    old, new = b"a" * 200_000, b"b" * 200_000
    await blobs.put("atomic", old)

    async def read_while_writing() -> set[bytes]:
        seen = set()
        for _ in range(10):
            seen.add(await blobs.get("atomic"))
        return seen

    _, seen = await asyncio.gather(blobs.put("atomic", new), read_while_writing())
    assert seen <= {old, new}
    assert await blobs.get("atomic") == new
