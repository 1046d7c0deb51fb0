"""Issue 9: hostile-but-plausible input gets a 4xx with a precise detail, never a 202 for what can never run,
never a 5xx, and never stops the pipeline for anyone else."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from dsched.libs.clock import now_ms
from dsched.libs.models import Job
from tests.helpers.cluster import Api, cluster_settings, running

URL = "http://127.0.0.1:9/x"
DEEP: Any = "leaf"
for _ in range(40):
    DEEP = [DEEP]

BAD_SUBMITS: dict[str, tuple[dict[str, Any], str]] = {
    # id: (body without project_id, a word the detail must contain)
    "every_overflows": ({"payload": "x", "cron_schedule": "@every 2600000000000h"}, "maximum"),
    "every_above_a_year": ({"payload": "x", "cron_schedule": "@every 8785h"}, "maximum"),
    "fire_before_1970": ({"payload": "x", "next_fire_at": "1969-12-31T23:59:59Z"}, "1970"),
    "fire_without_offset": ({"payload": "x", "next_fire_at": "2030-01-01T00:00:00"}, "offset"),
    "retries_past_9999": (
        {"payload": "x", "next_fire_at": "9999-12-31T23:00:00Z", "max_retries": 3, "retry": {"max_s": 86400}},
        "9999",
    ),
    "retry_delay_overflows": ({"payload": "x", "retry": {"initial_s": 1e308}}, "initial_s"),
    "retry_multiplier_huge": ({"payload": "x", "retry": {"multiplier": 1e300}}, "multiplier"),
    "retry_unknown_key": ({"payload": "x", "retry": {"initial": 1}}, "initial"),
    "retry_status_out_of_range": ({"payload": "x", "retry": {"retry_on_status": [600]}}, "599"),
    "bool_for_int": ({"payload": "x", "max_retries": True}, "max_retries"),
    "string_for_int": ({"payload": "x", "priority": "5"}, "priority"),
    "string_for_float": ({"payload": "x", "timeout_s": "10"}, "timeout_s"),
    "unknown_top_key": ({"payload": "x", "colour": "red"}, "colour"),
    "cron_never_fires": ({"payload": "x", "cron_schedule": "0 0 30 2 *"}, "cron_schedule"),
    "cmd_over_arg_limit": ({"payload": "cmd:echo " + "x" * (128 * 1024)}, "MAX_ARG_STRLEN"),
    "cmd_with_nul": ({"payload": "cmd:echo a\u0000b"}, "NUL"),
    "http_header_crlf": ({"payload": {"http": {"url": URL, "headers": {"X-A": "a\r\nX-B: b"}}}}, "CR"),
    "http_header_nul": ({"payload": {"http": {"url": URL, "headers": {"X-A": "a\u0000"}}}}, "NUL"),
    "http_header_bad_name": ({"payload": {"http": {"url": URL, "headers": {"X A": "a"}}}}, "header name"),
    "http_host_header": ({"payload": {"http": {"url": URL, "headers": {"Host": "evil"}}}}, "Host"),
    "http_framing_header": ({"payload": {"http": {"url": URL, "headers": {"Transfer-Encoding": "chunked"}}}}, "hop"),
    "http_hop_header": ({"payload": {"http": {"url": URL, "headers": {"Connection": "close"}}}}, "hop"),
    "http_no_host": ({"payload": {"http": {"url": "http:///path"}}}, "host"),
    "http_bad_port": ({"payload": {"http": {"url": "http://127.0.0.1:99999/x"}}}, "URL"),
    "http_port_zero": ({"payload": {"http": {"url": "http://example.com:0/x"}}}, "port 0"),
    "http_unknown_key": ({"payload": {"http": {"url": URL, "verb": "GET"}}}, "verb"),
    "http_bad_method": ({"payload": {"http": {"url": URL, "method": "TRACE"}}}, "method"),
    "deep_nesting": ({"payload": {"http": {"url": URL, "method": "POST", "body": DEEP}}}, "deeper"),
    "name_with_nul": ({"payload": "x", "name": "a\u0000b"}, "control characters"),
    "project_with_newline": ({"payload": "x", "project_id": "p\nq"}, "control characters"),
}


async def _job_count(api: Api) -> int:
    status, data = await api.call("GET", "/jobs?limit=1000")
    assert status == 200, data
    return len(data["jobs"])


async def test_each_class_of_bad_input_is_a_400_and_the_pipeline_keeps_running(api: Api) -> None:
    before = await _job_count(api)
    for case, (body, word) in BAD_SUBMITS.items():
        status, data = await api.call("POST", "/submit", json={"project_id": "p", **body})
        assert status == 400, (case, status, data)
        assert set(data) == {"error", "detail"}, (case, data)
        assert word.lower() in data["detail"].lower(), (case, data["detail"])
    assert await _job_count(api) == before  # nothing was accepted
    # An ordinary job still runs for everyone, and nothing reports a fault.
    job_id = await api.submit(payload="still alive")
    runs = await api.finished_runs(job_id, timeout=15)
    assert runs[0]["status"] == "succeeded"
    status, health = await api.call("GET", "/health")
    assert status == 200 and health["status"] == "ok", health


async def test_a_past_fire_time_fires_now(api: Api) -> None:
    job_id = await api.submit(payload="late", next_fire_at="2001-01-01T00:00:00Z")
    runs = await api.finished_runs(job_id, timeout=15)
    assert runs[0]["status"] == "succeeded"


async def test_patch_is_validated_like_submit_and_refuses_empty_or_no_op(api: Api) -> None:
    job_id = await api.submit(payload="x", name="n", next_fire_at="2099-01-01T00:00:00Z")
    for body, word in [
        ({}, "empty"),
        ({"name": "n"}, "nothing to change"),
        ({"cron_schedule": "@every 2600000000000h"}, "maximum"),
        ({"max_retries": True}, "max_retries"),
        ({"retry": {"bogus": 1}}, "bogus"),
        ({"payload": "cmd:" + "x" * (128 * 1024)}, "MAX_ARG_STRLEN"),
        ({"next_fire_at": "1900-01-01T00:00:00Z"}, "1970"),
        ({"project_id": "other"}, "project_id"),
    ]:
        status, data = await api.call("PATCH", f"/jobs/{job_id}", json=body)
        assert status == 400, (body, data)
        assert word.lower() in data["detail"].lower(), (body, data)
    status, data = await api.call("PATCH", f"/jobs/{job_id}", json={"name": "renamed"})
    assert status == 202, data


async def test_client_errors_are_json_4xx_and_never_leak_internals(api: Api) -> None:
    status, data = await api.call("GET", "/jobs?cursor=not-a-cursor")
    assert status == 400 and "cursor" in data["detail"], data
    status, data = await api.call("PUT", "/submit", json={})
    assert status == 405 and set(data) == {"error", "detail"}, data
    async with api.session.request("PUT", api.base + "/submit", headers={"X-User-ID": "alice"}) as resp:
        assert "POST" in resp.headers.get("Allow", ""), dict(resp.headers)
    status, data = await api.call("POST", "/submit", data=b"[1, 2", headers={"Content-Type": "application/json"})
    assert status == 400 and data["error"] == "invalid_json", data


async def _raw(api: Api, request: bytes) -> tuple[int, bytes]:
    host, port = api.base.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(request)
        await writer.drain()
        answer = await asyncio.wait_for(reader.read(65536), timeout=5)
    finally:
        writer.close()
    head, _, body = answer.partition(b"\r\n\r\n")
    return int(head.split()[1]), body


@pytest.mark.parametrize(
    "request_bytes",
    [
        b"GARBAGE\r\n\r\n",
        b"G\x00T / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n",
        b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Long: " + b"a" * 20000 + b"\r\n\r\n",
    ],
    ids=["bad_request_line", "bad_method", "header_too_long"],
)
async def test_errors_raised_by_the_http_layer_are_json(api: Api, request_bytes: bytes) -> None:
    status, body = await _raw(api, request_bytes)
    assert 400 <= status < 500
    assert body.startswith(b'{"error":'), body[:200]


async def test_replaying_a_dead_letter_of_a_deleted_job_is_a_conflict(api: Api) -> None:
    job_id = await api.submit(payload="cmd:exit 3", max_retries=0)
    await api.finished_runs(job_id, timeout=15)

    async def letters() -> list[dict[str, Any]]:
        _, data = await api.call("GET", "/dead-letters")
        return [d for d in data["dead_letters"] if d["job_id"] == job_id]

    letter = (await api.wait_for(letters))[0]
    status, _ = await api.call("DELETE", f"/jobs/{job_id}")
    assert status == 202

    async def deleted() -> bool:
        _, job = await api.call("GET", f"/jobs/{job_id}")
        return bool(job["status"] == "deleted")

    await api.wait_for(deleted)
    status, data = await api.call("POST", f"/dead-letters/{letter['id']}/replay")
    assert status == 409, data


@pytest.mark.parametrize(
    ("cron", "zone"),
    [("not a schedule", "UTC"), ("0 0 30 2 *", "UTC"), ("@hourly", "Mars/Olympus_Mons")],
    ids=["unparseable", "no_occurrence", "unknown_zone"],
)
async def test_a_stored_job_whose_schedule_cannot_be_rendered_is_never_a_5xx(
    tmp_path: Path, cron: str, zone: str
) -> None:
    """A stored definition no current ingestion would accept (an older release's, another producer's) is still
    readable: the job, the list, and its schedule preview (without the occurrences it cannot compute), never a
    5xx with internal text."""
    settings = cluster_settings(tmp_path)
    async with running(settings, ["ingestion"]) as instances, aiohttp.ClientSession() as session:
        ingestion: Any = instances["ingestion"]
        api = Api(base=f"http://127.0.0.1:{ingestion.port}", session=session)
        now = now_ms()
        job = Job.model_validate(
            {
                "job_id": "unrenderable-1",
                "user_id": api.user,
                "project_id": "p",
                "payload": {"kind": "echo", "text": "x"},
                "cron_schedule": cron,
                "timezone": zone,
                "next_fire_ms": now - 60_000,
                "dispatched_through_ms": now - 60_000,
                "created_ms": now - 120_000,
            }
        )
        await ingestion.store.put_jobs([job])
        for path in ("/job?id=unrenderable-1", "/jobs/unrenderable-1", "/jobs", "/jobs/unrenderable-1/schedule?next=3"):
            status, data = await api.call("GET", path)
            assert status == 200, (path, status, data)
        _, preview = await api.call("GET", "/jobs/unrenderable-1/schedule?next=3")
        assert len(preview["next"]) <= 1, preview  # at most the stored first fire: nothing it cannot compute


async def test_a_backend_outage_is_a_503_that_leaks_nothing_and_accepts_nothing(tmp_path: Path) -> None:
    """503 is kept for a backend that did not answer: the body never carries the exception's text (it is in the
    log), and a submit whose append failed leaves no job that looks accepted."""
    settings = cluster_settings(tmp_path)
    async with running(settings, ["ingestion"]) as instances, aiohttp.ClientSession() as session:
        ingestion: Any = instances["ingestion"]
        api = Api(base=f"http://127.0.0.1:{ingestion.port}", session=session)
        secret = "broker kafka-7.internal:9092 refused (errno 111) at /srv/dsched/secret"

        async def down(*args: Any, **kwargs: Any) -> Any:
            raise ConnectionError(secret)

        ingestion.log.append = down
        status, data = await api.call("POST", "/submit", json={"project_id": "p", "payload": "x"})
        assert status == 503, data
        assert data == {"error": "unavailable", "detail": "a backend did not answer; retry later"}
        status, page = await api.call("GET", "/jobs?status=submitted")
        assert status == 200 and page["jobs"] == [], page  # the accepted row was withdrawn

        ingestion.store.get_jobs = down
        status, data = await api.call("GET", "/jobs/some-job")
        assert status == 503 and secret not in str(data), data
