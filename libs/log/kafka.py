"""The submissions log on Apache Kafka (aiokafka).

URL: ``kafka://host1:9092,host2:9092/dsched.submissions?partitions=8&dlq_topic=dsched.submissions.dlq``

- path: the topic; ``partitions`` (default ``settings.log_partitions``), ``replication_factor`` (default
  ``min(3, brokers)``) and ``dlq_topic`` (default ``<topic>.dlq``) are used when the topics are created;
  ``create_topics=false`` skips the admin call altogether.
- ``session_timeout_ms`` (default 10000): how long a silent group member keeps its partitions (heartbeats
  every third of it). Lower means faster failover of a dead writer and more spurious rebalances.

Consumer group ids are ``<topic>.<group>``, so deployments sharing one Kafka cluster with different topics
never rebalance each other's members.

Producer: idempotent (``enable_idempotence=True`` implies ``acks="all"``), so broker-side retries never
duplicate or reorder a partition's records; ``linger_ms=5`` lets one ``append`` call travel as a few batches.
``append`` hands every record to the producer first and only then awaits all acknowledgements, so a call costs
about one round trip however many records it carries.

Keys: the record key is the job id, hashed by the default (murmur2, Java-compatible) partitioner, so every
change of one job lands in one partition, in append order.

Consumer: a group member with auto-commit off; ``commit`` stores ``offset + 1`` of the highest record per
partition after the caller's side effects. On a rebalance the partitions a member loses are forgotten
(``_Rebalance``): records it returned but did not commit are delivered again to the partition's new
owner, which is harmless because the writer's store writes are idempotent. A commit of a partition the
member no longer owns is skipped for the same reason.

Topics: at startup an admin client tries to create the topic and its dead-letter topic, bounded by a short
timeout. Where that fails (no ACL, a broker or mock cluster without CreateTopics, a timeout) we rely on broker
auto-creation (``auto.create.topics.enable``, partition count ``num.partitions``) on first produce/subscribe;
the deploy stack creates the topics explicitly in its init job.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol
from urllib.parse import parse_qs, unquote, urlsplit

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRebalanceListener, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import CommitFailedError, IllegalStateError

from dsched.libs import logs
from dsched.libs.errors import BackendConfigError
from dsched.libs.log.base import ConsumedRecord, ConsumerLag, LogConsumer, SubmissionLog
from dsched.libs.settings import Settings

logger = logs.get("log.kafka")

ADMIN_TIMEOUT_S = 5.0
REASON_HEADER = "dsched-dlq-reason"
MAX_REASON_BYTES = 1024
TOPIC_ALREADY_EXISTS = 36  # Kafka protocol error code
URL_PARAMS = frozenset({"partitions", "dlq_topic", "replication_factor", "create_topics", "session_timeout_ms"})


class KafkaUrlError(BackendConfigError):
    """A ``kafka://`` URL that cannot be used."""


@dataclass(frozen=True, slots=True)
class KafkaConfig:
    bootstrap_servers: tuple[str, ...]
    topic: str
    dlq_topic: str
    partitions: int
    replication_factor: int | None  # None: min(3, brokers in the cluster)
    create_topics: bool = True
    session_timeout_ms: int = 10_000


def _flag(value: str) -> bool:
    if value.lower() in ("1", "true", "yes", "on"):
        return True
    if value.lower() in ("0", "false", "no", "off"):
        return False
    raise KafkaUrlError(f"not a boolean: {value!r}")


def parse_url(url: str, settings: Settings) -> KafkaConfig:
    """Parse ``kafka://h1:9092,h2:9092/topic?partitions=…&dlq_topic=…&replication_factor=…&create_topics=…``."""
    parts = urlsplit(url)
    if parts.scheme != "kafka":
        raise KafkaUrlError(f"expected kafka://, got {url!r}")
    servers = tuple(s.strip() for s in parts.netloc.split(",") if s.strip())
    if not servers:
        raise KafkaUrlError(f"no bootstrap servers in {url!r}")
    servers = tuple(s if ":" in s else f"{s}:9092" for s in servers)
    topic = unquote(parts.path.lstrip("/"))
    if not topic or "/" in topic:
        raise KafkaUrlError(f"the URL path must be one topic name: {url!r}")
    query = {k: v[-1] for k, v in parse_qs(parts.query, keep_blank_values=True).items()}
    unknown = set(query) - URL_PARAMS
    if unknown:
        raise KafkaUrlError(f"unknown kafka URL parameter(s): {', '.join(sorted(unknown))}")
    try:
        partitions = int(query.get("partitions", settings.log_partitions))
        replication = int(query["replication_factor"]) if "replication_factor" in query else None
        session_timeout_ms = int(query.get("session_timeout_ms", 10_000))
    except ValueError as exc:
        raise KafkaUrlError(f"bad number in {url!r}: {exc}") from None
    if partitions <= 0 or (replication is not None and replication <= 0) or session_timeout_ms <= 0:
        raise KafkaUrlError("partitions, replication_factor and session_timeout_ms must be > 0")
    return KafkaConfig(
        bootstrap_servers=servers,
        topic=topic,
        dlq_topic=query.get("dlq_topic") or f"{topic}.dlq",
        partitions=partitions,
        replication_factor=replication,
        create_topics=_flag(query.get("create_topics", "true")),
        session_timeout_ms=session_timeout_ms,
    )


