"""The submissions log: an append-only, partitioned, keyed record log (Kafka's shape).

Semantics every implementation keeps:
- ``append`` returns only once every record is durable (Kafka: acknowledged by ``acks=all``).
- Records with the same key go to the same partition and are consumed in append order.
- A consumer group sees each record at least once; a record is consumed again after a crash unless its
  offset was committed. Commit after the side effects (the store write), never before.
- Partitions are independent: no ordering across keys.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass

WRITER_GROUP = "dsched-writer"  # the consumer group of the writers (ingestion asks how far behind it is)


@dataclass(frozen=True, slots=True)
class ConsumedRecord:
    partition: int
    offset: int
    key: str
    value: bytes
    timestamp_ms: int


@dataclass(frozen=True, slots=True)
class ConsumerLag:
    """How far a consumer group is behind the log, on the partitions this member reads.

    ``records``: appended but not yet committed by the group. ``oldest_ms``: append time of the oldest of them
    (None when ``records`` is 0, or when the implementation cannot tell cheaply).
    """

    records: int
    oldest_ms: int | None


class LogConsumer(ABC):
    """One member of a consumer group."""

    async def lag(self) -> ConsumerLag | None:
        """The group's lag behind the log (see :class:`ConsumerLag`); None if this implementation cannot tell."""
        return None

    @abstractmethod
    async def startup(self) -> None: ...

    @abstractmethod
    async def shutdown(self) -> None: ...

    @abstractmethod
    async def poll(self, max_records: int, timeout_s: float) -> list[ConsumedRecord]:
        """Up to ``max_records`` records after this member's position; waits up to ``timeout_s`` for the first.

        Within a partition, records come in offset order. Polling again without committing continues after
        the records already returned (the position is in memory); a restarted member resumes at the commit.
        """

    @abstractmethod
    async def commit(self, records: Sequence[ConsumedRecord]) -> None:
        """Mark ``records`` and everything before them in their partitions as consumed by the group."""

    @abstractmethod
    async def dead_letter(self, record: ConsumedRecord, reason: str) -> None:
        """Park a record that cannot be decoded so it never stalls its partition (Kafka: a DLQ topic)."""


class SubmissionLog(ABC):
    @abstractmethod
    async def startup(self) -> None: ...

    @abstractmethod
    async def shutdown(self) -> None: ...

    @abstractmethod
    async def append(self, records: Sequence[tuple[str, bytes]]) -> None:
        """Append ``(key, value)`` records; returns when all are durable. Raises if any could not be made so."""

    @abstractmethod
    def consumer(self, group: str) -> LogConsumer:
        """A new consumer-group member (call ``startup`` on it)."""

    @abstractmethod
    async def backlog(self, group: str) -> int:
        """Records appended and not yet committed by consumer group ``group``, over every partition (a group that
        never committed counts every record the log keeps). Asked from any process, without joining the group;
        a snapshot as of the call (records appended meanwhile may or may not count). Raises if the log does not
        answer."""
