"""Work queue contract (SQS's shape): visibility timeouts, redelivery, ack/extend/nack, redrive, batch limits.

Visibility timeouts are 1 s and message counts small (a moto-backed SQS is slow). Delivery order is not part
of the contract (priority is only a hint); the embedded queue's ordering is tested in tests/unit. Every wait
is a bounded poll.
"""

from __future__ import annotations

import asyncio
import time

from dsched.libs.queue.base import MAX_BATCH, OutgoingMessage, ReceivedMessage, WorkQueue
from tests.helpers.backends import MAX_RECEIVES

VISIBILITY_S = 1.0
DEADLINE_S = 15.0


async def receive_one(queue: WorkQueue, visibility_s: float = VISIBILITY_S) -> ReceivedMessage:
    """The next message, waiting (bounded) for it to become visible."""
    end = time.monotonic() + DEADLINE_S
    while time.monotonic() < end:
        messages = await queue.receive(1, wait_s=1, visibility_s=visibility_s)
        if messages:
            assert len(messages) == 1
            return messages[0]
    raise AssertionError("no message became visible in time")


async def receive_all(queue: WorkQueue, n: int, visibility_s: float = 30) -> list[ReceivedMessage]:
    """Receive until ``n`` distinct messages arrived (bounded)."""
    got: dict[str, ReceivedMessage] = {}
    end = time.monotonic() + DEADLINE_S
    while len(got) < n:
        assert time.monotonic() < end, f"only {len(got)} of {n} messages arrived"
        for message in await queue.receive(MAX_BATCH, wait_s=1, visibility_s=visibility_s):
            got[message.message_id] = message
    return list(got.values())


async def nothing_visible(queue: WorkQueue, wait_s: float = 1) -> bool:
    return await queue.receive(MAX_BATCH, wait_s=wait_s, visibility_s=VISIBILITY_S) == []


async def test_receive_hides_the_message_until_its_visibility_timeout_ends(queue: WorkQueue) -> None:
    await queue.send([OutgoingMessage(b"job")])
    first = await receive_one(queue)
    assert first.body == b"job"
    assert first.receive_count == 1
    assert await nothing_visible(queue, wait_s=0)

    again = await receive_one(queue)  # after the 1 s visibility timeout
    assert again.message_id == first.message_id
    assert again.body == b"job"
    assert again.receive_count == 2
    assert again.receipt != first.receipt
    await queue.ack([again.receipt])


async def test_ack_deletes_the_message(queue: WorkQueue) -> None:
    await queue.send([OutgoingMessage(b"job")])
    message = await receive_one(queue)
    await queue.ack([message.receipt])
    await asyncio.sleep(VISIBILITY_S + 0.2)
    assert await nothing_visible(queue)


async def test_extend_keeps_the_message_hidden(queue: WorkQueue) -> None:
    await queue.send([OutgoingMessage(b"long job")])
    message = await receive_one(queue)
    await queue.extend([message.receipt], visibility_s=4)
    await asyncio.sleep(VISIBILITY_S + 0.5)
    assert await nothing_visible(queue, wait_s=0)
    await queue.ack([message.receipt])


async def test_nack_makes_the_message_visible_again(queue: WorkQueue) -> None:
    await queue.send([OutgoingMessage(b"job")])
    message = await receive_one(queue, visibility_s=30)
    await queue.nack([message.receipt])
    again = await receive_one(queue, visibility_s=30)
    assert again.message_id == message.message_id
    assert again.receive_count == 2
    await queue.ack([again.receipt])


async def test_ack_with_a_stale_receipt_never_raises(queue: WorkQueue) -> None:
    await queue.send([OutgoingMessage(b"job")])
    first = await receive_one(queue)
    second = await receive_one(queue, visibility_s=30)  # redelivered after the timeout: first is stale
    assert second.message_id == first.message_id
    # SQS documents that a stale receipt "may or may not" delete; whichever happens, nothing raises and the
    # current delivery can still be handed back or acked.
    await queue.ack([first.receipt])
    await queue.nack([second.receipt])
    remaining = await queue.receive(10, wait_s=1, visibility_s=30)
    assert [m.message_id for m in remaining] in ([], [first.message_id])
    await queue.ack([m.receipt for m in remaining])


async def test_receive_returns_at_most_ten(queue: WorkQueue) -> None:
    await queue.send([OutgoingMessage(str(i).encode()) for i in range(15)])
    messages = await queue.receive(25, wait_s=1, visibility_s=30)
    assert 1 <= len(messages) <= MAX_BATCH
    rest = await receive_all(queue, 15 - len(messages))
    assert {m.body for m in messages + rest} == {str(i).encode() for i in range(15)}
    await queue.ack([m.receipt for m in messages + rest])


async def test_a_send_of_more_than_ten_delivers_every_message(queue: WorkQueue) -> None:
    bodies = {f"msg-{i}".encode() for i in range(25)}
    await queue.send([OutgoingMessage(body, priority=i * 4) for i, body in enumerate(sorted(bodies))])
    messages = await receive_all(queue, 25)
    assert {m.body for m in messages} == bodies
    assert all(m.receive_count == 1 for m in messages)
    await queue.ack([m.receipt for m in messages])  # more than ten receipts in one call
    assert await nothing_visible(queue)


async def test_delay_keeps_a_message_invisible_at_first(queue: WorkQueue) -> None:
    await queue.send([OutgoingMessage(b"later", delay_s=2)])
    assert await nothing_visible(queue, wait_s=0)
    message = await receive_one(queue)
    assert message.body == b"later"
    await queue.ack([message.receipt])


async def test_a_message_received_too_often_moves_to_dead_letters(queue: WorkQueue) -> None:
    await queue.send([OutgoingMessage(b"poison")])
    counts = []
    end = time.monotonic() + 2 * DEADLINE_S
    while not any(m.body == b"poison" for m in await queue.dead_letters(10)):
        assert time.monotonic() < end, "message never moved to dead letters"
        for message in await queue.receive(1, wait_s=1, visibility_s=30):
            counts.append(message.receive_count)
            await queue.nack([message.receipt])
    assert counts == list(range(1, MAX_RECEIVES + 1))
    assert await nothing_visible(queue)
    dead = [m for m in await queue.dead_letters(10) if m.body == b"poison"]
    assert len(dead) == 1
    again = [m for m in await queue.dead_letters(10) if m.body == b"poison"]  # peeking does not remove
    assert [m.message_id for m in again] == [m.message_id for m in dead]


async def test_counts_reflect_visible_and_in_flight_messages(queue: WorkQueue) -> None:
    await queue.send([OutgoingMessage(b"a"), OutgoingMessage(b"b"), OutgoingMessage(b"c")])
    end = time.monotonic() + DEADLINE_S
    while (await queue.counts()).visible != 3:  # approximate on distributed queues: converge
        assert time.monotonic() < end
        await asyncio.sleep(0.2)
    message = await receive_one(queue, visibility_s=30)
    while (counts := await queue.counts()).in_flight != 1 or counts.visible != 2:
        assert time.monotonic() < end
        await asyncio.sleep(0.2)
    assert counts.dead == 0
    await queue.ack([message.receipt])
