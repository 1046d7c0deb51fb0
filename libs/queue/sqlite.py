"""Embedded work queue: SQS semantics on one SQLite file.

``messages`` holds (id, body, priority, visible_at_ms, receive_count, receipt); a message is visible when
``visible_at_ms <= now``. ``receive`` hides what it returns until ``now + visibility`` and gives each delivery
a fresh random receipt ``"<id>:<nonce>"``; ack/extend/nack match id *and* nonce, so a receipt from an earlier
delivery does nothing. A message that would be delivered for the ``max_receives + 1``-th time is moved to
``dead_messages`` instead (SQS redrive policy). Receives take the highest priority first, then the longest
visible, then the oldest.

Throughput: every call of one process goes through one :class:`~dsched.libs.batching.Coalescer`: calls queue an
operation, and everything pending runs in one ``BEGIN IMMEDIATE`` transaction on the connection's thread (in
arrival order), then each caller resumes. Many concurrent receivers, senders and ackers therefore share
transactions and thread hops. Receives that find nothing visible do not take the write lock at all.

Durability: a transaction that contains a ``send`` commits with ``synchronous=FULL`` (the message is fsynced
before ``send`` returns); the others commit with ``NORMAL`` (a power cut may undo a receive or an ack, which
only means a redelivery, as at-least-once allows). Sends of this process wake its waiting receivers at once;
other processes sharing the file wake them through the file's doorbell (:mod:`dsched.libs.doorbell`: a process
whose receive waits listens, and every commit that may make messages visible rings the other listeners once), and
a waiting receive still looks every ``POLL_INTERVAL_S``, so a lost ring only costs that.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar, cast

from dsched.libs import clock
from dsched.libs.batching import Coalescer
from dsched.libs.doorbell import Doorbell
from dsched.libs.entropy import random_bytes
from dsched.libs.queue.base import (
    MAX_BATCH,
    OutgoingMessage,
    QueueCounts,
    ReceivedMessage,
    WorkQueue,
)
from dsched.libs.sqlite import Connection, SqliteDB, begin_immediate

T = TypeVar("T")

# How often a waiting receive looks anyway: sends ring the doorbell, so this catches a lost ring, a delayed message
# or an expired visibility timeout (long: each look is a thread hop and a transaction).
POLL_INTERVAL_S = 0.1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS messages (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    body BLOB NOT NULL,
    priority INTEGER NOT NULL,
    visible_at_ms INTEGER NOT NULL,
    receive_count INTEGER NOT NULL DEFAULT 0,
    receipt TEXT,
    sent_ms INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS messages_by_priority ON messages (priority DESC, visible_at_ms, id);
CREATE TABLE IF NOT EXISTS dead_messages (
    id INTEGER PRIMARY KEY,
    body BLOB NOT NULL,
    priority INTEGER NOT NULL,
    receive_count INTEGER NOT NULL,
    sent_ms INTEGER NOT NULL,
    dead_ms INTEGER NOT NULL
)
"""

_SELECT_VISIBLE = (
    "SELECT id, body, receive_count FROM messages WHERE visible_at_ms <= ? "
    "ORDER BY priority DESC, visible_at_ms, id LIMIT ?"
)

_DELETE = "DELETE FROM messages WHERE id = ? AND receipt = ?"

_Handle = tuple[int, str]  # (message id, delivery nonce) parsed from a receipt
_OpFn = Callable[[Connection, int], Any]


@dataclass(slots=True)
class _Op:
    fn: _OpFn  # runs inside the batch transaction with the batch's "now" (epoch ms)
    durable: bool = False  # needs an fsync before its caller is told it succeeded
    receive: bool = False
    wakes: bool = False  # may make messages visible: wake this process's waiting receivers


def _parse_receipts(receipts: Sequence[str]) -> list[_Handle]:
    handles = []
    for receipt in receipts:
        ident, sep, nonce = receipt.partition(":")
        if not sep or not ident.isdigit() or not nonce:
            raise ValueError(f"not a receipt of this queue: {receipt!r}")
        handles.append((int(ident), nonce))
    return handles


