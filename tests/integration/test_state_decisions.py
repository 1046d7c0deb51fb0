"""A job's status is the latest *decided* state, whatever order the state writes arrive in.

Left open by the fix for chaos ``frozen-picker``'s ``job_states_settled`` (docs/chaos.md): a picker's "queued"
write that lands after the run's outcome used to set a finished one-off job back to "queued" for good. Two ways
there, both driven here with the real picker and worker on embedded backends: the write held in flight (the
picker frozen inside it, after its send) while the run finishes; and a picker that read the job just before the
outcome was recorded.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from dsched.libs import clock
from dsched.libs.blobs.files import FileBlobStore
from dsched.libs.clock import now_ms
from dsched.libs.models import BucketEntry, Job, JobState, JobStatus, Payload, RunOrder, RunStatus, run_id_for
from dsched.libs.queue.base import OutgoingMessage
from dsched.libs.queue.sqlite import SqliteQueue
from dsched.libs.settings import Settings
from dsched.libs.sharding import entry_for
from dsched.libs.store.sqlite import SqliteStore
from dsched.worker.service import Worker
from tests.helpers.pickers import picker_backends, picker_owning


class HeldStore:
    """The store, with hooks around a picker's reads and state writes."""

    def __init__(self, inner: SqliteStore) -> None:
        self.inner = inner
        self.after_read: Any = None  # awaited after get_jobs returns, before the picker sees the jobs
        self.hold_state_write: asyncio.Event | None = None  # a "queued" write waits for it once
        self.holding = asyncio.Event()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    async def get_jobs(self, job_ids: Sequence[str]) -> dict[str, Job]:
        jobs = await self.inner.get_jobs(job_ids)
        if self.after_read is not None:
            hook, self.after_read = self.after_read, None
            await hook()
        return jobs

    async def update_job_states(self, updates: Sequence[JobState]) -> None:
        release = self.hold_state_write
        if release is not None and any(u.state == JobStatus.QUEUED for u in updates):
            self.hold_state_write = None
            self.holding.set()
            await release.wait()
        await self.inner.update_job_states(updates)


@pytest.fixture
async def backends(tmp_path: Path) -> AsyncIterator[tuple[Settings, SqliteStore, SqliteQueue]]:
    async with picker_backends(tmp_path, shard_count=1) as backends:
        yield backends


@pytest.fixture
async def worker(backends: tuple[Settings, SqliteStore, SqliteQueue], tmp_path: Path) -> AsyncIterator[Worker]:
    settings, store, queue = backends
    blobs = FileBlobStore(tmp_path / "blobs")
    async with Worker(queue=queue, store=store, blobs=blobs, settings=settings).open() as w:
        yield w


async def _one_off(store: SqliteStore, settings: Settings, **fields: Any) -> tuple[Job, BucketEntry, int]:
    now = now_ms()
    job = Job(
        job_id="once",
        user_id="u",
        project_id="p",
        payload=Payload(kind="echo", text="x"),
        next_fire_ms=now,
        created_ms=now,
        max_retries=0,
        **fields,
    )
    entry = entry_for(
        job, now, scheduled_ms=now, attempt=0, kind="schedule", shard_count=1, bucket_ms=settings.bucket_ms, now=now
    )
    await store.put_jobs([job])
    await store.put_entries([entry])
    return job, entry, now


async def _status(store: SqliteStore, job: Job) -> tuple[JobStatus, RunStatus | None]:
    current = (await store.get_jobs([job.job_id]))[job.job_id]
    return current.status, None if current.last_run is None else current.last_run.status


