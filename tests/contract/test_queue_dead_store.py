"""Work queue contract, dead-letter store: what the redrive parks can be taken and deleted (the worker's sweep
turns each into a failed run the job's owner sees), on every queue implementation."""

from __future__ import annotations

import time

from dsched.libs.queue.base import OutgoingMessage, WorkQueue
from tests.helpers.backends import MAX_RECEIVES

DEADLINE_S = 30.0


async def park(queue: WorkQueue, body: bytes) -> None:
    """Send ``body`` and receive it until the redrive moves it to the dead-letter store (bounded)."""
    await queue.send([OutgoingMessage(body)])
    end = time.monotonic() + DEADLINE_S
    while not any(m.body == body for m in await queue.dead_letters(10)):
        assert time.monotonic() < end, "message never moved to dead letters"
        for message in await queue.receive(1, wait_s=1, visibility_s=30):
            await queue.nack([message.receipt])


async def test_dead_letters_can_be_taken_and_deleted(queue: WorkQueue) -> None:
    await park(queue, b"parked")
    taken = [m for m in await queue.take_dead_letters(10, visibility_s=30) if m.body == b"parked"]
    assert len(taken) == 1
    assert taken[0].receive_count >= MAX_RECEIVES
    await queue.delete_dead_letters([taken[0].receipt])
    end = time.monotonic() + DEADLINE_S
    while any(m.body == b"parked" for m in await queue.dead_letters(10)):
        assert time.monotonic() < end, "deleted dead letter is still there"
    assert not [m for m in await queue.take_dead_letters(10, visibility_s=0) if m.body == b"parked"]
    assert (await queue.counts()).dead == 0


async def test_taking_without_deleting_keeps_a_dead_letter(queue: WorkQueue) -> None:
    await park(queue, b"kept")
    taken = [m for m in await queue.take_dead_letters(10, visibility_s=1) if m.body == b"kept"]
    assert len(taken) == 1
    end = time.monotonic() + DEADLINE_S
    while not [m for m in await queue.take_dead_letters(10, visibility_s=30) if m.body == b"kept"]:
        assert time.monotonic() < end, "a dead letter taken but not deleted never came back"
    await queue.delete_dead_letters([])  # nothing to delete: a no-op
