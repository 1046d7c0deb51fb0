"""A scheduler holding many future jobs: memory, restart to serving, and fire lag while they wait.

    python -m dsched.bench.future --sizes 10000,100000,1000000 [--rate 200 --seconds 10]

For each size N, on a fresh ``dsched run all``: submit N HTTP jobs due over the next three days (through
``POST /submit/batch``) and wait until the writer stored their entries; report RSS; run a steady workload (``--rate``
jobs/s for ``--seconds``, each due 2 s after its submit) and report its fire lag; then SIGTERM and start the
process again on the same data and report restart-to-serving (the new process answers ``/health`` 200) and
restart-to-first-fire (a job due at once reaches the target), and RSS after the restart.

While the N jobs are submitted (tenant ``bench``), another tenant (``neighbour``) submits one job at a time at
``--neighbour-rate``/s, each sent once: how many of its submits admission control refused while the flood held
the writer's backlog over the bound, and its submit latency.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import time

import aiohttp

from dsched.app.cli import run_loop
from dsched.bench.common import Scheduler, Target, load_average, percentile, submit_all, submit_batches, wait_hits
from dsched.libs import sqlite
from dsched.libs.clock import to_rfc3339

SPREAD_MS = 3 * 86_400_000  # future jobs are due uniformly over the next three days
FUTURE_START_MS = 3_600_000  # ... starting in an hour (nothing of them fires during the measurement)
LAG_SAMPLE_S = 0.5  # how often the writer's lag is read while the jobs are submitted and stored


def stored_entries(scheduler: Scheduler) -> int:
    """Entries in the store's time-bucket table (one per stored future job), read directly from the file."""
    conn = sqlite.connect(scheduler.data_dir / "store.db", read_only=True)
    try:
        return int(conn.execute("SELECT COUNT(*) FROM job_queue").fetchone()[0])
    except sqlite.Error:
        return 0
    finally:
        conn.close()


async def steady(scheduler: Scheduler, target: Target, rate: float, seconds: float) -> str:
    target.hits.clear()
    jobs = int(rate * seconds)
    start_ms = time.time() * 1000 + 300
    due = [int(start_ms + i * 1000 / rate + 2000) for i in range(jobs)]
    bodies: list[dict[str, object]] = [
        {"project_id": "bench", "payload": {"http": {"url": target.url}}, "next_fire_at": to_rfc3339(d)} for d in due
    ]
    await asyncio.sleep(0.3)
    ids, _ = await submit_all(f"http://127.0.0.1:{scheduler.port}", bodies, rate=rate)
    due_by_id = {job_id: d for job_id, d in zip(ids, due, strict=True) if job_id}
    await wait_hits(target, len(due_by_id), timeout_s=60 + seconds)
    seen: dict[str, float] = {}
    for job_id, at in target.hits:
        seen.setdefault(job_id, at)
    lags = [seen[j] - d for j, d in due_by_id.items() if j in seen]
    return (
        f"steady {rate:g}/s x {seconds:g}s: executed {len(lags)}/{len(due_by_id)}, "
        f"lag p50 {percentile(lags, 0.5):.1f} ms, p99 {percentile(lags, 0.99):.1f} ms, max {max(lags or [0]):.1f} ms"
    )


async def restart(scheduler: Scheduler, target: Target) -> str:
    scheduler.stop(keep_data=True)
    scheduler.procs.clear()
    began = time.monotonic()
    await scheduler.start()  # returns once /health answers 200
    serving_s = time.monotonic() - began
    target.hits.clear()
    body = {"project_id": "bench", "payload": {"http": {"url": target.url}}}
    async with aiohttp.ClientSession() as session:
        async with session.post(
            f"http://127.0.0.1:{scheduler.port}/submit", json=body, headers={"X-User-ID": "bench"}
        ) as resp:
            job_id = (await resp.json())["job_id"]
    for _ in range(600):
        if any(j == job_id for j, _ in target.hits):
            break
        await asyncio.sleep(0.05)
    fire_s = time.monotonic() - began
    rss = scheduler.rss_mb()
    return f"restart to serving {serving_s:.2f} s, to the first fire {fire_s:.2f} s, RSS after {rss:.0f} MiB"


async def sample_writer_lag(scheduler: Scheduler, lag_max: list[float]) -> None:
    """Keep in ``lag_max[0]`` the largest ``dsched_writer_lag_seconds`` seen: how late a job due at once would be
    stored. Sampled every ``LAG_SAMPLE_S`` until cancelled (bounded: an hour)."""
    for _ in range(int(3600 / LAG_SAMPLE_S)):
        lag_max[0] = max([lag_max[0], *await scheduler.samples("dsched_writer_lag_seconds")])
        await asyncio.sleep(LAG_SAMPLE_S)


