"""Embedded log specifics: several OS processes appending to one file, group commit, fixed partition count."""

from __future__ import annotations

import asyncio
import multiprocessing
from collections import defaultdict
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import TypeVar

import pytest

from dsched.libs.log.base import ConsumedRecord, LogConsumer
from dsched.libs.log.sqlite import SqliteLog, partition_for
from dsched.libs.sqlite import Connection

T = TypeVar("T")

PROCESSES = 2
TASKS_PER_PROCESS = 20
APPENDS_PER_TASK = 25


@pytest.fixture
async def log(tmp_path: Path) -> AsyncIterator[SqliteLog]:
    impl = SqliteLog(tmp_path / "log.db", partitions=4)
    await impl.startup()
    try:
        yield impl
    finally:
        await impl.shutdown()


async def read_all(consumer: LogConsumer, n: int) -> list[ConsumedRecord]:
    got: list[ConsumedRecord] = []
    for _ in range(200):
        if len(got) >= n:
            break
        got += await consumer.poll(max_records=1000, timeout_s=0.2)
    return got


def _append_from_process(path: str, process: int) -> None:
    """Child process: many concurrent single-record appends, like concurrent HTTP requests."""

    async def main() -> None:
        log = SqliteLog(Path(path), partitions=4)
        await log.startup()

        async def task(t: int) -> None:
            for i in range(APPENDS_PER_TASK):
                await log.append([(f"p{process}-t{t}", f"{process}/{t}/{i}".encode())])

        await asyncio.gather(*(task(t) for t in range(TASKS_PER_PROCESS)))
        await log.shutdown()

    asyncio.run(main())


async def test_two_processes_appending_to_one_file_lose_nothing(tmp_path: Path) -> None:
    path = tmp_path / "log.db"
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_append_from_process, args=(str(path), p)) for p in range(PROCESSES)]
    for proc in procs:
        proc.start()
    for proc in procs:
        await asyncio.to_thread(proc.join, 120)
        assert proc.exitcode == 0

    log = SqliteLog(path, partitions=4)
    await log.startup()
    consumer = log.consumer("check")
    await consumer.startup()
    try:
        total = PROCESSES * TASKS_PER_PROCESS * APPENDS_PER_TASK
        records = await read_all(consumer, total)
    finally:
        await consumer.shutdown()
        await log.shutdown()
    assert len(records) == total
    offsets: dict[int, list[int]] = defaultdict(list)
    values: dict[str, list[int]] = defaultdict(list)
    for record in records:
        offsets[record.partition].append(record.offset)
        values[record.key].append(int(record.value.decode().rsplit("/", 1)[1]))
    assert all(sorted(o) == list(range(len(o))) for o in offsets.values()), "offsets are gapless and unique"
    assert all(v == list(range(APPENDS_PER_TASK)) for v in values.values()), "per-key order kept"


async def test_concurrent_appends_share_transactions_and_all_land(
    log: SqliteLog, monkeypatch: pytest.MonkeyPatch
) -> None:
    transactions = 0
    run = log._db.run  # one call per group commit (one transaction on the connection's thread)

    async def counting_run(fn: Callable[[Connection], T]) -> T:
        nonlocal transactions
        transactions += 1
        return await run(fn)

    monkeypatch.setattr(log._db, "run", counting_run)
    await asyncio.gather(*(log.append([(f"k{i % 7}", str(i).encode())]) for i in range(300)))
    assert transactions <= 5, "concurrent appends were not coalesced"

    consumer = log.consumer("g")
    await consumer.startup()
    try:
        records = await read_all(consumer, 300)
    finally:
        await consumer.shutdown()
    assert sorted(int(r.value) for r in records) == list(range(300))
    for key in {r.key for r in records}:
        mine = [int(r.value) for r in records if r.key == key]
        assert mine == sorted(mine), "one key's records keep call order"


async def test_a_consumer_in_another_process_sees_appends(tmp_path: Path) -> None:
    writer = SqliteLog(tmp_path / "log.db", partitions=4)
    reader = SqliteLog(tmp_path / "log.db", partitions=4)
    await writer.startup()
    await reader.startup()
    consumer = reader.consumer("g")
    await consumer.startup()
    try:
        waiter = asyncio.create_task(consumer.poll(10, timeout_s=5))
        await asyncio.sleep(0.1)
        await writer.append([("k", b"v")])
        assert [r.value for r in await waiter] == [b"v"]
    finally:
        await consumer.shutdown()
        await reader.shutdown()
        await writer.shutdown()


async def test_the_partition_count_is_fixed_when_the_file_is_created(tmp_path: Path) -> None:
    first = SqliteLog(tmp_path / "log.db", partitions=4)
    await first.startup()
    await first.shutdown()
    again = SqliteLog(tmp_path / "log.db", partitions=8)
    await again.startup()
    try:
        assert again.partitions == 4
    finally:
        await again.shutdown()


async def test_commits_from_two_members_keep_the_furthest(log: SqliteLog) -> None:
    await log.append([("k", str(i).encode()) for i in range(5)])
    a, b = log.consumer("g"), log.consumer("g")
    await a.startup()
    await b.startup()
    try:
        ra, rb = await read_all(a, 5), await read_all(b, 5)
        await a.commit(ra)
        await b.commit(rb[:2])  # a slower member committing older records
    finally:
        await a.shutdown()
        await b.shutdown()
    c = log.consumer("g")
    await c.startup()
    try:
        assert await c.poll(10, timeout_s=0.2) == []
    finally:
        await c.shutdown()


async def test_append_after_shutdown_fails(tmp_path: Path) -> None:
    log = SqliteLog(tmp_path / "log.db", partitions=2)
    await log.startup()
    await log.shutdown()
    with pytest.raises(RuntimeError):
        await log.append([("k", b"v")])


async def test_a_backlog_in_every_partition_is_read_oldest_first_once_and_in_order(log: SqliteLog) -> None:
    """Polls smaller than the backlog: each returns the oldest records across partitions, each partition's in
    offset order, and together they return every record once."""
    keys = {partition_for(f"key-{i}", 4): f"key-{i}" for i in range(100)}
    assert sorted(keys) == [0, 1, 2, 3]
    for round_ in range(30):
        for partition in (3, 1, 0, 2):
            await log.append([(keys[partition], f"{round_}".encode())])
            await asyncio.sleep(0.002)  # distinct append times: "oldest" is then well defined
    consumer = log.consumer("g")
    await consumer.startup()
    try:
        polls = [await consumer.poll(max_records=25, timeout_s=0.2) for _ in range(5)]
    finally:
        await consumer.shutdown()
    assert [len(p) for p in polls] == [25, 25, 25, 25, 20]
    got = [record for p in polls for record in p]
    assert [r.timestamp_ms for r in got] == sorted(r.timestamp_ms for r in got)
    assert len({(r.partition, r.offset) for r in got}) == 120
    for partition in range(4):
        mine = [r for r in got if r.partition == partition]
        assert [r.offset for r in mine] == list(range(30))
        assert [r.value for r in mine] == [str(i).encode() for i in range(30)]
        assert {r.key for r in mine} == {keys[partition]}
