"""Fair dispatch: a small tenant's fire lag while a big tenant bursts.

    python -m dsched.bench.fairness --big 20000 --small 20 [--scenarios idle,fair,unfair]

Scenarios, each on a fresh ``dsched run all`` (embedded backends), all jobs ``echo`` (no I/O) and due at one instant
``--lead`` seconds after the start. The jobs and their time-bucket entries are written straight into the
store (as the writer would), so the measurement is dispatch and execution only, not HTTP submission (measured by
``bench.burst``; on a loaded machine 20,000 submits take longer than any sensible lead):

- ``idle``: only tenant B's ``--small`` jobs: the fire lag of an idle system;
- ``fair``: tenant A's ``--big`` jobs and B's, with fair dispatch on (the default);
- ``unfair``: the same with ``DSCHED_TENANT_FAIR_DISPATCH=false`` (due order only), for comparison.

Fire lag = the run's ``started_ms`` minus its due time, read from the embedded store afterwards.
"""

from __future__ import annotations

import argparse
import asyncio
import time
import uuid
from pathlib import Path

from dsched.app.cli import run_loop
from dsched.bench.common import Scheduler, percentile
from dsched.libs.models import BucketEntry, Job, Payload, run_id_for
from dsched.libs.settings import Settings
from dsched.libs.sharding import bucket_for, shard_for
from dsched.libs.store.sqlite import SqliteStore


async def seed(data_dir: Path, tenants: list[tuple[str, int]], due_ms: int) -> dict[str, list[str]]:
    """Write each tenant's one-shot echo jobs due at ``due_ms`` and their queue entries; tenant → job ids."""
    settings = Settings.from_env(data_dir=data_dir)
    store = SqliteStore(data_dir / "store.db")
    await store.startup()
    ids: dict[str, list[str]] = {}
    try:
        await store.check_layout(settings.shard_count, settings.bucket_ms)
        bucket = bucket_for(due_ms, settings.bucket_ms)
        for tenant, count in tenants:
            jobs = [
                Job(
                    job_id=str(uuid.uuid4()),
                    user_id=tenant,
                    project_id="bench",
                    payload=Payload(kind="echo", text="noop"),
                    next_fire_ms=due_ms,
                    created_ms=int(time.time() * 1000),
                )
                for _ in range(count)
            ]
            for start in range(0, len(jobs), 2000):
                chunk = jobs[start : start + 2000]
                await store.put_jobs(chunk)
                await store.put_entries(
                    [
                        BucketEntry(
                            shard=shard_for(j.job_id, settings.shard_count),
                            bucket_ms=bucket,
                            due_ms=due_ms,
                            job_id=j.job_id,
                            scheduled_ms=due_ms,
                        )
                        for j in chunk
                    ]
                )
            ids[tenant] = [j.job_id for j in jobs]
    finally:
        await store.shutdown()
    return ids


async def wait_finished(scheduler: Scheduler, ids: list[str], due_ms: int, timeout_s: float) -> dict[str, float]:
    """Job id → fire lag in ms, once every job's run started and finished (or the timeout passed)."""
    deadline = time.monotonic() + timeout_s
    store = SqliteStore(scheduler.data_dir / "store.db")
    await store.startup()
    try:
        await asyncio.sleep(max(0.0, due_ms / 1000 - time.time()))
        while True:
            runs = await store.get_runs([run_id_for(j, due_ms, 0) for j in ids])
            done = {r.job_id: float(r.started_ms or 0) - due_ms for r in runs.values() if r.finished_ms}
            if len(done) >= len(ids) or time.monotonic() > deadline:
                return done
            await asyncio.sleep(0.5)
    finally:
        await store.shutdown()


async def scenario(name: str, big: int, small: int, lead: float) -> dict[str, float]:
    env = {"DSCHED_TENANT_FAIR_DISPATCH": "false"} if name == "unfair" else {}
    scheduler = Scheduler(env)
    # Seeded before the scheduler starts (it finds them as the writer would have left them), due ``lead`` s from now.
    due_ms = int(time.time() * 1000 + lead * 1000)
    tenants = [("tenant-a", 0 if name == "idle" else big), ("tenant-b", small)]
    seeding = time.monotonic()
    ids = await seed(scheduler.data_dir, tenants, due_ms)
    seeded_s = time.monotonic() - seeding
    await scheduler.start()
    try:
        if time.time() * 1000 > due_ms - 2000:
            print(f"warning: seeding ({seeded_s:.1f}s) and start-up ended less than 2 s before due; raise --lead")
        a_ids, b_ids = ids["tenant-a"], ids["tenant-b"]
        lags = await wait_finished(scheduler, a_ids + b_ids, due_ms, timeout_s=600)
    finally:
        scheduler.stop()
    b_lags = [lags[j] for j in b_ids if j in lags]
    a_lags = [lags[j] for j in a_ids if j in lags]
    result = {
        "b_runs": float(len(b_lags)),
        "b_lag_p50_ms": percentile(b_lags, 0.5),
        "b_lag_p99_ms": percentile(b_lags, 0.99),
        "b_lag_max_ms": max(b_lags) if b_lags else float("nan"),
        "a_runs": float(len(a_lags)),
        "a_lag_p50_ms": percentile(a_lags, 0.5),
        "a_lag_p99_ms": percentile(a_lags, 0.99),
    }
    print(f"== {name}: tenant A {len(a_ids)} jobs, tenant B {len(b_ids)} jobs, all due at one instant")
    for key, value in result.items():
        print(f"{key:>16}: {value:,.1f}")
    return result


async def main(big: int, small: int, lead: float, scenarios: list[str]) -> None:
    results = {name: await scenario(name, big, small, lead) for name in scenarios}
    if "idle" in results:
        idle = max(results["idle"]["b_lag_p99_ms"], 1.0)
        for name in ("fair", "unfair"):
            if name in results:
                ratio = results[name]["b_lag_p99_ms"] / idle
                print(f"tenant B lag p99, {name} / idle: {ratio:,.1f}x")


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--big", type=int, default=20000, help="tenant A's jobs")
    parser.add_argument("--small", type=int, default=20, help="tenant B's jobs")
    parser.add_argument("--lead", type=float, default=30.0, help="seconds from the start to the due instant")
    parser.add_argument("--scenarios", default="idle,fair,unfair")
    args = parser.parse_args()
    run_loop(main(args.big, args.small, args.lead, args.scenarios.split(",")))
