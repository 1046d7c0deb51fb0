"""Prometheus metrics. One registry per process; every service registers into it.

Names are part of the contract with the ``deploy/grafana`` dashboards and the ``deploy/prometheus`` alert rules
(tests check that every name they use is registered here, and evaluate them on a real Prometheus).

Each gauge is set by the process that owns what it measures, so every process of a distributed deployment
exports the truth about its own part: the work-queue depth by workers (sampled from the queue itself, every
:data:`QUEUE_DEPTH_INTERVAL_S`), the writer's lag behind the log by the writer, shard ownership by pickers.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, TypeVar, cast

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families

from dsched.libs.models import FINISHED_RUN_STATUSES

if TYPE_CHECKING:
    from dsched.libs.queue.base import WorkQueue

REGISTRY = CollectorRegistry(auto_describe=True)

# Lags: from a millisecond to ten minutes (a run stuck behind a backlog, a late retry).
LAG_BUCKETS = (
    *(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0),
    *(120.0, 300.0, 600.0),
)
# Run durations: from an echo (milliseconds) to an hour-long command.
DURATION_BUCKETS = (
    *(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0),
    *(120.0, 300.0, 600.0, 1800.0, 3600.0),
)
# The fire-lag objective of the SLO dashboard and alerts: a run starts within this of its due time. It must be
# one of LAG_BUCKETS (the SLI is the share of observations in the bucket ``le="1.0"``).
FIRE_LAG_OBJECTIVE_S = 1.0
# Per-tenant series are bounded: the first MAX_TENANT_LABELS tenants a process sees get their own label value,
# every later one is counted under OTHER_TENANT (per process: a tenant may be named in one and "other" in another).
MAX_TENANT_LABELS = 50
OTHER_TENANT = "__other__"
QUEUE_DEPTH_INTERVAL_S = 2.0

HTTP_REQUESTS = Counter(
    "dsched_http_requests_total", "HTTP requests served", ["route", "method", "status"], registry=REGISTRY
)
SUBMISSIONS = Counter("dsched_submissions_total", "Job changes appended to the log", ["op"], registry=REGISTRY)
SUBMISSIONS_REFUSED = Counter(
    "dsched_submissions_refused_total",
    "New work answered 503 overloaded (ingestion/admission.py), by reason",
    ["reason"],
    registry=REGISTRY,
)
BLOB_OFFLOADS = Counter(
    "dsched_blob_offloads_total", "Payloads/outputs stored in the blob store", ["what"], registry=REGISTRY
)
WRITER_RECORDS = Counter(
    "dsched_writer_records_total", "Log records persisted by the writer", ["result"], registry=REGISTRY
)
PICKER_DISPATCHED = Counter(
    "dsched_picker_dispatched_total", "Runs handed to the work queue", ["kind"], registry=REGISTRY
)
PICKER_DROPPED = Counter(
    "dsched_picker_dropped_total",
    "Queue entries dropped instead of dispatched",
    ["reason"],
    registry=REGISTRY,
)
PICKER_SHARDS = Gauge("dsched_picker_owned_shards", "Shards this picker currently owns", registry=None)  # owned
DISPATCH_LAG = Histogram(
    "dsched_dispatch_lag_seconds", "Queue send time minus due time", buckets=LAG_BUCKETS, registry=REGISTRY
)
FIRE_LAG = Histogram(
    "dsched_fire_lag_seconds",
    "Run start time minus due time (runs of jobs submitted already late are left out: see late_submission_runs)",
    buckets=LAG_BUCKETS,
    registry=REGISTRY,
)
LATE_SUBMISSION_RUNS = Counter(
    "dsched_late_submission_runs_total",
    "First runs of jobs submitted with a due time already past: their lag is the client's, not dsched's, and is "
    "kept out of dsched_fire_lag_seconds (and so out of the fire-lag SLO)",
    registry=REGISTRY,
)
RUNS_FINISHED = Counter("dsched_runs_total", "Runs finished, by outcome", ["status"], registry=REGISTRY)
RUN_DURATION = Histogram(
    "dsched_run_duration_seconds", "Run execution time", buckets=DURATION_BUCKETS, registry=REGISTRY
)
RETRIES = Counter("dsched_retries_total", "Retries scheduled", registry=REGISTRY)
DEAD_LETTERS = Counter("dsched_dead_letters_total", "Jobs dead-lettered after their last attempt", registry=REGISTRY)
DUPLICATE_DELIVERIES = Counter(
    "dsched_duplicate_deliveries_total",
    "Deliveries of runs already claimed or finished (not executed again)",
    registry=REGISTRY,
)
WORKER_INFLIGHT = Gauge("dsched_worker_inflight_runs", "Runs executing in this worker", registry=None)  # owned
WORKER_SLOTS = Gauge(
    "dsched_worker_slots", "Runs this worker may execute at once (DSCHED_WORKER_CONCURRENCY)", registry=None
)
QUEUE_DEPTH = Gauge(
    "dsched_queue_depth",
    "Approximate work-queue messages by state (visible, in_flight, dead), sampled by workers from the queue",
    ["state"],
    registry=REGISTRY,
)
SHARD_COUNT = Gauge(
    "dsched_shard_count", "Shards of the time-bucket table (set by coordinators and pickers)", registry=None
)
WRITER_LAG_RECORDS = Gauge(
    "dsched_writer_lag_records",
    "Log records appended but not yet persisted and committed by the writer's consumer group",
    registry=None,
)
WRITER_LAG_SECONDS = Gauge(
    "dsched_writer_lag_seconds",
    "Age of the oldest log record not yet persisted by the writer (0 when caught up)",
    registry=None,
)
TENANT_SUBMISSIONS = Counter(
    "dsched_tenant_submissions_total",
    f"Job changes appended to the log per tenant (user id; at most {MAX_TENANT_LABELS} per process, then "
    f"{OTHER_TENANT!r})",
    ["tenant", "op"],
    registry=REGISTRY,
)
TENANT_RUNS = Counter(
    "dsched_tenant_runs_total", "Runs finished per tenant and outcome", ["tenant", "status"], registry=REGISTRY
)
TENANT_FIRE_LAG = Histogram(
    "dsched_tenant_fire_lag_seconds",
    "Fire lag per tenant (coarser buckets than dsched_fire_lag_seconds to bound the series)",
    ["tenant"],
    buckets=(0.01, 0.1, 0.5, 1.0, 5.0, 30.0, 300.0),
    registry=REGISTRY,
)
COORDINATOR_LEADER = Gauge("dsched_coordinator_is_leader", "1 while this coordinator leads", registry=None)  # owned
SERVICE_UP = Gauge(
    "dsched_service_up",
    "1 while every supervised loop of the service runs (0 while one restarts)",
    ["service"],
    registry=REGISTRY,
)
SERVICE_RESTARTS = Counter(
    "dsched_service_restarts_total", "Supervised loops restarted after an exception", ["service"], registry=REGISTRY
)
WRITER_DEAD_LETTERS = Counter(
    "dsched_writer_dead_letters_total",
    "Log records moved to the log's dead-letter place (undecodable, invalid or unstorable)",
    ["reason"],
    registry=REGISTRY,
)


_tenants: set[str] = set()
_tenants_lock = threading.Lock()


def tenant_label(user_id: str) -> str:
    """The ``tenant`` label value for ``user_id``: itself for the first :data:`MAX_TENANT_LABELS` tenants this
    process sees, :data:`OTHER_TENANT` for every later one (bounded cardinality, whatever the number of users)."""
    if user_id in _tenants:
        return user_id
    with _tenants_lock:
        if len(_tenants) < MAX_TENANT_LABELS:
            _tenants.add(user_id)
            return user_id
    return OTHER_TENANT


# Labelled children the per-run and per-request paths use, by metric and label values: ``labels()`` validates and
# locks on every call (~1.9 µs), a dict lookup does not (~0.6 µs with the increment). Bounded like the labels
# themselves (tenants capped by MAX_TENANT_LABELS; routes, methods, ops and statuses are few).
_children: dict[tuple[int, tuple[str, ...]], Any] = {}
_Metric = TypeVar("_Metric", Counter, Histogram)


def child(metric: _Metric, *values: str) -> _Metric:
    """``metric.labels(*values)``, looked up in a dict after the first call (for module-level metrics)."""
    key = (id(metric), values)  # module-level metrics: their ids never change
    if (child := _children.get(key)) is None:
        child = _children.setdefault(key, metric.labels(*values))
    return cast(_Metric, child)


def observe_run_start(user_id: str, lag_s: float, *, late_submission: bool) -> None:
    """Record a run's fire lag (start minus due). A run of a job submitted with a due time already past is only
    counted (``dsched_late_submission_runs_total``): its lateness is not dsched's and must not burn the SLO."""
    if late_submission:
        LATE_SUBMISSION_RUNS.inc()
        return
    FIRE_LAG.observe(lag_s)
    child(TENANT_FIRE_LAG, tenant_label(user_id)).observe(lag_s)


