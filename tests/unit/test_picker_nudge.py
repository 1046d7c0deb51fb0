"""A writer in the picker's process nudges it (``Picker.entries_stored``): a job due now is dispatched without
waiting for the picker's next tick; ``run all`` wires the two when they share a process. Shards newly assigned (a
failover) are read at once too."""

from __future__ import annotations

import asyncio
from pathlib import Path

from dsched.app.runner import started
from dsched.libs.clock import now_ms
from dsched.libs.models import Job, Payload
from dsched.libs.queue.sqlite import SqliteQueue
from dsched.libs.settings import Settings
from dsched.libs.sharding import entry_for
from dsched.libs.store.sqlite import SqliteStore
from dsched.picker.service import Picker
from tests.helpers.pickers import assign, picker_backends, picker_owning, running

TICK_S = 60.0  # far longer than the test: only a nudge can make the picker load


async def _store_due_now(store: SqliteStore, settings: Settings) -> int:
    now = now_ms()
    job = Job(job_id="now", user_id="u", project_id="p", payload=Payload(kind="echo"), next_fire_ms=now, created_ms=now)
    await store.put_jobs([job])
    entry = entry_for(
        job, now, scheduled_ms=now, attempt=0, kind="schedule", shard_count=1, bucket_ms=settings.bucket_ms, now=now
    )
    await store.put_entries([entry])
    return now


async def _received(queue: SqliteQueue, wait_s: float) -> int:
    return len(await queue.receive(10, wait_s=wait_s, visibility_s=30))


async def test_a_nudged_picker_loads_and_sends_a_job_due_now_before_its_tick(tmp_path: Path) -> None:
    async with (
        picker_backends(tmp_path, shard_count=1, picker_tick_s=TICK_S) as (settings, store, queue),
        picker_owning([0], store=store, queue=queue, settings=settings, tmp_path=tmp_path) as picker,
        running(picker),
    ):
        await asyncio.sleep(0.2)  # the first load ran (an empty store); the next regular one is a minute away
        due = await _store_due_now(store, settings)
        assert await _received(queue, wait_s=0.5) == 0  # not loaded: stored behind the picker's back
        picker.entries_stored(due)
        assert await _received(queue, wait_s=5) == 1


async def test_a_picker_assigned_a_shard_loads_it_at_once_not_at_its_tick(tmp_path: Path) -> None:
    async with (
        picker_backends(tmp_path, shard_count=1, picker_tick_s=TICK_S) as (settings, store, queue),
        picker_owning([], store=store, queue=queue, settings=settings, tmp_path=tmp_path) as picker,
        running(picker),
    ):
        await _store_due_now(store, settings)
        await asyncio.sleep(0.2)  # the first load ran, owning nothing; the next regular one is a minute away
        assert await _received(queue, wait_s=0.3) == 0
        await assign(picker, [0])
        assert await _received(queue, wait_s=5) == 1


async def test_run_all_wires_its_writer_to_its_picker(tmp_path: Path) -> None:
    settings = Settings.from_env(data_dir=tmp_path, shard_count=1)
    async with started(settings, ["writer", "picker"], asyncio.Event()) as services:
        writer, picker = services["writer"], services["picker"]
        assert isinstance(picker, Picker)
        assert getattr(writer, "on_stored", None) == picker.entries_stored
