"""Kafka adapter pieces that need no broker: URL parsing, record encoding, offsets, acks, DLQ, rebalances.

The broker-facing behaviour runs in the log contract suite (``[kafka]``, on the session's Apache Kafka, or on
``DSCHED_TEST_KAFKA``).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from aiokafka import TopicPartition
from aiokafka.errors import CommitFailedError, KafkaTimeoutError

from dsched.libs.errors import BackendConfigError
from dsched.libs.log.base import ConsumedRecord
from dsched.libs.log.kafka import (
    REASON_HEADER,
    KafkaConfig,
    KafkaLog,
    KafkaLogConsumer,
    KafkaUrlError,
    _Rebalance,
    commit_offsets,
    dead_letter_headers,
    parse_url,
    send_all,
    to_record,
)
from dsched.libs.settings import Settings


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return Settings.from_env(data_dir=tmp_path, log_partitions=6)


# URL parsing ----------------------------------------------------------------------------------------------
def test_url_defaults(settings: Settings) -> None:
    config = parse_url("kafka://k1:9092,k2:9093/dsched.submissions", settings)
    assert config == KafkaConfig(
        bootstrap_servers=("k1:9092", "k2:9093"),
        topic="dsched.submissions",
        dlq_topic="dsched.submissions.dlq",
        partitions=6,
        replication_factor=None,
        create_topics=True,
        session_timeout_ms=10_000,
    )


def test_url_parameters(settings: Settings) -> None:
    config = parse_url(
        "kafka://k1/subs?partitions=12&dlq_topic=parked&replication_factor=3&create_topics=false"
        "&session_timeout_ms=6000",
        settings,
    )
    assert config.bootstrap_servers == ("k1:9092",)  # default port
    assert (config.partitions, config.dlq_topic, config.replication_factor) == (12, "parked", 3)
    assert config.create_topics is False
    assert config.session_timeout_ms == 6000


@pytest.mark.parametrize(
    ("url", "fragment"),
    [
        ("sqs://k1/topic", "kafka://"),
        ("kafka:///topic", "bootstrap"),
        ("kafka://k1", "topic"),
        ("kafka://k1/a/b", "topic"),
        ("kafka://k1/t?partitons=3", "unknown"),
        ("kafka://k1/t?partitions=x", "bad number"),
        ("kafka://k1/t?partitions=0", "> 0"),
        ("kafka://k1/t?create_topics=maybe", "boolean"),
    ],
)
def test_bad_urls_are_one_clear_line(settings: Settings, url: str, fragment: str) -> None:
    with pytest.raises(KafkaUrlError) as info:
        parse_url(url, settings)
    assert fragment in str(info.value)
    assert isinstance(info.value, BackendConfigError)  # Backends.open passes it through as is
    assert "\n" not in str(info.value)


async def test_from_url_builds_a_log_without_touching_the_network(settings: Settings) -> None:
    log = KafkaLog.from_url("kafka://127.0.0.1:1/t", settings)
    assert log.config.topic == "t"
    await log.append([])  # nothing to send: fine even unstarted
    with pytest.raises(RuntimeError, match="not started"):
        await log.append([("k", b"v")])


# Record encoding ------------------------------------------------------------------------------------------
@dataclass
class Message:
    """The fields of an aiokafka ``ConsumerRecord`` the adapter reads."""

    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    timestamp: int = 1_700_000_000_000
    topic: str = "t"


def test_to_record_decodes_the_key_and_keeps_the_raw_value() -> None:
    assert to_record(Message(2, 41, "job-é".encode(), b"\x00raw")) == ConsumedRecord(
        partition=2, offset=41, key="job-é", value=b"\x00raw", timestamp_ms=1_700_000_000_000
    )
    # Foreign producers may write without key or value; such records still decode (and dead-letter).
    assert to_record(Message(0, 1, None, None)).key == ""
    assert to_record(Message(0, 1, None, None)).value == b""
    assert to_record(Message(0, 1, b"\xff", b"")).key == "\ufffd"


def record(partition: int, offset: int, key: str = "k", value: bytes = b"v") -> ConsumedRecord:
    return ConsumedRecord(partition=partition, offset=offset, key=key, value=value, timestamp_ms=1)


def test_commit_offsets_are_one_past_the_highest_record_per_partition() -> None:
    records = [record(0, 5), record(1, 2), record(0, 7), record(0, 6), record(3, 0)]
    assert commit_offsets(records) == {0: 8, 1: 3, 3: 1}
    assert commit_offsets([]) == {}


def test_dead_letter_headers_carry_the_reason_and_origin() -> None:
    headers = dict(dead_letter_headers("subs", record(3, 99), "undecodable: x" * 200))
    assert headers[REASON_HEADER].startswith(b"undecodable: x")
    assert len(headers[REASON_HEADER]) == 1024  # bounded
    assert headers["dsched-dlq-topic"] == b"subs"
    assert (headers["dsched-dlq-partition"], headers["dsched-dlq-offset"]) == (b"3", b"99")


# Producing: every ack awaited -----------------------------------------------------------------------------
@dataclass
class FakeProducer:
    """``send`` enqueues and returns an ack future, like aiokafka's; the test settles the acks."""

    sent: list[dict[str, Any]] = field(default_factory=list)
    acks: list[asyncio.Future[None]] = field(default_factory=list)
    fail_send: BaseException | None = None

    async def send(
        self,
        topic: str,
        value: bytes | None = None,
        key: bytes | None = None,
        partition: int | None = None,
        timestamp_ms: int | None = None,
        headers: list[tuple[str, bytes]] | None = None,
    ) -> Awaitable[Any]:
        if self.fail_send is not None:
            raise self.fail_send
        self.sent.append({"topic": topic, "value": value, "key": key, "headers": headers})
        ack: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.acks.append(ack)
        return ack


