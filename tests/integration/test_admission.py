"""Admission control (ingestion/admission.py): new work is answered 503 while the writer lags by more than
``DSCHED_MAX_WRITER_BACKLOG`` records, changes to existing jobs still go through, and submissions are accepted
again once the writer has caught up. Every job that got a 202 is stored. Over the bound, the tenant that sent the
backlog waits while another tenant's submits still get in."""

from __future__ import annotations

import asyncio
from pathlib import Path

import aiohttp
import orjson

from dsched.ingestion import admission
from dsched.ingestion.admission import RETRY_AFTER_S
from tests.helpers.cluster import Api, cluster_settings, running

MAX_BACKLOG = 3
REASONS = ("writer_backlog", "tenant_share")


async def _submit_until_refused(api: Api, attempts: int = 200) -> tuple[list[str], aiohttp.ClientResponse, bytes]:
    """Submit until one is refused (the backlog is read at most every 0.25 s, so a few more get in first)."""
    accepted: list[str] = []
    for _ in range(attempts):
        async with api.session.post(
            f"{api.base}/submit",
            json={"project_id": "p1", "payload": "hello", "next_fire_at": "2099-01-01T00:00:00Z"},
            headers={"X-User-ID": api.user},
        ) as resp:
            body = await resp.read()
            if resp.status != 202:
                return accepted, resp, body
            accepted.append((await resp.json())["job_id"])
    raise AssertionError(f"{attempts} submits accepted with no writer running")


async def test_new_work_waits_while_the_writer_lags_and_changes_still_go_through(tmp_path: Path) -> None:
    settings = cluster_settings(tmp_path, max_writer_backlog=MAX_BACKLOG)
    async with running(settings, ["ingestion"]) as services, aiohttp.ClientSession() as session:
        api = Api(base=f"http://127.0.0.1:{services['ingestion'].port}", session=session)  # type: ignore[attr-defined]
        accepted, refused, body = await _submit_until_refused(api)
        assert len(accepted) > MAX_BACKLOG
        assert refused.status == 503
        assert refused.headers["Retry-After"] == str(RETRY_AFTER_S)
        answer = orjson.loads(body)
        assert answer["error"] == "overloaded"
        assert "earlier submissions" in answer["detail"]

        status, batch = await api.call("POST", "/submit/batch", json={"jobs": [{"project_id": "p1", "payload": "x"}]})
        assert (status, batch["error"]) == (503, "overloaded")
        status, _ = await api.call("POST", f"/jobs/{accepted[0]}/trigger")
        assert status == 503
        # Changes to what was accepted are not new work: an operator can still pause, edit or delete.
        status, _ = await api.call("POST", f"/jobs/{accepted[0]}/pause")
        assert status == 202
        status, _ = await api.call("DELETE", f"/jobs/{accepted[1]}")
        assert status == 202
        status, listed = await api.call("GET", "/jobs?limit=1000")
        assert status == 200 and {j["job_id"] for j in listed["jobs"]} >= set(accepted)
        refusals = [await api.metric("dsched_submissions_refused_total", reason=r) for r in REASONS]
        assert sum(refusals) >= 3  # writer_backlog, or tenant_share if the log was asked between the bounds

        async with running(settings, ["writer"]):  # it stores the backlog; then new work is accepted again
            job_id = await api.wait_for(lambda: _accepted_once(api), timeout=20, what="a submit accepted again")
            for known in [*accepted, job_id]:
                await api.wait_for(lambda known=known: _stored(api, known), timeout=20, what=f"{known} stored")


async def _accepted_once(api: Api) -> str | None:
    status, data = await api.call("POST", "/submit", json={"project_id": "p1", "payload": "after"})
    return str(data["job_id"]) if status == 202 else None


async def _stored(api: Api, job_id: str) -> bool:
    status, job = await api.call("GET", f"/jobs/{job_id}")
    return status == 200 and job.get("status") != "submitted"


async def test_a_tenant_flooding_the_writer_waits_while_another_tenant_gets_in(tmp_path: Path) -> None:
    bound = 1000
    settings = cluster_settings(tmp_path, max_writer_backlog=bound)
    async with running(settings, ["ingestion"]) as services, aiohttp.ClientSession() as session:
        base = f"http://127.0.0.1:{services['ingestion'].port}"  # type: ignore[attr-defined]
        alice, bob = Api(base=base, session=session, user="alice"), Api(base=base, session=session, user="bob")
        flood = {"jobs": [{"project_id": "p1", "payload": "x", "next_fire_at": "2099-01-01T00:00:00Z"}] * 1000}
        for _ in range(2):  # 2,000 records for a writer that is not running: over the bound, under twice it
            status, _ = await alice.call("POST", "/submit/batch", json=flood)
            assert status == 202
        await asyncio.sleep(admission.PROBE_S * 1.5)  # the next check asks the log again

        status, refused = await alice.call("POST", "/submit", json={"project_id": "p1", "payload": "more"})
        assert (status, refused["error"]) == (503, "overloaded")
        assert "this tenant sent at least its share" in refused["detail"]
        bob_jobs = [await bob.submit(project_id="p2", payload="mine") for _ in range(3)]
        assert await alice.metric("dsched_submissions_refused_total", reason="tenant_share") >= 1

        async with running(settings, ["writer"]):
            await alice.wait_for(lambda: _accepted_once(alice), timeout=30, what="alice accepted again")
            for job_id in bob_jobs:
                await bob.wait_for(lambda job_id=job_id: _stored(bob, job_id), timeout=30, what=f"{job_id} stored")
