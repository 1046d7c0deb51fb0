"""Wall-clock time in epoch milliseconds (the unit used everywhere inside dsched) and RFC3339 at the edges."""

from __future__ import annotations

import time
from datetime import UTC, datetime

from dsched.libs.limits import MAX_INSTANT_MS, MIN_INSTANT_MS


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def to_rfc3339(ms: int | None) -> str | None:
    if ms is None or not MIN_INSTANT_MS <= ms <= MAX_INSTANT_MS:
        return None
    return datetime.fromtimestamp(ms / 1000, tz=UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def parse_rfc3339(value: str) -> int:
    """Epoch ms of an RFC3339 timestamp; a value without offset is rejected (ambiguous)."""
    parsed = datetime.fromisoformat(value.replace("Z", "+00:00").replace("z", "+00:00"))
    if parsed.tzinfo is None:
        raise ValueError("timestamp needs a UTC offset, e.g. 2030-01-01T00:00:00Z")
    return int(parsed.timestamp() * 1000)