async def test_send_all_queues_every_record_before_awaiting_acks() -> None:
    producer = FakeProducer()
    task = asyncio.create_task(send_all(producer, "subs", [("a", b"1"), ("b", b"2"), ("a", b"3")]))
    await asyncio.sleep(0)
    # All three were handed to the producer although no ack came back yet: one round trip per call.
    assert [(m["key"], m["value"]) for m in producer.sent] == [(b"a", b"1"), (b"b", b"2"), (b"a", b"3")]
    assert not task.done()
    for ack in producer.acks:
        ack.set_result(None)
    await task


async def test_send_all_waits_for_every_ack_and_raises_the_first_failure() -> None:
    producer = FakeProducer()
    task = asyncio.create_task(send_all(producer, "subs", [("a", b"1"), ("b", b"2"), ("c", b"3")]))
    await asyncio.sleep(0)
    producer.acks[1].set_exception(KafkaTimeoutError("no ack"))
    await asyncio.sleep(0)
    assert not task.done()  # still waiting for the others: nothing is left unobserved
    producer.acks[0].set_result(None)
    producer.acks[2].set_exception(RuntimeError("second failure"))
    with pytest.raises(KafkaTimeoutError):
        await task


async def test_send_all_raises_when_the_producer_refuses_a_record() -> None:
    with pytest.raises(KafkaTimeoutError):
        await send_all(FakeProducer(fail_send=KafkaTimeoutError("buffer full")), "subs", [("a", b"1")])


# Consumer: poll, commit, rebalance, dead letters ----------------------------------------------------------
@dataclass
class FakeConsumer:
    """The parts of ``AIOKafkaConsumer`` the log consumer calls."""

    topic: str
    owned: set[int]
    batches: list[dict[TopicPartition, list[Message]]] = field(default_factory=list)
    commits: list[dict[TopicPartition, int]] = field(default_factory=list)
    commit_error: BaseException | None = None

    def assignment(self) -> set[TopicPartition]:
        return {TopicPartition(self.topic, p) for p in self.owned}

    async def getmany(self, timeout_ms: int = 0, max_records: int | None = None) -> dict[TopicPartition, Any]:
        return self.batches.pop(0) if self.batches else {}

    async def commit(self, offsets: dict[TopicPartition, int]) -> None:
        if self.commit_error is not None:
            raise self.commit_error
        self.commits.append(dict(offsets))


def member(fake: FakeConsumer, producer: FakeProducer | None = None) -> KafkaLogConsumer:
    config = parse_url(f"kafka://k1/{fake.topic}", Settings.from_env())
    consumer = KafkaLogConsumer(config, "writer", lambda: producer or FakeProducer())
    consumer._consumer = fake  # aiokafka is untyped: any object fits
    return consumer


def test_group_ids_are_namespaced_by_topic() -> None:
    assert member(FakeConsumer("subs", {0})).group_id == "subs.writer"


async def test_poll_flattens_partitions_in_offset_order() -> None:
    batch = {
        TopicPartition("subs", 1): [Message(1, 4, b"b", b"x")],
        TopicPartition("subs", 0): [Message(0, 7, b"a", b"y"), Message(0, 8, b"a", b"z")],
    }
    fake = FakeConsumer("subs", {0, 1}, batches=[batch])
    records = await member(fake).poll(max_records=10, timeout_s=0.1)
    assert [(r.partition, r.offset) for r in records] == [(0, 7), (0, 8), (1, 4)]
    assert await member(fake).poll(max_records=10, timeout_s=0.1) == []


async def test_commit_sends_next_offsets_and_never_moves_back() -> None:
    fake = FakeConsumer("subs", {0, 1})
    consumer = member(fake)
    await consumer.commit([record(0, 3), record(1, 9), record(0, 5)])
    assert fake.commits == [{TopicPartition("subs", 0): 6, TopicPartition("subs", 1): 10}]
    await consumer.commit([record(0, 1)])  # older than what the group has: nothing sent
    await consumer.commit([])
    assert len(fake.commits) == 1


