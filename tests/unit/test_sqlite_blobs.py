"""Embedded blob store specifics (the file-based store that ships with the embedded SQLite backends)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from dsched.libs.blobs.base import BlobNotFound
from dsched.libs.blobs.files import FileBlobStore


@pytest.fixture
async def blobs(tmp_path: Path) -> AsyncIterator[FileBlobStore]:
    impl = FileBlobStore(tmp_path / "blobs")
    await impl.startup()
    try:
        yield impl
    finally:
        await impl.shutdown()


@pytest.mark.parametrize("key", ["", "/abs", "../escape", "a/../../b", "a//b", "a/", "./a", "a/.", ".tmp-x", "a/\x00b"])
async def test_keys_that_could_escape_the_root_are_rejected(blobs: FileBlobStore, key: str) -> None:
    with pytest.raises(ValueError):
        await blobs.put(key, b"x")
    with pytest.raises(ValueError):
        await blobs.get(key)
    with pytest.raises(ValueError):
        await blobs.delete(key)


async def test_slashes_make_directories_and_no_temp_files_remain(blobs: FileBlobStore, tmp_path: Path) -> None:
    await blobs.put("outputs/2030/run-1", b"out")
    await blobs.put("outputs/2030/run-1", b"out2")
    assert (tmp_path / "blobs" / "outputs" / "2030" / "run-1").read_bytes() == b"out2"
    assert sorted(p.name for p in (tmp_path / "blobs" / "outputs" / "2030").iterdir()) == ["run-1"]


async def test_a_directory_is_not_a_blob(blobs: FileBlobStore) -> None:
    await blobs.put("dir/child", b"x")
    with pytest.raises(BlobNotFound):
        await blobs.get("dir")
    with pytest.raises(BlobNotFound):
        await blobs.get("dir/child/grandchild")
