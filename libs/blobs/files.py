"""Embedded blob store: one file per key under a root directory.

A key maps to the relative path ``root/<key>``; ``/`` in a key makes subdirectories. A key may therefore not
be both a blob and a "directory" of other blobs (``a`` and ``a/b``): the second put fails with an OSError.
Writes go to a hidden temp file in the target directory, are fsynced, then renamed over the key (atomic on
POSIX), and the directory is fsynced so the rename itself survives a power cut.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import tempfile
from collections.abc import AsyncGenerator
from pathlib import Path
from typing import IO

from dsched.libs.blobs.base import BlobNotFound, BlobStore

_TEMP_PREFIX = ".tmp-"


class FileBlobStore(BlobStore):
    def __init__(self, root: Path) -> None:
        self.root = root

    async def startup(self) -> None:
        await asyncio.to_thread(self.root.mkdir, parents=True, exist_ok=True)

    async def shutdown(self) -> None:
        return None

    async def put(self, key: str, data: bytes) -> None:
        await asyncio.to_thread(_put, self._path(key), data)

    async def get(self, key: str) -> bytes:
        path = self._path(key)
        try:
            return await asyncio.to_thread(path.read_bytes)
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            raise BlobNotFound(key) from None

    async def put_file(self, key: str, file: IO[bytes]) -> None:
        await asyncio.to_thread(_put, self._path(key), file)

    async def iter_chunks(self, key: str, chunk_bytes: int = 65536) -> AsyncGenerator[bytes, None]:
        """Reads the file a chunk at a time (an atomic ``put`` replaces the file, so an open reader keeps
        reading the version it opened)."""
        path = self._path(key)
        try:
            f = await asyncio.to_thread(path.open, "rb")
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            raise BlobNotFound(key) from None
        try:
            while chunk := await asyncio.to_thread(f.read, chunk_bytes):
                yield chunk
        finally:
            f.close()

    async def delete(self, key: str) -> None:
        path = self._path(key)
        with contextlib.suppress(FileNotFoundError, NotADirectoryError):
            await asyncio.to_thread(path.unlink)

    def _path(self, key: str) -> Path:
        """The file of ``key``; ValueError for a key that could escape the root or names no file.

        Rejected: empty, absolute, ``.``/``..`` or empty segments, NUL, and segments starting with the temp
        prefix ``.tmp-`` (reserved for in-progress writes).
        """
        segments = key.split("/")
        if "\x00" in key or any(s in ("", ".", "..") or s.startswith(_TEMP_PREFIX) for s in segments):
            raise ValueError(f"invalid blob key {key!r}")
        return self.root.joinpath(*segments)


def _put(path: Path, data: bytes | IO[bytes]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=_TEMP_PREFIX, dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            if isinstance(data, bytes):
                f.write(data)
            else:
                shutil.copyfileobj(data, f, 1024 * 1024)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
