"""Wall-clock time in epoch milliseconds (the unit used everywhere inside dsched) and RFC3339 at the edges."""

from __future__ import annotations

import time
from datetime import UTC, datetime

from dsched.libs.limits import MAX_INSTANT_MS, MIN_INSTANT_MS


def now_ms() -> int:
    return time.time_ns() // 1_000_000


_last_decision_us = 0


def decision_us(after: int = 0) -> int:
    """A job-state write's decision time in epoch microseconds: the wall clock, strictly increasing within this
    process and later than ``after`` (a decision this one follows from, e.g. the dispatch a run's outcome answers).

    The store keeps, per state column, the value with the latest decision time (Scylla's cell timestamps,
    ``USING TIMESTAMP``), not the value that arrived last: a write delayed in flight (a frozen process, a
    retried request) cannot set a job back. Across machines this relies on clocks within the time between
    causally unrelated decisions; causally related ones are ordered by ``after``."""
    global _last_decision_us
    _last_decision_us = max(_last_decision_us + 1, time.time_ns() // 1000, after + 1)
    return _last_decision_us


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
