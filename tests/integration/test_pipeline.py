"""The whole pipeline through the HTTP API, every service in one process on embedded backends."""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from aiohttp import web

from tests.helpers.cluster import Api, job_exists, parse, rfc3339
from tests.helpers.sleepers import gone, kill_leftovers, marker_seconds, wait_for_sleeper

DROPPED = "dsched_picker_dropped_total"  # time-bucket entries a picker dropped instead of dispatching, by reason


async def test_cmd_job_runs_and_records_output(api: Api) -> None:
    job_id = await api.submit(payload="cmd:echo hi")
    [run] = await api.finished_runs(job_id)
    assert run["status"] == "succeeded"
    assert run["output"] == "hi\n"
    assert run["exit_code"] == 0
    assert run["attempt"] == 0
    status, job = await api.call("GET", f"/jobs/{job_id}")
    assert status == 200 and job["status"] == "succeeded"
    assert job["last_run"]["run_id"] == run["run_id"]
    # seed 004's query form
    status, same = await api.call("GET", f"/job?id={job_id}")
    assert status == 200 and same["job_id"] == job_id


async def test_echo_job_output_is_the_payload(api: Api) -> None:
    job_id = await api.submit(payload="Hello, Distributed Scheduler!")
    [run] = await api.finished_runs(job_id)
    assert (run["status"], run["output"]) == ("succeeded", "Hello, Distributed Scheduler!")


