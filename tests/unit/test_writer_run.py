"""Writer.run over a flood of records: offsets are committed in order, each batch's only after the batch is
stored, so a store outage mid-flood loses nothing and skips nothing."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import pytest

from dsched.libs.clock import now_ms
from dsched.libs.log.base import WRITER_GROUP
from dsched.libs.log.sqlite import SqliteLog
from dsched.libs.models import BucketEntry, Job, Submission
from dsched.libs.settings import Settings
from dsched.libs.store.sqlite import SqliteStore
from dsched.writer.service import Writer
from tests.helpers.store_contract import make_job

BATCH = 4
JOBS = 20


class FlakyStore(SqliteStore):
    """A store that is down (writes and reads fail) from its ``fail_from``-th batch write while ``down``."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.down = False
        self.fail_from = 2
        self.writes = 0

    async def put_jobs_and_entries(self, jobs: Sequence[Job], entries: Sequence[BucketEntry]) -> None:
        self.writes += 1
        if self.down and self.writes >= self.fail_from:
            raise OSError("store unreachable")
        await super().put_jobs_and_entries(jobs, entries)

    async def get_jobs(self, job_ids: Sequence[str]) -> dict[str, Job]:
        if self.down and self.writes >= self.fail_from:
            raise OSError("store unreachable")
        return await super().get_jobs(job_ids)


@pytest.fixture
async def parts(tmp_path: Path) -> AsyncIterator[tuple[Settings, SqliteLog, FlakyStore, list[str]]]:
    settings = Settings.from_env(data_dir=tmp_path, writer_batch=BATCH)
    log = SqliteLog(tmp_path / "log.db", partitions=1)  # one partition: batches are the log's order
    store = FlakyStore(tmp_path / "store.db")
    await log.startup()
    await store.startup()
    now = now_ms()
    jobs = [make_job("u", now, job_id=f"job-{i:02d}", next_fire_ms=now + 60_000) for i in range(JOBS)]
    await log.append([(j.job_id, Submission(op="submit", job=j, at_ms=now).model_dump_json().encode()) for j in jobs])
    try:
        yield settings, log, store, [j.job_id for j in jobs]
    finally:
        await store.shutdown()
        await log.shutdown()


async def uncommitted(log: SqliteLog) -> int:
    consumer = log.consumer(WRITER_GROUP)
    await consumer.startup()
    try:
        return (await consumer.lag()).records  # type: ignore[union-attr]
    finally:
        await consumer.shutdown()


async def run_until(writer: Writer, done: asyncio.Event) -> None:
    """Run the writer's loop until ``done`` is set (bounded: 10 s)."""
    stop = asyncio.Event()
    task = asyncio.create_task(writer.run(stop))
    try:
        await asyncio.wait_for(done.wait(), timeout=10)
    finally:
        stop.set()
        await task


async def test_every_batch_is_stored_and_committed(parts: tuple[Settings, SqliteLog, FlakyStore, list[str]]) -> None:
    settings, log, store, job_ids = parts
    writer = Writer(log=log, store=store, settings=settings)
    all_stored = asyncio.Event()
    writer.on_stored = lambda _: all_stored.set() if store.writes == JOBS // BATCH else None
    async with writer.open():
        await run_until(writer, all_stored)
    assert sorted(await store.get_jobs(job_ids)) == job_ids
    assert await uncommitted(log) == 0


async def test_a_store_outage_mid_flood_commits_only_what_was_stored_and_the_rest_follows(
    parts: tuple[Settings, SqliteLog, FlakyStore, list[str]],
) -> None:
    settings, log, store, job_ids = parts
    store.down = True
    writer = Writer(log=log, store=store, settings=settings)
    async with writer.open():
        with pytest.raises(OSError):
            await writer.run(asyncio.Event())
        # The first batch was stored and committed; the second failed, and nothing after it was committed.
        assert await uncommitted(log) == JOBS - BATCH
        assert len(await SqliteStore.get_jobs(store, job_ids)) == BATCH
        store.down = False
        caught_up = asyncio.Event()

        async def watch() -> None:
            for _ in range(200):  # bounded: 10 s
                if len(await store.get_jobs(job_ids)) == JOBS:
                    caught_up.set()
                    return
                await asyncio.sleep(0.05)

        watcher = asyncio.create_task(watch())
        await run_until(writer, caught_up)  # the loop starts over from the last commit
        await watcher
    assert sorted(await store.get_jobs(job_ids)) == job_ids
    assert await uncommitted(log) == 0
