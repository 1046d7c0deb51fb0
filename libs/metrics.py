"""Prometheus metrics. One registry per process; every service registers into it.

Names are part of the contract with ``deploy/grafana`` dashboards (a test checks they exist here).
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

REGISTRY = CollectorRegistry(auto_describe=True)

LAG_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)

HTTP_REQUESTS = Counter(
    "dsched_http_requests_total", "HTTP requests served", ["route", "method", "status"], registry=REGISTRY
)
SUBMISSIONS = Counter("dsched_submissions_total", "Job changes appended to the log", ["op"], registry=REGISTRY)
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
PICKER_SHARDS = Gauge("dsched_picker_owned_shards", "Shards this picker currently owns", registry=REGISTRY)
DISPATCH_LAG = Histogram(
    "dsched_dispatch_lag_seconds", "Queue send time minus due time", buckets=LAG_BUCKETS, registry=REGISTRY
)
FIRE_LAG = Histogram("dsched_fire_lag_seconds", "Run start time minus due time", buckets=LAG_BUCKETS, registry=REGISTRY)
RUNS_FINISHED = Counter("dsched_runs_total", "Runs finished, by outcome", ["status"], registry=REGISTRY)
RUN_DURATION = Histogram("dsched_run_duration_seconds", "Run execution time", registry=REGISTRY)
RETRIES = Counter("dsched_retries_total", "Retries scheduled", registry=REGISTRY)
DEAD_LETTERS = Counter("dsched_dead_letters_total", "Jobs dead-lettered after their last attempt", registry=REGISTRY)
DUPLICATE_DELIVERIES = Counter(
    "dsched_duplicate_deliveries_total",
    "Deliveries of runs already claimed or finished (not executed again)",
    registry=REGISTRY,
)
WORKER_INFLIGHT = Gauge("dsched_worker_inflight_runs", "Runs executing in this worker", registry=REGISTRY)
QUEUE_DEPTH = Gauge("dsched_queue_depth", "Approximate work-queue messages", ["state"], registry=REGISTRY)
COORDINATOR_LEADER = Gauge("dsched_coordinator_is_leader", "1 while this coordinator leads", registry=REGISTRY)
SERVICE_UP = Gauge("dsched_service_up", "1 while the service runs", ["service"], registry=REGISTRY)
