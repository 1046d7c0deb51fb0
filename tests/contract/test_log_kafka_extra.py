"""Kafka-only log behaviour: two members of one group rebalancing, the idempotent producer across a broker
crash, the dead-letter topic.

Runs against the session's Apache Kafka (or ``DSCHED_TEST_KAFKA=host:port``).
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import pytest

from dsched.libs.log.base import ConsumedRecord
from dsched.libs.log.kafka import KafkaLog, KafkaLogConsumer
from dsched.libs.servers import KafkaServer
from dsched.libs.servers import kafka as kafka_server_module
from tests.helpers import backends

DEADLINE_S = 45.0


@pytest.fixture(params=["kafka"])
async def kafka_log(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[KafkaLog]:
    impl = backends.build_log(request.param, request, tmp_path)
    assert isinstance(impl, KafkaLog)
    await impl.startup()
    try:
        yield impl
    finally:
        await impl.shutdown()


def owned(consumer: KafkaLogConsumer) -> set[int]:
    assert consumer._consumer is not None
    return {tp.partition for tp in consumer._consumer.assignment()}


Batches = list[list[ConsumedRecord]]


async def poll_until(consumers: list[KafkaLogConsumer], done: Callable[[Batches], bool], what: str) -> Batches:
    """Poll every member (a member that does not poll cannot take part in a rebalance) until ``done(got)``."""
    got: Batches = [[] for _ in consumers]
    end = time.monotonic() + DEADLINE_S
    while not done(got):
        assert time.monotonic() < end, f"timed out waiting for {what}"
        for i, consumer in enumerate(consumers):
            got[i] += await consumer.poll(max_records=500, timeout_s=0.2)
    return got


async def test_a_joining_member_takes_over_partitions_and_their_uncommitted_records(
    kafka_log: KafkaLog,
) -> None:
    group = f"g-{uuid.uuid4().hex[:10]}"
    await kafka_log.append([(f"job-{i}", b"v") for i in range(40)])
    first, second = kafka_log.consumer(group), kafka_log.consumer(group)
    await first.startup()
    try:
        records = (await poll_until([first], lambda got: len(got[0]) >= 40, "all records"))[0]
        assert len(owned(first)) == 4
        await first.commit([r for r in records if r.partition == 0])  # the rest stays uncommitted

        def moved() -> set[int]:
            mine, theirs = owned(first), owned(second)
            return theirs if theirs and mine.isdisjoint(theirs) else set()

        def redelivered(got: Batches) -> bool:
            expected = {(r.partition, r.offset) for r in records if r.partition in moved() and r.partition != 0}
            return bool(moved()) and expected <= {(r.partition, r.offset) for r in got[1]}

        await second.startup()
        got = await poll_until([first, second], redelivered, "the moved partitions' uncommitted records")
        taken = moved()
        assert all(r.partition in taken for r in got[1])
        # The first member forgot the partitions it lost: committing their records is skipped, not an error.
        assert taken.isdisjoint(first._returned) and taken.isdisjoint(first._committed)
        await first.commit(records)
    finally:
        await second.shutdown()
        await first.shutdown()


async def test_a_leaving_member_hands_its_partitions_over_at_once(kafka_log: KafkaLog) -> None:
    group = f"g-{uuid.uuid4().hex[:10]}"
    await kafka_log.append([(f"job-{i}", b"v") for i in range(20)])
    first, second = kafka_log.consumer(group), kafka_log.consumer(group)
    await first.startup()
    await second.startup()
    try:
        await poll_until([first, second], lambda _: bool(owned(first)) and bool(owned(second)), "both assigned")
        await first.shutdown()  # leaves the group: nobody waits for its session to time out
        started = time.monotonic()
        await poll_until([second], lambda _: len(owned(second)) == 4, "the handover")
        assert time.monotonic() - started < 15.0
    finally:
        await second.shutdown()


async def test_the_producer_is_idempotent_on_a_real_broker(kafka_log: KafkaLog) -> None:
    await kafka_log.append([("job-pid", b"v")])
    producer = kafka_log._producer
    assert producer is not None
    txn = producer._txn_manager
    assert txn is not None, "enable_idempotence is off"
    assert txn.has_pid(), "the broker granted no producer id (InitProducerId failed)"


async def test_a_dead_letter_lands_on_the_dlq_topic_with_its_reason(kafka_log: KafkaLog) -> None:
    from aiokafka import AIOKafkaConsumer

    key = f"job-{uuid.uuid4().hex[:8]}"
    await kafka_log.append([(key, b"poison")])
    consumer = kafka_log.consumer(f"g-{uuid.uuid4().hex[:10]}")
    await consumer.startup()
    try:
        [record] = (await poll_until([consumer], lambda got: len(got[0]) >= 1, "the record"))[0]
        await consumer.dead_letter(record, "undecodable")
        await consumer.commit([record])
    finally:
        await consumer.shutdown()
    reader = AIOKafkaConsumer(
        kafka_log.config.dlq_topic,
        bootstrap_servers=list(kafka_log.config.bootstrap_servers),
        auto_offset_reset="earliest",
        enable_auto_commit=False,
    )
    await reader.start()
    try:
        batches = await reader.getmany(timeout_ms=int(DEADLINE_S * 1000), max_records=10)
        [dead] = [m for messages in batches.values() for m in messages]
    finally:
        await reader.stop()
    assert (dead.key, dead.value) == (key.encode(), b"poison")
    headers = dict(dead.headers)
    assert headers["dsched-dlq-reason"] == b"undecodable"
    assert headers["dsched-dlq-topic"] == kafka_log.config.topic.encode()
    assert headers["dsched-dlq-offset"] == str(record.offset).encode()


@pytest.fixture(scope="module")
def own_kafka() -> Iterator[KafkaServer]:
    """A broker of this module's own: the test below kills it, which the session's broker must not see. Its
    cluster id begins with "-", as one random id in 64 does: storage formatting must still take it."""
    random_id = kafka_server_module._cluster_id
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(kafka_server_module, "_cluster_id", lambda: "-" + random_id()[1:])
        server = KafkaServer(partitions=4)
        server.start()
    try:
        yield server
    finally:
        server.stop()


async def test_appends_across_a_broker_crash_arrive_once_and_in_order(own_kafka: KafkaServer, tmp_path: Path) -> None:
    settings = backends.test_settings(tmp_path, log_url=own_kafka.url(backends.unique("restart"), partitions=4))
    log = KafkaLog.from_url(settings.log_url, settings)
    await log.startup()
    keys = [f"job-{i}" for i in range(8)]
    rounds = 40
    try:

        async def produce() -> None:
            for round_ in range(rounds):
                await log.append([(k, f"{k}:{round_}".encode()) for k in keys])
                await asyncio.sleep(0.02)

        producing = asyncio.create_task(produce())
        await asyncio.sleep(0.2)
        await own_kafka.arestart(kill=True)  # in-flight batches are retried; idempotence drops the repeats
        await asyncio.wait_for(producing, DEADLINE_S)
        consumer = log.consumer("g-restart")
        await consumer.startup()
        try:
            got = await poll_until([consumer], lambda got: len(got[0]) >= rounds * len(keys), "every record")
            got[0] += await consumer.poll(max_records=500, timeout_s=1.0)  # a duplicate would show up here
        finally:
            await consumer.shutdown()
    finally:
        await log.shutdown()
    per_key: dict[str, list[bytes]] = {}
    for record in got[0]:
        per_key.setdefault(record.key, []).append(record.value)
    assert per_key == {k: [f"{k}:{r}".encode() for r in range(rounds)] for k in keys}
