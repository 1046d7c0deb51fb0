"""A load reads a queue partition from a window before its last complete read, not from its start (whose
tombstones Scylla would step over each tick), and still dispatches every entry: stored late, cut by the limit, or
stored in the same process."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Container, Mapping, Sequence
from pathlib import Path
from typing import Any

import orjson
import pytest

from dsched.libs.clock import now_ms
from dsched.libs.models import BucketEntry, Job, Payload
from dsched.libs.queue.sqlite import SqliteQueue
from dsched.libs.settings import Settings
from dsched.libs.sharding import bucket_for, entry_for
from dsched.libs.store.sqlite import SqliteStore
from dsched.picker.service import FULL_LOAD_INTERVAL_MS, LATE_WINDOW_MS, Picker
from tests.helpers.pickers import QueueFailingFirstSend, picker_backends, picker_owning

BUCKET_MS = 60_000
# 5 s into a bucket: the one before ended under bucket_grace_s ago (its checkpoint stays), over LATE_WINDOW_MS ago.
NOW = bucket_for(1_800_000_000_000, BUCKET_MS) + 5_000


class RecordingStore:
    """The embedded store, recording each ``due_entries_many`` call's partitions and lower bounds."""

    def __init__(self, inner: SqliteStore) -> None:
        self.inner = inner
        self.reads: list[tuple[list[tuple[int, int]], dict[tuple[int, int], int]]] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    async def due_entries_many(
        self,
        partitions: Sequence[tuple[int, int]],
        until_ms: int,
        limit: int,
        *,
        known: Container[tuple[int, int, int, str, int, int]] = (),
        since: Mapping[tuple[int, int], int] | None = None,
    ) -> dict[tuple[int, int], list[BucketEntry]]:
        self.reads.append((list(partitions), dict(since or {})))
        return await self.inner.due_entries_many(partitions, until_ms, limit, known=known, since=since)


@pytest.fixture
async def backends(tmp_path: Path) -> AsyncIterator[tuple[Settings, SqliteStore, SqliteQueue]]:
    async with picker_backends(tmp_path, shard_count=1, picker_batch=3, tenant_fair_dispatch=False) as backends:
        yield backends


def _job(job_id: str) -> Job:
    return Job(
        job_id=job_id,
        user_id="u",
        project_id="p",
        payload=Payload(kind="echo", text="x"),
        next_fire_ms=NOW,
        created_ms=NOW - 60_000,
    )


async def _store(store: SqliteStore, due_ms: int, stored_at: int, *job_ids: str) -> None:
    """Store one entry per job, due at ``due_ms``, as a writer does at ``stored_at``."""
    jobs = [_job(job_id) for job_id in job_ids]
    await store.put_jobs(jobs)
    await store.put_entries(
        [
            entry_for(
                job,
                due_ms,
                scheduled_ms=due_ms,
                attempt=0,
                kind="schedule",
                shard_count=1,
                bucket_ms=BUCKET_MS,
                now=stored_at,
            )
            for job in jobs
        ]
    )


async def _sent(queue: SqliteQueue) -> list[str]:
    return sorted(orjson.loads(m.body)["job"]["job_id"] for m in await queue.receive(10, 0.0, 30.0))


@contextlib.asynccontextmanager
async def _owning(
    backends: tuple[Settings, SqliteStore, SqliteQueue], tmp_path: Path
) -> AsyncIterator[tuple[Picker, RecordingStore]]:
    settings, store, queue = backends
    await store.advance_checkpoint(0, None, bucket_for(NOW, BUCKET_MS) - BUCKET_MS)  # the bucket before: old
    recording = RecordingStore(store)
    async with picker_owning([0], store=recording, queue=queue, settings=settings, tmp_path=tmp_path) as picker:  # type: ignore[arg-type]
        yield picker, recording


