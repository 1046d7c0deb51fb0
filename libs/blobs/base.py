"""Blob store for large payloads and run outputs (S3's shape).

- ``put`` is atomic: a reader sees the old bytes or the new ones, never a mix. Overwriting a key is allowed.
- ``get`` of a missing key raises :class:`BlobNotFound`.
- ``delete`` of a missing key is not an error.
- ``put_file`` and ``iter_chunks`` are ``put`` and ``get`` without holding the whole blob in memory where the
  implementation can (the embedded file store streams both ways; the defaults read the whole blob).
"""

from __future__ import annotations

import asyncio
from abc import ABC, abstractmethod
from collections.abc import AsyncGenerator
from typing import IO


class BlobNotFound(KeyError):
    pass


class BlobStore(ABC):
    @abstractmethod
    async def startup(self) -> None: ...

    @abstractmethod
    async def shutdown(self) -> None: ...

    @abstractmethod
    async def put(self, key: str, data: bytes) -> None: ...

    @abstractmethod
    async def get(self, key: str) -> bytes: ...

    @abstractmethod
    async def delete(self, key: str) -> None: ...

    async def put_file(self, key: str, file: IO[bytes]) -> None:
        """Store the rest of ``file`` (from its current position) under ``key``, atomically like ``put``."""
        await self.put(key, await asyncio.to_thread(file.read))

    async def iter_chunks(self, key: str, chunk_bytes: int = 65536) -> AsyncGenerator[bytes, None]:
        """The blob's bytes, in chunks of at most ``chunk_bytes`` (none for an empty blob).

        A missing key raises :class:`BlobNotFound` from the first ``__anext__``, before any chunk.
        """
        data = await self.get(key)
        for start in range(0, len(data), chunk_bytes):
            yield data[start : start + chunk_bytes]