def group_id(topic: str, group: str) -> str:
    """Kafka's id of consumer group ``group`` on ``topic`` (see the module docstring)."""
    return f"{topic}.{group}"


def to_record(message: Any) -> ConsumedRecord:
    """An aiokafka ``ConsumerRecord`` as a :class:`ConsumedRecord` (keys are UTF-8 job ids)."""
    key: bytes | None = message.key
    return ConsumedRecord(
        partition=message.partition,
        offset=message.offset,
        key=key.decode("utf-8", errors="replace") if key is not None else "",
        value=message.value if message.value is not None else b"",
        timestamp_ms=message.timestamp,
    )


def commit_offsets(records: Sequence[ConsumedRecord]) -> dict[int, int]:
    """Per partition, the offset to commit: one past the highest record (Kafka's "next to read")."""
    offsets: dict[int, int] = {}
    for record in records:
        offsets[record.partition] = max(offsets.get(record.partition, 0), record.offset + 1)
    return offsets


def dead_letter_headers(topic: str, record: ConsumedRecord, reason: str) -> list[tuple[str, bytes]]:
    return [
        (REASON_HEADER, reason.encode()[:MAX_REASON_BYTES]),
        ("dsched-dlq-topic", topic.encode()),
        ("dsched-dlq-partition", str(record.partition).encode()),
        ("dsched-dlq-offset", str(record.offset).encode()),
    ]


class Producer(Protocol):
    """The part of ``AIOKafkaProducer`` the log uses (a fake in unit tests)."""

    async def send(
        self,
        topic: str,
        value: bytes | None = None,
        key: bytes | None = None,
        partition: int | None = None,
        timestamp_ms: int | None = None,
        headers: list[tuple[str, bytes]] | None = None,
    ) -> Awaitable[Any]: ...


async def send_all(producer: Producer, topic: str, records: Sequence[tuple[str, bytes]]) -> None:
    """Queue every record, then await every acknowledgement; raise the first failure after all settled."""
    # send() only enqueues into the accumulator; the acks come back together, batched by linger_ms.
    acks = [await producer.send(topic, value, key=key.encode()) for key, value in records]
    results = await asyncio.gather(*acks, return_exceptions=True)
    errors = [r for r in results if isinstance(r, BaseException)]
    if errors:
        raise errors[0]


