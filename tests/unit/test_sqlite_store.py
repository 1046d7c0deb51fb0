"""Embedded store specifics: exact stats, several processes on one file, cursors, a persisted layout."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from dsched.libs.models import BucketEntry, DeadLetter, Job, JobState, JobStatus, Payload
from dsched.libs.sqlite import connect
from dsched.libs.store.base import LayoutMismatch
from dsched.libs.store.sqlite import SqliteStore


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[SqliteStore]:
    impl = SqliteStore(tmp_path / "store.db")
    await impl.startup()
    try:
        yield impl
    finally:
        await impl.shutdown()


def job(created_ms: int, **fields: object) -> Job:
    return Job.model_validate(
        {
            "job_id": uuid.uuid4().hex,
            "user_id": "u",
            "project_id": "p",
            "payload": Payload(kind="echo", text="x"),
            "next_fire_ms": created_ms,
            "created_ms": created_ms,
            **fields,
        }
    )


async def test_stats_counts_exactly(store: SqliteStore) -> None:
    jobs = [job(i) for i in range(8)]
    jobs[6].paused = True
    jobs[7].deleted = True
    await store.put_jobs(jobs)
    states = [JobStatus.QUEUED, JobStatus.RUNNING, JobStatus.RUNNING, JobStatus.SUCCEEDED, JobStatus.FAILED]
    await store.update_job_states(
        [JobState(job_id=j.job_id, state=s) for j, s in zip(jobs, states, strict=False)]
        + [JobState(job_id=jobs[6].job_id, state=JobStatus.RUNNING)]  # paused wins
    )
    await store.put_entries(
        [
            BucketEntry(shard=s, bucket_ms=0, due_ms=due, job_id=jobs[0].job_id, scheduled_ms=due)
            for s, due in ((0, 100), (1, 200), (2, 300))
        ]
    )
    await store.put_dead_letters(
        [
            DeadLetter(
                dead_letter_id=uuid.uuid4().hex,
                job_id="j",
                user_id="u",
                project_id="p",
                scheduled_ms=1,
                attempts=1,
                error=None,
                dead_ms=2,
            )
        ]
    )
    assert await store.stats(now_ms=200) == {
        "scheduled": 1,
        "queued": 1,
        "running": 2,
        "succeeded": 1,
        "failed": 1,
        "due": 2,
        "dead": 1,
    }


async def test_two_instances_on_one_file_claim_each_run_once(tmp_path: Path) -> None:
    a, b = SqliteStore(tmp_path / "s.db"), SqliteStore(tmp_path / "s.db")
    await a.startup()
    await b.startup()
    try:
        ids = [uuid.uuid4().hex for _ in range(200)]
        results = await asyncio.gather(*(s.claim_runs(ids[i::2] + ids, f"w{i}") for i, s in enumerate((a, b, a, b))))
        assert set().union(*results) == set(ids)
        assert sum(len(r) for r in results) == len(ids)
    finally:
        await a.shutdown()
        await b.shutdown()


async def test_a_write_is_visible_to_the_next_read(store: SqliteStore) -> None:
    # Reads use a second connection: a completed write must still be seen by the read that follows it.
    for i in range(50):
        j = job(i)
        await store.put_jobs([j])
        assert j.job_id in await store.get_jobs([j.job_id])


async def test_an_invalid_cursor_is_a_value_error(store: SqliteStore) -> None:
    with pytest.raises(ValueError):
        await store.list_jobs("u", 10, cursor="not a cursor")
    with pytest.raises(ValueError):
        await store.list_runs("j", 10, cursor="WzFd")  # valid base64 JSON, wrong shape


async def test_the_layout_survives_a_restart(tmp_path: Path) -> None:
    first = SqliteStore(tmp_path / "s.db")
    await first.startup()
    await first.check_layout(16, 60_000)
    await first.shutdown()
    again = SqliteStore(tmp_path / "s.db")
    await again.startup()
    try:
        with pytest.raises(LayoutMismatch):
            await again.check_layout(8, 60_000)
        await again.check_layout(16, 60_000)
    finally:
        await again.shutdown()


async def test_large_batches_go_through(store: SqliteStore) -> None:
    jobs = [job(i) for i in range(2_000)]
    await store.put_jobs(jobs)
    got = await store.get_jobs([j.job_id for j in jobs])
    assert len(got) == 2_000


async def test_a_store_file_from_before_the_accepted_column_opens_and_lists_its_jobs(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    old = job(1000)
    conn = connect(path)  # the jobs table as earlier releases created it
    conn.execute(
        "CREATE TABLE jobs (job_id TEXT PRIMARY KEY, user_id TEXT NOT NULL, project_id TEXT NOT NULL, "
        "created_ms INTEGER NOT NULL, paused INTEGER NOT NULL, deleted INTEGER NOT NULL, "
        "definition BLOB NOT NULL) WITHOUT ROWID"
    )
    conn.execute(
        "INSERT INTO jobs VALUES (?, 'u', 'p', 1000, 0, 0, ?)",
        (old.job_id, old.model_dump_json(exclude={"state", "last_run", "dispatched_through_ms"}).encode()),
    )
    conn.close()
    upgraded = SqliteStore(path)
    await upgraded.startup()
    try:
        page, _ = await upgraded.list_jobs("u", 10, status="scheduled")
        assert [j.job_id for j in page] == [old.job_id]
        await upgraded.put_jobs([job(2000, version=-1)])
        submitted, _ = await upgraded.list_jobs("u", 10, status="submitted")
        assert len(submitted) == 1
    finally:
        await upgraded.shutdown()


async def test_a_store_file_from_before_the_decision_times_keeps_its_states_and_takes_new_ones(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    old = job(1000)
    first = SqliteStore(path)
    await first.startup()
    await first.put_jobs([old])
    await first.shutdown()
    conn = connect(path)  # job_states as earlier releases created it, with a state written then
    conn.execute("DROP TABLE job_states")
    conn.execute(
        "CREATE TABLE job_states (job_id TEXT PRIMARY KEY, state TEXT, last_run BLOB, dispatched_through_ms INTEGER) "
        "WITHOUT ROWID"
    )
    conn.execute("INSERT INTO job_states VALUES (?, 'queued', NULL, 1000)", (old.job_id,))
    conn.close()
    upgraded = SqliteStore(path)
    await upgraded.startup()
    try:
        got = (await upgraded.get_jobs([old.job_id]))[old.job_id]
        assert (got.state, got.dispatched_through_ms, got.state_at_us) == (JobStatus.QUEUED, 1000, 0)
        await upgraded.update_job_states([JobState(job_id=old.job_id, state=JobStatus.SUCCEEDED)])
        got = (await upgraded.get_jobs([old.job_id]))[old.job_id]
        assert (got.state, got.dispatched_through_ms) == (JobStatus.SUCCEEDED, 1000) and got.state_at_us > 0
    finally:
        await upgraded.shutdown()
