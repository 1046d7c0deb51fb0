"""Outputs (cap, blob store, streaming) and the cmd:-mode guards, through the whole pipeline in one process."""

from __future__ import annotations

import random
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from tests.helpers.cluster import Api
from tests.helpers.sleepers import gone, kill_leftovers, marker_seconds, wait_for_sleeper

MIB = 1024 * 1024


async def test_output_over_the_cap_is_cut_stored_and_streamed_whole(api: Api, tmp_path: Path) -> None:
    job_id = await api.submit(payload="cmd:head -c 12582912 /dev/zero | tr '\\0' x", max_retries=0)
    [run] = await api.finished_runs(job_id, timeout=30)
    assert run["status"] == "succeeded"
    assert run["output_capped"] is True  # 12 MiB produced, the default cap is 10 MiB
    assert run["output_stored"] is True and run["output_truncated"] is True
    assert run["output"] == "x" * 4096  # the inline part
    async with api.session.get(f"{api.base}/runs/{run['run_id']}/output", headers={"X-User-ID": api.user}) as resp:
        assert resp.status == 200 and resp.headers.get("Transfer-Encoding") == "chunked"
        size, chunks = 0, 0
        async for chunk in resp.content.iter_any():
            assert chunk.count(b"x") == len(chunk)
            size += len(chunk)
            chunks += 1
    assert size == 10 * MIB and chunks > 1
    [blob] = (tmp_path / "data" / "blobs" / "outputs").iterdir()
    assert blob.stat().st_size == 10 * MIB


async def test_output_between_inline_and_cap_is_stored_not_capped(api: Api) -> None:
    job_id = await api.submit(payload="cmd:seq 1 30000")
    [run] = await api.finished_runs(job_id)
    expected = "".join(f"{i}\n" for i in range(1, 30001))
    assert (run["output_stored"], run["output_capped"]) == (True, False)
    assert expected.startswith(run["output"]) and len(run["output"]) == 4096
    status, text = await api.call("GET", f"/runs/{run['run_id']}/output")
    assert status == 200 and text == expected


async def test_short_output_is_inline(api: Api) -> None:
    job_id = await api.submit(payload="cmd:echo hi")
    [run] = await api.finished_runs(job_id)
    assert (run["output"], run["output_stored"], run["output_truncated"], run["output_capped"]) == (
        "hi\n",
        False,
        False,
        False,
    )
    status, job_run = await api.call("GET", f"/runs/{run['run_id']}")
    assert status == 200 and job_run["output_capped"] is False
    assert (await api.call("GET", f"/runs/{run['run_id']}/output")) == (200, "hi\n")


@pytest.fixture
async def big_target() -> AsyncIterator[str]:
    async def handle(request: web.Request) -> web.Response:
        return web.Response(body=b"y" * 5000)

    app = web.Application()
    app.router.add_get("/big", handle)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    try:
        yield f"http://127.0.0.1:{runner.addresses[0][1]}/big"
    finally:
        await runner.cleanup()


async def test_http_output_cap_is_a_setting(make_cluster: Callable[..., Any], big_target: str) -> None:
    async with make_cluster(output_cap_bytes=3000, output_inline_bytes=100) as api:
        job_id = await api.submit(payload={"http": {"url": big_target}})
        [run] = await api.finished_runs(job_id)
        assert run["status"] == "succeeded" and run["http_status"] == 200
        assert (run["output_capped"], run["output_stored"], run["output"]) == (True, True, "y" * 100)
        assert (await api.call("GET", f"/runs/{run['run_id']}/output")) == (200, "y" * 3000)


async def test_cancel_through_the_api_kills_a_setsid_child(api: Api) -> None:
    seconds = marker_seconds()
    try:
        job_id = await api.submit(payload=f"cmd:setsid sleep {seconds} & sleep 30", max_retries=0)
        await wait_for_sleeper(seconds)

        async def running() -> str | None:
            runs = [r for r in await api.runs(job_id) if r["status"] == "running"]
            return str(runs[0]["run_id"]) if runs else None

        run_id = await api.wait_for(running)
        status, _ = await api.call("POST", f"/runs/{run_id}/cancel")
        assert status in (200, 202)
        [run] = await api.finished_runs(job_id)
        assert run["status"] == "cancelled"
        assert await gone(seconds)
    finally:
        kill_leftovers(seconds)


async def test_timeout_through_the_pipeline_kills_a_setsid_child(api: Api) -> None:
    seconds = marker_seconds()
    try:
        job_id = await api.submit(payload=f"cmd:setsid sleep {seconds} & sleep 30", timeout_s=0.5, max_retries=0)
        [run] = await api.finished_runs(job_id)
        assert run["status"] == "timed_out"
        assert await gone(seconds)
    finally:
        kill_leftovers(seconds)


async def test_the_api_refuses_foreign_hosts_and_form_posts_while_cmd_is_on(api: Api) -> None:
    status, body = await api.call("GET", "/jobs", headers={"Host": f"evil-{random.randrange(10**6)}.example:8080"})
    assert status == 421 and body["error"] == "misdirected_request"
    status, body = await api.call(
        "POST",
        "/submit",
        data=b'{"project_id": "p", "payload": "cmd:id"}',
        headers={"Content-Type": "text/plain", "Host": "localhost:8080"},
    )
    assert status == 415 and set(body) == {"error", "detail"}
    assert (await api.call("GET", "/jobs", headers={"Host": "localhost:1"}))[0] == 200


async def test_without_cmd_the_guards_are_off(make_cluster: Callable[..., Any]) -> None:
    async with make_cluster(allow_cmd=False) as api:
        assert (await api.call("GET", "/jobs", headers={"Host": "dsched.internal:8080"}))[0] == 200
        # and a cmd: job is refused by the worker, as it is disabled
        job_id = await api.submit(payload="cmd:echo hi", max_retries=0)
        [run] = await api.finished_runs(job_id)
        assert run["status"] == "failed" and "DSCHED_ALLOW_CMD" in run["error"]
