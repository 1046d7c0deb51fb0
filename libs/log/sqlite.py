"""Embedded submissions log: Kafka's partitioned, keyed log on one SQLite file.

``records`` holds (partition, offset, key, value, timestamp_ms); a key's partition is
``crc32(key) % partitions`` and offsets grow by one per partition. ``committed`` holds each group's next
offset per partition (it only ever moves forward); ``dead_letters`` parks records a consumer could not decode.

Durability: the connection runs with ``synchronous=FULL``, so a committed append is fsynced. Concurrent
``append`` calls of one process share one transaction (the group commit of :meth:`SqliteDB.write`, each append
in its own savepoint); every caller resumes once that transaction is committed.

Waiting: a consumer of this process is woken by this process's appends at once, by other processes' appends
through the file's doorbell (:mod:`dsched.libs.doorbell`: a process whose consumer waits listens, every append
commit rings the other listeners once), and looks every ``POLL_INTERVAL_S`` anyway (a lost ring costs that).

The partition count is fixed when the file is created (like a Kafka topic's): a log reopened with another
``partitions`` value keeps the stored one, so every key keeps its partition and its order.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
import zlib
from collections.abc import Sequence
from functools import partial
from pathlib import Path

from dsched.libs import clock
from dsched.libs.doorbell import Doorbell
from dsched.libs.log.base import ConsumedRecord, ConsumerLag, LogConsumer, SubmissionLog
from dsched.libs.sqlite import Connection, SqliteDB

# How often a waiting consumer looks for records appended by other processes (in-process appends wake it at
# once, other processes' appends ring its doorbell; this poll is the fallback, so it is long: each look is a thread
# hop, and at 25 ms the looks of an idle `run all` cost ~2 % of a core).
POLL_INTERVAL_S = 0.1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS records (
    partition INTEGER NOT NULL,
    offset INTEGER NOT NULL,
    key TEXT NOT NULL,
    value BLOB NOT NULL,
    timestamp_ms INTEGER NOT NULL,
    PRIMARY KEY (partition, offset)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS committed (
    grp TEXT NOT NULL,
    partition INTEGER NOT NULL,
    next_offset INTEGER NOT NULL,
    PRIMARY KEY (grp, partition)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS dead_letters (
    id INTEGER PRIMARY KEY,
    grp TEXT NOT NULL,
    partition INTEGER NOT NULL,
    offset INTEGER NOT NULL,
    key TEXT NOT NULL,
    value BLOB NOT NULL,
    timestamp_ms INTEGER NOT NULL,
    reason TEXT NOT NULL,
    dead_ms INTEGER NOT NULL
)
"""

_INSERT_DEAD_LETTER = (
    "INSERT INTO dead_letters (grp, partition, offset, key, value, timestamp_ms, reason, dead_ms) "
    "VALUES (?, ?, ?, ?, ?, ?, ?, ?)"
)


def partition_for(key: str, partitions: int) -> int:
    """Stable across processes and restarts (unlike ``hash``)."""
    return zlib.crc32(key.encode()) % partitions


def _uncommitted(conn: Connection, group: str, partitions: int) -> list[tuple[int, int, int]]:
    """``(partition, first uncommitted offset, last offset)`` of each partition where ``group`` is behind."""
    committed = dict(conn.execute("SELECT partition, next_offset FROM committed WHERE grp = ?", (group,)).fetchall())
    behind = []
    for partition in range(partitions):
        start = int(committed.get(partition, 0))
        (last,) = conn.execute("SELECT MAX(offset) FROM records WHERE partition = ?", (partition,)).fetchone()
        if last is not None and last >= start:
            behind.append((partition, start, int(last)))
    return behind


def _backlog(conn: Connection, group: str, partitions: int) -> int:
    return sum(last + 1 - start for _, start, last in _uncommitted(conn, group, partitions))


def _stored_partitions(conn: Connection, default: int) -> int:
    row = conn.execute("SELECT value FROM meta WHERE name = 'partitions'").fetchone()
    if row is not None:
        return int(row[0])
    conn.execute("INSERT INTO meta (name, value) VALUES ('partitions', ?)", (default,))
    return default


class SqliteLog(SubmissionLog):
    def __init__(self, path: Path, partitions: int) -> None:
        if partitions <= 0:
            raise ValueError("partitions must be > 0")
        self.path = path
        self.partitions = partitions
        self._db = SqliteDB(path, synchronous="FULL", schema=_SCHEMA, on_commit=self._appended)
        self._running = False
        # Replaced after every commit; consumers wait on the one current when they found nothing.
        self.appended = asyncio.Event()
        # Other processes' appends ring it; it listens from the first time a consumer of this process waits.
        self._bell = Doorbell(path, self._wake_consumers)

    def _wake_consumers(self) -> None:
        woken, self.appended = self.appended, asyncio.Event()
        woken.set()

    def listen_for_other_processes(self) -> None:
        if not self._bell.listening:
            self._bell.listen()

    async def startup(self) -> None:
        await self._db.open()
        self.partitions = await self._db.write(lambda conn: _stored_partitions(conn, self.partitions))
        self._running = True

    async def shutdown(self) -> None:
        self._running = False
        self._bell.close()
        await self._db.close()  # drains every append already made

    async def append(self, records: Sequence[tuple[str, bytes]]) -> None:
        if not records:
            return
        if not self._running:
            raise RuntimeError(f"log {self.path} is not running")
        rows = list(records)
        # A caller that gives up (cancelled) still has its records written: they are in the group already.
        await self._db.write(lambda conn: self._insert(conn, rows))

    def consumer(self, group: str) -> LogConsumer:
        return SqliteLogConsumer(self, group)

    async def backlog(self, group: str) -> int:
        """Exact: offsets are contiguous per partition, so it costs one primary-key lookup per partition."""
        return await self._db.run(lambda conn: _backlog(conn, group, self.partitions))

    def _appended(self) -> None:
        self._wake_consumers()
        self._bell.ring()  # one datagram per other listening process, per commit

    def _insert(self, conn: Connection, records: list[tuple[str, bytes]]) -> None:
        now = clock.now_ms()
        next_offset: dict[int, int] = {}
        rows = []
        for key, value in records:
            partition = partition_for(key, self.partitions)
            offset = next_offset.get(partition)
            if offset is None:
                last = conn.execute("SELECT MAX(offset) FROM records WHERE partition = ?", (partition,)).fetchone()
                offset = -1 if last[0] is None else int(last[0])
                offset += 1
            next_offset[partition] = offset + 1
            rows.append((partition, offset, key, value, now))
        conn.executemany(
            "INSERT INTO records (partition, offset, key, value, timestamp_ms) VALUES (?, ?, ?, ?, ?)", rows
        )