class KafkaLog(SubmissionLog):
    def __init__(self, config: KafkaConfig) -> None:
        self.config = config
        self._producer: AIOKafkaProducer | None = None
        self._probes: dict[str, AIOKafkaConsumer] = {}  # per group, for backlog(): never joins the group
        self._probes_lock = asyncio.Lock()

    @classmethod
    def from_url(cls, url: str, settings: Settings) -> KafkaLog:
        return cls(parse_url(url, settings))

    async def startup(self) -> None:
        if self.config.create_topics:
            await self._ensure_topics()
        producer = AIOKafkaProducer(
            bootstrap_servers=list(self.config.bootstrap_servers),
            client_id="dsched-log",
            enable_idempotence=True,
            acks="all",
            linger_ms=5,
            max_batch_size=256 * 1024,
        )
        try:
            await producer.start()
            # A metadata request for the topic: waits until it exists (auto-creating it where the broker
            # allows), so a consumer started next finds its partitions.
            await producer.partitions_for(self.config.topic)
        except BaseException:
            await producer.stop()
            raise
        self._producer = producer

    async def shutdown(self) -> None:
        probes, self._probes = list(self._probes.values()), {}
        for probe in probes:
            with contextlib.suppress(Exception):
                await probe.stop()
        producer, self._producer = self._producer, None
        if producer is not None:
            await producer.stop()  # flushes whatever is still queued

    async def append(self, records: Sequence[tuple[str, bytes]]) -> None:
        if records:
            await send_all(self._require_producer(), self.config.topic, records)

    def consumer(self, group: str) -> KafkaLogConsumer:
        return KafkaLogConsumer(self.config, group, self._require_producer)

    async def backlog(self, group: str) -> int:
        """End offset minus the group's committed offset (the log start where it never committed), summed over
        the topic's partitions. Asked by a consumer that carries the group id but never subscribes, so it never
        joins the group or causes a rebalance. Two ListOffsets requests (end, start) and one OffsetFetch per partition,
        all concurrent."""
        probe = await self._probe(group)
        partitions = await self._require_producer().partitions_for(self.config.topic)  # from metadata, kept fresh
        tps = [TopicPartition(self.config.topic, partition) for partition in sorted(partitions)]
        if not tps:
            return 0
        ends, starts = await asyncio.gather(probe.end_offsets(tps), probe.beginning_offsets(tps))
        committed = await asyncio.gather(*(probe.committed(tp) for tp in tps))
        return sum(
            max(0, int(ends.get(tp, 0)) - int(starts.get(tp, 0) if done is None else done))
            for tp, done in zip(tps, committed, strict=True)
        )

    async def _probe(self, group: str) -> AIOKafkaConsumer:
        async with self._probes_lock:
            probe = self._probes.get(group)
            if probe is None:
                probe = AIOKafkaConsumer(
                    bootstrap_servers=list(self.config.bootstrap_servers),
                    group_id=group_id(self.config.topic, group),
                    client_id=f"dsched-{group}-backlog",
                    enable_auto_commit=False,
                    isolation_level="read_committed",  # as the group's members read it
                )
                try:
                    await probe.start()
                except BaseException:
                    await probe.stop()
                    raise
                self._probes[group] = probe
            return probe

    def _require_producer(self) -> AIOKafkaProducer:
        if self._producer is None:
            raise RuntimeError("KafkaLog is not started")
        return self._producer

    async def _ensure_topics(self) -> None:
        """Create the topics if missing, best effort (see the module docstring)."""
        admin = AIOKafkaAdminClient(
            bootstrap_servers=list(self.config.bootstrap_servers),
            client_id="dsched-admin",
            request_timeout_ms=int(ADMIN_TIMEOUT_S * 1000),
        )
        try:
            async with asyncio.timeout(ADMIN_TIMEOUT_S):
                await admin.start()
                existing = set(await admin.list_topics())
                missing = [t for t in (self.config.topic, self.config.dlq_topic) if t not in existing]
                if not missing:
                    return
                brokers = len((await admin.describe_cluster()).get("brokers", [])) or 1
                replication = self.config.replication_factor or min(3, brokers)
                new = [
                    NewTopic(
                        name=name,
                        num_partitions=self.config.partitions,
                        replication_factor=replication,
                        # acks=all only means "on two brokers" when the ISR may not shrink to one.
                        topic_configs={"min.insync.replicas": str(min(2, replication))},
                    )
                    for name in missing
                ]
                response = await admin.create_topics(new, timeout_ms=int(ADMIN_TIMEOUT_S * 1000))
                failed = [
                    (name, code) for name, code, *_ in response.topic_errors if code not in (0, TOPIC_ALREADY_EXISTS)
                ]
                if failed:
                    logger.warning("kafka_create_topics_failed", errors=failed, fallback="broker auto-creation")
        except Exception as exc:  # includes the timeout; auto-creation is the documented fallback
            logger.warning(
                "kafka_create_topics_failed",
                error=f"{type(exc).__name__}: {exc}",
                fallback="broker auto-creation",
            )
        finally:
            with contextlib.suppress(Exception):
                await admin.close()


class _Rebalance(ConsumerRebalanceListener):  # type: ignore[misc]  # aiokafka is untyped
    def __init__(self, owner: KafkaLogConsumer) -> None:
        self.owner = owner

    def on_partitions_revoked(self, revoked: list[TopicPartition]) -> None:
        self.owner.forget({tp.partition for tp in revoked})

    def on_partitions_assigned(self, assigned: list[TopicPartition]) -> None:
        logger.info(
            "kafka_partitions_assigned",
            group=self.owner.group,
            partitions=sorted(tp.partition for tp in assigned),
        )