def export_run_outcomes() -> None:
    """Called by a process that runs jobs (the worker): ``dsched_runs_total`` for every finished run status is
    exported from 0 on, so ``rate()`` and ``increase()`` see the first failure or timeout of the process too (a
    counter series first scraped at 1 hides its first increment). Other processes export none of them."""
    for status in sorted(FINISHED_RUN_STATUSES):
        child(RUNS_FINISHED, status.value)


def observe_run_finished(user_id: str, status: str, duration_s: float) -> None:
    """Count a finished attempt by outcome (overall and per tenant) and record how long it ran."""
    RUN_DURATION.observe(duration_s)
    child(RUNS_FINISHED, status).inc()
    child(TENANT_RUNS, tenant_label(user_id), status).inc()


async def sample_queue_depth(queue: WorkQueue, interval_s: float = QUEUE_DEPTH_INTERVAL_S) -> None:
    """Set ``dsched_queue_depth`` from ``queue.counts()`` every ``interval_s`` until cancelled. A failed sample
    leaves the last values (the queue's own health shows elsewhere) and is retried at the next interval."""
    while True:
        with contextlib.suppress(Exception):
            counts = await queue.counts()
            QUEUE_DEPTH.labels("visible").set(counts.visible)
            QUEUE_DEPTH.labels("in_flight").set(counts.in_flight)
            QUEUE_DEPTH.labels("dead").set(counts.dead)
        await asyncio.sleep(interval_s)