async def test_revoked_partitions_are_forgotten_and_not_committed() -> None:
    tp = TopicPartition("subs", 0)
    fake = FakeConsumer("subs", {0, 1}, batches=[{tp: [Message(0, 3, b"k", b"v")]}])
    consumer = member(fake)
    await consumer.poll(10, 0.1)
    await consumer.commit([record(0, 2)])
    _Rebalance(consumer).on_partitions_revoked([tp])
    fake.owned = {1}
    assert consumer._returned == {} and consumer._committed == {}
    # Its records go to the new owner, which starts from the last commit; committing them here is skipped.
    await consumer.commit([record(0, 3), record(1, 0)])
    assert fake.commits[-1] == {TopicPartition("subs", 1): 1}


async def test_a_commit_lost_to_a_rebalance_is_skipped_not_raised() -> None:
    fake = FakeConsumer("subs", {0}, commit_error=CommitFailedError("rebalanced"))
    await member(fake).commit([record(0, 1)])  # the records are redelivered to the new owner


async def test_dead_letter_produces_the_raw_record_to_the_dlq_topic_and_awaits_the_ack() -> None:
    producer = FakeProducer()
    consumer = member(FakeConsumer("subs", {0}), producer)
    task = asyncio.create_task(consumer.dead_letter(record(0, 12, key="job-1", value=b"\x00not json"), "bad"))
    await asyncio.sleep(0)
    assert not task.done()  # durable before the caller commits past it
    [sent] = producer.sent
    assert (sent["topic"], sent["key"], sent["value"]) == ("subs.dlq", b"job-1", b"\x00not json")
    assert dict(sent["headers"])[REASON_HEADER] == b"bad"
    producer.acks[0].set_result(None)
    await task


async def test_a_failed_dead_letter_raises_so_the_record_is_not_committed() -> None:
    producer = FakeProducer(fail_send=KafkaTimeoutError("dlq unavailable"))
    with pytest.raises(KafkaTimeoutError):
        await member(FakeConsumer("subs", {0}), producer).dead_letter(record(0, 1), "bad")


async def test_unstarted_consumer_refuses_to_poll() -> None:
    consumer = KafkaLogConsumer(parse_url("kafka://k1/t", Settings.from_env()), "g", FakeProducer)
    with pytest.raises(RuntimeError, match="not started"):
        await consumer.poll(1, 0)


# Topic creation falls back to auto-creation ---------------------------------------------------------------
async def test_topic_creation_failure_falls_back_to_auto_creation(
    monkeypatch: pytest.MonkeyPatch, settings: Settings
) -> None:
    closed: list[bool] = []

    class BrokenAdmin:
        def __init__(self, **kwargs: Any) -> None:
            pass

        async def start(self) -> None:
            raise KafkaTimeoutError("CreateTopics not supported")

        async def close(self) -> None:
            closed.append(True)

    monkeypatch.setattr("dsched.libs.log.kafka.AIOKafkaAdminClient", BrokenAdmin)
    log = KafkaLog.from_url("kafka://127.0.0.1:1/t", settings)
    await log._ensure_topics()  # logs a warning, raises nothing
    assert closed == [True]


async def test_existing_topics_are_not_created_again(monkeypatch: pytest.MonkeyPatch, settings: Settings) -> None:
    created: list[Any] = []

    class Admin:
        def __init__(self, **kwargs: Any) -> None:
            pass

        async def start(self) -> None:
            pass

        async def list_topics(self) -> list[str]:
            return ["t", "t.dlq"]

        async def create_topics(self, topics: list[Any], timeout_ms: int) -> Any:
            created.extend(topics)

        async def close(self) -> None:
            pass

    monkeypatch.setattr("dsched.libs.log.kafka.AIOKafkaAdminClient", Admin)
    await KafkaLog.from_url("kafka://127.0.0.1:1/t", settings)._ensure_topics()
    assert created == []


async def test_missing_topics_are_created_with_the_configured_partitions(
    monkeypatch: pytest.MonkeyPatch, settings: Settings
) -> None:
    created: list[Any] = []

    @dataclass
    class Response:
        topic_errors: list[tuple[str, int, str]]

    class Admin:
        def __init__(self, **kwargs: Any) -> None:
            pass

        async def start(self) -> None:
            pass

        async def list_topics(self) -> list[str]:
            return ["t"]

        async def describe_cluster(self) -> dict[str, Any]:
            return {"brokers": [{"node_id": i} for i in range(5)]}

        async def create_topics(self, topics: list[Any], timeout_ms: int) -> Response:
            created.extend(topics)
            return Response([(t.name, 0, "") for t in topics])

        async def close(self) -> None:
            pass

    monkeypatch.setattr("dsched.libs.log.kafka.AIOKafkaAdminClient", Admin)
    await KafkaLog.from_url("kafka://127.0.0.1:1/t?partitions=8", settings)._ensure_topics()
    [dlq] = created
    assert (dlq.name, dlq.num_partitions, dlq.replication_factor) == ("t.dlq", 8, 3)
    assert dlq.topic_configs == {"min.insync.replicas": "2"}
