"""Submissions log contract (Kafka's shape): keyed order, group commits, redelivery, dead letters.

Each test uses its own consumer group and keys. A member is shut down before the next member of its group
starts, so backends with group rebalancing hand the partitions over cleanly. Every wait is bounded.
"""

from __future__ import annotations

import time
import uuid
from collections import defaultdict

from dsched.libs.log.base import ConsumedRecord, LogConsumer, SubmissionLog

POLL_DEADLINE_S = 20.0  # generous: a real broker's group join can take seconds


def group() -> str:
    return f"g-{uuid.uuid4().hex[:10]}"


async def poll_n(consumer: LogConsumer, n: int, deadline_s: float = POLL_DEADLINE_S) -> list[ConsumedRecord]:
    """Poll until ``n`` records arrived (more may come in the last batch)."""
    got: list[ConsumedRecord] = []
    end = time.monotonic() + deadline_s
    while len(got) < n:
        remaining = end - time.monotonic()
        assert remaining > 0, f"only {len(got)} of {n} records arrived"
        got += await consumer.poll(max_records=100, timeout_s=min(1.0, remaining))
    return got


async def poll_nothing(consumer: LogConsumer, wait_s: float = 1.5) -> list[ConsumedRecord]:
    """Everything that arrives within ``wait_s`` (expected: nothing)."""
    got: list[ConsumedRecord] = []
    end = time.monotonic() + wait_s
    while (remaining := end - time.monotonic()) > 0:
        got += await consumer.poll(max_records=100, timeout_s=min(0.5, remaining))
    return got


async def started(log: SubmissionLog, name: str) -> LogConsumer:
    consumer = log.consumer(name)
    await consumer.startup()
    return consumer


def by_key(records: list[ConsumedRecord]) -> dict[str, list[bytes]]:
    out: dict[str, list[bytes]] = defaultdict(list)
    for record in records:
        out[record.key].append(record.value)
    return dict(out)


async def test_records_of_one_key_are_consumed_in_append_order(log: SubmissionLog) -> None:
    keys = [f"job-{uuid.uuid4().hex[:8]}" for _ in range(5)]
    expected: dict[str, list[bytes]] = {k: [] for k in keys}
    for round_ in range(4):
        batch = [(k, f"{k}:{round_}".encode()) for k in keys]
        await log.append(batch)
        for k, v in batch:
            expected[k].append(v)
    consumer = await started(log, group())
    try:
        records = await poll_n(consumer, 20)
    finally:
        await consumer.shutdown()
    assert by_key(records) == expected
    # Same key, same partition; offsets increase within a partition.
    assert all(len({r.partition for r in records if r.key == k}) == 1 for k in keys)
    last: dict[int, int] = {}
    for record in records:
        assert record.offset > last.get(record.partition, -1)
        last[record.partition] = record.offset
        assert record.timestamp_ms > 0


async def test_poll_waits_for_records_appended_later(log: SubmissionLog) -> None:
    consumer = await started(log, group())
    try:
        assert await poll_nothing(consumer, 0.5) == []
        await log.append([("late", b"v")])
        records = await poll_n(consumer, 1)
        assert [(r.key, r.value) for r in records] == [("late", b"v")]
    finally:
        await consumer.shutdown()


async def test_poll_respects_max_records_and_continues_after_uncommitted_records(log: SubmissionLog) -> None:
    await log.append([("k", str(i).encode()) for i in range(6)])
    consumer = await started(log, group())
    try:
        first: list[ConsumedRecord] = []
        end = time.monotonic() + POLL_DEADLINE_S
        while not first:
            assert time.monotonic() < end
            first = await consumer.poll(max_records=2, timeout_s=1.0)
        assert 1 <= len(first) <= 2
        rest = await poll_n(consumer, 6 - len(first))
        assert [r.value for r in first + rest] == [str(i).encode() for i in range(6)]
    finally:
        await consumer.shutdown()


async def test_a_new_member_resumes_after_the_committed_records(log: SubmissionLog) -> None:
    name = group()
    await log.append([("k", str(i).encode()) for i in range(5)])
    consumer = await started(log, name)
    try:
        records = await poll_n(consumer, 5)
        await consumer.commit(records[:3])  # commit "0", "1", "2"
    finally:
        await consumer.shutdown()

    await log.append([("k", b"5")])
    consumer = await started(log, name)
    try:
        records = await poll_n(consumer, 3)
        assert [r.value for r in records] == [b"3", b"4", b"5"]
        await consumer.commit(records)
    finally:
        await consumer.shutdown()

    consumer = await started(log, name)
    try:
        assert await poll_nothing(consumer) == []
    finally:
        await consumer.shutdown()