class KafkaLogConsumer(LogConsumer):
    """One member of consumer group ``group`` on the submissions topic."""

    def __init__(self, config: KafkaConfig, group: str, producer: Callable[[], Producer]) -> None:
        self.config = config
        self.group = group
        self.group_id = group_id(config.topic, group)
        self._producer = producer
        self._consumer: AIOKafkaConsumer | None = None
        # Per partition: highest offset returned by poll and not yet committed; next offset committed by us.
        self._returned: dict[int, int] = {}
        self._committed: dict[int, int] = {}

    async def startup(self) -> None:
        consumer = AIOKafkaConsumer(
            bootstrap_servers=list(self.config.bootstrap_servers),
            group_id=self.group_id,
            client_id=f"dsched-{self.group}",
            enable_auto_commit=False,
            session_timeout_ms=self.config.session_timeout_ms,
            heartbeat_interval_ms=max(100, self.config.session_timeout_ms // 3),
            auto_offset_reset="earliest",
            # Producers are idempotent, not transactional; read_committed costs nothing and stays correct
            # should a transactional producer ever write here.
            isolation_level="read_committed",
        )
        consumer.subscribe([self.config.topic], listener=_Rebalance(self))
        try:
            await consumer.start()
        except BaseException:
            await consumer.stop()
            raise
        self._consumer = consumer

    async def shutdown(self) -> None:
        consumer, self._consumer = self._consumer, None
        if consumer is not None:
            await consumer.stop()  # leaves the group: its partitions move to the other members at once
        self._returned.clear()
        self._committed.clear()

    async def poll(self, max_records: int, timeout_s: float) -> list[ConsumedRecord]:
        consumer = self._require()
        batches = await consumer.getmany(timeout_ms=max(0, int(timeout_s * 1000)), max_records=max_records)
        records: list[ConsumedRecord] = []
        for tp in sorted(batches, key=lambda tp: tp.partition):
            for message in batches[tp]:
                records.append(to_record(message))
            if batches[tp]:
                self._returned[tp.partition] = batches[tp][-1].offset
        return records

    async def lag(self) -> ConsumerLag:
        """Records: end offset minus the group's committed offset, summed over this member's partitions.
        ``oldest_ms`` is None (it would need a fetch at the committed offset)."""
        consumer = self._require()
        partitions = sorted(consumer.assignment(), key=lambda tp: tp.partition)
        if not partitions:
            return ConsumerLag(records=0, oldest_ms=None)
        ends = await consumer.end_offsets(partitions)
        records = 0
        for tp in partitions:
            committed = await consumer.committed(tp)
            records += max(0, int(ends.get(tp, 0)) - int(committed or 0))
        return ConsumerLag(records=records, oldest_ms=None)

    async def commit(self, records: Sequence[ConsumedRecord]) -> None:
        consumer = self._require()
        owned = {tp.partition for tp in consumer.assignment()}
        offsets: dict[TopicPartition, int] = {}
        for partition, offset in commit_offsets(records).items():
            if partition not in owned:
                continue  # revoked since poll: the new owner reads these records again (idempotent writes)
            if offset <= self._committed.get(partition, -1):
                continue  # never move a committed offset backwards
            offsets[TopicPartition(self.config.topic, partition)] = offset
        if not offsets:
            return
        try:
            await consumer.commit(offsets)
        except (CommitFailedError, IllegalStateError) as exc:
            # The group rebalanced under us; the partitions' new owner starts from the last commit.
            logger.warning("kafka_commit_skipped", group=self.group, error=f"{type(exc).__name__}: {exc}")
            return
        for tp, offset in offsets.items():
            self._committed[tp.partition] = offset
            if self._returned.get(tp.partition, -1) < offset:
                self._returned.pop(tp.partition, None)

    async def dead_letter(self, record: ConsumedRecord, reason: str) -> None:
        """Produce the raw record to the DLQ topic (with the reason in a header) and await its ack.

        The partition is not held back: the caller commits the record with its batch as usual. If the DLQ
        write fails this raises, the batch is not committed, and the record comes back on the next poll.
        """
        producer = self._producer()
        ack = await producer.send(
            self.config.dlq_topic,
            record.value,
            key=record.key.encode(),
            headers=dead_letter_headers(self.config.topic, record, reason),
        )
        await ack

    def forget(self, partitions: set[int]) -> None:
        """Drop what we know of revoked partitions; their uncommitted records go to the new owner."""
        lost = {p: self._returned.pop(p) for p in list(self._returned) if p in partitions}
        for partition in partitions:
            self._committed.pop(partition, None)
        if lost:
            logger.info("kafka_partitions_revoked", group=self.group, redelivered_after=lost)

    def _require(self) -> AIOKafkaConsumer:
        if self._consumer is None:
            raise RuntimeError("KafkaLogConsumer is not started")
        return self._consumer


__all__ = ["KafkaConfig", "KafkaLog", "KafkaLogConsumer", "KafkaUrlError", "parse_url"]
