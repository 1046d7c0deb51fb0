"""Shard and time-bucket maths shared by the writer, the picker and every store."""

from __future__ import annotations

import zlib


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