async def test_a_queued_write_held_in_flight_past_the_runs_outcome_does_not_set_the_job_back(
    backends: tuple[Settings, SqliteStore, SqliteQueue], worker: Worker, tmp_path: Path
) -> None:
    settings, store, queue = backends
    job, entry, now = await _one_off(store, settings)
    frozen_store = HeldStore(store)
    frozen_store.hold_state_write = release = asyncio.Event()
    async with picker_owning([0], store=frozen_store, queue=queue, settings=settings, tmp_path=tmp_path) as frozen:
        stuck = asyncio.create_task(frozen._dispatch([entry], now))
        await asyncio.wait_for(frozen_store.holding.wait(), 10)  # sent, then frozen in its state write
        assert await worker.drain() == 1  # the run goes meanwhile
        assert await _status(store, job) == (JobStatus.SUCCEEDED, RunStatus.SUCCEEDED)
        frozen._lease_valid_until = 0.0  # its lease lapsed while it was frozen
        release.set()  # it wakes: its "queued" lands now, and it stops at the next step
        assert await asyncio.wait_for(stuck, 10) == 0
    assert await _status(store, job) == (JobStatus.SUCCEEDED, RunStatus.SUCCEEDED)
    assert await store.due_entries(0, entry.bucket_ms, now, 10) == [entry]  # left for the next owner


async def test_a_picker_that_read_the_job_before_its_outcome_was_recorded_does_not_set_it_back(
    backends: tuple[Settings, SqliteStore, SqliteQueue], worker: Worker, tmp_path: Path
) -> None:
    settings, store, queue = backends
    # at_most_once: the new owner's copy of the run is then deduplicated, and nothing but the picker's write
    # touches the state after the outcome.
    job, entry, now = await _one_off(store, settings, execution="at_most_once")
    async with picker_owning([0], store=store, queue=queue, settings=settings, tmp_path=tmp_path) as first:

        class LapsingQueue:  # its lease lapses right after the send: it stops before recording the dispatch
            def __getattr__(self, name: str) -> Any:
                return getattr(queue, name)

            async def send(self, messages: Sequence[OutgoingMessage]) -> None:
                await queue.send(messages)
                first._lease_valid_until = 0.0

        first.queue = LapsingQueue()  # type: ignore[assignment]
        assert await first._dispatch([entry], now) == 0  # sent, then abandoned: the entry stays
    read_first = HeldStore(store)
    (tmp_path / "p2").mkdir()

    async def run_it() -> None:  # the run finishes between the new owner's read and its writes
        assert await worker.drain() == 1

    read_first.after_read = run_it
    async with picker_owning([0], store=read_first, queue=queue, settings=settings, tmp_path=tmp_path / "p2") as new:
        assert await new._dispatch([entry], now) == 1
    assert read_first.after_read is None  # the hook ran
    assert await worker.drain() == 1  # the copy: acked, not run
    assert await _status(store, job) == (JobStatus.SUCCEEDED, RunStatus.SUCCEEDED)


async def test_a_runs_outcome_outranks_its_dispatch_even_from_a_picker_whose_clock_runs_ahead(
    backends: tuple[Settings, SqliteStore, SqliteQueue], worker: Worker, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Across machines the clocks differ: the worker's writes of a run are decided after the dispatch they
    answer (the order carries its decision time), not merely at a later reading of the worker's own clock."""
    settings, store, queue = backends
    job, _, now = await _one_off(store, settings)
    # This process's decision clock follows the order an hour ahead: put it back after the test.
    monkeypatch.setattr(clock, "_last_decision_us", clock._last_decision_us)
    ahead_us = (now + 3_600_000) * 1000  # the picker's clock, an hour ahead
    await store.update_job_states([JobState(job_id=job.job_id, state=JobStatus.QUEUED, at_us=ahead_us)])
    order = RunOrder(
        run_id=run_id_for(job.job_id, now, 0), job=job, scheduled_ms=now, attempt=0, due_ms=now, decided_us=ahead_us
    )
    await queue.send([OutgoingMessage(body=order.model_dump_json().encode())])
    assert await worker.drain() == 1
    assert await _status(store, job) == (JobStatus.SUCCEEDED, RunStatus.SUCCEEDED)
