"""Retry maths: backoff delays, the retry decision, retryable HTTP statuses, Retry-After. Pure, no I/O."""

from __future__ import annotations

import hashlib
import math
import re
from datetime import UTC
from email.utils import parsedate_to_datetime

from dsched.libs.models import RetryPolicy

__all__ = ["backoff_s", "http_status_retryable", "parse_retry_after", "should_retry"]

_DELTA_SECONDS = re.compile(r"[0-9]+(?:\.[0-9]+)?")


def backoff_s(policy: RetryPolicy, retry_number: int, seed: str) -> float:
    """Delay in seconds before retry ``retry_number`` (1 = the first retry).

    Base delay: exponential ``initial_s * multiplier**(n-1)``, linear ``initial_s * n``, fixed
    ``initial_s``; capped at ``max_s``. With ``policy.jitter`` the delay is drawn uniformly from
    ``[d/2, d)`` ("full jitter on the upper half": spreads a thundering herd, never waits less than
    half). The draw is a hash of ``seed`` (the run id) and ``retry_number``, not a random number:
    a redelivered message recomputes the same due time, so re-putting the retry entry is idempotent.
    """
    if retry_number < 1:
        raise ValueError("retry_number must be >= 1")
    n = retry_number
    if policy.backoff == "exponential":
        try:
            delay = policy.initial_s * policy.multiplier ** (n - 1)
        except OverflowError:  # large n: the cap applies anyway
            delay = math.inf
    elif policy.backoff == "linear":
        delay = policy.initial_s * n
    else:
        delay = policy.initial_s
    delay = min(delay, policy.max_s)
    if policy.jitter:
        delay *= 0.5 + 0.5 * _unit_interval(f"{seed}\x00{n}")
    return delay


def _unit_interval(key: str) -> float:
    """A stable value in [0, 1) derived from ``key`` (same on every process and Python version)."""
    digest = hashlib.sha256(key.encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def should_retry(policy: RetryPolicy, max_retries: int, attempt: int, scheduled_ms: int, next_due_ms: int) -> bool:
    """Whether the failed ``attempt`` (0-based: 0 = the original run) gets another attempt due at
    ``next_due_ms``: retries left (``attempt < max_retries``) and, with ``max_age_s``, the retry would
    start no later than ``max_age_s`` after the occurrence's scheduled time.
    """
    if attempt >= max_retries:
        return False
    return policy.max_age_s is None or next_due_ms - scheduled_ms <= policy.max_age_s * 1000


def http_status_retryable(status: int, policy: RetryPolicy) -> bool:
    """Whether an HTTP status is worth a retry: exactly ``policy.retry_on_status`` if set, else 5xx, 429."""
    if policy.retry_on_status is not None:
        return status in policy.retry_on_status
    return status == 429 or 500 <= status <= 599


def parse_retry_after(value: str | None, now_ms: int) -> float | None:
    """Seconds to wait from a ``Retry-After`` header: delta-seconds or an HTTP-date (relative to ``now_ms``).

    None when absent or unparseable; a date in the past gives 0.0. Decimal delta-seconds ("1.5") are
    accepted although the RFC only allows integers; a date without a zone (asctime form) is taken as GMT.
    """
    if value is None:
        return None
    text = value.strip()
    if not text:
        return None
    if _DELTA_SECONDS.fullmatch(text):
        seconds = float(text)
        return seconds if math.isfinite(seconds) else None
    try:
        when = parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, when.timestamp() - now_ms / 1000)
