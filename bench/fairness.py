"""Fair dispatch: a small tenant's fire lag while a big tenant bursts.

    python -m bench.fairness --big 20000 --small 20 [--scenarios idle,fair,unfair]

Scenarios, each on a fresh ``dsched run all`` (dev mode, embedded backends), all jobs ``echo`` (no I/O) and due at
one instant ``--lead`` seconds after the start (enough to submit them all; tenant B's jobs are submitted last):

- ``idle``: only tenant B's ``--small`` jobs: the fire lag of an idle system;
- ``fair``: tenant A's ``--big`` jobs and B's, with fair dispatch on (the default);
- ``unfair``: the same with ``DSCHED_TENANT_FAIR_DISPATCH=false`` (due order only), for comparison.

Fire lag = the run's ``started_ms`` minus its due time, read from the embedded store afterwards.
"""

from __future__ import annotations

import argparse
import asyncio
import time

import aiohttp

from bench.common import Scheduler, percentile
from libs.cli import run_loop
from libs.clock import to_rfc3339
from libs.models import run_id_for
from libs.store.sqlite import SqliteStore


async def submit(base: str, bodies: list[tuple[str, dict[str, object]]], concurrency: int = 64) -> list[str | None]:
    """POST each (tenant, body); returns the job ids (None = refused)."""
    ids: list[str | None] = [None] * len(bodies)
    sem = asyncio.Semaphore(concurrency)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency)) as session:

        async def one(i: int) -> None:
            tenant, body = bodies[i]
            async with sem:
                for attempt in range(3):
                    try:
                        async with session.post(f"{base}/submit", json=body, headers={"X-User-ID": tenant}) as resp:
                            if resp.status == 202:
                                ids[i] = (await resp.json())["job_id"]
                            return
                    except aiohttp.ClientError:
                        await asyncio.sleep(0.1 * (attempt + 1))

        await asyncio.gather(*(one(i) for i in range(len(bodies))))
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
    await scheduler.start()
    base = f"http://127.0.0.1:{scheduler.port}"
    try:
        due_ms = int(time.time() * 1000 + lead * 1000)
        body = {"project_id": "bench", "payload": "noop", "next_fire_at": to_rfc3339(due_ms)}
        bodies = [("tenant-a", body)] * (0 if name == "idle" else big) + [("tenant-b", body)] * small
        started = time.monotonic()
        ids = await submit(base, bodies)
        took = time.monotonic() - started
        if time.time() * 1000 > due_ms:
            print(f"warning: submission took {took:.1f}s, longer than the lead; raise --lead")
        a_ids = [j for (tenant, _), j in zip(bodies, ids, strict=True) if j and tenant == "tenant-a"]
        b_ids = [j for (tenant, _), j in zip(bodies, ids, strict=True) if j and tenant == "tenant-b"]
        lags = await wait_finished(scheduler, a_ids + b_ids, due_ms, timeout_s=180)
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
    parser.add_argument("--lead", type=float, default=30.0)
    parser.add_argument("--scenarios", default="idle,fair,unfair")
    args = parser.parse_args()
    run_loop(main(args.big, args.small, args.lead, args.scenarios.split(",")))