async def test_future_job_fires_at_its_due_time(api: Api) -> None:
    due = datetime.now(UTC) + timedelta(seconds=1.5)
    job_id = await api.submit(payload="cmd:true", next_fire_at=rfc3339(due))

    async def stored() -> bool:  # in its time bucket (or already handed to a worker), not run
        return await api.status(job_id) in ("scheduled", "queued")

    await api.wait_for(stored, timeout=5)
    runs = await api.runs(job_id)
    assert runs == [] or datetime.now(UTC) >= due, runs  # no run before its time
    [run] = await api.finished_runs(job_id, timeout=5)
    started = parse(run["started_at"])
    assert started >= due - timedelta(milliseconds=5)  # the run did not start early
    assert parse(run["scheduled_for"]) == due.replace(microsecond=due.microsecond // 1000 * 1000)


async def test_a_run_sent_ahead_is_held_by_the_worker_until_its_due_time(make_cluster: Any) -> None:
    async with make_cluster(dispatch_ahead_ms=1500, picker_lookahead_s=3.0) as api:
        due = datetime.now(UTC) + timedelta(seconds=2)
        job_id = await api.submit(payload="cmd:true", next_fire_at=rfc3339(due))

        async def queued() -> bool:
            return await api.status(job_id) == "queued"

        await api.wait_for(queued, timeout=1.8)  # in the queue or held by the worker, ahead of time
        assert datetime.now(UTC) < due - timedelta(milliseconds=100)
        assert await api.runs(job_id) == []
        [run] = await api.finished_runs(job_id, timeout=5)
        assert run["status"] == "succeeded"
        assert parse(run["started_at"]) >= due - timedelta(milliseconds=1)


async def test_every_second_produces_a_run_each_second(api: Api) -> None:
    job_id = await api.submit(payload="tick", cron_schedule="@every 1s")
    runs = await api.finished_runs(job_id, count=3, timeout=8)
    scheduled = sorted(parse(r["scheduled_for"]) for r in runs)
    gaps = {round((b - a).total_seconds()) for a, b in itertools.pairwise(scheduled)}
    assert gaps == {1}
    assert all(r["status"] == "succeeded" for r in runs)
    _, job = await api.call("GET", f"/jobs/{job_id}")
    assert job["status"] == "scheduled" and job["next_fire_at"] is not None


async def test_failing_command_retries_then_dead_letters(api: Api) -> None:
    job_id = await api.submit(
        payload="cmd:exit 3", max_retries=2, retry={"backoff": "fixed", "initial_s": 0.1, "jitter": False}
    )
    runs = await api.finished_runs(job_id, count=3, timeout=10)
    assert sorted(r["attempt"] for r in runs) == [0, 1, 2]
    assert {r["status"] for r in runs} == {"failed"}
    assert {r["exit_code"] for r in runs} == {3}

    async def failed() -> dict[str, Any] | None:
        _, job = await api.call("GET", f"/jobs/{job_id}")
        return job if job["status"] == "failed" else None

    await api.wait_for(failed)
    status, letters = await api.call("GET", "/dead-letters")
    assert status == 200
    assert [d["job_id"] for d in letters["dead_letters"]] == [job_id]
    assert letters["dead_letters"][0]["attempts"] == 3
    # A fourth attempt would be a retry entry due 0.1 s after the third: give the pipeline its chance to fire it.
    await api.fired_through(datetime.now(UTC) + timedelta(seconds=0.5))
    assert len(await api.runs(job_id)) == 3  # no fourth attempt


@pytest.fixture
async def target() -> AsyncIterator[tuple[str, list[web.Request]]]:
    hits: list[web.Request] = []

    async def handler(request: web.Request) -> web.Response:
        hits.append(request)
        await request.read()
        return web.Response(status=int(request.query.get("status", "200")), text="pong")

    app = web.Application()
    app.router.add_route("*", "/hook", handler)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    yield f"http://127.0.0.1:{port}/hook", hits
    await runner.cleanup()


async def test_http_job_records_status_and_sends_headers(api: Api, target: tuple[str, list[web.Request]]) -> None:
    url, hits = target
    job_id = await api.submit(
        payload={"http": {"url": url, "method": "POST", "body": {"a": 1}, "headers": {"X-Custom": "yes"}}}
    )
    [run] = await api.finished_runs(job_id)
    assert (run["status"], run["http_status"], run["output"]) == ("succeeded", 200, "pong")
    [hit] = hits
    assert hit.method == "POST"
    assert hit.headers["X-Custom"] == "yes"
    assert hit.headers["X-Dsched-Job-Id"] == job_id
    assert hit.headers["X-Dsched-Run-Id"] == run["run_id"]
    assert hit.headers["Idempotency-Key"]


async def test_http_4xx_fails_fast_and_5xx_retries(api: Api, target: tuple[str, list[web.Request]]) -> None:
    url, _ = target
    fast = await api.submit(payload={"http": {"url": url + "?status=404"}}, max_retries=3)
    slow = await api.submit(
        payload={"http": {"url": url + "?status=503"}},
        max_retries=1,
        retry={"backoff": "fixed", "initial_s": 0.1, "jitter": False},
    )
    assert [r["http_status"] for r in await api.finished_runs(fast)] == [404]
    assert sorted(r["attempt"] for r in await api.finished_runs(slow, count=2)) == [0, 1]
    # A retry of the 404 would be due within the backoff's cap (retry_max_s 0.5 s): the pipeline's chance to fire it.
    await api.fired_through(datetime.now(UTC) + timedelta(seconds=1))
    assert len(await api.runs(fast)) == 1
    assert await api.status(fast) == "failed"


async def test_large_payload_round_trips_through_the_blob_store(api: Api, tmp_path: Any) -> None:
    text = "x" * 5 * 1024
    job_id = await api.submit(payload=text)
    await api.wait_for(lambda: job_exists(api, job_id))
    _, job = await api.call("GET", f"/jobs/{job_id}")
    assert job["payload"] == {"kind": "echo", "offloaded": True}
    assert any((tmp_path / "data" / "blobs" / "payloads").rglob("*"))
    [run] = await api.finished_runs(job_id)
    assert run["status"] == "succeeded"
    status, output = await api.call("GET", f"/runs/{run['run_id']}/output")
    assert status == 200 and output == text
    assert run["output_truncated"] is True and text.startswith(run["output"])


async def test_cmd_timeout_kills_the_process_group(api: Api, tmp_path: Any) -> None:
    marker = tmp_path / "survivor"
    seconds = marker_seconds()  # the background child's sleep, found by its unique command line
    job_id = await api.submit(payload=f"cmd:(sleep {seconds}; touch {marker}) & sleep 30", timeout_s=1, max_retries=0)
    try:
        await wait_for_sleeper(seconds)
        [run] = await api.finished_runs(job_id)
        assert run["status"] == "timed_out"
        assert await gone(seconds), "the background child outlived the timeout"  # killed with its group
    finally:
        kill_leftovers(seconds)
    assert not marker.exists()


async def test_errors_are_json_with_status(api: Api) -> None:
    assert (await api.call("POST", "/submit", user=None, json={"project_id": "p", "payload": "x"}))[0] == 401
    assert (await api.call("POST", "/submit", user="bad user!", json={"project_id": "p", "payload": "x"}))[0] == 401
    status, body = await api.call("POST", "/submit", data=b"{not json", headers={"Content-Type": "application/json"})
    assert status == 400 and body["error"] == "invalid_json"
    status, body = await api.call("POST", "/submit", json={"payload": "x"})
    assert status == 400 and "project_id" in body["detail"]
    status, body = await api.call("POST", "/submit", json={"project_id": "p", "payload": "x", "cron_schedule": "bad"})
    assert status == 400 and "cron_schedule" in body["detail"]
    status, body = await api.call(
        "POST", "/submit", json={"project_id": "p", "payload": "x", "next_fire_at": "tomorrow"}
    )
    assert status == 400 and "next_fire_at" in body["detail"]
    status, body = await api.call("POST", "/submit", json={"project_id": "p", "payload": "x" * (2 * 1024 * 1024)})
    assert status == 413 and body["error"] == "payload_too_large"
    status, body = await api.call("GET", "/jobs/does-not-exist")
    assert status == 404 and set(body) == {"error", "detail"}


async def test_a_user_only_sees_their_own_jobs(api: Api) -> None:
    mine = await api.submit(payload="mine")
    await api.finished_runs(mine)
    assert (await api.call("GET", f"/jobs/{mine}", user="mallory"))[0] == 404
    assert (await api.call("GET", f"/jobs/{mine}/runs", user="mallory"))[0] == 404
    _, listing = await api.call("GET", "/jobs", user="mallory")
    assert listing["jobs"] == []


async def test_list_jobs_newest_first_with_cursor_and_filters(api: Api) -> None:
    ids = []
    for i in range(5):
        ids.append(
            await api.submit(
                payload=f"job {i}",
                project_id="a" if i % 2 else "b",
                next_fire_at=rfc3339(datetime.now(UTC) + timedelta(hours=1)),
            )
        )
        await asyncio.sleep(0.002)  # distinct creation milliseconds: the listing orders by them (not a wait)

    async def listed() -> list[str] | None:
        _, page = await api.call("GET", "/jobs?limit=100")
        got = [j["job_id"] for j in page["jobs"]]
        return got if len(got) == 5 else None

    assert await api.wait_for(listed) == ids[::-1]
    _, page1 = await api.call("GET", "/jobs?limit=2")
    _, page2 = await api.call("GET", f"/jobs?limit=2&cursor={page1['next_cursor']}")
    assert [j["job_id"] for j in page1["jobs"] + page2["jobs"]] == ids[::-1][:4]
    _, only_a = await api.call("GET", "/jobs?project_id=a")
    assert {j["job_id"] for j in only_a["jobs"]} == {ids[1], ids[3]}
    _, scheduled = await api.call("GET", "/jobs?status=scheduled")
    assert len(scheduled["jobs"]) == 5


async def test_queue_stats_and_health_and_metrics(api: Api) -> None:
    await api.submit(payload="later", next_fire_at=rfc3339(datetime.now(UTC) + timedelta(hours=1)))
    job_id = await api.submit(payload="now")
    await api.finished_runs(job_id)

    async def stats() -> dict[str, Any] | None:
        _, data = await api.call("GET", "/queue/stats")
        return data if data["scheduled"] == 1 and data["succeeded"] == 1 else None

    data = await api.wait_for(stats)
    assert set(data) >= {"scheduled", "due", "queued", "running", "succeeded", "failed", "dead"}
    assert (await api.call("GET", "/health"))[0] == 200
    status, text = await api.call("GET", "/metrics")
    assert status == 200 and "dsched_fire_lag_seconds_bucket" in text


async def test_idempotent_submit_returns_the_first_job(api: Api) -> None:
    headers = {"Idempotency-Key": "order-42"}
    s1, first = await api.call("POST", "/submit", json={"project_id": "p", "payload": "once"}, headers=headers)
    assert s1 == 202
    await api.finished_runs(first["job_id"])
    s2, second = await api.call("POST", "/submit", json={"project_id": "p", "payload": "once"}, headers=headers)
    assert s2 == 200 and second["job_id"] == first["job_id"]
    s3, other = await api.call(
        "POST", "/submit", json={"project_id": "p", "payload": "once"}, headers=headers, user="bob"
    )
    assert s3 == 202 and other["job_id"] != first["job_id"]


async def test_pause_resume_delete_and_trigger(api: Api) -> None:
    dropped = {reason: await api.metric(DROPPED, reason=reason) for reason in ("paused", "deleted")}

    async def dropped_more(reason: str) -> bool:  # the picker dropped an entry of a job for that reason
        return await api.metric(DROPPED, reason=reason) > dropped[reason]

    job_id = await api.submit(payload="beat", cron_schedule="@every 1s")
    await api.finished_runs(job_id, count=1, timeout=5)
    assert (await api.call("POST", f"/jobs/{job_id}/pause"))[0] == 202

    async def status_is(value: str) -> bool:
        return await api.status(job_id) == value

    await api.wait_for(lambda: status_is("paused"))
    await api.wait_for(api.idle)  # a run dispatched just before the pause has finished
    count = len(await api.runs(job_id))
    # The picker's chance to fire it: the job's next occurrence came due and its entry was dropped as paused.
    await api.wait_for(lambda: dropped_more("paused"), timeout=5, what="the paused job's next entry dropped")
    await api.wait_for(api.idle)
    assert len(await api.runs(job_id)) == count  # paused jobs never fire
    assert (await api.call("POST", f"/jobs/{job_id}/resume"))[0] == 202
    await api.finished_runs(job_id, count=count + 1, timeout=5)
    assert (await api.call("DELETE", f"/jobs/{job_id}"))[0] == 202
    await api.wait_for(lambda: status_is("deleted"))
    await api.wait_for(api.idle)
    count = len(await api.runs(job_id))
    # Likewise: its next occurrence came due and was dropped as deleted.
    await api.wait_for(lambda: dropped_more("deleted"), timeout=5, what="the deleted job's next entry dropped")
    await api.wait_for(api.idle)
    assert len(await api.runs(job_id)) == count  # history kept, no new runs

    later = await api.submit(payload="manual", next_fire_at=rfc3339(datetime.now(UTC) + timedelta(hours=1)))
    await api.wait_for(lambda: job_exists(api, later))
    t0 = time.monotonic()
    assert (await api.call("POST", f"/jobs/{later}/trigger"))[0] == 202
    [run] = await api.finished_runs(later, timeout=5)
    assert run["status"] == "succeeded" and time.monotonic() - t0 < 5
