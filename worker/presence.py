"""Worker presence: each worker announces itself under ``workers/<node>`` in the coordination backend.

The key is attached to the worker's own lease (like ``pickers/<node>``), so it vanishes within one lease TTL of the
worker dying. Its value is refreshed every third of the TTL with what an operator wants to see
(``GET /workers``, the dashboard's cluster page):

``{"node_id", "slots", "busy", "held", "running": [run ids], "started_at", "heartbeat_at", "runs_total":
{status: n}, "fire_lag": {"buckets": [[le_s, cumulative], ...], "count": n, "sum": s}}``

``runs_total`` and ``fire_lag`` are this process's own Prometheus counters (cumulative since it started), so the
ingestion service can derive cluster-wide throughput and fire-lag percentiles over a window from the deltas
between samples, without scraping every process.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import TYPE_CHECKING, Any

import orjson

from dsched.libs import logs
from dsched.libs.clock import now_ms, parse_rfc3339, to_rfc3339
from dsched.libs.coordination.base import Coordination
from dsched.libs.coordination.keys import WORKERS_PREFIX
from dsched.libs.metrics import REGISTRY

if TYPE_CHECKING:
    from dsched.worker.service import Worker

MAX_LISTED_RUNS = 50
logger = logs.get("worker")


def metrics_snapshot() -> dict[str, Any]:
    """This process's finished-run counters by status and its fire-lag histogram (cumulative buckets)."""
    runs: dict[str, float] = {}
    buckets: list[list[float]] = []
    count = 0.0
    total = 0.0
    for family in REGISTRY.collect():
        if family.name == "dsched_runs":
            for sample in family.samples:
                if sample.name == "dsched_runs_total":
                    runs[sample.labels.get("status", "")] = sample.value
        elif family.name == "dsched_fire_lag_seconds":
            for sample in family.samples:
                if sample.name.endswith("_bucket"):
                    le = sample.labels.get("le", "+Inf")
                    buckets.append([float("inf") if le == "+Inf" else float(le), sample.value])
                elif sample.name.endswith("_count"):
                    count = sample.value
                elif sample.name.endswith("_sum"):
                    total = sample.value
    finite = [[le, n] for le, n in buckets if le != float("inf")]
    return {"runs_total": runs, "fire_lag": {"buckets": finite, "count": count, "sum": total}}


def describe(worker: Worker, started_ms: int) -> dict[str, Any]:
    """The presence record of ``worker`` now."""
    running = [run_id for run_id, receipt in worker._receipts_by_run.items() if receipt in worker._inflight]
    return {
        "node_id": worker.node_id,
        "slots": worker.settings.worker_concurrency,
        "busy": len(running),
        "held": worker._held,
        "running": running[:MAX_LISTED_RUNS],
        "started_at": to_rfc3339(started_ms),
        "heartbeat_at": to_rfc3339(now_ms()),
        **metrics_snapshot(),
    }


def started_ms(record: bytes) -> int | None:
    """When the worker that wrote this presence record started (epoch ms; None if the record does not say)."""
    started_at = orjson.loads(record).get("started_at")
    return parse_rfc3339(started_at) if started_at else None


async def announce(worker: Worker, coordination: Coordination) -> None:
    """Keep ``workers/<node>`` alive and current until cancelled; then revoke the lease (the key goes at once).

    Failures are logged and retried on the next beat: presence is informational and never stops the worker."""
    ttl = worker.settings.lease_ttl_s
    key = WORKERS_PREFIX + worker.node_id
    started = worker.started_ms  # the process's, not this task's: a restarted announce must not look like a new worker
    lease: int | None = None
    try:
        while True:
            try:
                if lease is None or not await coordination.keepalive(lease):
                    lease = await coordination.grant_lease(ttl)
                await coordination.put(key, orjson.dumps(describe(worker, started)), lease)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                logger.warning("presence_failed", error=f"{type(exc).__name__}: {exc}")
                lease = None
            await asyncio.sleep(ttl / 3)
    finally:
        if lease is not None:
            with contextlib.suppress(Exception):
                await asyncio.shield(coordination.revoke(lease))
