"""Shard and time-bucket maths shared by the writer, the picker and every store."""

from __future__ import annotations

import zlib


def shard_for(job_id: str, shard_count: int) -> int:
    """Stable across processes, restarts and Python versions (unlike ``hash``)."""
    return zlib.crc32(job_id.encode()) % shard_count


def bucket_for(ms: int, bucket_ms: int) -> int:
    """Start of the time bucket holding ``ms``."""
    return ms - ms % bucket_ms
