"""Traces: one job's spans form one trace from the submit to the HTTP target, through the log record, the store
and the queue message; log lines carry the ids; with tracing off nothing is added anywhere."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import signal
import subprocess
import threading
import urllib.request
from collections.abc import AsyncIterator, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from dsched.app.runner import started
from dsched.libs import logs, tracing
from dsched.libs.servers.base import free_port, http_ok
from dsched.libs.settings import SERVICES, Settings
from tests.helpers.observability import DSCHED, wait_until


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


class OtlpReceiver:
    """A minimal OTLP/HTTP trace receiver: keeps every ``POST /v1/traces`` body (protobuf), answers 200."""

    def __init__(self) -> None:
        bodies: list[bytes] = []
        self.bodies = bodies

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                if self.path == "/v1/traces":
                    bodies.append(body)
                self.send_response(200 if self.path == "/v1/traces" else 404)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def spans(self) -> list[tuple[str, str, str]]:
        """``(service.name, span name, trace id hex)`` of every span received."""
        found = []
        for body in self.bodies:
            request = ExportTraceServiceRequest.FromString(body)
            for resource_spans in request.resource_spans:
                attributes = {a.key: a.value.string_value for a in resource_spans.resource.attributes}
                for scope_spans in resource_spans.scope_spans:
                    for span in scope_spans.spans:
                        found.append((attributes.get("service.name", ""), span.name, span.trace_id.hex()))
        return found


@pytest.mark.timeout(90)
def test_dsched_run_exports_spans_over_otlp_when_an_endpoint_is_set(tmp_path: Path) -> None:
    """The real CLI (``dsched run all``) with ``DSCHED_OTLP_ENDPOINT``: one submitted job's spans reach the
    collector over OTLP/HTTP (flushed at the latest on SIGTERM), in one trace."""
    receiver = OtlpReceiver()
    receiver.thread.start()
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("DSCHED_")}
    env |= {"DSCHED_DATA_DIR": str(tmp_path / "data"), "DSCHED_PORT": str(port), "DSCHED_OTLP_ENDPOINT": receiver.url}
    env |= {"DSCHED_NODE_ID": "otlp-test", "DSCHED_LEASE_TTL_S": "2", "DSCHED_LOG_LEVEL": "WARNING"}
    base = f"http://127.0.0.1:{port}"
    with (tmp_path / "dsched.log").open("wb") as log:
        proc = subprocess.Popen([DSCHED, "run", "all"], env=env, stdout=log, stderr=log, start_new_session=True)
    try:
        wait_until(lambda: http_ok(f"{base}/health") is not None, 30, "dsched run all healthy")
        request = urllib.request.Request(
            f"{base}/submit",
            data=json.dumps({"project_id": "p", "payload": "hello"}).encode(),
            headers={"X-User-ID": "alice", "Content-Type": "application/json"},
            method="POST",
        )
        with urllib.request.urlopen(request, timeout=10) as resp:
            job_id = json.loads(resp.read())["job_id"]

        def succeeded() -> bool:
            req = urllib.request.Request(f"{base}/jobs/{job_id}/runs", headers={"X-User-ID": "alice"})
            with urllib.request.urlopen(req, timeout=10) as answer:
                runs = json.loads(answer.read())["runs"]
            return any(run["status"] == "succeeded" for run in runs)

        wait_until(succeeded, 30, "the job ran")
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
        receiver.server.shutdown()
        receiver.server.server_close()
    assert proc.returncode == 0, (tmp_path / "dsched.log").read_text()[-2000:]
    spans = receiver.spans()
    names = {name for _, name, _ in spans}
    assert {"dsched.submit", "dsched.store", "dsched.dispatch", "dsched.run"} <= names, spans
    traces = {trace for _, _, trace in spans}
    assert len(traces) == 1, spans
    assert {service for service, _, _ in spans} == {"dsched"}
