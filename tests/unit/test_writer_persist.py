"""Writer.persist: what one batch of log records becomes in the store, and where records it cannot store go."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import pytest

from dsched.libs.clock import now_ms
from dsched.libs.log.base import ConsumedRecord
from dsched.libs.log.sqlite import SqliteLog
from dsched.libs.models import BucketEntry, Job, Payload, Submission
from dsched.libs.settings import Settings
from dsched.libs.sharding import entry_for
from dsched.libs.sqlite import connect
from dsched.libs.store.sqlite import SqliteStore
from dsched.writer.service import Writer

DUE_IN_MS = 60_000


class Env:
    def __init__(self, settings: Settings, log: SqliteLog, store: SqliteStore, writer: Writer) -> None:
        self.settings, self.log, self.store, self.writer = settings, log, store, writer
        self.now = now_ms()

    def job(self, job_id: str, **changes: object) -> Job:
        return Job(
            job_id=job_id,
            user_id="u",
            project_id="p",
            payload=Payload(kind="echo", text="x"),
            next_fire_ms=self.now + DUE_IN_MS,
            created_ms=self.now,
        ).model_copy(update=changes)

    def record(self, offset: int, job: Job, op: str = "submit") -> ConsumedRecord:
        body = Submission(op=op, job=job, at_ms=self.now).model_dump_json().encode()  # type: ignore[arg-type]
        return ConsumedRecord(partition=0, offset=offset, key=job.job_id, value=body, timestamp_ms=self.now)

    async def entries_of(self, job: Job) -> list[tuple[int, str, int]]:
        where = entry_for(
            job,
            job.next_fire_ms,
            scheduled_ms=job.next_fire_ms,
            attempt=0,
            kind="schedule",
            bucket_ms=self.settings.bucket_ms,
            shard_count=self.settings.shard_count,
            now=self.now,
        )
        found = await self.store.due_entries(where.shard, where.bucket_ms, job.next_fire_ms, 100)
        return [(e.due_ms, e.job_id, e.version) for e in found if e.job_id == job.job_id]

    def parked_offsets(self) -> list[int]:
        conn = connect(self.log.path)
        try:
            return [row[0] for row in conn.execute("SELECT offset FROM dead_letters ORDER BY offset")]
        finally:
            conn.close()


@pytest.fixture
async def env(tmp_path: Path) -> AsyncIterator[Env]:
    settings = Settings.from_env(data_dir=tmp_path)
    log = SqliteLog(tmp_path / "log.db", partitions=settings.log_partitions)
    store = SqliteStore(tmp_path / "store.db")
    await log.startup()
    await store.startup()
    writer = Writer(log=log, store=store, settings=settings)
    try:
        async with writer.open():
            yield Env(settings, log, store, writer)
    finally:
        await store.shutdown()
        await log.shutdown()


async def test_a_submission_stores_its_job_versioned_by_offset_and_its_first_entry(env: Env) -> None:
    job = env.job("j1")
    await env.writer.persist([env.record(7, job)])
    stored = (await env.store.get_jobs(["j1"]))["j1"]
    assert stored.version == 7
    assert await env.entries_of(job) == [(job.next_fire_ms, "j1", 7)]


async def test_a_paused_job_is_stored_without_an_entry(env: Env) -> None:
    job = env.job("j2", paused=True)
    await env.writer.persist([env.record(3, job, op="pause")])
    assert (await env.store.get_jobs(["j2"]))["j2"].paused
    assert await env.entries_of(job) == []


async def test_undecodable_and_invalid_records_are_parked_and_the_rest_stored(env: Env) -> None:
    good, invalid = env.job("good"), env.job("bad", next_fire_ms=2**80)  # no bucket can hold that time
    garbage = ConsumedRecord(partition=0, offset=1, key="x", value=b"not json", timestamp_ms=env.now)
    await env.writer.persist([garbage, env.record(2, invalid), env.record(3, good)])
    assert env.parked_offsets() == [1, 2]
    assert await env.entries_of(good) == [(good.next_fire_ms, "good", 3)]
    letters, _ = await env.store.list_dead_letters("u", 10)
    assert [letter.job_id for letter in letters] == ["bad"]  # the owner of the decodable one is told


async def test_a_store_outage_raises_and_parks_nothing(env: Env) -> None:
    class Down(SqliteStore):
        async def put_jobs(self, jobs: Sequence[Job]) -> None:
            raise OSError("store unreachable")

        async def put_jobs_and_entries(self, jobs: Sequence[Job], entries: Sequence[BucketEntry]) -> None:
            raise OSError("store unreachable")

        async def get_jobs(self, job_ids: Sequence[str]) -> dict[str, Job]:
            raise OSError("store unreachable")

    down = Down(env.store.path)
    await down.startup()
    try:
        env.writer.store = down
        with pytest.raises(OSError):
            await env.writer.persist([env.record(1, env.job("a")), env.record(2, env.job("b"))])
    finally:
        await down.shutdown()
    assert env.parked_offsets() == []
