"""Issue 9: what a 202 promises. Read-your-writes before the writer stored the job, idempotent submits that
hold under fast retries (one execution per occurrence), and poison records that are parked, not fatal."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import aiohttp

from dsched.libs.clock import now_ms
from tests.helpers.cluster import Api, api_only, cluster_settings, running

BACKEND_SERVICES = ["writer", "coordinator", "picker", "worker"]


async def test_an_accepted_job_is_readable_at_once_before_the_writer_stores_it(tmp_path: Path) -> None:
    settings = cluster_settings(tmp_path)
    async with api_only(settings) as api:
        job_id = await api.submit(payload="hello", name="early")
        for path in (f"/job?id={job_id}", f"/jobs/{job_id}"):
            status, job = await api.call("GET", path)
            assert status == 200, job
            assert job["status"] == "submitted" and job["name"] == "early"
        status, page = await api.call("GET", "/jobs")
        assert [j["job_id"] for j in page["jobs"]] == [job_id]
        status, _ = await api.call("GET", f"/jobs/{job_id}", user="mallory")
        assert status == 404
    async with running(settings, ["ingestion", *BACKEND_SERVICES]) as instances, aiohttp.ClientSession() as session:
        api = Api(base=f"http://127.0.0.1:{instances['ingestion'].port}", session=session)  # type: ignore[attr-defined]
        runs = await api.finished_runs(job_id, timeout=15)
        assert [r["status"] for r in runs] == ["succeeded"]
        _, job = await api.call("GET", f"/jobs/{job_id}")
        assert job["status"] == "succeeded"


async def test_fast_idempotent_retries_run_the_job_once(tmp_path: Path) -> None:
    settings = cluster_settings(tmp_path)
    body = {"project_id": "p", "payload": "cmd:echo once"}
    headers = {"Idempotency-Key": "order-42"}
    async with api_only(settings) as api:
        answers = await asyncio.gather(*(api.call("POST", "/submit", json=body, headers=headers) for _ in range(5)))
        ids = {data["job_id"] for _, data in answers}
        assert len(ids) == 1, answers
        assert {status for status, _ in answers} <= {200, 202}
        # Same key, another body: refused, nothing new accepted.
        status, data = await api.call("POST", "/submit", json={**body, "payload": "cmd:echo twice"}, headers=headers)
        assert status == 422 and data["error"] == "idempotency_key_reused", data
    (job_id,) = ids
    async with running(settings, ["ingestion", *BACKEND_SERVICES]) as instances, aiohttp.ClientSession() as session:
        api = Api(base=f"http://127.0.0.1:{instances['ingestion'].port}", session=session)  # type: ignore[attr-defined]
        await api.finished_runs(job_id, timeout=15)
        # A retry after the writer stored it is still the same job, and still not a second run.
        status, data = await api.call("POST", "/submit", json=body, headers=headers)
        assert status == 200 and data["job_id"] == job_id
        # Nothing else can run it: no time-bucket entry is left and the work queue is empty.
        ingestion: Any = instances["ingestion"]

        async def drained() -> bool:
            counts = await ingestion.queue.counts()
            due = (await ingestion.store.stats(now_ms()))["due"]
            return bool((counts.visible, counts.in_flight, due) == (0, 0, 0))

        await api.wait_for(drained, timeout=10)
        runs = await api.runs(job_id)
        assert [r["output"] for r in runs] == ["once\n"], runs


async def test_a_poison_record_is_parked_and_the_others_are_stored(tmp_path: Path) -> None:
    """A record the store refuses (here: an integer SQLite cannot hold) is dead-lettered with its offset; the
    records around it are stored and run, and the owner sees a dead letter."""
    settings = cluster_settings(tmp_path)
    async with running(settings, ["ingestion", *BACKEND_SERVICES]) as instances, aiohttp.ClientSession() as session:
        api = Api(base=f"http://127.0.0.1:{instances['ingestion'].port}", session=session)  # type: ignore[attr-defined]
        ingestion: Any = instances["ingestion"]
        before = await api.submit(payload="before")
        # What an older, laxer ingestion (or another producer) could have appended.
        record = {
            "op": "submit",
            "at_ms": 0,
            "job": {
                "job_id": "poison-1",
                "user_id": "alice",
                "project_id": "p1",
                "payload": {"kind": "echo", "text": "boom"},
                "next_fire_ms": 2**70,
                "created_ms": 0,
            },
        }
        await ingestion.log.append([("poison-1", json.dumps(record).encode()), ("junk", b"\xff not json")])
        after = await api.submit(payload="after")
        for job_id in (before, after):
            runs = await api.finished_runs(job_id, timeout=15)
            assert runs[0]["status"] == "succeeded"

        async def letters() -> list[dict[str, Any]]:
            _, data = await api.call("GET", "/dead-letters")
            return [d for d in data["dead_letters"] if d["job_id"] == "poison-1"]

        (letter,) = await api.wait_for(letters)
        assert "could not be stored" in letter["error"]
        status, health = await api.call("GET", "/health")
        assert status == 200, health
