"""Unit tests of libs.retry: backoff sequences, deterministic jitter, the retry decision, HTTP statuses,
Retry-After parsing."""

from __future__ import annotations

import os
import subprocess
import sys
from datetime import UTC, datetime

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dsched.libs.models import RetryPolicy
from dsched.libs.retry import backoff_s, http_status_retryable, parse_retry_after, should_retry


def policy(**kw: object) -> RetryPolicy:
    return RetryPolicy.model_validate({"jitter": False, **kw})


# ---------------------------------------------------------------------------------------------- backoff


def test_exponential_sequence_is_capped() -> None:
    p = policy(backoff="exponential", initial_s=1, multiplier=2, max_s=60)
    assert [backoff_s(p, n, "r") for n in range(1, 9)] == [1, 2, 4, 8, 16, 32, 60, 60]


def test_exponential_with_fractional_multiplier() -> None:
    p = policy(backoff="exponential", initial_s=10, multiplier=1.5, max_s=1000)
    assert [backoff_s(p, n, "r") for n in range(1, 5)] == pytest.approx([10, 15, 22.5, 33.75])


def test_linear_sequence_is_capped() -> None:
    p = policy(backoff="linear", initial_s=5, max_s=12)
    assert [backoff_s(p, n, "r") for n in range(1, 5)] == [5, 10, 12, 12]


def test_fixed_sequence() -> None:
    p = policy(backoff="fixed", initial_s=7, multiplier=3, max_s=100)
    assert [backoff_s(p, n, "r") for n in range(1, 5)] == [7, 7, 7, 7]
    assert backoff_s(policy(backoff="fixed", initial_s=7, max_s=3), 1, "r") == 3


def test_default_policy_is_exponential_from_one_second() -> None:
    p = RetryPolicy(jitter=False)
    assert [backoff_s(p, n, "r") for n in (1, 2, 3, 9, 10)] == [1, 2, 4, 256, 300]


def test_huge_retry_number_does_not_overflow() -> None:
    p = policy(backoff="exponential", initial_s=1, multiplier=10, max_s=300)
    assert backoff_s(p, 100_000, "r") == 300
    assert backoff_s(policy(backoff="linear", initial_s=1, max_s=300), 10**9, "r") == 300


def test_zero_initial_delay() -> None:
    assert backoff_s(policy(initial_s=0), 5, "r") == 0
    assert backoff_s(policy(initial_s=0, jitter=True), 5, "r") == 0


def test_retry_number_starts_at_one() -> None:
    with pytest.raises(ValueError):
        backoff_s(policy(), 0, "r")


# ---------------------------------------------------------------------------------------------- jitter


@pytest.mark.parametrize("mode", ["exponential", "linear", "fixed"])
def test_jitter_is_in_the_upper_half_and_deterministic(mode: str) -> None:
    jittered = policy(backoff=mode, initial_s=2, max_s=50, jitter=True)
    plain = policy(backoff=mode, initial_s=2, max_s=50)
    for n in range(1, 10):
        d = backoff_s(plain, n, "x")
        values = [backoff_s(jittered, n, f"run-{i}") for i in range(200)]
        assert all(d / 2 <= v <= d for v in values)
        assert values == [backoff_s(jittered, n, f"run-{i}") for i in range(200)]  # same seed, same delay
        assert len(set(values)) > 150  # actually spread, not a constant
        assert min(values) < d * 0.6 and max(values) > d * 0.9  # covers the whole upper half


def test_jitter_is_applied_after_the_cap() -> None:
    p = policy(initial_s=1, multiplier=2, max_s=10, jitter=True)
    values = [backoff_s(p, 20, f"seed-{i}") for i in range(100)]
    assert all(5 <= v <= 10 for v in values)


def test_jitter_differs_between_retries_of_the_same_seed() -> None:
    p = policy(backoff="fixed", initial_s=100, max_s=100, jitter=True)
    assert len({backoff_s(p, n, "same-run") for n in range(1, 20)}) > 15


def test_jitter_is_stable_across_processes() -> None:
    # A redelivered message may be handled by another worker process: the due time must not change.
    code = (
        "from dsched.libs.models import RetryPolicy; from dsched.libs.retry import backoff_s; "
        "print(repr(backoff_s(RetryPolicy(initial_s=3, max_s=100), 4, 'f0e1d2c3-run')))"
    )
    outputs = set()
    for hash_seed in ("0", "1", "12345"):
        env = {**os.environ, "PYTHONHASHSEED": hash_seed}
        result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
        outputs.add(result.stdout.strip())
    assert outputs == {repr(backoff_s(RetryPolicy(initial_s=3, max_s=100), 4, "f0e1d2c3-run"))}


