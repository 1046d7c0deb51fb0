"""N jobs due at one instant: how fast are they all executed?

    python -m bench.burst --jobs 20000 [--kind http|echo] [--split]

All jobs are submitted first (due ``--lead`` seconds after the start, enough to submit them all); throughput
= N / (last execution - due instant). ``http`` jobs call a local target, whose arrival time is the execution time;
``echo`` jobs (no I/O: the scheduler's own overhead, comparable to a no-op Celery task) are timed by their runs'
finish times, read from the embedded store afterwards.
"""

from __future__ import annotations

import argparse
import asyncio
import time

import aiohttp

from bench.common import Scheduler, Target, report, submit_all, wait_hits
from libs.cli import run_loop
from libs.clock import to_rfc3339
from libs.models import run_id_for
from libs.store.sqlite import SqliteStore


async def wait_succeeded(base: str, expected: int, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    async with aiohttp.ClientSession() as session:
        while time.monotonic() < deadline:
            async with session.get(f"{base}/queue/stats") as resp:
                if (await resp.json())["succeeded"] >= expected:
                    return
            await asyncio.sleep(0.5)


async def main(jobs: int, lead: float, split: bool, kind: str) -> None:
    target = Target()
    await target.start()
    scheduler = Scheduler(split=split)
    await scheduler.start()
    cpu_before = scheduler.cpu_s()
    base = f"http://127.0.0.1:{scheduler.port}"
    try:
        due_ms = int(time.time() * 1000 + lead * 1000)
        payload: object = {"http": {"url": target.url}} if kind == "http" else "noop"
        bodies = [{"project_id": "bench", "payload": payload, "next_fire_at": to_rfc3339(due_ms)} for _ in range(jobs)]
        ids, took = await submit_all(base, bodies, rate=None)
        if time.time() * 1000 > due_ms:
            print(f"warning: submission took {took:.1f}s, longer than the lead; raise --lead")
        due_by_id = {job_id: float(due_ms) for job_id in ids if job_id}
        if kind == "http":
            await wait_hits(target, len(due_by_id), timeout_s=120, not_before_ms=due_ms)
            hits = target.hits
        else:
            await asyncio.sleep(max(0.0, due_ms / 1000 - time.time()))
            await wait_succeeded(base, len(due_by_id), timeout_s=120)
            store = SqliteStore(scheduler.data_dir / "store.db")
            await store.startup()
            try:
                runs = await store.get_runs([run_id_for(j, due_ms, 0) for j in due_by_id])
            finally:
                await store.shutdown()
            hits = [(r.job_id, float(r.finished_ms or 0)) for r in runs.values() if r.status == "succeeded"]
        report(f"burst: {jobs} {kind} jobs due at one instant", due_by_id, hits, len(due_by_id), took, float(due_ms))
        cpu_ms = 1000 * (scheduler.cpu_s() - cpu_before) / max(1, len(due_by_id))
        print(f"{'scheduler_cpu_ms_per_job':>20}: {cpu_ms:.2f}")
        print(await scheduler.lag_summary())
    finally:
        scheduler.stop()
        await target.stop()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--jobs", type=int, default=20000)
    parser.add_argument("--split", action="store_true", help="one process per service instead of `run all`")
    parser.add_argument("--kind", choices=["http", "echo"], default="http")
    parser.add_argument("--lead", type=float, default=30.0)
    args = parser.parse_args()
    run_loop(main(args.jobs, args.lead, args.split, args.kind))
