"""Blob store for large payloads and run outputs (S3's shape).

- ``put`` is atomic: a reader sees the old bytes or the new ones, never a mix. Overwriting a key is allowed.
- ``get`` of a missing key raises :class:`BlobNotFound`.
- ``delete`` of a missing key is not an error.
"""

from __future__ import annotations

from abc import ABC, abstractmethod


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