async def test_uncommitted_records_are_redelivered_to_a_new_member(log: SubmissionLog) -> None:
    name = group()
    await log.append([("a", b"1"), ("b", b"2"), ("a", b"3")])
    consumer = await started(log, name)
    try:
        first = await poll_n(consumer, 3)
    finally:
        await consumer.shutdown()  # crashed before committing

    consumer = await started(log, name)
    try:
        again = await poll_n(consumer, 3)
    finally:
        await consumer.shutdown()
    assert by_key(again) == by_key(first) == {"a": [b"1", b"3"], "b": [b"2"]}
    assert {(r.partition, r.offset) for r in again} == {(r.partition, r.offset) for r in first}


async def test_committing_an_older_record_never_moves_the_group_back(log: SubmissionLog) -> None:
    name = group()
    await log.append([("k", str(i).encode()) for i in range(4)])
    consumer = await started(log, name)
    try:
        records = await poll_n(consumer, 4)
        await consumer.commit(records)
        await consumer.commit(records[:1])
    finally:
        await consumer.shutdown()
    consumer = await started(log, name)
    try:
        assert await poll_nothing(consumer) == []
    finally:
        await consumer.shutdown()


async def test_groups_are_independent(log: SubmissionLog) -> None:
    await log.append([("k", b"v")])
    one, two = group(), group()
    consumer = await started(log, one)
    try:
        await consumer.commit(await poll_n(consumer, 1))
    finally:
        await consumer.shutdown()
    consumer = await started(log, two)
    try:
        assert [r.value for r in await poll_n(consumer, 1)] == [b"v"]
    finally:
        await consumer.shutdown()


async def test_a_dead_lettered_record_does_not_stall_its_partition(log: SubmissionLog) -> None:
    name = group()
    await log.append([("k", b"not json"), ("k", b"good-1")])
    consumer = await started(log, name)
    try:
        records = await poll_n(consumer, 2)
        assert [r.value for r in records] == [b"not json", b"good-1"]
        await consumer.dead_letter(records[0], "undecodable")
        await consumer.commit(records)
        await log.append([("k", b"good-2")])
        more = await poll_n(consumer, 1)
        assert [r.value for r in more] == [b"good-2"]
        await consumer.commit(more)
    finally:
        await consumer.shutdown()

    consumer = await started(log, name)  # the parked record is not redelivered either
    try:
        assert await poll_nothing(consumer) == []
    finally:
        await consumer.shutdown()


async def test_append_of_nothing_is_a_no_op(log: SubmissionLog) -> None:
    await log.append([])


async def test_lag_counts_what_the_group_has_not_committed(log: SubmissionLog) -> None:
    """``lag()`` (the writer's ``dsched_writer_lag_*``): polled is not enough, only a commit removes records."""
    consumer = await started(log, group())
    try:
        await log.append([(f"lag-{uuid.uuid4().hex[:8]}", b"x") for _ in range(6)])
        got = await poll_n(consumer, 6)
        lag = await consumer.lag()
        assert lag is not None and lag.records == 6
        if lag.oldest_ms is not None:  # the embedded log knows it; Kafka reports records only
            assert lag.oldest_ms <= min(r.timestamp_ms for r in got) + 1
        await consumer.commit(got)
        lag = await consumer.lag()
        assert lag is not None and (lag.records, lag.oldest_ms) == (0, None)
    finally:
        await consumer.shutdown()


async def test_backlog_counts_what_a_group_has_not_committed_asked_from_outside_it(log: SubmissionLog) -> None:
    """``backlog(group)`` (ingestion's admission control) needs no member: a group that never committed counts
    every record kept; appends raise it, only a member's commit lowers it, and asking never joins the group."""
    name = group()
    before = await log.backlog(name)  # the records of earlier tests on this log: none committed by this group
    await log.append([(f"bl-{uuid.uuid4().hex[:8]}", b"x") for _ in range(5)])
    assert await log.backlog(name) == before + 5
    consumer = await started(log, name)
    try:
        got = await poll_n(consumer, before + 5)
        assert await log.backlog(name) == before + 5  # polled is not stored
        await consumer.commit(got)
        assert await log.backlog(name) == 0
        await log.append([(f"bl-{uuid.uuid4().hex[:8]}", b"y") for _ in range(2)])
        assert await log.backlog(name) == 2
        assert await log.backlog(group()) >= before + 7  # other groups are not moved by this one's commit
    finally:
        await consumer.shutdown()