class SqliteLogConsumer(LogConsumer):
    """A group member reading every partition from its own connection.

    Members of one group do not split partitions: several members (e.g. in several processes) each read all of
    them, so a record may be processed by more than one (the writer is idempotent); commits only move forward.
    """

    def __init__(self, log: SqliteLog, group: str) -> None:
        self._log = log
        self.group = group
        self._db = SqliteDB(log.path, synchronous="FULL", schema=_SCHEMA)
        self._position: dict[int, int] = {}
        self._partitions = log.partitions

    async def startup(self) -> None:
        await self._db.open()

        def load(conn: Connection) -> tuple[int, dict[int, int]]:
            partitions = _stored_partitions(conn, self._log.partitions)
            rows = conn.execute("SELECT partition, next_offset FROM committed WHERE grp = ?", (self.group,)).fetchall()
            return partitions, {int(p): int(o) for p, o in rows}

        self._partitions, committed = await self._db.write(load)
        self._position = {p: committed.get(p, 0) for p in range(self._partitions)}

    async def shutdown(self) -> None:
        await self._db.close()

    async def poll(self, max_records: int, timeout_s: float) -> list[ConsumedRecord]:
        if max_records <= 0:
            return []
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while True:
            appended = self._log.appended  # taken before reading, so no append can slip between
            records = await self._db.run(partial(self._read, position=dict(self._position), limit=max_records))
            if records:
                for record in records:
                    self._position[record.partition] = record.offset + 1
                return records
            remaining = deadline - loop.time()
            if remaining <= 0:
                return []
            self._log.listen_for_other_processes()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(min(POLL_INTERVAL_S, remaining)):
                    await appended.wait()

    def _read(self, conn: Connection, position: dict[int, int], limit: int) -> list[ConsumedRecord]:
        # One cursor per partition, stepped lazily by the merge: at most ``limit`` + one row per partition leave
        # SQLite, however many partitions have a backlog (reading ``limit`` from each and keeping ``limit`` made the
        # writer read four records per record used when all four had one). Open together, they share one snapshot.
        cursors = [
            conn.execute(
                "SELECT ?, offset, key, value, timestamp_ms FROM records "
                "WHERE partition = ? AND offset >= ? ORDER BY offset LIMIT ?",
                (partition, partition, start, limit),
            )
            for partition, start in position.items()
        ]
        try:
            # Oldest first across partitions; heapq.merge keeps each partition's own (offset) order regardless.
            merged = heapq.merge(*cursors, key=lambda row: row[4])
            return [
                ConsumedRecord(partition, offset, key, bytes(value), timestamp_ms)
                for partition, offset, key, value, timestamp_ms in itertools.islice(merged, limit)
            ]
        finally:
            for cursor in cursors:
                cursor.close()

    async def lag(self) -> ConsumerLag:
        """Exact: offsets are contiguous per partition, so each partition costs two primary-key lookups."""

        def read(conn: Connection) -> ConsumerLag:
            records, oldest = 0, None
            for partition, start, last in _uncommitted(conn, self.group, self._partitions):
                records += last + 1 - start
                row = conn.execute(
                    "SELECT timestamp_ms FROM records WHERE partition = ? AND offset >= ? ORDER BY offset LIMIT 1",
                    (partition, start),
                ).fetchone()
                if row is not None and (oldest is None or row[0] < oldest):
                    oldest = int(row[0])
            return ConsumerLag(records=records, oldest_ms=oldest)

        return await self._db.run(read)

    async def commit(self, records: Sequence[ConsumedRecord]) -> None:
        upto: dict[int, int] = {}
        for record in records:
            upto[record.partition] = max(upto.get(record.partition, 0), record.offset + 1)
        if not upto:
            return
        rows = [(self.group, partition, next_offset) for partition, next_offset in upto.items()]
        await self._db.write(
            lambda conn: conn.executemany(
                "INSERT INTO committed (grp, partition, next_offset) VALUES (?, ?, ?) "
                "ON CONFLICT (grp, partition) DO UPDATE "
                "SET next_offset = MAX(next_offset, excluded.next_offset)",
                rows,
            )
        )

    async def dead_letter(self, record: ConsumedRecord, reason: str) -> None:
        row = (
            self.group,
            record.partition,
            record.offset,
            record.key,
            record.value,
            record.timestamp_ms,
            reason,
            clock.now_ms(),
        )
        await self._db.write(lambda conn: conn.execute(_INSERT_DEAD_LETTER, row))
