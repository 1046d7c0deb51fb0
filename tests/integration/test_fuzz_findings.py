"""Issue 9: what the fuzzers found, one test each (the fuzz tests find them again only with their seed)."""

from __future__ import annotations

import asyncio

from tests.helpers.cluster import Api


async def test_a_new_time_zone_neither_moves_nor_runs_a_one_off_job(api: Api) -> None:
    """Found by test_fuzz_pipeline: PATCH {"timezone"} of a one-off job due in 2030 ran it at once (its first fire
    was recomputed as "now" whenever a schedule field changed)."""
    job_id = await api.submit(payload="later", next_fire_at="2030-01-01T00:00:00Z")
    status, data = await api.call("PATCH", f"/jobs/{job_id}", json={"timezone": "Europe/Berlin"})
    assert status == 202, data
    assert data["job"]["next_fire_at"] == "2030-01-01T00:00:00.000Z"
    assert data["job"]["timezone"] == "Europe/Berlin"
    await asyncio.sleep(1.0)  # the picker ticks every 50 ms: a run now would be there
    assert await api.runs(job_id) == []
    status, job = await api.call("GET", f"/jobs/{job_id}")
    assert (status, job["next_fire_at"], job["timezone"]) == (200, "2030-01-01T00:00:00.000Z", "Europe/Berlin")


async def test_a_one_off_job_that_ran_does_not_run_again_for_a_new_time_zone(api: Api) -> None:
    job_id = await api.submit(payload="once")
    await api.finished_runs(job_id)
    status, data = await api.call("PATCH", f"/jobs/{job_id}", json={"timezone": "Asia/Kathmandu"})
    assert status == 202, data
    await asyncio.sleep(1.0)
    assert len(await api.runs(job_id)) == 1


async def test_an_explicit_next_fire_at_still_reschedules_a_one_off_job(api: Api) -> None:
    job_id = await api.submit(payload="later", next_fire_at="2030-01-01T00:00:00Z")
    status, data = await api.call(
        "PATCH", f"/jobs/{job_id}", json={"timezone": "UTC", "next_fire_at": "2031-06-01T12:00:00+02:00"}
    )
    assert status == 202, data
    assert data["job"]["next_fire_at"] == "2031-06-01T10:00:00.000Z"
