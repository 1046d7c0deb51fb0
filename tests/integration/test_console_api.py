"""The API additions behind the dashboard and the client CLI (``ingestion/console.py``), asserted at the HTTP level:
execution statistics over a window, the workers list, bulk actions with per-item results, bulk dead-letter replay
and the server-sent events stream. The browser and CLI tests drive the same routes from the outside."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
import pytest

from dsched.ingestion import console
from tests.helpers.cluster import Api, rfc3339


def later(hours: int = 1) -> str:
    return rfc3339(datetime.now(UTC) + timedelta(hours=hours))


async def stats(api: Api, window_s: int = 900) -> dict[str, Any]:
    status, data = await api.call("GET", f"/stats?window_s={window_s}")
    assert status == 200, data
    return dict(data)


async def test_stats_count_finished_runs_by_status_with_fire_lag_percentiles(api: Api) -> None:
    before = (await stats(api))["runs"]  # in-process counters are shared by the tests of this process
    ok = [await api.submit(payload=f"cmd:echo {i}") for i in range(3)]
    bad = await api.submit(payload="cmd:exit 2", max_retries=0)
    for job_id in [*ok, bad]:
        await api.finished_runs(job_id)

    def grown(data: dict[str, Any], status: str) -> int:
        return int(data["runs"].get(status, 0)) - int(before.get(status, 0))

    async def counted() -> dict[str, Any] | None:
        data = await stats(api)
        return data if grown(data, "succeeded") >= 3 and grown(data, "failed") >= 1 else None

    data = await api.wait_for(counted, timeout=30, what="/stats counting the four runs")
    assert data["window_s"] == 900 and data["throughput_per_s"] > 0
    p50, p99 = data["fire_lag_p50_ms"], data["fire_lag_p99_ms"]
    assert p50 is not None and p99 is not None and 0 <= p50 <= p99
    assert data["points"] and all({"at", "runs", "throughput_per_s"} <= set(p) for p in data["points"])
    assert sum(p["runs"].get("failed", 0) for p in data["points"]) == data["runs"]["failed"]
    status, error = await api.call("GET", "/stats?window_s=999999")
    assert status == 400 and error["error"] == "invalid_field"


async def test_workers_list_the_live_worker_with_its_slots_and_counters(api: Api) -> None:
    async def listed() -> list[dict[str, Any]] | None:
        _, data = await api.call("GET", "/workers")
        return data["workers"] or None

    workers = await api.wait_for(listed, what="a live worker in /workers")
    assert [w["node_id"] for w in workers] == ["test-node"]
    worker = workers[0]
    assert worker["slots"] > 0 and 0 <= worker["busy"] <= worker["slots"] and isinstance(worker["running"], list)
    assert worker["heartbeat_at"].endswith("Z") and "runs_total" in worker


async def test_bulk_actions_answer_per_job_and_only_touch_the_callers_jobs(api: Api) -> None:
    mine = [await api.submit(payload="tick", cron_schedule="@daily") for _ in range(2)]
    theirs = await api.call("POST", "/submit", json={"project_id": "p", "payload": "x", "next_fire_at": later()},
                            user="mallory")  # fmt: skip
    foreign = theirs[1]["job_id"]
    status, answer = await api.call("POST", "/jobs/bulk", json={"action": "pause", "job_ids": [*mine, foreign, "nope"]})
    assert status == 200, answer
    assert (answer["action"], answer["ok"], answer["failed"]) == ("pause", 2, 2)
    assert [(r["job_id"], r["ok"], r.get("error")) for r in answer["results"]] == [
        (mine[0], True, None), (mine[1], True, None), (foreign, False, "not_found"), ("nope", False, "not_found"),
    ]  # fmt: skip
    for job_id in mine:
        await api.wait_for(lambda j=job_id: _status_is(api, j, "paused"), what=f"{job_id} paused")
    assert await api.status(foreign) is None  # not visible to alice ...
    _, still = await api.call("GET", f"/jobs/{foreign}", user="mallory")
    assert still["status"] == "scheduled"  # ... and untouched
    status, answer = await api.call("POST", "/jobs/bulk", json={"action": "delete", "job_ids": [mine[0]]})
    assert status == 200 and answer["ok"] == 1
    await api.wait_for(lambda: _status_is(api, mine[0], "deleted"), what="deleted")
    _, answer = await api.call("POST", "/jobs/bulk", json={"action": "resume", "job_ids": mine})
    assert [(r["ok"], r.get("error")) for r in answer["results"]] == [(False, "conflict"), (True, None)]
    for bad in ({"action": "explode", "job_ids": mine}, {"action": "pause", "job_ids": []}):
        status, error = await api.call("POST", "/jobs/bulk", json=bad)
        assert status == 400 and error["error"] == "invalid_field", error


async def _status_is(api: Api, job_id: str, status: str) -> bool:
    return await api.status(job_id) == status


async def test_bulk_replay_runs_each_dead_letter_again(api: Api) -> None:
    jobs = [await api.submit(payload=f"cmd:exit {3 + i}", max_retries=0) for i in range(2)]

    async def letters() -> list[dict[str, Any]] | None:
        _, data = await api.call("GET", "/dead-letters")
        return data["dead_letters"] if len(data["dead_letters"]) == 2 else None

    ids = [d["id"] for d in await api.wait_for(letters, what="two dead letters")]
    status, answer = await api.call("POST", "/dead-letters/replay", json={"ids": [*ids, "nope"]})
    assert status == 200 and (answer["ok"], answer["failed"]) == (2, 1), answer
    assert {r["job_id"] for r in answer["results"] if r["ok"]} == set(jobs)
    for job_id in jobs:
        await api.finished_runs(job_id, count=2)
    status, answer = await api.call("POST", "/dead-letters/replay", json={"ids": ids}, user="mallory")
    assert status == 200 and answer["ok"] == 0  # another tenant cannot replay them


async def _events(api: Api, query: str, user: str = "alice") -> AsyncIterator[tuple[str, Any]]:
    """``(event, data)`` pairs from ``GET /events?<query>`` as they arrive."""
    async with api.session.get(f"{api.base}/events?{query}", headers={"X-User-ID": user}) as resp:
        assert resp.status == 200 and resp.content_type == "text/event-stream"
        event = ""
        async for raw in resp.content:
            line = raw.decode().rstrip("\n")
            if line.startswith("event: "):
                event = line[len("event: ") :]
            elif line.startswith("data: "):
                yield event, orjson.loads(line[len("data: ") :])


async def test_events_stream_a_jobs_runs_and_dead_letters_live(api: Api) -> None:
    job_id = await api.submit(payload="cmd:echo streamed; exit 1", max_retries=0, next_fire_at=later())
    seen: list[str] = []
    run_statuses: list[str] = []
    dead_letter = None
    triggered = False
    stream = _events(api, f"job_id={job_id}")
    async with asyncio.timeout(60):  # a bound on the wait, not a timing assertion
        async for event, data in stream:
            seen.append(event)
            if event == "jobs":
                assert all(j["user_id"] == "alice" for j in data["jobs"])
            if event == "runs":
                assert data["job_id"] == job_id and data["job"]["job_id"] == job_id
                run_statuses += [r["status"] for r in data["runs"]]
            if event == "dead_letters" and data["newest"] is not None:
                dead_letter = data["newest"]
            if not triggered and "dead_letters" in seen:  # the first state is out: now make something happen
                status, _ = await api.call("POST", f"/jobs/{job_id}/trigger")
                assert status == 202
                triggered = True
            if "failed" in run_statuses and dead_letter is not None:
                break
    await stream.aclose()
    assert seen[0] == "hello" and "jobs" in seen
    assert dead_letter is not None and dead_letter["job_id"] == job_id
    status, _ = await api.call("GET", f"/events?job_id={job_id}", user="mallory")
    assert status == 404  # another tenant's job cannot be watched


async def test_search_goes_on_through_older_windows_within_one_request(
    api: Api, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(console, "SEARCH_SCAN", 10)  # windows of 10 jobs: 35 jobs are four windows
    future = later()
    oldest = await api.submit(payload="x", name="needle-oldest", next_fire_at=future)
    items = [{"project_id": "p1", "payload": "x", "name": f"hay-{i}", "next_fire_at": future} for i in range(34)]
    status, answer = await api.call("POST", "/submit/batch", json={"jobs": items})
    assert status == 202, answer

    async def stored() -> bool:
        _, data = await api.call("GET", "/jobs?status=submitted&limit=1")
        return not data["jobs"]

    await api.wait_for(stored, what="all 35 jobs stored")
    _, found = await api.call("GET", "/jobs?q=NEEDLE&limit=25")
    assert [j["job_id"] for j in found["jobs"]] == [oldest] and found["next_cursor"] is None
    _, hay = await api.call("GET", "/jobs?q=hay-&limit=25")
    assert len(hay["jobs"]) == 25 and hay["next_cursor"]  # a full page across three windows, then a cursor
    _, rest = await api.call("GET", f"/jobs?q=hay-&limit=25&cursor={hay['next_cursor']}")
    assert len(rest["jobs"]) == 9 and not {j["job_id"] for j in rest["jobs"]} & {j["job_id"] for j in hay["jobs"]}

    monkeypatch.setattr(console, "SEARCH_BUDGET_S", 0.0)  # out of time after the first window: a cursor to go on
    _, first = await api.call("GET", "/jobs?q=needle&limit=25")
    assert first["jobs"] == [] and first["next_cursor"]
    pages = 1
    cursor = first["next_cursor"]
    while cursor:
        _, more = await api.call("GET", f"/jobs?q=needle&limit=25&cursor={cursor}")
        pages += 1
        if more["jobs"]:
            assert [j["job_id"] for j in more["jobs"]] == [oldest]
            break
        cursor = more["next_cursor"]
    assert pages == 4  # the oldest job is in the fourth window
