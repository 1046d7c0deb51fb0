"""A picker stuck in one backend call gives its lease up (so the coordinator can move its shards); one that is
slow but makes progress (dispatch batches, or a load's calls one shard after another) keeps it."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from dsched.libs.clock import now_ms
from dsched.libs.coordination.keys import PICKERS_PREFIX
from dsched.libs.models import Job, Payload
from dsched.libs.queue.base import OutgoingMessage
from dsched.libs.queue.sqlite import SqliteQueue
from dsched.libs.settings import Settings
from dsched.libs.sharding import bucket_for, entry_for
from dsched.libs.store.sqlite import SqliteStore
from dsched.picker.service import Picker
from tests.helpers.pickers import picker_backends, picker_owning, running

TTL_S = 0.6
SHARDS = 6


class GatedQueue:
    """A work queue whose ``send`` waits ``delay_s`` (``None``: until ``release`` is set) plus ``per_message_s`` for
    each message before sending."""

    def __init__(self, inner: SqliteQueue, delay_s: float | None, per_message_s: float = 0.0) -> None:
        self.inner, self.delay_s, self.per_message_s = inner, delay_s, per_message_s
        self.batches: list[int] = []  # messages per send
        self.entered = asyncio.Event()
        self.release = asyncio.Event()
        self.sends = 0
        self.sent = 0  # messages

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    async def send(self, messages: Sequence[OutgoingMessage]) -> None:
        self.entered.set()
        self.sends += 1
        self.batches.append(len(messages))
        if self.delay_s is None:
            await asyncio.wait_for(self.release.wait(), timeout=30)
        else:
            await asyncio.sleep(self.delay_s + self.per_message_s * len(messages))
        await self.inner.send(messages)
        self.sent += len(messages)


@pytest.fixture
async def backends(tmp_path: Path) -> AsyncIterator[tuple[Settings, SqliteStore, SqliteQueue]]:
    settings = dict(shard_count=SHARDS, lease_ttl_s=TTL_S, picker_tick_s=0.05, picker_batch=2)
    async with picker_backends(tmp_path, **settings) as backends:
        yield backends


async def _due_jobs(store: SqliteStore, settings: Settings, count: int, due_in_ms: int = 0) -> None:
    now = now_ms()
    due = now + due_in_ms
    jobs = [
        Job.model_validate(
            dict(
                job_id=f"j{i}",
                user_id="u",
                project_id="p",
                payload=Payload(kind="echo", text="x"),
                next_fire_ms=due,
                created_ms=now - 1000,
            )
        )
        for i in range(count)
    ]
    await store.put_jobs(jobs)
    await store.put_entries(
        [
            entry_for(
                job,
                due,
                scheduled_ms=due,
                attempt=0,
                kind="schedule",
                shard_count=SHARDS,
                bucket_ms=settings.bucket_ms,
                now=now,
            )
            for job in jobs
        ]
    )


async def _registered(picker: Picker) -> bool:
    return await picker.coordination.get(PICKERS_PREFIX + picker.node_id) is not None


async def _until_registered(picker: Picker, wanted: bool, timeout_s: float) -> bool:
    for _ in range(int(timeout_s / 0.05)):
        if await _registered(picker) == wanted:
            return True
        await asyncio.sleep(0.05)
    return await _registered(picker) == wanted


async def test_a_picker_stuck_in_a_send_lets_its_lease_expire_and_joins_again_after(
    backends: tuple[Settings, SqliteStore, SqliteQueue], tmp_path: Path
) -> None:
    settings, store, inner = backends
    queue = GatedQueue(inner, delay_s=None)
    await _due_jobs(store, settings, 1)
    async with picker_owning(range(SHARDS), store=store, queue=queue, settings=settings, tmp_path=tmp_path) as picker:  # type: ignore[arg-type]
        async with running(picker):
            await asyncio.wait_for(queue.entered.wait(), timeout=5)
            assert await _registered(picker)
            # Its membership expires with the lease: the coordinator would now give its shard to another picker.
            assert await _until_registered(picker, False, 6 * TTL_S)
            assert picker.owned_shards() == set()
            queue.release.set()
            assert await _until_registered(picker, True, 6 * TTL_S), "the picker joins again once its loop moves"
            assert picker.stalled_s() < TTL_S / 2


async def _sends_all_keeping_the_lease(picker: Picker, queue: GatedQueue, count: int, timeout_s: float) -> None:
    """Run ``picker`` until ``count`` runs are sent, checking all along that it keeps its lease and shards."""
    lease = picker._lease
    async with running(picker):
        for _ in range(int(timeout_s / 0.05)):
            if queue.sent >= count:
                break
            assert await _registered(picker), f"lease lost; messages per send: {queue.batches}"
            assert picker.owned_shards() == set(range(SHARDS))
            await asyncio.sleep(0.05)
        assert queue.sent == count, "every run sent, once"
        assert picker._lease == lease, "the lease was never lost (a lost one is replaced by a new id)"


async def test_a_picker_slow_but_progressing_through_batches_keeps_its_lease(
    backends: tuple[Settings, SqliteStore, SqliteQueue], tmp_path: Path
) -> None:
    settings, store, inner = backends
    # A load reads 2 entries per shard (picker_batch): ~12 due, dispatched in batches of 2, each send taking a fifth
    # of the TTL, so one dispatch step lasts ~a TTL, twice the stall limit, making progress all along.
    queue = GatedQueue(inner, delay_s=TTL_S / 5)
    await _due_jobs(store, settings, 36)
    owning = picker_owning(range(SHARDS), store=store, queue=queue, settings=settings, tmp_path=tmp_path)  # type: ignore[arg-type]
    async with owning as picker:
        await _sends_all_keeping_the_lease(picker, queue, 36, timeout_s=10 * TTL_S)


async def test_a_picker_on_a_slow_queue_shrinks_its_batches_and_keeps_its_lease(tmp_path: Path) -> None:
    """1,200 due runs on a queue that sends 1,000 messages/s (ElasticMQ here: ~240/s): in one batch they would take
    1.2 s, twice the lease TTL, and the stall check would let the lease lapse mid-send. Batches shrink to fit, so
    the lease holds and no run is sent twice."""
    backends = picker_backends(tmp_path, shard_count=SHARDS, lease_ttl_s=TTL_S, picker_tick_s=0.05, picker_batch=2000)
    async with backends as (settings, store, inner):
        queue = GatedQueue(inner, delay_s=0.0, per_message_s=0.001)
        await _due_jobs(store, settings, 1200)
        owning = picker_owning(range(SHARDS), store=store, queue=queue, settings=settings, tmp_path=tmp_path)  # type: ignore[arg-type]
        async with owning as picker:
            await _sends_all_keeping_the_lease(picker, queue, 1200, timeout_s=30 * TTL_S)
        assert max(queue.batches) * 0.001 < TTL_S / 2, queue.batches


async def test_a_picker_on_a_queue_with_a_slow_round_trip_keeps_its_batches_whole(tmp_path: Path) -> None:
    """A send that takes the same time whatever its size (a slow round trip: cold JVMs, a loaded machine) is no
    reason to shrink the batches: smaller ones would take as long and only cut the rate (the production stack once
    fell to 10 runs per round trip after a cold start, its jobs a minute late)."""
    ttl_s = 3.0  # round trip 0.35 s: between the grow and shrink thresholds (0.3 s, 0.75 s), far under the stall check
    backends = picker_backends(tmp_path, shard_count=SHARDS, lease_ttl_s=ttl_s, picker_tick_s=0.05, picker_batch=2000)
    async with backends as (settings, store, inner):
        queue = GatedQueue(inner, delay_s=0.35)
        await _due_jobs(store, settings, 600)
        owning = picker_owning(range(SHARDS), store=store, queue=queue, settings=settings, tmp_path=tmp_path)  # type: ignore[arg-type]
        async with owning as picker:
            await _sends_all_keeping_the_lease(picker, queue, 600, timeout_s=60)
        assert len(queue.batches) <= 10, f"messages per send: {queue.batches}"


class SlowCheckpoints(SqliteStore):
    """A store whose checkpoint compare-and-set takes ``delay_s`` (Scylla's LWT under write pressure)."""

    delay_s = 0.0

    async def advance_checkpoint(self, shard: int, expected: int | None, new: int) -> bool:
        if expected is not None:
            await asyncio.sleep(self.delay_s)
        return await super().advance_checkpoint(shard, expected, new)


async def test_a_picker_whose_load_is_slow_shard_after_shard_keeps_its_lease(tmp_path: Path) -> None:
    """Every shard's checkpoint is ten minutes behind, so the first load moves each one (a compare-and-set per
    shard), and each move takes a third of the TTL: the load lasts twice the TTL. Each move counts as progress."""
    backends = picker_backends(tmp_path, shard_count=SHARDS, lease_ttl_s=TTL_S, picker_tick_s=0.05)
    async with backends as (settings, plain, inner):
        store = SlowCheckpoints(plain.path)
        await store.startup()
        try:
            old = bucket_for(now_ms() - 600_000, settings.bucket_ms)
            for shard in range(SHARDS):
                await store.advance_checkpoint(shard, None, old)
            store.delay_s = TTL_S / 3
            await _due_jobs(store, settings, 12)
            queue = GatedQueue(inner, delay_s=0.0)
            owning = picker_owning(range(SHARDS), store=store, queue=queue, settings=settings, tmp_path=tmp_path)
            async with owning as picker:
                await _sends_all_keeping_the_lease(picker, queue, 12, timeout_s=20 * TTL_S)
            moved = [await store.get_checkpoint(shard) != old for shard in range(SHARDS)]
            assert all(moved), "every shard's checkpoint moved"
        finally:
            await store.shutdown()


class SlowOwners(SqliteStore):
    """A store that takes ``per_id_s`` per job to answer an owners read (Cassandra under write pressure)."""

    per_id_s = 0.0

    async def get_job_owners(self, job_ids: Sequence[str]) -> dict[str, str]:
        await asyncio.sleep(self.per_id_s * len(job_ids))
        return await super().get_job_owners(job_ids)


async def test_a_picker_reading_many_owners_ahead_on_a_slow_store_keeps_its_lease(tmp_path: Path) -> None:
    """2,000 runs due in 30 s are loaded; fair dispatch reads their owners ahead, which takes three TTLs on this
    store. Read in chunks, each counting as progress, it keeps the lease."""
    backends = picker_backends(
        tmp_path, shard_count=SHARDS, lease_ttl_s=TTL_S, picker_tick_s=0.05, picker_lookahead_s=60
    )
    async with backends as (settings, plain, inner):
        store = SlowOwners(plain.path)
        await store.startup()
        try:
            await _due_jobs(store, settings, 2000, due_in_ms=30_000)
            store.per_id_s = 3 * TTL_S / 2000
            owning = picker_owning(range(SHARDS), store=store, queue=inner, settings=settings, tmp_path=tmp_path)
            async with owning as picker, running(picker):
                lease = picker._lease
                for _ in range(int(6 * TTL_S / 0.05)):  # bounded: the owners are read within ~3 TTLs
                    assert await _registered(picker), "lease lost while reading owners"
                    if len(picker._owners) == 2000:
                        break
                    await asyncio.sleep(0.05)
                assert len(picker._owners) == 2000
                assert picker._lease == lease, "the lease was never lost"
        finally:
            await store.shutdown()