@settings(max_examples=300, deadline=None, database=None)
@given(
    mode=st.sampled_from(["exponential", "linear", "fixed"]),
    initial=st.floats(0, 1000),
    multiplier=st.floats(1, 10),
    max_s=st.floats(0, 10_000),
    n=st.integers(1, 10_000),
    seed=st.text(max_size=40),
)
def test_backoff_properties(mode: str, initial: float, multiplier: float, max_s: float, n: int, seed: str) -> None:
    plain = policy(backoff=mode, initial_s=initial, multiplier=multiplier, max_s=max_s)
    jittered = policy(backoff=mode, initial_s=initial, multiplier=multiplier, max_s=max_s, jitter=True)
    d = backoff_s(plain, n, seed)
    assert 0 <= d <= max_s
    if n > 1:
        assert backoff_s(plain, n - 1, seed) <= d  # never shrinks
    j = backoff_s(jittered, n, seed)
    assert d / 2 <= j <= d
    assert j == backoff_s(jittered, n, seed)


# ---------------------------------------------------------------------------------------------- should_retry


def test_should_retry_counts_attempts() -> None:
    p = policy()
    assert should_retry(p, 3, 0, 0, 1000)
    assert should_retry(p, 3, 2, 0, 1000)
    assert not should_retry(p, 3, 3, 0, 1000)
    assert not should_retry(p, 0, 0, 0, 1000)  # max_retries 0: the first failure is final


def test_should_retry_respects_max_age_from_the_scheduled_time() -> None:
    p = policy(max_age_s=60)
    scheduled = 1_700_000_000_000
    assert should_retry(p, 10, 1, scheduled, scheduled + 60_000)  # exactly max_age: still allowed
    assert not should_retry(p, 10, 1, scheduled, scheduled + 60_001)
    assert should_retry(policy(), 10, 1, scheduled, scheduled + 10**12)  # no max_age: no limit
    assert not should_retry(p, 1, 1, scheduled, scheduled + 1)  # attempts exhausted anyway


# ---------------------------------------------------------------------------------------------- HTTP status


@pytest.mark.parametrize(
    ("status", "retryable"),
    [
        (500, True),
        (502, True),
        (503, True),
        (599, True),
        (429, True),
        (200, False),
        (301, False),
        (400, False),
        (404, False),
        (408, False),
        (499, False),
        (600, False),
    ],
)
def test_default_retryable_statuses(status: int, retryable: bool) -> None:
    assert http_status_retryable(status, policy()) is retryable


def test_explicit_status_list_is_exact() -> None:
    p = policy(retry_on_status=[408, 500])
    assert http_status_retryable(408, p)
    assert http_status_retryable(500, p)
    assert not http_status_retryable(503, p)
    assert not http_status_retryable(429, p)
    assert not any(http_status_retryable(s, policy(retry_on_status=[])) for s in (429, 500, 503))


# ---------------------------------------------------------------------------------------------- Retry-After

NOW = int(datetime(1994, 11, 6, 8, 49, 7, tzinfo=UTC).timestamp()) * 1000  # 30 s before the RFC example date


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        ("120", 120.0),
        ("0", 0.0),
        ("  7 ", 7.0),
        ("1.5", 1.5),
        ("Sun, 06 Nov 1994 08:49:37 GMT", 30.0),  # IMF-fixdate
        ("Sunday, 06-Nov-94 08:49:37 GMT", 30.0),  # obsolete RFC 850
        ("Sun Nov  6 08:49:37 1994", 30.0),  # obsolete asctime, no zone: GMT
        ("Sun, 06 Nov 1994 09:49:37 +0100", 30.0),
        ("Sun, 06 Nov 1994 08:00:00 GMT", 0.0),  # in the past: never negative
    ],
)
def test_parse_retry_after(value: str, seconds: float) -> None:
    assert parse_retry_after(value, NOW) == pytest.approx(seconds)


def test_parse_retry_after_is_relative_to_now_ms() -> None:
    assert parse_retry_after("Sun, 06 Nov 1994 08:49:37 GMT", NOW + 10_500) == pytest.approx(19.5)


@pytest.mark.parametrize("value", [None, "", "   ", "-5", "abc", "1e3", "soon", "Sun, 99 Foo 1994 08:49:37 GMT", "5s"])
def test_parse_retry_after_invalid(value: str | None) -> None:
    assert parse_retry_after(value, NOW) is None
