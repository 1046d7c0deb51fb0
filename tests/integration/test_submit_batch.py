"""POST /submit/batch (issue 15): per-item results in order, the single submit's validation for each item, every
accepted item durable and readable together, nothing accepted when the log append fails."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from dsched.ingestion.service import MAX_BATCH_JOBS, Ingestion
from tests.helpers.cluster import Api, api_only, cluster_settings, running


async def test_items_are_answered_in_order_and_the_valid_ones_run(api: Api) -> None:
    bad = {"payload": "no project"}
    status, data = await api.call(
        "POST",
        "/submit/batch",
        json={"jobs": [{"project_id": "p", "payload": "one"}, bad, {"project_id": "p", "payload": "cmd:echo two"}]},
    )
    assert status == 202, data
    assert (data["accepted"], data["refused"]) == (2, 1)
    assert [r["index"] for r in data["results"]] == [0, 1, 2]
    first, second, third = data["results"]
    assert first["status"] == third["status"] == "Submitted"
    single_status, single = await api.call("POST", "/submit", json=bad)
    assert (second["status"], second["error"], second["detail"]) == (single_status, single["error"], single["detail"])
    for result in (first, third):
        runs = await api.finished_runs(result["job_id"], timeout=15)
        assert [r["status"] for r in runs] == ["succeeded"]
    status, other = await api.call("GET", f"/jobs/{first['job_id']}", user="mallory")
    assert status == 404, other


async def test_a_definition_the_single_submit_refuses_is_refused_per_item(api: Api) -> None:
    bodies: list[Any] = [
        {"project_id": "p", "payload": "x", "cron_schedule": "not a cron"},
        {"project_id": "p", "payload": "x", "next_fire_at": "yesterday"},
        {"project_id": "p", "payload": {"http": {"url": "ftp://nope"}}},
        "not an object",
    ]
    status, data = await api.call("POST", "/submit/batch", json={"jobs": bodies})
    assert status == 400, data
    assert data["accepted"] == 0 and data["refused"] == len(bodies)
    assert data["error"] == "invalid_field" and data["detail"].startswith("no job accepted; jobs[0]: ")
    for body, result in zip(bodies[:3], data["results"], strict=False):
        _, single = await api.call("POST", "/submit", json=body)
        assert result["detail"] == single["detail"]


@pytest.mark.parametrize(
    "body",
    [
        {"jobs": []},
        {"jobs": [{"project_id": "p", "payload": "x"}] * (MAX_BATCH_JOBS + 1)},
        {"jobs": {"project_id": "p", "payload": "x"}},
        {"jobs": [{"project_id": "p", "payload": "x"}], "extra": 1},
        {"project_id": "p", "payload": "x"},
    ],
)
async def test_malformed_batches_are_refused_whole(api: Api, body: dict[str, Any]) -> None:
    status, data = await api.call("POST", "/submit/batch", json=body)
    assert status == 400 and data["error"] == "invalid_field", data


async def test_idempotency_key_and_missing_user_are_refused(api: Api) -> None:
    body = {"jobs": [{"project_id": "p", "payload": "x"}]}
    status, _ = await api.call("POST", "/submit/batch", json=body, headers={"Idempotency-Key": "k"})
    assert status == 400
    status, _ = await api.call("POST", "/submit/batch", json=body, user=None)
    assert status == 401


async def test_a_full_batch_is_readable_at_once_and_stored_by_the_writer(tmp_path: Path) -> None:
    settings = cluster_settings(tmp_path)
    jobs = [{"project_id": "p", "payload": f"job {i}", "next_fire_at": "2099-01-01T00:00:00Z"} for i in range(1000)]
    async with api_only(settings) as api:
        status, data = await api.call("POST", "/submit/batch", json={"jobs": jobs})
        assert status == 202 and data["accepted"] == 1000, data
        ids = [r["job_id"] for r in data["results"]]
        assert len(set(ids)) == 1000
        status, job = await api.call("GET", f"/jobs/{ids[-1]}")
        assert status == 200 and job["status"] == "submitted"
    async with running(settings, ["ingestion", "writer"]) as instances:
        ingestion = instances["ingestion"]
        assert isinstance(ingestion, Ingestion)

        async def stored() -> bool:
            found = await ingestion.store.get_jobs(ids)
            return len(found) == 1000 and all(j.version >= 0 for j in found.values())

        await Api(base="", session=None).wait_for(stored, timeout=30)  # type: ignore[arg-type]


async def test_nothing_is_accepted_when_the_log_append_fails(tmp_path: Path) -> None:
    settings = cluster_settings(tmp_path)
    async with running(settings, ["ingestion"]) as instances:
        ingestion = instances["ingestion"]
        assert isinstance(ingestion, Ingestion)

        async def broken(records: object) -> None:
            raise OSError("log down")

        ingestion.log.append = broken  # type: ignore[method-assign]
        import aiohttp

        async with aiohttp.ClientSession() as session:
            api = Api(base=f"http://127.0.0.1:{ingestion.port}", session=session)
            jobs = [{"project_id": "p", "payload": f"job {i}"} for i in range(3)]
            status, data = await api.call("POST", "/submit/batch", json={"jobs": jobs})
            assert status == 503, data
            status, page = await api.call("GET", "/jobs")
            assert status == 200 and [j for j in page["jobs"] if j["status"] != "deleted"] == []


async def test_large_payloads_of_a_batch_go_to_the_blob_store_and_small_ones_stay_inline(api: Api) -> None:
    big_http = {"http": {"url": "http://127.0.0.1:9/x", "method": "POST", "body": "b" * 2000}}
    small_http = {"http": {"url": "http://127.0.0.1:9/x"}}
    jobs = [
        {"project_id": "p", "payload": big_http, "next_fire_at": "2099-01-01T00:00:00Z"},
        {"project_id": "p", "payload": small_http, "next_fire_at": "2099-01-01T00:00:00Z"},
        {"project_id": "p", "payload": "é" * 300, "next_fire_at": "2099-01-01T00:00:00Z"},  # 600 bytes: inline
        {"project_id": "p", "payload": "é" * 600, "next_fire_at": "2099-01-01T00:00:00Z"},  # 1,200 bytes: offloaded
    ]
    status, data = await api.call("POST", "/submit/batch", json={"jobs": jobs})
    assert status == 202, data
    offloaded = []
    for result in data["results"]:
        _, job = await api.call("GET", f"/jobs/{result['job_id']}")
        offloaded.append(bool(job["payload"].get("offloaded")))
    assert offloaded == [True, False, False, True]
