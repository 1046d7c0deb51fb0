"""The chaos report's recovery figures (issue 10): one-off lateness and recurring gaps against TTL + 2 s."""

from __future__ import annotations

from typing import Any

from dsched.chaos.checks import recovery


def report(hits: list[tuple[str, str, int]], one_off_p99: float | None = 0.5) -> dict[str, Any]:
    return {
        "cluster": {"lease_ttl_s": 2.0},
        "workload": [
            {"key": "j0", "job_id": "every1", "purpose": "recurring", "every_s": 1},
            {"key": "j1", "job_id": "once", "purpose": "quick", "every_s": None},
        ],
        "hits": [{"job_id": job, "run_id": run, "at_ms": at} for job, run, at in hits],
        "fault_timeline": [{"t_s": 1.0, "start_ms": 11_000}],
        "lateness": {"one_off": {"p99": one_off_p99, "max": one_off_p99}, "recurring": {"p99": 0.1, "max": 0.2}},
    }


def test_gaps_beyond_the_interval_are_measured_from_first_executions() -> None:
    hits = [("every1", "a", 10_000), ("every1", "b", 11_000), ("every1", "b", 11_500), ("every1", "c", 18_000)]
    hits.append(("once", "x", 12_000))  # not a recurring job: no gap
    r = recovery(report(hits))
    assert r["target_s"] == 4.0
    assert r["recurring_max_gap_excess_s"] == 6.0  # 11 s -> 18 s, interval 1 s
    assert r["recurring_gaps_over_target"] == 1
    assert r["worst_recurring_gaps"][0]["from_t_s"] == 1.0
    assert r["met"] is False


def test_met_when_lateness_and_gaps_are_within_ttl_plus_two_seconds() -> None:
    hits = [("every1", str(i), 10_000 + i * 1000 + (3000 if i >= 3 else 0)) for i in range(6)]
    r = recovery(report(hits, one_off_p99=3.9))
    assert r["recurring_max_gap_excess_s"] == 3.0
    assert r["met"] is True
    assert recovery(report(hits, one_off_p99=4.1))["met"] is False