class SqliteQueue(WorkQueue):
    def __init__(self, path: Path, max_receives: int) -> None:
        if max_receives <= 0:
            raise ValueError("max_receives must be > 0")
        self.path = path
        self.max_receives = max_receives
        self._db = SqliteDB(path, synchronous="NORMAL", schema=_SCHEMA)
        self._ops: Coalescer[_Op, Any] = Coalescer(self._flush, on_abandoned=self._hand_back)
        self._running = False
        self._closing = False
        # Replaced whenever messages may have become visible; waiting receivers hold the current one.
        self._visible = asyncio.Event()
        # Other processes' sends and nacks ring it; it listens from this process's first waiting receive on.
        self._bell = Doorbell(path, self._wake_receivers)

    def _wake_receivers(self) -> None:
        woken, self._visible = self._visible, asyncio.Event()
        woken.set()

    async def startup(self) -> None:
        await self._db.open()
        self._closing = False
        self._running = True

    async def shutdown(self) -> None:
        self._closing = True
        await self._ops.drain()
        self._running = False
        self._bell.close()
        await self._db.close()

    # WorkQueue --------------------------------------------------------------------------------------------
    async def send(self, messages: Sequence[OutgoingMessage]) -> None:
        if not messages:
            return
        rows = [(m.body, m.priority, max(0, int(m.delay_s * 1000))) for m in messages]

        def send(conn: Connection, now: int) -> None:
            conn.executemany(
                "INSERT INTO messages (body, priority, visible_at_ms, sent_ms) VALUES (?, ?, ?, ?)",
                [(body, priority, now + delay_ms, now) for body, priority, delay_ms in rows],
            )

        await self._submit(_Op(send, durable=True, wakes=True))

    async def receive(self, max_messages: int, wait_s: float, visibility_s: float) -> list[ReceivedMessage]:
        limit = min(max_messages, MAX_BATCH)
        if limit <= 0:
            return []
        visibility_ms = max(0, int(visibility_s * 1000))
        max_receives = self.max_receives

        def receive(conn: Connection, now: int) -> list[ReceivedMessage]:
            return _receive(conn, now, limit, visibility_ms, max_receives)

        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait_s
        first = True
        while True:
            visible = self._visible  # taken before looking, so a send in between still wakes us
            if self._closing and not first:
                return []
            first = False
            messages = cast(list[ReceivedMessage], await self._submit(_Op(receive, receive=True)))
            if messages:
                return messages
            remaining = deadline - loop.time()
            if remaining <= 0:
                return []
            if not self._bell.listening:
                self._bell.listen()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(min(POLL_INTERVAL_S, remaining)):
                    await visible.wait()

    async def ack(self, receipts: Sequence[str]) -> None:
        handles = _parse_receipts(receipts)
        if handles:
            await self._submit(_Op(lambda conn, now: conn.executemany(_DELETE, handles)))

    async def extend(self, receipts: Sequence[str], visibility_s: float) -> None:
        handles = _parse_receipts(receipts)
        visibility_ms = max(0, int(visibility_s * 1000))

        def extend(conn: Connection, now: int) -> None:
            conn.executemany(
                "UPDATE messages SET visible_at_ms = ? WHERE id = ? AND receipt = ?",
                [(now + visibility_ms, ident, nonce) for ident, nonce in handles],
            )

        if handles:
            await self._submit(_Op(extend))

    async def nack(self, receipts: Sequence[str], delay_s: float = 0.0) -> None:
        handles = _parse_receipts(receipts)
        if handles:
            await self._submit(_Op(_nack_fn(handles, max(0, int(delay_s * 1000))), wakes=True))

    async def dead_letters(self, max_messages: int) -> list[ReceivedMessage]:
        def peek(conn: Connection) -> list[ReceivedMessage]:
            rows = conn.execute(
                "SELECT id, body, receive_count FROM dead_messages ORDER BY id LIMIT ?",
                (max(0, max_messages),),
            ).fetchall()
            return [ReceivedMessage(str(ident), "", bytes(body), count) for ident, body, count in rows]

        return await self._db.run(peek)

    async def take_dead_letters(self, max_messages: int, visibility_s: float) -> list[ReceivedMessage]:
        """The oldest dead messages, receipt ``"<id>:dead"`` (not hidden: the file has no room for it)."""
        found = await self.dead_letters(min(max_messages, MAX_BATCH))
        return [ReceivedMessage(m.message_id, f"{m.message_id}:dead", m.body, m.receive_count) for m in found]

    async def delete_dead_letters(self, receipts: Sequence[str]) -> None:
        idents = [(int(r.partition(":")[0]),) for r in receipts if r.partition(":")[0].isdigit()]
        if idents:
            await self._submit(
                _Op(lambda conn, now: conn.executemany("DELETE FROM dead_messages WHERE id = ?", idents))
            )

    async def counts(self) -> QueueCounts:
        def counts(conn: Connection) -> QueueCounts:
            now = clock.now_ms()
            visible, in_flight = conn.execute(
                "SELECT COALESCE(SUM(visible_at_ms <= ?), 0), "
                "COALESCE(SUM(visible_at_ms > ? AND receipt IS NOT NULL), 0) FROM messages",
                (now, now),
            ).fetchone()
            (dead,) = conn.execute("SELECT COUNT(*) FROM dead_messages").fetchone()
            return QueueCounts(visible=int(visible), in_flight=int(in_flight), dead=int(dead))

        return await self._db.run(counts)

    # Combiner ---------------------------------------------------------------------------------------------
    async def _submit(self, op: _Op) -> Any:
        if not self._running or self._closing:
            raise RuntimeError(f"queue {self.path} is not running")
        return await self._ops.submit(op)

    async def _flush(self, batch: list[_Op]) -> list[Any]:
        results = await self._db.run(lambda conn: _run_batch(conn, batch))
        if any(op.wakes for op in batch):
            self._wake_receivers()
            self._bell.ring()  # one datagram per other listening process, per commit
        return results

    def _hand_back(self, op: _Op, result: Any) -> None:
        """A receiver gave up after we hid its messages: make them visible now, not after the timeout."""
        if op.receive and result:
            handles = _parse_receipts([m.receipt for m in result])
            self._ops.submit(_Op(_nack_fn(handles, 0), wakes=True))  # nobody awaits it; a failure only delays


