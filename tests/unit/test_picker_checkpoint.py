"""A shard's checkpoint passes a bucket only once nothing in it is left to dispatch: entries the picker holds
loaded (which a load leaves out as known) keep their bucket from being passed."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import orjson
import pytest

from dsched.libs.models import Job, Payload
from dsched.libs.queue.sqlite import SqliteQueue
from dsched.libs.settings import Settings
from dsched.libs.sharding import bucket_for, entry_for
from dsched.libs.store.sqlite import SqliteStore
from dsched.picker.service import FULL_LOAD_INTERVAL_MS
from tests.helpers.pickers import QueueFailingFirstSend, picker_backends, picker_owning

BUCKET_MS = 60_000
NOW = bucket_for(1_800_000_000_000, BUCKET_MS)  # the start of a bucket


@pytest.fixture
async def backends(tmp_path: Path) -> AsyncIterator[tuple[Settings, SqliteStore, SqliteQueue]]:
    # Runs dispatched in due order, batch after batch (what a failed batch leaves loaded is the later batches).
    async with picker_backends(tmp_path, shard_count=1, tenant_fair_dispatch=False) as backends:
        yield backends


def _job(job_id: str, fire_ms: int) -> Job:
    return Job(
        job_id=job_id,
        user_id="u",
        project_id="p",
        payload=Payload(kind="echo", text="x"),
        next_fire_ms=fire_ms,
        created_ms=NOW - 1000,
    )


async def test_entries_loaded_when_a_dispatch_failed_are_sent_after_the_shard_is_read_again(
    backends: tuple[Settings, SqliteStore, SqliteQueue], tmp_path: Path
) -> None:
    """A picker catching up after an outage: one job's entry sits in an old bucket, another's (due earlier, stored
    late by a lagging writer) in the next. The earlier one's send fails, so the later one stays loaded through the
    next load, which must not pass its bucket: the picker then loses its lease for a moment, drops what it loaded,
    and reads the shard again from the checkpoint."""
    settings, store, queue = backends
    assert settings.bucket_ms == BUCKET_MS and settings.bucket_grace_s == 10.0
    waiting, stored_late = _job("waiting", NOW + 5_000), _job("stored-late", NOW)
    entries = [
        entry_for(waiting, NOW + 5_000, scheduled_ms=NOW + 5_000, attempt=0, kind="schedule", shard_count=1,
                  bucket_ms=BUCKET_MS, now=NOW),
        entry_for(stored_late, NOW, scheduled_ms=NOW, attempt=0, kind="schedule", shard_count=1,
                  bucket_ms=BUCKET_MS, now=NOW + BUCKET_MS),
    ]  # fmt: skip
    assert [e.bucket_ms for e in entries] == [NOW, NOW + BUCKET_MS]
    await store.put_jobs([waiting, stored_late])
    await store.advance_checkpoint(0, None, NOW)
    await store.put_entries(entries)
    catching_up = NOW + 2 * BUCKET_MS + 11_000  # both buckets ended over bucket_grace_s ago
    async with picker_owning([0], store=store, queue=queue, settings=settings, tmp_path=tmp_path) as picker:
        picker.queue = QueueFailingFirstSend(queue)  # type: ignore[assignment]
        picker._batch_size = 1
        await picker.load(catching_up)
        with pytest.raises(ConnectionError):
            await picker.dispatch_due(catching_up)  # "stored-late" first (due first): its send fails
        await picker.load(catching_up)  # the next step; "waiting" is still loaded
        lease = picker._lease_valid_until
        picker._lease_valid_until = 0.0  # the lease lapses (a stalled step, a partition) ...
        await picker.load(catching_up)  # ... so the picker lets go of what it loaded
        picker._lease_valid_until = lease  # and it holds the shard again
        await picker.load(catching_up)
        assert await picker.dispatch_due(catching_up) == 2
        sent = await queue.receive(10, 0.0, 30.0)
        assert sorted(orjson.loads(m.body)["job"]["job_id"] for m in sent) == ["stored-late", "waiting"]
        await picker.load(catching_up + FULL_LOAD_INTERVAL_MS)  # both buckets read from their start are empty: passed
        assert await store.get_checkpoint(0) == NOW + 2 * BUCKET_MS
