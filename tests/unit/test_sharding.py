"""The bucket rule every time-bucket entry follows (writer, picker and worker build entries with entry_for)."""

from __future__ import annotations

from dsched.libs.models import Job, Payload
from dsched.libs.sharding import bucket_for, entry_for, initial_checkpoint, shard_for

JOB = Job(
    job_id="j1", user_id="u", project_id="p", payload=Payload(kind="echo", text="x"), next_fire_ms=0, created_ms=0
)


def test_a_future_entry_lands_in_the_bucket_of_its_due_time() -> None:
    entry = entry_for(
        JOB, 125_000, scheduled_ms=125_000, attempt=0, kind="schedule", shard_count=8, bucket_ms=60_000, now=10_000
    )
    assert (entry.bucket_ms, entry.due_ms, entry.shard) == (120_000, 125_000, shard_for("j1", 8))


def test_an_entry_already_due_lands_in_the_current_bucket_never_behind_a_checkpoint() -> None:
    now = 1_000_000
    entry = entry_for(JOB, 5_000, scheduled_ms=5_000, attempt=2, kind="retry", shard_count=8, bucket_ms=60_000, now=now)
    assert entry.bucket_ms == bucket_for(now, 60_000)
    assert entry.due_ms == 5_000 and entry.attempt == 2 and entry.kind == "retry"
    assert entry.bucket_ms >= initial_checkpoint(now, 60_000, 10_000)


def test_the_entry_carries_the_job_version_and_priority() -> None:
    job = JOB.model_copy(update={"version": 7, "priority": 90})
    entry = entry_for(job, 1, scheduled_ms=1, attempt=0, kind="trigger", shard_count=4, bucket_ms=1000, now=0)
    assert (entry.version, entry.priority) == (7, 90)
