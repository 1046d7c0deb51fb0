"""Coordination: a small key-value store with leases and watches (etcd's shape).

Semantics every implementation keeps:
- A lease lives ``ttl_s`` after its last successful ``keepalive``; when it expires, every key attached to it
  is deleted. ``keepalive`` of an expired or revoked lease returns False (the holder has lost it).
- ``create`` writes a key only if absent (etcd txn on ``create_revision == 0``): the basis of leader election.
- ``put_if`` writes only while ``guard_key`` holds ``guard_value`` (a deposed leader cannot write).
- Writing with an expired or revoked lease raises :class:`LeaseNotFound`.
- ``watch_prefix`` yields an event for every change under a prefix made after it started, in order, and
  coalesces nothing it cannot re-read: after an event, ``get_prefix`` shows at least that change.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import AsyncIterator
from dataclasses import dataclass


class LeaseNotFound(LookupError):
    """A write named a lease that has expired or been revoked (etcd: "requested lease not found")."""


class WatchCompacted(RuntimeError):
    """A watcher fell so far behind that the changes it had not read were pruned."""


@dataclass(frozen=True, slots=True)
class WatchEvent:
    key: str
    value: bytes | None  # None: deleted (or expired with its lease)


class Coordination(ABC):
    @abstractmethod
    async def startup(self) -> None: ...

    @abstractmethod
    async def shutdown(self) -> None: ...

    @abstractmethod
    async def grant_lease(self, ttl_s: float) -> int: ...

    @abstractmethod
    async def keepalive(self, lease_id: int) -> bool:
        """Refresh a lease for another TTL. False if it has already expired or been revoked."""

    @abstractmethod
    async def revoke(self, lease_id: int) -> None:
        """End a lease now, deleting its keys. Revoking an unknown lease is not an error."""

    @abstractmethod
    async def create(self, key: str, value: bytes, lease_id: int | None = None) -> bool:
        """Write ``key`` only if it does not exist; True if this call wrote it."""

    @abstractmethod
    async def put(self, key: str, value: bytes, lease_id: int | None = None) -> None: ...

    @abstractmethod
    async def put_if(self, guard_key: str, guard_value: bytes, key: str, value: bytes) -> bool:
        """Write ``key`` only if ``guard_key`` currently holds ``guard_value``; True if written."""

    @abstractmethod
    async def get(self, key: str) -> bytes | None: ...

    @abstractmethod
    async def get_prefix(self, prefix: str) -> dict[str, bytes]: ...

    @abstractmethod
    async def delete(self, key: str) -> None: ...

    @abstractmethod
    def watch_prefix(self, prefix: str) -> AsyncIterator[WatchEvent]:
        """Changes under ``prefix`` from now on, until the iterator is closed."""
