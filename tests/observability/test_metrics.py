"""The metrics tell the truth: bounded tenant labels, late submissions kept out of the SLO histogram, the queue
depth sampled from the queue, the writer's lag measured on the log, owner-only gauges."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

from prometheus_client import CollectorRegistry, Gauge

from dsched.libs import metrics
from dsched.libs.log.base import ConsumerLag, LogConsumer
from dsched.libs.log.sqlite import SqliteLog
from dsched.libs.metrics import REGISTRY
from dsched.libs.queue.base import OutgoingMessage
from dsched.libs.queue.sqlite import SqliteQueue
from dsched.libs.supervisor import Supervisor


def sample(name: str, labels: dict[str, str] | None = None) -> float:
    return REGISTRY.get_sample_value(name, labels or {}) or 0.0


def test_tenant_labels_are_bounded() -> None:
    seen = {metrics.tenant_label(f"tenant-{i}") for i in range(metrics.MAX_TENANT_LABELS * 3)}
    assert metrics.OTHER_TENANT in seen
    assert len(seen) <= metrics.MAX_TENANT_LABELS + 1
    # A tenant that got a label keeps it.
    named = next(t for t in seen if t != metrics.OTHER_TENANT)
    assert metrics.tenant_label(named) == named


def test_a_late_submission_is_counted_not_observed() -> None:
    count = sample("dsched_fire_lag_seconds_count")
    late = sample("dsched_late_submission_runs_total")
    metrics.observe_run_start("alice", 3600.0, late_submission=True)
    assert sample("dsched_fire_lag_seconds_count") == count
    assert sample("dsched_late_submission_runs_total") == late + 1
    metrics.observe_run_start("alice", 0.02, late_submission=False)
    assert sample("dsched_fire_lag_seconds_count") == count + 1
    assert sample("dsched_fire_lag_seconds_bucket", {"le": "0.025"}) >= 1
    assert sample("dsched_tenant_fire_lag_seconds_count", {"tenant": metrics.tenant_label("alice")}) >= 1


def test_lag_buckets_span_milliseconds_to_minutes() -> None:
    assert metrics.LAG_BUCKETS[0] <= 0.001 and metrics.LAG_BUCKETS[-1] >= 600
    assert metrics.DURATION_BUCKETS[-1] >= 3600
    assert list(metrics.LAG_BUCKETS) == sorted(metrics.LAG_BUCKETS)


async def test_queue_depth_is_sampled_from_the_queue(tmp_path: Path) -> None:
    queue = SqliteQueue(tmp_path / "queue.db", max_receives=5)
    await queue.startup()
    try:
        await queue.send([OutgoingMessage(body=b"a"), OutgoingMessage(body=b"b"), OutgoingMessage(body=b"c")])
        await queue.receive(1, 0.1, 30)
        sampler = asyncio.create_task(metrics.sample_queue_depth(queue, interval_s=0.01))
        try:
            for _ in range(200):
                if sample("dsched_queue_depth", {"state": "visible"}) == 2:
                    break
                await asyncio.sleep(0.01)
        finally:
            sampler.cancel()
        assert sample("dsched_queue_depth", {"state": "visible"}) == 2
        assert sample("dsched_queue_depth", {"state": "in_flight"}) == 1
        assert sample("dsched_queue_depth", {"state": "dead"}) == 0
    finally:
        await queue.shutdown()


async def lag_of(consumer: LogConsumer) -> ConsumerLag:
    lag = await consumer.lag()
    assert lag is not None, "the embedded log always knows its lag"
    return lag


async def test_sqlite_log_lag_counts_uncommitted_records_and_their_age(tmp_path: Path) -> None:
    log = SqliteLog(tmp_path / "log.db", 4)
    await log.startup()
    consumer = log.consumer("writer")
    await consumer.startup()
    try:
        lag = await lag_of(consumer)
        assert (lag.records, lag.oldest_ms) == (0, None)
        await log.append([(f"key-{i}", b"v") for i in range(10)])
        lag = await lag_of(consumer)
        assert lag.records == 10 and lag.oldest_ms is not None
        first = await consumer.poll(4, 0.1)
        assert (await lag_of(consumer)).records == 10, "polled but not committed is still lag"
        await consumer.commit(first)
        assert (await lag_of(consumer)).records == 6
        await consumer.commit(await consumer.poll(100, 0.1))
        lag = await lag_of(consumer)
        assert (lag.records, lag.oldest_ms) == (0, None)
        # Another group's position is its own.
        other = log.consumer("other")
        await other.startup()
        assert (await lag_of(other)).records == 10
        await other.shutdown()
    finally:
        await consumer.shutdown()
        await log.shutdown()


def test_a_process_without_the_services_exports_none_of_their_gauges() -> None:
    """Imported alone (no writer, picker, coordinator or worker running), libs.metrics exports no owned gauge:
    no "writer lag 0" from a process without a writer, no "0 shards owned" from a process without a picker."""
    code = "from prometheus_client import generate_latest; from dsched.libs.metrics import REGISTRY; "
    code += "print(generate_latest(REGISTRY).decode())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60).stdout
    assert "dsched_fire_lag_seconds_bucket" in out
    for gauge in metrics.OWNED_GAUGES:
        assert f"\n{gauge._name} " not in out, gauge._name


def test_owned_gauges_are_exported_only_once_asked() -> None:
    """A gauge of OWNED_GAUGES is absent from the scrape until the service owning it calls ``export``."""
    registry = CollectorRegistry()
    gauge = Gauge("dsched_test_owned", "test", registry=None)
    assert registry.get_sample_value("dsched_test_owned") is None
    original = metrics.REGISTRY
    metrics.REGISTRY = registry
    try:
        metrics.export(gauge)
        metrics.export(gauge)  # idempotent
    finally:
        metrics.REGISTRY = original
    assert registry.get_sample_value("dsched_test_owned") == 0


def test_a_services_restart_counter_is_exported_from_zero() -> None:
    """Before its first restart a service already exports ``dsched_service_restarts_total 0``: a counter series
    that first appeared at 1 would hide that restart from ``increase()`` (DschedServiceRestarting, the panels)."""
    labels = {"service": "obs-restart-counter"}
    assert REGISTRY.get_sample_value("dsched_service_restarts_total", labels) is None
    Supervisor().register("obs-restart-counter")
    assert REGISTRY.get_sample_value("dsched_service_restarts_total", labels) == 0


def test_a_worker_exports_every_run_outcome_from_zero() -> None:
    """A process that runs jobs exports ``dsched_runs_total{status}`` at 0 for every outcome before its first
    run, so the first failure is a visible increase; a process that runs none exports no outcome at all."""
    code = "from prometheus_client import generate_latest; from dsched.libs import metrics; "
    code += "print(generate_latest(metrics.REGISTRY).decode()); print('--- export'); metrics.export_run_outcomes(); "
    code += "print(generate_latest(metrics.REGISTRY).decode())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60).stdout
    before, after = out.split("--- export")
    assert "dsched_runs_total{" not in before
    for status in ("succeeded", "failed", "timed_out", "cancelled", "skipped"):
        assert f'dsched_runs_total{{status="{status}"}} 0.0' in after, status
