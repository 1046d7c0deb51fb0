"""Work queue checks beyond the common contract: exact bodies, big sends, and SQS-specific behaviour.

The first tests run on every queue backend (``queue`` fixture); the ``sqs`` ones build an SqsQueue on moto and on
ElasticMQ directly. Tests that restart a server use their own, never the session one.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from dsched.libs.queue.base import MAX_BATCH, OutgoingMessage, ReceivedMessage, WorkQueue
from dsched.libs.queue.sqs import SqsQueue
from dsched.libs.servers import ElasticMQServer, MotoServer
from tests.helpers import backends

DEADLINE_S = 15.0


async def receive_all(queue: WorkQueue, n: int) -> list[ReceivedMessage]:
    got: dict[str, ReceivedMessage] = {}
    end = time.monotonic() + DEADLINE_S
    while len(got) < n:
        assert time.monotonic() < end, f"only {len(got)} of {n} messages arrived"
        for message in await queue.receive(MAX_BATCH, wait_s=1, visibility_s=30):
            got[message.message_id] = message
    return list(got.values())


async def test_bodies_round_trip_byte_for_byte(queue: WorkQueue) -> None:
    bodies = [
        b"",
        b"plain ascii",
        "unicode: d\u00e9j\u00e0 vu \u2713 \U0001f680".encode(),
        b"crlf\r\nline",
        bytes(range(256)),
        b"\x00leading nul",
        json.dumps({"job": 1, "payload": "x" * 100}).encode(),
    ]
    await queue.send([OutgoingMessage(body) for body in bodies])
    messages = await receive_all(queue, len(bodies))
    assert sorted(m.body for m in messages) == sorted(bodies)
    await queue.ack([m.receipt for m in messages])


async def test_one_send_of_large_messages_is_split_under_the_batch_size_limit(queue: WorkQueue) -> None:
    bodies = [bytes([65 + i]) * 60_000 for i in range(12)]  # 720 kB: more than any single SQS batch call
    await queue.send([OutgoingMessage(body) for body in bodies])
    messages = await receive_all(queue, len(bodies))
    assert sorted(m.body for m in messages) == sorted(bodies)
    await queue.ack([m.receipt for m in messages])


async def test_acking_more_than_ten_and_extending_more_than_ten(queue: WorkQueue) -> None:
    await queue.send([OutgoingMessage(f"m{i}".encode()) for i in range(23)])
    messages = await receive_all(queue, 23)
    await queue.extend([m.receipt for m in messages], visibility_s=30)
    await queue.nack([m.receipt for m in messages[:12]])
    again = await receive_all(queue, 12)
    assert {m.message_id for m in again} == {m.message_id for m in messages[:12]}
    await queue.ack([m.receipt for m in messages[12:]] + [m.receipt for m in again])
    assert await queue.receive(MAX_BATCH, wait_s=1, visibility_s=1) == []


# SQS only -------------------------------------------------------------------------------------------------
def _sqs(endpoint: str, tmp_path: Path, name: str | None = None) -> SqsQueue:
    url = f"sqs://{name or backends.unique('q')}?endpoint={endpoint}&region=us-east-1"
    return SqsQueue.from_url(url, backends.test_settings(tmp_path, queue_url=url))


@contextlib.asynccontextmanager
async def _started(queue: SqsQueue) -> AsyncIterator[SqsQueue]:
    await queue.startup()
    try:
        yield queue
    finally:
        await queue.shutdown()


async def _redrive_policy(queue: SqsQueue) -> dict[str, str]:
    reply = await queue._client.get_queue_attributes(QueueUrl=queue._url, AttributeNames=["RedrivePolicy"])
    policy: dict[str, str] = json.loads(reply["Attributes"]["RedrivePolicy"])
    return policy


@pytest.fixture(params=["moto", "elasticmq"])
def sqs_endpoint(request: pytest.FixtureRequest) -> str:
    """The SQS endpoint of each SQS server the adapter is tested on: moto and ElasticMQ."""
    server = request.getfixturevalue(f"{request.param}_server")
    return str(server.endpoint)


async def test_sqs_rejects_a_message_over_256_kib(sqs_endpoint: str, tmp_path: Path) -> None:
    async with _started(_sqs(sqs_endpoint, tmp_path)) as queue:
        with pytest.raises(ValueError, match="limit"):
            await queue.send([OutgoingMessage(b"x" * (256 * 1024 + 1))])


async def test_sqs_startup_sets_the_redrive_policy_on_an_existing_queue(sqs_endpoint: str, tmp_path: Path) -> None:
    name = backends.unique("q")

    def create_plain_queue() -> None:  # an existing queue without a redrive policy, holding one message
        import boto3

        client = boto3.client(
            "sqs", endpoint_url=sqs_endpoint, region_name="us-east-1", aws_access_key_id="x", aws_secret_access_key="x"
        )
        url = client.create_queue(QueueName=name)["QueueUrl"]
        client.send_message(QueueUrl=url, MessageBody="kept")

    await asyncio.to_thread(create_plain_queue)
    async with _started(_sqs(sqs_endpoint, tmp_path, name)) as queue:
        policy = await _redrive_policy(queue)
        assert int(policy["maxReceiveCount"]) == backends.MAX_RECEIVES
        assert policy["deadLetterTargetArn"].endswith(f":{name}-dlq")
        [message] = await receive_all(queue, 1)
        assert message.body == b"kept"
        await queue.ack([message.receipt])


async def test_sqs_dead_letter_peek_is_not_a_removal(sqs_endpoint: str, tmp_path: Path) -> None:
    async with _started(_sqs(sqs_endpoint, tmp_path)) as queue:
        assert await queue.dead_letters(10) == []
        for batch in (range(10), range(10, 13)):
            await queue._client.send_message_batch(
                QueueUrl=queue._dlq_url, Entries=[{"Id": str(i), "MessageBody": f"d{i}"} for i in batch]
            )
        first = await queue.dead_letters(20)  # more than one receive call's worth
        assert sorted(m.body for m in first) == sorted(f"d{i}".encode() for i in range(13))
        assert len(await queue.dead_letters(5)) == 5
        assert (await queue.counts()).dead == 13
        again = await queue.dead_letters(20)
        assert {m.message_id for m in again} == {m.message_id for m in first}


@pytest.fixture(scope="module")
def own_moto() -> Iterator[MotoServer]:
    with MotoServer() as server:
        yield server


async def test_sqs_recreates_its_queues_after_the_server_lost_them(own_moto: MotoServer, tmp_path: Path) -> None:
    async with _started(_sqs(own_moto.endpoint, tmp_path)) as queue:
        await queue.send([OutgoingMessage(b"before")])
        await asyncio.to_thread(own_moto.reset)  # what a restarted emulator looks like: no queues at all
        await queue.send([OutgoingMessage(b"after")])
        [message] = await receive_all(queue, 1)
        assert message.body == b"after"
        assert int((await _redrive_policy(queue))["maxReceiveCount"]) == backends.MAX_RECEIVES
        await queue.ack([message.receipt])


@pytest.fixture(scope="module")
def own_elasticmq() -> Iterator[ElasticMQServer]:
    with ElasticMQServer() as server:
        yield server


async def test_elasticmq_keeps_queues_and_messages_across_a_crash(
    own_elasticmq: ElasticMQServer, tmp_path: Path
) -> None:
    name = backends.unique("q")
    async with _started(_sqs(own_elasticmq.endpoint, tmp_path, name)) as queue:
        await queue.send([OutgoingMessage(f"m{i}".encode()) for i in range(5)])
        await own_elasticmq.arestart(kill=True)  # SIGKILL: only what reached its disk survives
        got = await receive_all(queue, 5)
        assert sorted(m.body for m in got) == [f"m{i}".encode() for i in range(5)]
        assert int((await _redrive_policy(queue))["maxReceiveCount"]) == backends.MAX_RECEIVES
        await queue.ack([m.receipt for m in got])
