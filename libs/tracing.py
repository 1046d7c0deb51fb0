"""Distributed traces (OpenTelemetry), W3C trace context carried by the data itself.

A job's trace follows the job through every hop, each hop a span whose parent travels with the data:

``dsched.submit`` (ingestion: the log append, child of the request's own ``traceparent`` header when the caller
sent one; its ``traceparent`` is written into the job definition in the log record) → ``dsched.store`` (writer:
the job stored; the stored definition carries this span's ``traceparent``) → ``dsched.dispatch`` (picker: one per
run sent; the queue message carries its ``traceparent``) → ``dsched.run`` (worker: the attempt) → the outgoing HTTP
call, which carries a ``traceparent`` header naming the run span, so the target's own spans join the trace. A
recurring job's runs stay in the trace of its latest change; a retry is a new ``dsched.dispatch``/``dsched.run``
pair in the same trace. The coordinator is on no job's path (it assigns shards).

Off unless configured: :func:`configure` with ``DSCHED_OTLP_ENDPOINT`` set (an OTLP/HTTP collector, e.g.
``http://127.0.0.1:4318``) installs the SDK with a batching OTLP exporter; :func:`configure_exporter` installs any
exporter (the tests use the SDK's in-memory one). While off, every function here returns after one boolean test:
no span objects, no context switches, no ``traceparent`` fields or headers — nothing on the hot path.

Log lines carry ``trace_id`` and ``span_id`` of the active span (:func:`log_ids`, used by :mod:`libs.logs`).
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING

from opentelemetry import context, trace
from opentelemetry.trace import Span, SpanKind
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SpanExporter

    from dsched.libs.settings import Settings

ENABLED = False
_provider: TracerProvider | None = None
_inbound: contextvars.ContextVar[str | None] = contextvars.ContextVar("dsched_inbound_traceparent", default=None)
_propagator = TraceContextTextMapPropagator()
Attributes = Mapping[str, str | int | float | bool]


def configure(settings: Settings, services: list[str]) -> bool:
    """Turn tracing on when ``settings.otlp_endpoint`` is set (OTLP over HTTP, batched); returns whether it is."""
    endpoint = settings.otlp_endpoint
    if not endpoint:
        return False
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

    traces_url = endpoint.rstrip("/")
    if not traces_url.endswith("/v1/traces"):
        traces_url += "/v1/traces"
    configure_exporter(OTLPSpanExporter(endpoint=traces_url), services, batch=True, node_id=settings.node_id)
    return True


def configure_exporter(
    exporter: SpanExporter, services: list[str], *, batch: bool = False, node_id: str = ""
) -> TracerProvider:
    """Turn tracing on with ``exporter`` (batched, or synchronous for tests); ``service.name`` is
    ``dsched-<service>`` (``dsched`` for several services in one process)."""
    global ENABLED, _provider
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor

    name = f"dsched-{services[0]}" if len(services) == 1 else "dsched"
    attributes = {"service.name": name, "service.instance.id": node_id} if node_id else {"service.name": name}
    provider = TracerProvider(resource=Resource.create(attributes))
    provider.add_span_processor(BatchSpanProcessor(exporter) if batch else SimpleSpanProcessor(exporter))
    _provider = provider
    ENABLED = True
    return provider


def shutdown() -> None:
    """Flush and stop the exporter; tracing is off afterwards."""
    global ENABLED, _provider
    ENABLED = False
    provider, _provider = _provider, None
    if provider is not None:
        provider.shutdown()


def _parent(traceparent: str | None) -> context.Context | None:
    return _propagator.extract({"traceparent": traceparent}) if traceparent else None


def traceparent_of(span: Span) -> str | None:
    """The W3C ``traceparent`` naming ``span`` (to store in a record or send as a header)."""
    carrier: dict[str, str] = {}
    _propagator.inject(carrier, context=trace.set_span_in_context(span))
    return carrier.get("traceparent")


def start(
    service: str,
    name: str,
    parent: str | None,
    attributes: Attributes | None = None,
    kind: SpanKind = SpanKind.INTERNAL,
) -> Span | None:
    """A started span, child of the ``parent`` traceparent (a new trace if None); None while tracing is off.
    End it with :func:`end`."""
    provider = _provider  # set exactly while ENABLED
    if provider is None:
        return None
    tracer = provider.get_tracer(f"dsched.{service}")
    return tracer.start_span(name, context=_parent(parent), kind=kind, attributes=attributes)


def end(span: Span | None, error: str | None = None) -> None:
    if span is None:
        return
    if error:
        span.set_status(trace.Status(trace.StatusCode.ERROR, error))
    span.end()


def instant(service: str, name: str, parent: str | None, attributes: Attributes | None = None) -> str | None:
    """Record a zero-length span (a hand-off) and return its traceparent; None while tracing is off."""
    span = start(service, name, parent, attributes)
    if span is None:
        return None
    span.end()
    return traceparent_of(span)


@contextlib.contextmanager
def active(span: Span | None) -> Iterator[None]:
    """Make ``span`` the current span (for log lines and :func:`current_traceparent`) inside the block."""
    if span is None:
        yield
        return
    token = context.attach(trace.set_span_in_context(span))
    try:
        yield
    finally:
        context.detach(token)


def remember_inbound(traceparent: str | None) -> None:
    """The ``traceparent`` header of the request being served (the API's caller may already be in a trace)."""
    if ENABLED:
        _inbound.set(traceparent or None)


def inbound() -> str | None:
    """What :func:`remember_inbound` kept for this request (None while off or without the header)."""
    return _inbound.get() if ENABLED else None


def current_traceparent() -> str | None:
    """The traceparent of the current span (an outgoing call's header); None while off or outside a span."""
    if not ENABLED:
        return None
    span = trace.get_current_span()
    return traceparent_of(span) if span.get_span_context().is_valid else None


def log_ids() -> dict[str, str]:
    """``trace_id`` and ``span_id`` (hex) of the current span, for log lines; empty while off or outside a span."""
    if not ENABLED:
        return {}
    span_context = trace.get_current_span().get_span_context()
    if not span_context.is_valid:
        return {}
    return {"trace_id": f"{span_context.trace_id:032x}", "span_id": f"{span_context.span_id:016x}"}


def attach(span: Span | None) -> object | None:
    """Make ``span`` current until :func:`detach` with the returned token (in the same task); None if no span."""
    if span is None:
        return None
    return context.attach(trace.set_span_in_context(span))


def detach(token: object | None) -> None:
    if token is not None:
        context.detach(token)  # type: ignore[arg-type]
