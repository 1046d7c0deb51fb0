"""Delivery, retry, recurrence and job-control semantics (issue 4), through the API or the worker itself."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import itertools
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from aiohttp import web

from dsched.app.backends import Backends
from dsched.libs.metrics import DUPLICATE_DELIVERIES
from dsched.libs.models import Job, Payload, RunOrder, run_id_for
from dsched.libs.queue.base import OutgoingMessage
from dsched.libs.settings import Settings
from dsched.worker.service import Worker
from tests.helpers.cluster import Api, job_exists, parse, rfc3339


@pytest.fixture
async def target() -> AsyncIterator[tuple[str, list[tuple[float, web.Request, bytes]]]]:
    """/ok → 200; /fail → 503 with Retry-After: 1; /slow → sleeps 30 s."""
    hits: list[tuple[float, web.Request, bytes]] = []

    async def ok(request: web.Request) -> web.Response:
        hits.append((time.monotonic(), request, await request.read()))
        return web.Response(text="ok")

    async def fail(request: web.Request) -> web.Response:
        hits.append((time.monotonic(), request, await request.read()))
        return web.Response(status=503, headers={"Retry-After": "1"})

    async def slow(request: web.Request) -> web.Response:
        hits.append((time.monotonic(), request, b""))
        await asyncio.sleep(30)
        return web.Response(text="late")

    app = web.Application()
    app.router.add_route("*", "/ok", ok)
    app.router.add_route("*", "/fail", fail)
    app.router.add_route("*", "/slow", slow)
    runner = web.AppRunner(app, shutdown_timeout=0.1)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    yield f"http://127.0.0.1:{port}", hits
    await runner.cleanup()


class LosingAcks:
    """A queue whose acks are lost: every delivery comes back after its visibility timeout."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    async def ack(self, receipts: Any) -> None:
        return None


async def test_at_most_once_runs_once_across_five_redeliveries(tmp_path: Path) -> None:
    marker = tmp_path / "executions"
    settings = Settings.from_env(data_dir=tmp_path, allow_cmd=True, visibility_timeout_s=0.3, max_receives=10)
    async with Backends.open(settings, {"queue", "store", "blobs"}) as b:
        assert b.queue and b.store and b.blobs
        now = int(time.time() * 1000)
        job = Job(
            job_id="amo",
            user_id="u",
            project_id="p",
            payload=Payload(kind="cmd", text=f"echo x >> {marker}"),
            next_fire_ms=now,
            created_ms=now,
            execution="at_most_once",
        )
        message = RunOrder(run_id=run_id_for(job.job_id, now, 0), job=job, scheduled_ms=now, attempt=0, due_ms=now)
        await b.queue.send([OutgoingMessage(body=message.model_dump_json().encode())])
        duplicates_before = DUPLICATE_DELIVERIES._value.get()
        worker = Worker(queue=LosingAcks(b.queue), store=b.store, blobs=b.blobs, settings=settings)
        deliveries = 0
        async with worker.open():
            for _ in range(50):
                deliveries += await worker.drain()
                if deliveries >= 5:
                    break
                await asyncio.sleep(0.1)
        assert deliveries >= 5
        assert marker.read_text().splitlines() == ["x"]  # exactly one execution
        assert DUPLICATE_DELIVERIES._value.get() - duplicates_before == deliveries - 1
        runs = await b.store.get_runs([message.run_id])
        assert runs[message.run_id].status == "succeeded"