async def neighbour_submits(base: str, rate: float, outcomes: list[tuple[int, float]]) -> None:
    """Submit one job at a time as tenant ``neighbour``, ``rate`` per second, each sent once, until cancelled
    (bounded: an hour); append (status, latency ms) to ``outcomes``."""
    if rate <= 0:
        return
    body = {
        "project_id": "neighbour",
        "payload": "echo",
        "next_fire_at": to_rfc3339(int(time.time() * 1000) + 86_400_000),
    }
    async with aiohttp.ClientSession() as session:
        start = time.monotonic()
        for i in range(int(3600 * rate)):
            await asyncio.sleep(max(0.0, start + i / rate - time.monotonic()))
            began = time.monotonic()
            try:
                async with session.post(f"{base}/submit", json=body, headers={"X-User-ID": "neighbour"}) as resp:
                    await resp.read()
                    outcomes.append((resp.status, 1000 * (time.monotonic() - began)))
            except aiohttp.ClientError:
                outcomes.append((0, 1000 * (time.monotonic() - began)))


def neighbour_line(outcomes: list[tuple[int, float]]) -> str:
    accepted = [ms for status, ms in outcomes if status == 202]
    refused = sum(1 for status, _ in outcomes if status == 503)
    other = len(outcomes) - len(accepted) - refused
    latency = f"p50 {percentile(accepted, 0.5):.0f} ms, p99 {percentile(accepted, 0.99):.0f} ms" if accepted else "-"
    return (
        f"neighbour tenant during the flood: {len(outcomes)} single submits, {len(accepted)} accepted ({latency}), "
        f"{refused} refused as overloaded, {other} other"
    )


async def one_size(size: int, rate: float, seconds: float, neighbour_rate: float) -> None:
    print(f"== {size:,} future jobs (load average {load_average()})")
    target = Target()
    await target.start()
    scheduler = Scheduler()
    await scheduler.start()
    try:
        rss_empty = scheduler.rss_mb()
        now = int(time.time() * 1000)
        rng = random.Random(size)
        bodies: list[dict[str, object]] = [
            {
                "project_id": "bench",
                "payload": {"http": {"url": target.url}},
                "next_fire_at": to_rfc3339(now + FUTURE_START_MS + rng.randrange(SPREAD_MS)),
            }
            for _ in range(size)
        ]
        lag_max = [0.0]
        sampler = asyncio.create_task(sample_writer_lag(scheduler, lag_max))
        outcomes: list[tuple[int, float]] = []
        neighbour = asyncio.create_task(
            neighbour_submits(f"http://127.0.0.1:{scheduler.port}", neighbour_rate, outcomes)
        )
        try:
            ids, took, _ = await submit_batches(f"http://127.0.0.1:{scheduler.port}", bodies)
            neighbour.cancel()
            accepted = sum(1 for i in ids if i)
            began = time.monotonic()
            for _ in range(36_000):  # bounded: up to an hour
                if stored_entries(scheduler) >= accepted:
                    break
                await asyncio.sleep(1.0)
        finally:
            sampler.cancel()
            neighbour.cancel()
        refused = sum(await scheduler.samples("dsched_submissions_refused_total"))
        print(
            f"  submitted {accepted:,} in {took:.1f} s ({accepted / took:,.0f}/s), stored "
            f"{time.monotonic() - began:.1f} s after the last 202; writer lag at most {lag_max[0]:.1f} s, "
            f"{refused:,.0f} requests refused as overloaded (and sent again)"
        )
        if neighbour_rate > 0:
            print("  " + neighbour_line(outcomes))
        await asyncio.sleep(2.0)
        print(f"  RSS empty {rss_empty:.0f} MiB, with the jobs stored {scheduler.rss_mb():.0f} MiB")
        print("  " + await steady(scheduler, target, rate, seconds))
        print(f"  RSS after the steady run {scheduler.rss_mb():.0f} MiB")
        print("  " + await restart(scheduler, target))
    finally:
        scheduler.stop()
        await target.stop()


async def main(sizes: list[int], rate: float, seconds: float, neighbour_rate: float) -> None:
    for size in sizes:
        await one_size(size, rate, seconds, neighbour_rate)


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", default="10000,100000,1000000")
    parser.add_argument("--rate", type=float, default=200)
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--neighbour-rate", type=float, default=20, help="another tenant's single submits/s (0: none)")
    args = parser.parse_args()
    run_loop(main([int(s) for s in args.sizes.split(",")], args.rate, args.seconds, args.neighbour_rate))