def _nack_fn(handles: list[_Handle], delay_ms: int) -> _OpFn:
    def nack(conn: Connection, now: int) -> None:
        conn.executemany(
            "UPDATE messages SET visible_at_ms = ?, receipt = NULL WHERE id = ? AND receipt = ?",
            [(now + delay_ms, ident, nonce) for ident, nonce in handles],
        )

    return nack


def _run_batch(conn: Connection, batch: list[_Op]) -> list[Any]:
    """Run ``batch`` in order in one transaction (none if it only receives and nothing is visible)."""
    now = clock.now_ms()
    if all(op.receive for op in batch):
        if conn.execute("SELECT 1 FROM messages WHERE visible_at_ms <= ? LIMIT 1", (now,)).fetchone() is None:
            return [[] for _ in batch]
    durable = any(op.durable for op in batch)
    if durable:
        conn.execute("PRAGMA synchronous=FULL")
    try:
        begin_immediate(conn)
        try:
            results = [op.fn(conn, now) for op in batch]
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")
    finally:
        if durable:
            conn.execute("PRAGMA synchronous=NORMAL")
    return results


def _receive(conn: Connection, now: int, limit: int, visibility_ms: int, max_receives: int) -> list[ReceivedMessage]:
    out: list[ReceivedMessage] = []
    while len(out) < limit:
        rows = conn.execute(_SELECT_VISIBLE, (now, limit - len(out))).fetchall()
        if not rows:
            break
        dead = [(ident,) for ident, _, count in rows if count >= max_receives]
        updates = []
        for ident, body, count in rows:
            if count >= max_receives:
                continue
            nonce = random_bytes(8).hex()
            updates.append((now + visibility_ms, count + 1, nonce, ident))
            out.append(ReceivedMessage(str(ident), f"{ident}:{nonce}", bytes(body), count + 1))
        if updates:
            conn.executemany(
                "UPDATE messages SET visible_at_ms = ?, receive_count = ?, receipt = ? WHERE id = ?", updates
            )
        if not dead:
            break  # fewer visible than asked for
        conn.executemany(
            "INSERT INTO dead_messages (id, body, priority, receive_count, sent_ms, dead_ms) "
            "SELECT id, body, priority, receive_count, sent_ms, ? FROM messages WHERE id = ?",
            [(now, ident) for (ident,) in dead],
        )
        conn.executemany("DELETE FROM messages WHERE id = ?", dead)
    return out
