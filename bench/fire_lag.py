"""N HTTP jobs due at a steady rate to a local target: submit rate, throughput, lost, duplicates, fire lag.

    python -m bench.fire_lag --jobs 20000 --rate 1000

Job i is submitted at start + i/rate and is due ``--lead`` seconds after that, so ingestion, writer, picker and
worker all work concurrently at the target rate. Fire lag = arrival at the target minus the due time.
"""

from __future__ import annotations

import argparse
import asyncio
import time

from bench.common import Scheduler, Target, report, submit_all, wait_hits
from libs.cli import run_loop
from libs.clock import to_rfc3339


async def main(jobs: int, rate: float, lead: float, split: bool) -> None:
    target = Target()
    await target.start()
    scheduler = Scheduler(split=split)
    await scheduler.start()
    cpu_before = scheduler.cpu_s()
    try:
        start_ms = time.time() * 1000 + 500
        due = [start_ms + i * 1000 / rate + lead * 1000 for i in range(jobs)]
        bodies = [
            {
                "project_id": "bench",
                "payload": {"http": {"url": target.url}},
                "next_fire_at": to_rfc3339(int(d)),
            }
            for d in due
        ]
        await asyncio.sleep(max(0, (start_ms - time.time() * 1000) / 1000))
        ids, took = await submit_all(f"http://127.0.0.1:{scheduler.port}", bodies, rate=rate)
        due_by_id = {job_id: float(int(d)) for job_id, d in zip(ids, due, strict=True) if job_id}
        await wait_hits(target, len(due_by_id), timeout_s=60 + jobs / rate)
        report(
            f"fire lag: {jobs} HTTP jobs at {rate:g}/s (lead {lead:g}s)",
            due_by_id,
            target.hits,
            len(due_by_id),
            took,
            min(due_by_id.values()) if due_by_id else 0,
        )
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
    parser.add_argument("--rate", type=float, default=1000)
    parser.add_argument("--lead", type=float, default=2.0)
    args = parser.parse_args()
    run_loop(main(args.jobs, args.rate, args.lead, args.split))