async def test_loads_between_full_loads_read_from_the_window_and_skip_old_buckets(
    backends: tuple[Settings, SqliteStore, SqliteQueue], tmp_path: Path
) -> None:
    async with _owning(backends, tmp_path) as (picker, recording):
        current, old = (0, bucket_for(NOW, BUCKET_MS)), (0, bucket_for(NOW, BUCKET_MS) - BUCKET_MS)
        await picker.load(NOW)
        await picker.load(NOW + 100)
        await picker.load(NOW + FULL_LOAD_INTERVAL_MS)
        assert recording.reads == [
            ([old, current], {}),  # the first load: every partition from its start
            ([current], {old: NOW - LATE_WINDOW_MS, current: NOW - LATE_WINDOW_MS}),  # ``old`` ended before that
            ([old, current], {}),
        ]


async def test_entries_stored_late_are_dispatched_within_the_window_or_by_the_next_full_load(
    backends: tuple[Settings, SqliteStore, SqliteQueue], tmp_path: Path
) -> None:
    _, store, queue = backends
    async with _owning(backends, tmp_path) as (picker, _):
        await picker.load(NOW)
        # Stored after that load: one a little late (a run-now job), one long after its due time.
        await _store(store, NOW - LATE_WINDOW_MS, NOW + 50, "a-little-late")
        await _store(store, NOW - LATE_WINDOW_MS - 1, NOW + 50, "long-after")
        await picker.load(NOW + 100)
        assert await picker.dispatch_due(NOW + 100) == 1
        assert await _sent(queue) == ["a-little-late"]
        await picker.load(NOW + 200)
        assert await picker.dispatch_due(NOW + 200) == 0  # read only by a full load ...
        await picker.load(NOW + FULL_LOAD_INTERVAL_MS)  # ... at most this much later
        assert await picker.dispatch_due(NOW + FULL_LOAD_INTERVAL_MS) == 1
        assert await _sent(queue) == ["long-after"]


async def test_a_writer_in_the_process_storing_late_entries_brings_the_full_load_forward(
    backends: tuple[Settings, SqliteStore, SqliteQueue], tmp_path: Path
) -> None:
    _, store, queue = backends
    async with _owning(backends, tmp_path) as (picker, recording):
        await picker.load(NOW)
        now = NOW + 100  # before the next full load
        due = now_ms() - 60_000  # entries_stored compares with the clock; NOW is later still
        await _store(store, due, now, "after-an-outage")
        picker.entries_stored(due)
        await picker.load(now)
        assert recording.reads[-1][1] == {}  # from the start
        assert await picker.dispatch_due(now) == 1
        assert await _sent(queue) == ["after-an-outage"]


async def test_a_partition_whose_read_the_limit_cut_is_read_again_from_where_that_read_started(
    backends: tuple[Settings, SqliteStore, SqliteQueue], tmp_path: Path
) -> None:
    """A backlog due long ago (picker_batch 3 here): each load reads the next page from the partition's start, not
    from the window, so the backlog drains load after load instead of one page per full load."""
    settings, store, queue = backends
    assert settings.picker_batch == 3
    await _store(store, NOW - 20_000, NOW - 20_000, *(f"backlog-{i}" for i in range(7)))
    async with _owning(backends, tmp_path) as (picker, _):
        sent = 0
        for step in range(3):
            now = NOW + 100 * step  # one full load, then loads between full loads
            await picker.load(now)
            sent += await picker.dispatch_due(now)
        assert sent == 7
        assert len(await queue.receive(10, 0.0, 30.0)) == 7


async def test_entries_whose_dispatch_failed_are_read_again_by_the_next_load(
    backends: tuple[Settings, SqliteStore, SqliteQueue], tmp_path: Path
) -> None:
    """They leave the heap still stored, due before the next load's window: it reads their partition from the
    start rather than leave them to the next full load."""
    _, store, queue = backends
    await _store(store, NOW - 20_000, NOW - 20_000, "overdue")
    async with _owning(backends, tmp_path) as (picker, _):
        picker.queue = QueueFailingFirstSend(queue)  # type: ignore[assignment]
        await picker.load(NOW)
        with pytest.raises(ConnectionError):
            await picker.dispatch_due(NOW)
        await picker.load(NOW + 100)
        assert await picker.dispatch_due(NOW + 100) == 1
        assert await _sent(queue) == ["overdue"]
