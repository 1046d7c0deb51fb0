"""Kafka-only log behaviour: two members of one consumer group rebalancing.

Runs against the session's Apache Kafka (or ``DSCHED_TEST_KAFKA=host:port``).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from libs.log.base import ConsumedRecord
from libs.log.kafka import KafkaLog, KafkaLogConsumer
from tests import backends

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
