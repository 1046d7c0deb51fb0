"""Fair dispatch: the order runs due together reach the work queue (``picker/fair.py``)."""

from __future__ import annotations

from pathlib import Path

import orjson
import pytest

from dsched.libs.models import BucketEntry, Job, Payload
from dsched.libs.queue.sqlite import SqliteQueue
from dsched.libs.settings import Settings
from dsched.libs.sharding import bucket_for, shard_for
from dsched.libs.store.sqlite import SqliteStore
from dsched.picker import service as picker_service
from dsched.picker.fair import fair_order
from tests.helpers.pickers import picker_owning


def test_round_robin_keeps_priority_and_each_tenants_order() -> None:
    items = [("a", 50, i) for i in range(6)] + [("b", 50, i) for i in range(2)] + [("c", 90, 0), ("a", 90, 9)]
    ordered = fair_order(items, lambda x: x[0], lambda x: x[1])
    assert ordered[:2] == [("c", 90, 0), ("a", 90, 9)]  # higher priority first, round-robin inside it
    assert ordered[2:] == [("a", 50, 0), ("b", 50, 0), ("a", 50, 1), ("b", 50, 1), *[("a", 50, i) for i in range(2, 6)]]
    weighted = fair_order(items[:8], lambda x: x[0], lambda x: x[1], {"a": 3})
    assert [t for t, _, _ in weighted] == ["a", "a", "a", "b", "a", "a", "a", "b"]
    assert fair_order([], lambda x: "", lambda x: 0) == []


async def test_picker_sends_a_burst_round_robin_across_tenants(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Tenant a has 300 runs due at one instant, tenant b 5: b's runs are among the first ten sent, although the
    due set spans four dispatch batches (and b's entries sort last by key)."""
    monkeypatch.setattr(picker_service, "OWNERS_SLACK", 0)  # clean the tenant cache as eagerly as possible
    settings = Settings.from_env(data_dir=tmp_path, shard_count=4, bucket_s=60, picker_batch=100)
    store, queue = SqliteStore(tmp_path / "store.db"), SqliteQueue(tmp_path / "queue.db", max_receives=5)
    await store.startup()
    await queue.startup()
    try:
        due = 1_000_000_000_000
        jobs = [
            Job(
                job_id=f"{tenant}-{i:04d}" if tenant == "a" else f"z-{tenant}-{i}",
                user_id=tenant,
                project_id="p",
                payload=Payload(kind="echo", text="x"),
                next_fire_ms=due,
                created_ms=due - 1000,
            )
            for tenant, count in (("a", 300), ("b", 5))
            for i in range(count)
        ]
        await store.put_jobs(jobs)
        await store.put_entries(
            [
                BucketEntry(
                    shard=shard_for(j.job_id, settings.shard_count),
                    bucket_ms=bucket_for(due, settings.bucket_ms),
                    due_ms=due,
                    job_id=j.job_id,
                    scheduled_ms=due,
                )
                for j in jobs
            ]
        )
        for shard in range(settings.shard_count):
            await store.advance_checkpoint(shard, None, bucket_for(due, settings.bucket_ms))
        async with picker_owning(range(4), store=store, queue=queue, settings=settings, tmp_path=tmp_path) as picker:
            assert await picker.drain(until_ms=due) == 305
        received = []
        for _ in range(100):
            batch = await queue.receive(10, 0.0, 30.0)
            if not batch:
                break
            received += [orjson.loads(m.body)["job"]["user_id"] for m in batch]
        assert len(received) == 305
        positions = [i for i, tenant in enumerate(received) if tenant == "b"]
        assert positions == [1, 3, 5, 7, 9], positions
    finally:
        await queue.shutdown()
        await store.shutdown()
