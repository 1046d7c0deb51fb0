"""Traces: one job's spans form one trace from the submit to the HTTP target, through the log record, the store
and the queue message; log lines carry the ids; with tracing off nothing is added anywhere."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from libs import logs, tracing
from libs.runner import started
from libs.settings import SERVICES, Settings


@pytest.fixture
def exporter() -> Iterator[InMemorySpanExporter]:
    memory = InMemorySpanExporter()
    tracing.configure_exporter(memory, list(SERVICES))
    try:
        yield memory
    finally:
        tracing.shutdown()


@contextlib.asynccontextmanager
async def hook_server() -> AsyncIterator[tuple[str, list[dict[str, str]]]]:
    """An HTTP target recording the headers of each request it receives."""
    received: list[dict[str, str]] = []

    async def hook(request: web.Request) -> web.Response:
        received.append(dict(request.headers))
        return web.json_response({"ok": True})

    app = web.Application()
    app.router.add_post("/hook", hook)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        yield f"http://127.0.0.1:{port}/hook", received
    finally:
        await runner.cleanup()


def settings_for(tmp_path: Path) -> Settings:
    return Settings.from_env(
        data_dir=tmp_path / "data",
        port=0,
        shard_count=4,
        bucket_s=10,
        bucket_grace_s=2.0,
        lease_ttl_s=2.0,
        picker_tick_s=0.05,
        node_id="trace-node",
        shutdown_grace_s=1.0,
    ).with_dev_defaults()


CALLER = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"  # the API caller's own span (W3C example)


async def run_http_job(tmp_path: Path) -> tuple[str, list[dict[str, str]]]:
    """Submit one HTTP job to all five services in this process (the caller sends its ``traceparent``); returns
    the job id and the headers the target received."""
    stop = asyncio.Event()
    async with hook_server() as (url, received), started(settings_for(tmp_path), list(SERVICES), stop) as services:
        port = services["ingestion"].port  # type: ignore[attr-defined]
        async with aiohttp.ClientSession() as session:
            body = {"project_id": "p", "payload": {"http": {"url": url, "method": "POST", "body": "{}"}}}
            async with session.post(
                f"http://127.0.0.1:{port}/submit", json=body, headers={"X-User-ID": "alice", "traceparent": CALLER}
            ) as resp:
                assert resp.status == 202, await resp.text()
                job_id = str((await resp.json())["job_id"])
            for _ in range(300):  # bounded: 15 s
                if received:
                    break
                await asyncio.sleep(0.05)
            assert received, "the HTTP target was never called"
            await asyncio.sleep(0.3)  # the run span ends once the attempt is recorded
    return job_id, received


def by_name(spans: tuple[ReadableSpan, ...], name: str, **attributes: str) -> ReadableSpan:
    found = [
        s for s in spans if s.name == name and all((s.attributes or {}).get(k) == v for k, v in attributes.items())
    ]
    assert len(found) == 1, (name, attributes, [s.name for s in spans])
    return found[0]


async def test_one_jobs_spans_form_one_trace_from_submit_to_the_http_target(
    tmp_path: Path, exporter: InMemorySpanExporter
) -> None:
    job_id, received = await run_http_job(tmp_path)
    spans = exporter.get_finished_spans()
    submit = by_name(spans, "dsched.submit", **{"dsched.job_id": job_id})
    store = by_name(spans, "dsched.store", **{"dsched.job_id": job_id})
    dispatch = next(s for s in spans if s.name == "dsched.dispatch")
    run = by_name(spans, "dsched.run", **{"dsched.run_id": str((dispatch.attributes or {})["dsched.run_id"])})

    chain = [submit, store, dispatch, run]
    assert {f"{s.context.trace_id:032x}" for s in chain} == {CALLER.split("-")[1]}, "one trace: the caller's"
    assert submit.parent is not None and f"{submit.parent.span_id:016x}" == CALLER.split("-")[2]
    for parent, child in itertools.pairwise(chain):
        assert child.parent is not None and child.parent.span_id == parent.context.span_id, child.name
    scopes = [s.instrumentation_scope.name if s.instrumentation_scope else "" for s in chain]
    assert scopes == ["dsched.ingestion", "dsched.writer", "dsched.picker", "dsched.worker"]
    assert run.end_time is not None and run.start_time is not None and run.end_time >= run.start_time

    # The target received the run span as its parent: its own spans join the same trace.
    trace_id, span_id = f"{run.context.trace_id:032x}", f"{run.context.span_id:016x}"
    version, sent_trace, sent_parent, flags = received[0]["traceparent"].split("-")
    assert (version, sent_trace, sent_parent) == ("00", trace_id, span_id)
    assert int(flags, 16) & 1, "sampled"


async def test_with_tracing_off_nothing_is_traced_or_sent(tmp_path: Path) -> None:
    assert not tracing.ENABLED
    assert tracing.start("worker", "dsched.run", None) is None
    assert tracing.instant("picker", "dsched.dispatch", None) is None
    assert tracing.current_traceparent() is None and tracing.log_ids() == {}
    _, received = await run_http_job(tmp_path)
    assert "traceparent" not in {key.lower() for key in received[0]}


def test_log_lines_carry_trace_and_span_ids(exporter: InMemorySpanExporter) -> None:
    span = tracing.start("worker", "dsched.run", None)
    assert span is not None
    token = tracing.attach(span)
    try:
        event = logs._trace_ids(None, "info", {"event": "run_finished"})
    finally:
        tracing.detach(token)
        tracing.end(span)
    assert event["trace_id"] == f"{span.get_span_context().trace_id:032x}"
    assert event["span_id"] == f"{span.get_span_context().span_id:016x}"
    assert logs._trace_ids(None, "info", {"event": "outside"}) == {"event": "outside"}


def test_an_otlp_endpoint_turns_tracing_on() -> None:
    settings = Settings.from_env(otlp_endpoint="http://127.0.0.1:4318", node_id="n1")
    try:
        assert tracing.configure(settings, ["worker"]) is True
        assert tracing.ENABLED
    finally:
        tracing.shutdown()
    assert not tracing.ENABLED
    assert tracing.configure(Settings.from_env(node_id="n1"), ["worker"]) is False
    assert not tracing.ENABLED
