"""The work queue between pickers and workers (SQS's shape).

Semantics every implementation keeps:
- At-least-once delivery, no ordering guarantee (priority is a hint that implementations honour when they can).
- ``receive`` hides each returned message for ``visibility_s``; ``ack`` deletes it; a message neither acked nor
  extended becomes visible again when its visibility timeout ends, with ``receive_count`` incremented.
- A message received more than ``max_receives`` times is moved to the dead-letter store instead of delivered
  (SQS: redrive policy).
- Batch limits: ``receive`` returns at most 10 messages; ``send``/``ack``/``extend`` accept any number and
  split them into calls of at most 10.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass

MAX_BATCH = 10


@dataclass(frozen=True, slots=True)
class OutgoingMessage:
    body: bytes
    priority: int = 50  # 0..100, higher first when the implementation can order
    delay_s: float = 0.0


@dataclass(frozen=True, slots=True)
class ReceivedMessage:
    message_id: str
    receipt: str  # handle for ack/extend/nack; only valid for this delivery
    body: bytes
    receive_count: int


@dataclass(frozen=True, slots=True)
class QueueCounts:
    visible: int
    in_flight: int
    dead: int


class WorkQueue(ABC):
    @abstractmethod
    async def startup(self) -> None: ...

    @abstractmethod
    async def shutdown(self) -> None: ...

    @abstractmethod
    async def send(self, messages: Sequence[OutgoingMessage]) -> None:
        """Enqueue durably; returns when every message is accepted."""

    @abstractmethod
    async def receive(self, max_messages: int, wait_s: float, visibility_s: float) -> list[ReceivedMessage]:
        """Up to ``min(max_messages, 10)`` messages, waiting up to ``wait_s`` for the first (long poll)."""

    @abstractmethod
    async def ack(self, receipts: Sequence[str]) -> None:
        """Delete delivered messages. A stale receipt (message redelivered since) never raises; like SQS, it
        may or may not delete the message (the embedded queue ignores it), so redelivery must stay harmless."""

    @abstractmethod
    async def extend(self, receipts: Sequence[str], visibility_s: float) -> None:
        """Keep messages hidden for ``visibility_s`` more seconds from now (a long job's heartbeat)."""

    @abstractmethod
    async def nack(self, receipts: Sequence[str], delay_s: float = 0.0) -> None:
        """Make messages visible again after ``delay_s`` (handing them back, e.g. on shutdown)."""

    @abstractmethod
    async def dead_letters(self, max_messages: int) -> list[ReceivedMessage]:
        """Peek at messages moved to the dead-letter store by the redrive policy (not removed)."""

    @abstractmethod
    async def counts(self) -> QueueCounts:
        """Approximate numbers of visible, in-flight and dead-lettered messages."""

    async def take_dead_letters(self, max_messages: int, visibility_s: float) -> list[ReceivedMessage]:
        """Messages of the dead-letter store to settle (the worker records each as a failed run), up to
        ``min(max_messages, 10)``; each stays there until :meth:`delete_dead_letters` is called with its receipt.
        Implementations that can hide them for ``visibility_s`` do (SQS), so concurrent sweepers share the work;
        others may hand the same message to two sweepers, which the idempotent settling allows. A queue without
        a dead-letter store returns nothing."""
        return []

    async def delete_dead_letters(self, receipts: Sequence[str]) -> None:
        """Remove settled messages from the dead-letter store (receipts from :meth:`take_dead_letters`)."""
        return None
