"""Console API helpers: histogram quantiles, windowed deltas across worker restarts, job search (SQLite query and
the base class's scan); client CLI formatting."""

from __future__ import annotations

import functools
import math
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from dsched.app.client import hoist_options, parse_at, shard_ranges, table
from dsched.ingestion.console import Sample, _delta, quantile
from dsched.libs.models import HttpTarget, Job, Payload
from dsched.libs.store.base import JobStore
from dsched.libs.store.sqlite import SqliteStore


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


def test_common_options_before_a_client_command_move_after_it() -> None:
    assert hoist_options(["--url", "U", "--json", "jobs", "list", "--limit", "2"]) == [
        "jobs", "list", "--url", "U", "--json", "--limit", "2",
    ]  # fmt: skip
    # the option after the command is parsed last: it wins
    assert hoist_options(["--user=me", "cluster", "status", "--user", "you"]) == [
        "cluster", "status", "--user=me", "--user", "you",
    ]  # fmt: skip
    assert hoist_options(["--json", "jobs", "--help"]) == ["jobs", "--json", "--help"]
    for unchanged in (["jobs", "list", "--json"], ["--json", "run", "all"], ["--url"], ["--version"], []):
        assert hoist_options(unchanged) == unchanged


def make_job(i: int, **fields: object) -> Job:
    return Job.model_validate(
        {
            "job_id": f"job-{i:04d}",
            "user_id": "u",
            "project_id": f"proj-{i % 3}",
            "name": f"name-{i}",
            "payload": Payload(kind="cmd", text=f"echo Payload-{i}"),
            "next_fire_ms": 10**13,
            "created_ms": 1000 + i,
            **fields,
        }
    )


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[SqliteStore]:
    s = SqliteStore(tmp_path / "store.db")
    await s.startup()
    yield s
    await s.shutdown()


@pytest.mark.parametrize("native", [True, False], ids=["sqlite-sql", "base-scan"])
async def test_search_jobs_matches_fields_pages_and_continues_past_a_window(store: SqliteStore, native: bool) -> None:
    http = Payload(kind="http", http=HttpTarget(url="https://hooks.example.com/Deploy"))
    await store.put_jobs([make_job(i) for i in range(60)] + [make_job(60, payload=http, name="deployer")])
    await store.put_jobs([make_job(1000, user_id="other", name="name-1")])
    search = store.search_jobs if native else functools.partial(JobStore.search_jobs, store)

    async def ids(text: str, limit: int = 100, **kw: Any) -> list[str]:
        jobs, _ = await search("u", text, limit, **kw)
        return [j.job_id for j in jobs]

    assert await ids("NAME-5") == ["job-0059", "job-0058", "job-0057", "job-0056", "job-0055", "job-0054",
                                   "job-0053", "job-0052", "job-0051", "job-0050", "job-0005"]  # fmt: skip
    assert await ids("payload-42") == ["job-0042"]  # payload text, case-insensitive
    assert await ids("hooks.example.com/deploy") == ["job-0060"]  # HTTP URL
    assert await ids("job-0007") == ["job-0007"]
    assert await ids("name-1", project_id="proj-1") == ["job-0019", "job-0016", "job-0013", "job-0010", "job-0001"]
    assert await ids("name-1", status="paused") == []
    assert await ids("nothing") == []
    # paging: limit 4 of the 11 "name-5" matches, then continue from the cursor
    first, cursor = await search("u", "name-5", 4)
    second, _ = await search("u", "name-5", 4, cursor)
    assert [j.job_id for j in first + second] == [f"job-00{n}" for n in (59, 58, 57, 56, 55, 54, 53, 52)]
    # a window of 10 jobs holds no match for "name-1": no result yet, but a cursor to search further
    found, cursor = await search("u", "name-1", 5, scan=10)
    assert found == [] and cursor is not None
    rounds = 0
    while not found and cursor is not None and rounds < 10:
        found, cursor = await search("u", "name-1", 5, cursor, scan=10)
        rounds += 1
    assert [j.job_id for j in found][:1] == ["job-0019"]
