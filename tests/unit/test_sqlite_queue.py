"""Embedded queue specifics: priority order, several processes on one file, hand-back, durability."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from dsched.libs.queue.base import OutgoingMessage, ReceivedMessage
from dsched.libs.queue.sqlite import SqliteQueue


@pytest.fixture
async def queue(tmp_path: Path) -> AsyncIterator[SqliteQueue]:
    q = SqliteQueue(tmp_path / "queue.db", max_receives=3)
    await q.startup()
    try:
        yield q
    finally:
        await q.shutdown()


async def drain(queue: SqliteQueue, n: int) -> list[ReceivedMessage]:
    got: list[ReceivedMessage] = []
    for _ in range(50):
        if len(got) >= n:
            break
        got += await queue.receive(10, wait_s=0.5, visibility_s=30)
    return got


async def test_higher_priority_is_received_first_then_oldest_first(queue: SqliteQueue) -> None:
    await queue.send([OutgoingMessage(f"low-{i}".encode(), priority=10) for i in range(3)])
    await queue.send([OutgoingMessage(b"high", priority=90), OutgoingMessage(b"mid", priority=50)])
    got = await drain(queue, 5)
    assert [m.body for m in got] == [b"high", b"mid", b"low-0", b"low-1", b"low-2"]


async def test_a_waiting_receiver_is_woken_by_a_send_at_once(queue: SqliteQueue) -> None:
    loop = asyncio.get_running_loop()
    waiter = asyncio.create_task(queue.receive(10, wait_s=5, visibility_s=30))
    await asyncio.sleep(0.1)
    sent_at = loop.time()
    await queue.send([OutgoingMessage(b"x")])
    got = await waiter
    assert [m.body for m in got] == [b"x"]
    assert loop.time() - sent_at < 0.5


async def test_two_instances_on_one_file_never_deliver_a_message_twice(tmp_path: Path) -> None:
    # Two SqliteQueue objects on one file behave like two processes sharing a data directory.
    a = SqliteQueue(tmp_path / "q.db", max_receives=3)
    b = SqliteQueue(tmp_path / "q.db", max_receives=3)
    await a.startup()
    await b.startup()
    try:
        await a.send([OutgoingMessage(str(i).encode()) for i in range(200)])

        async def consume(q: SqliteQueue) -> list[bytes]:
            bodies: list[bytes] = []
            for _ in range(200):
                messages = await q.receive(10, wait_s=0.2, visibility_s=30)
                if not messages:
                    break
                bodies += [m.body for m in messages]
                await asyncio.sleep(0.01)  # "work", so that the instances interleave
                await q.ack([m.receipt for m in messages])
            return bodies

        results = await asyncio.gather(consume(a), consume(b), consume(a), consume(b))
        everything = [body for bodies in results for body in bodies]
        assert sorted(everything) == sorted(str(i).encode() for i in range(200))
        assert results[0] + results[2] and results[1] + results[3], "both instances took part"
        assert (await b.counts()).visible == 0
    finally:
        await a.shutdown()
        await b.shutdown()


async def test_another_instance_sees_sends_by_polling(tmp_path: Path) -> None:
    a = SqliteQueue(tmp_path / "q.db", max_receives=3)
    b = SqliteQueue(tmp_path / "q.db", max_receives=3)
    await a.startup()
    await b.startup()
    try:
        waiter = asyncio.create_task(b.receive(10, wait_s=5, visibility_s=30))
        await asyncio.sleep(0.1)
        await a.send([OutgoingMessage(b"cross-process")])
        assert [m.body for m in await waiter] == [b"cross-process"]
    finally:
        await a.shutdown()
        await b.shutdown()


async def test_a_cancelled_receive_hands_its_messages_back(queue: SqliteQueue) -> None:
    await queue.send([OutgoingMessage(b"x")])
    task = asyncio.create_task(queue.receive(10, wait_s=0, visibility_s=30))
    await asyncio.sleep(0)  # the receive is queued in the combiner
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    got = await queue.receive(10, wait_s=2, visibility_s=30)
    assert [m.body for m in got] == [b"x"]


async def test_messages_survive_a_restart(tmp_path: Path) -> None:
    q = SqliteQueue(tmp_path / "q.db", max_receives=3)
    await q.startup()
    await q.send([OutgoingMessage(b"durable")])
    in_flight = await q.receive(1, wait_s=0, visibility_s=0.3)
    await q.shutdown()

    q = SqliteQueue(tmp_path / "q.db", max_receives=3)
    await q.startup()
    try:
        got = await q.receive(1, wait_s=3, visibility_s=30)
        assert [(m.body, m.receive_count) for m in got] == [(b"durable", 2)]
        await q.ack([in_flight[0].receipt])  # stale after the redelivery: a no-op
        assert (await q.counts()).in_flight == 1
    finally:
        await q.shutdown()


async def test_counts_and_dead_letters(queue: SqliteQueue) -> None:
    await queue.send([OutgoingMessage(b"a"), OutgoingMessage(b"b", delay_s=60)])
    counts = await queue.counts()
    assert (counts.visible, counts.in_flight, counts.dead) == (1, 0, 0)  # a delayed message is neither
    for _ in range(3):
        [message] = await queue.receive(1, wait_s=0, visibility_s=30)
        await queue.nack([message.receipt])
    assert await queue.receive(1, wait_s=0, visibility_s=30) == []
    counts = await queue.counts()
    assert (counts.visible, counts.in_flight, counts.dead) == (0, 0, 1)
    [letter] = await queue.dead_letters(10)
    assert (letter.body, letter.receive_count) == (b"a", 3)


async def test_a_receipt_from_elsewhere_is_rejected(queue: SqliteQueue) -> None:
    with pytest.raises(ValueError):
        await queue.ack(["not-a-receipt"])


async def test_operations_after_shutdown_fail_clearly(tmp_path: Path) -> None:
    q = SqliteQueue(tmp_path / "q.db", max_receives=3)
    await q.startup()
    await q.shutdown()
    with pytest.raises(RuntimeError):
        await q.send([OutgoingMessage(b"x")])