class StuckRecording:
    """A store where a run's final record never lands: the worker executed it, then was lost before recording."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    async def put_runs(self, runs: Any) -> None:
        if any(run.status != "running" for run in runs):
            await asyncio.Event().wait()  # never returns: the worker dies before the record is durable
        await self.inner.put_runs(runs)


async def test_at_least_once_runs_again_after_a_lost_delivery(tmp_path: Path) -> None:
    """Control for the test above: an at-least-once run whose worker was lost after executing it, before
    recording it, is delivered again and executed a second time (at-most-once would run it once)."""
    marker = tmp_path / "executions"
    settings = Settings.from_env(
        data_dir=tmp_path, allow_cmd=True, visibility_timeout_s=0.3, max_receives=10, shutdown_grace_s=0.2
    )
    async with Backends.open(settings, {"queue", "store", "blobs"}) as b:
        assert b.queue and b.store and b.blobs
        now = int(time.time() * 1000)
        job = Job(
            job_id="alo",
            user_id="u",
            project_id="p",
            payload=Payload(kind="cmd", text=f"echo x >> {marker}"),
            next_fire_ms=now,
            created_ms=now,
        )
        message = RunOrder(run_id=run_id_for(job.job_id, now, 0), job=job, scheduled_ms=now, attempt=0, due_ms=now)
        await b.queue.send([OutgoingMessage(body=message.model_dump_json().encode())])
        lost = Worker(queue=b.queue, store=StuckRecording(b.store), blobs=b.blobs, settings=settings)
        async with lost.open():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(lost.drain(), timeout=2.0)  # executes, then hangs recording
        assert marker.read_text().splitlines() == ["x"]
        assert (await b.store.get_runs([message.run_id])).get(message.run_id) is None  # nothing recorded
        second = Worker(queue=b.queue, store=b.store, blobs=b.blobs, settings=settings)
        async with second.open():
            handled = 0
            for _ in range(50):  # bounded: the message is visible again at once (handed back) or within 0.3 s
                handled += await second.drain()
                if handled:
                    break
                await asyncio.sleep(0.1)
        assert handled == 1
        assert marker.read_text().splitlines() == ["x", "x"]  # delivered again and executed again
        runs = await b.store.get_runs([message.run_id])
        assert runs[message.run_id].status == "succeeded"


async def test_http_signature_with_two_active_keys(make_cluster: Any, target: Any) -> None:
    base, hits = target
    async with make_cluster(signing_secrets={"alice/signed": ["new-key", "old-key"]}) as api:
        job_id = await api.submit(
            project_id="signed", payload={"http": {"url": base + "/ok", "method": "POST", "body": "hello"}}
        )
        await api.finished_runs(job_id)
    _, request, body = hits[0]
    timestamp = request.headers["X-Dsched-Timestamp"]
    signatures = request.headers["X-Dsched-Signature"].split(",")
    for secret, sig in zip(["new-key", "old-key"], signatures, strict=True):
        expected = hmac.new(secret.encode(), timestamp.encode() + b"." + body, hashlib.sha256).hexdigest()
        assert sig == f"v1={expected}"
    assert abs(int(timestamp) - time.time()) < 30


async def test_retry_after_is_honoured_and_the_idempotency_key_is_stable(api: Api, target: Any) -> None:
    base, hits = target
    job_id = await api.submit(
        payload={"http": {"url": base + "/fail"}},
        max_retries=1,
        retry={"backoff": "fixed", "initial_s": 0.05, "jitter": False},
    )
    runs = await api.finished_runs(job_id, count=2, timeout=10)
    assert [r["http_status"] for r in runs] == [503, 503]
    (t0, first, _), (t1, second, _) = hits
    assert t1 - t0 >= 0.95  # Retry-After: 1 wins over the 50 ms backoff
    assert first.headers["Idempotency-Key"] == second.headers["Idempotency-Key"]
    assert first.headers["X-Dsched-Run-Id"] != second.headers["X-Dsched-Run-Id"]


async def test_max_age_stops_retrying(api: Api) -> None:
    job_id = await api.submit(
        payload="cmd:exit 1",
        max_retries=50,
        retry={"backoff": "fixed", "initial_s": 0.3, "jitter": False, "max_age_s": 1},
    )
    await asyncio.sleep(2.5)
    runs = await api.runs(job_id)
    assert 2 <= len(runs) <= 5
    _, letters = await api.call("GET", "/dead-letters")
    assert job_id in {d["job_id"] for d in letters["dead_letters"]}


async def test_patch_changes_payload_and_schedule(api: Api) -> None:
    later = rfc3339(datetime.now(UTC) + timedelta(hours=1))
    job_id = await api.submit(payload="old", next_fire_at=later)
    await api.wait_for(lambda: job_exists(api, job_id))
    status, body = await api.call(
        "PATCH", f"/jobs/{job_id}", json={"payload": "new", "next_fire_at": rfc3339(datetime.now(UTC))}
    )
    assert status == 202, body
    [run] = await api.finished_runs(job_id)
    assert run["output"] == "new"
    status, body = await api.call("PATCH", f"/jobs/{job_id}", json={"cron_schedule": "not a cron"})
    assert status == 400 and "cron_schedule" in body["detail"]
    status, body = await api.call("PATCH", f"/jobs/{job_id}", json={"project_id": "other"})
    assert status == 400


async def test_cancel_a_running_command(api: Api) -> None:
    job_id = await api.submit(payload="cmd:sleep 30", max_retries=0)

    async def running() -> dict[str, Any] | None:
        runs = await api.runs(job_id)
        return runs[0] if runs and runs[0]["status"] == "running" else None

    run = await api.wait_for(running)
    t0 = time.monotonic()
    status, _ = await api.call("POST", f"/runs/{run['run_id']}/cancel")
    assert status == 202
    [done] = await api.finished_runs(job_id, timeout=5)
    assert done["status"] == "cancelled" and time.monotonic() - t0 < 3
    assert (await api.call("POST", f"/runs/{run['run_id']}/cancel"))[0] == 409
    assert (await api.call("POST", f"/runs/{run['run_id']}/cancel", user="mallory"))[0] == 404


async def test_cancel_aborts_an_http_call(api: Api, target: Any) -> None:
    base, _ = target
    job_id = await api.submit(payload={"http": {"url": base + "/slow"}}, max_retries=0)

    async def running() -> dict[str, Any] | None:
        runs = await api.runs(job_id)
        return runs[0] if runs and runs[0]["status"] == "running" else None

    run = await api.wait_for(running)
    assert (await api.call("POST", f"/runs/{run['run_id']}/cancel"))[0] == 202
    [done] = await api.finished_runs(job_id, timeout=5)
    assert done["status"] == "cancelled"


async def test_dead_letter_replay_runs_the_payload_again(api: Api) -> None:
    job_id = await api.submit(payload="cmd:echo attempt; exit 2", max_retries=0)
    await api.finished_runs(job_id)

    async def letters() -> list[dict[str, Any]] | None:
        _, data = await api.call("GET", "/dead-letters")
        return [d for d in data["dead_letters"] if d["job_id"] == job_id] or None

    [letter] = await api.wait_for(letters)
    assert (await api.call("POST", f"/dead-letters/{letter['id']}/replay", user="mallory"))[0] == 404
    status, _ = await api.call("POST", f"/dead-letters/{letter['id']}/replay")
    assert status == 202
    runs = await api.finished_runs(job_id, count=2)
    assert [r["output"] for r in runs] == ["attempt\n", "attempt\n"]


async def test_schedule_preview_in_a_timezone(api: Api) -> None:
    job_id = await api.submit(payload="x", cron_schedule="30 9 * * *", timezone="America/New_York")
    await api.wait_for(lambda: job_exists(api, job_id))
    status, body = await api.call("GET", f"/jobs/{job_id}/schedule?next=3")
    assert status == 200
    times = [parse(t) for t in body["next"]]
    assert len(times) == 3
    for t in times:
        local = t.astimezone(ZoneInfo("America/New_York"))
        assert (local.hour, local.minute) == (9, 30)
    # a day apart, or 23/25 hours across a DST change
    assert all(abs((b - a) - timedelta(days=1)) <= timedelta(hours=1) for a, b in itertools.pairwise(times))
    assert (await api.call("GET", f"/jobs/{job_id}/schedule?next=0"))[0] == 400


async def test_misfire_fire_once_coalesces_missed_occurrences(api: Api) -> None:
    past = rfc3339(datetime.now(UTC) - timedelta(seconds=10))
    job_id = await api.submit(payload="tick", cron_schedule="@every 1s", next_fire_at=past, max_lateness_s=1)

    async def settled() -> list[dict[str, Any]] | None:
        runs = await api.runs(job_id)
        return runs if any(r["status"] == "succeeded" for r in runs) and len(runs) >= 9 else None

    runs = await api.wait_for(settled)
    skipped = [r for r in runs if r["status"] == "skipped"]
    assert len(skipped) >= 8 and all("coalesced" in (r["error"] or "") for r in skipped)
    first_wave = [r for r in runs if parse(r["scheduled_for"]) <= datetime.now(UTC) - timedelta(seconds=5)]
    assert sum(r["status"] == "succeeded" for r in first_wave) <= 1


async def test_misfire_skip_drops_late_occurrences(api: Api) -> None:
    past = rfc3339(datetime.now(UTC) - timedelta(seconds=10))
    job_id = await api.submit(
        payload="tick", cron_schedule="@every 1s", next_fire_at=past, misfire="skip", max_lateness_s=1
    )
    runs = await api.finished_runs(job_id, count=9)
    late = [r for r in runs if parse(r["scheduled_for"]) < datetime.now(UTC) - timedelta(seconds=3)]
    assert late and all(r["status"] == "skipped" for r in late)


async def test_overlap_skip_records_skipped_occurrences(api: Api) -> None:
    job_id = await api.submit(payload="cmd:sleep 2.5", cron_schedule="@every 1s", overlap="skip")

    async def some_skipped() -> list[dict[str, Any]] | None:
        runs = await api.runs(job_id)
        skipped = [r for r in runs if r["status"] == "skipped" and "overlap" in (r["error"] or "")]
        return skipped if len(skipped) >= 2 else None

    await api.wait_for(some_skipped, timeout=10)
    runs = await api.runs(job_id)
    assert len([r for r in runs if r["status"] in ("running", "succeeded")]) <= 3


async def test_runs_paginate_newest_first(api: Api) -> None:
    job_id = await api.submit(payload="tick", cron_schedule="@every 1s")
    await api.finished_runs(job_id, count=4, timeout=8)
    _, page1 = await api.call("GET", f"/jobs/{job_id}/runs?limit=2")
    _, page2 = await api.call("GET", f"/jobs/{job_id}/runs?limit=2&cursor={page1['next_cursor']}")
    scheduled = [r["scheduled_for"] for r in page1["runs"] + page2["runs"]]
    assert len(scheduled) == 4 and scheduled == sorted(scheduled, reverse=True)
    assert len(set(scheduled)) == 4


async def test_higher_priority_runs_first_when_workers_are_busy(tmp_path: Path) -> None:
    marker = tmp_path / "order"
    settings = Settings.from_env(data_dir=tmp_path, allow_cmd=True, worker_concurrency=1)
    async with Backends.open(settings, {"queue", "store", "blobs"}) as b:
        assert b.queue and b.store and b.blobs
        now = int(time.time() * 1000)
        messages = []
        for i, priority in enumerate([10, 10, 10, 90, 90, 50]):
            job = Job(
                job_id=f"p{i}",
                user_id="u",
                project_id="p",
                priority=priority,
                next_fire_ms=now,
                created_ms=now,
                payload=Payload(kind="cmd", text=f"echo {priority} >> {marker}"),
            )
            order = RunOrder(run_id=run_id_for(job.job_id, now, 0), job=job, scheduled_ms=now, attempt=0, due_ms=now)
            messages.append(OutgoingMessage(body=order.model_dump_json().encode(), priority=priority))
        await b.queue.send(messages)
        worker = Worker(queue=b.queue, store=b.store, blobs=b.blobs, settings=settings)
        async with worker.open():
            stop = asyncio.Event()
            task = asyncio.create_task(worker.run(stop))
            for _ in range(100):
                if marker.exists() and len(marker.read_text().split()) == 6:
                    break
                await asyncio.sleep(0.05)
            stop.set()
            await task
    assert marker.read_text().split() == ["90", "90", "50", "10", "10", "10"]
