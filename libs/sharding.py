"""Shard and time-bucket maths shared by the writer, the picker and every store."""

from __future__ import annotations

import zlib

from dsched.libs.models import BucketEntry, EntryKind, Job


def shard_for(job_id: str, shard_count: int) -> int:
    """Stable across processes, restarts and Python versions (unlike ``hash``)."""
    return zlib.crc32(job_id.encode()) % shard_count


def bucket_for(ms: int, bucket_ms: int) -> int:
    """Start of the time bucket holding ``ms``."""
    return ms - ms % bucket_ms


def initial_checkpoint(now_ms: int, bucket_ms: int, grace_ms: int) -> int:
    """Where a shard's scan starts when it has no checkpoint yet.

    Entries are always written into the bucket of ``max(due, now)``, so once a checkpoint this far behind "now"
    exists, no entry can be written behind it.
    """
    return bucket_for(now_ms - grace_ms, bucket_ms)


def entry_for(
    job: Job,
    due_ms: int,
    *,
    scheduled_ms: int,
    attempt: int,
    kind: EntryKind,
    shard_count: int,
    bucket_ms: int,
    now: int,
) -> BucketEntry:
    """The time-bucket entry firing ``job``'s occurrence ``scheduled_ms`` (attempt ``attempt``) at ``due_ms``.

    The one place the bucket rule lives: an entry goes into the bucket of ``max(due_ms, now)``, so one already due
    lands in the current bucket, which pickers still scan, never in a past bucket a picker may have checkpointed
    past (see :func:`initial_checkpoint`). Writer, picker and worker all build entries here.
    """
    return BucketEntry(
        shard=shard_for(job.job_id, shard_count),
        bucket_ms=bucket_for(max(due_ms, now), bucket_ms),
        due_ms=due_ms,
        job_id=job.job_id,
        scheduled_ms=scheduled_ms,
        attempt=attempt,
        kind=kind,
        version=job.version,
        priority=job.priority,
    )
