"""Console API helpers: histogram quantiles, windowed deltas across worker restarts; client CLI formatting."""

from __future__ import annotations

import math
from datetime import UTC, datetime

import pytest

from ingestion.console import Sample, _delta, quantile
from libs.client import parse_at, shard_ranges, table


def test_quantile_interpolates_inside_the_bucket() -> None:
    buckets = [(0.1, 50.0), (0.2, 100.0), (math.inf, 100.0)]
    assert quantile(0.5, buckets) == pytest.approx(0.1)
    assert quantile(0.75, buckets) == pytest.approx(0.15)
    assert quantile(0.99, buckets) == pytest.approx(0.198)


def test_quantile_of_nothing_is_none_and_overflow_is_the_last_bound() -> None:
    assert quantile(0.5, [(0.1, 0.0), (math.inf, 0.0)]) is None
    assert quantile(0.99, [(0.1, 1.0), (math.inf, 10.0)]) == 0.1


def worker(runs: float, lag: list[list[float]], count: float, started_ms: int) -> dict[str, object]:
    return {
        "runs_total": {"succeeded": runs},
        "fire_lag": {"buckets": lag, "count": count, "sum": 0.0},
        "_started_ms": started_ms,
    }


def test_delta_between_samples_sums_workers_and_counts_restarts_from_zero() -> None:
    before = Sample(1000, {"a": worker(10, [[0.01, 8], [0.1, 10]], 10, 0), "b": worker(5, [[0.01, 5], [0.1, 5]], 5, 0)})
    after = Sample(
        11_000,
        {
            "a": worker(15, [[0.01, 12], [0.1, 15]], 15, 0),  # +5 runs
            "b": worker(2, [[0.01, 1], [0.1, 2]], 2, 5000),  # restarted in between: its 2 runs are new
            "c": worker(3, [[0.01, 3], [0.1, 3]], 3, 6000),  # joined in between
            "old": worker(99, [[0.01, 99], [0.1, 99]], 99, 0),  # seen for the first time, but old: not counted
        },
    )
    runs, buckets = _delta(before, after)
    assert runs == {"succeeded": 10}
    assert buckets == [(0.01, 8), (0.1, 10), (math.inf, 10)]


def test_client_helpers() -> None:
    assert shard_ranges([0, 1, 2, 5, 7, 8]) == "0-2,5,7-8"
    assert shard_ranges([]) == "-"
    assert table([["a", "bb"]], ["X", "Y"]).splitlines() == ["X  Y", "a  bb"]
    at = datetime.fromisoformat(parse_at("+90s").replace("Z", "+00:00"))
    assert 85 < (at - datetime.now(UTC)).total_seconds() <= 90
    assert parse_at("2030-01-01T00:00:00Z") == "2030-01-01T00:00:00Z"