# Unlabelled gauges that only the service owning them may export: registered into REGISTRY by that service
# (:func:`export`), so a process without a writer never claims "writer lag 0" and a process without a picker
# never adds a 0 to the owned shards. Every other metric is registered at import.
OWNED_GAUGES: tuple[Gauge, ...] = (
    *(PICKER_SHARDS, SHARD_COUNT, COORDINATOR_LEADER, WORKER_INFLIGHT, WORKER_SLOTS),
    *(WRITER_LAG_RECORDS, WRITER_LAG_SECONDS),
)
_exported: set[int] = set()
_exported_lock = threading.Lock()


def export(*gauges: Gauge) -> None:
    """Register ``gauges`` (from :data:`OWNED_GAUGES`) into REGISTRY: this process runs what they measure.
    Idempotent; several services of one process may export the same gauge."""
    with _exported_lock:
        for gauge in gauges:
            if id(gauge) not in _exported:
                REGISTRY.register(gauge)
                _exported.add(id(gauge))


# Other processes whose metrics this process serves as part of its own (``run all``'s worker children):
# their name (the value of their ``process`` label) -> how to read their exposition text.
_SOURCES: dict[str, Callable[[], Awaitable[str]]] = {}
PROCESS_LABEL = "process"


def add_source(name: str, read: Callable[[], Awaitable[str]]) -> None:
    """Serve the metrics ``read`` returns along with this process's own, each series labelled ``process=name``."""
    _SOURCES[name] = read


def remove_source(name: str) -> None:
    _SOURCES.pop(name, None)


class _Families:
    """A collector of already collected metric families (to render a merged exposition)."""

    def __init__(self, families: list[Metric]) -> None:
        self.families = families

    def collect(self) -> list[Metric]:
        return self.families


async def exposition() -> bytes:
    """This process's metrics in the Prometheus text format, merged with every added source's.

    One scrape of the API port sees the whole ``run all`` (Prometheus needs no target per child). A source that
    does not answer is left out of this scrape; its supervised loop reports it on ``/health`` and in
    ``dsched_service_up``. A family a source exports with another type than this process is left out."""
    if not _SOURCES:
        return generate_latest(REGISTRY)
    names = list(_SOURCES)
    texts = await asyncio.gather(*(_SOURCES[name]() for name in names), return_exceptions=True)
    merged = {family.name: family for family in REGISTRY.collect()}
    for name, text in zip(names, texts, strict=True):
        if isinstance(text, BaseException):
            continue
        for family in text_string_to_metric_families(text):
            samples = [s._replace(labels={**s.labels, PROCESS_LABEL: name}) for s in family.samples]
            known = merged.get(family.name)
            if known is None:
                family.samples = samples
                merged[family.name] = family
            elif known.type == family.type:
                known.samples.extend(samples)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Families(list(merged.values())))
    return generate_latest(registry)
