"""N jobs due at one instant: how fast are they all executed?

    python -m bench.burst --jobs 20000

All jobs are submitted first (due ``--lead`` seconds after the start, enough to submit them all); throughput
= N / (last execution - due instant). For HTTP jobs the arrival at the local target is the execution time;
for echo jobs the runs' finish times are read back from the API.
"""

from __future__ import annotations

import argparse
import asyncio
import time

from bench.common import Scheduler, Target, report, submit_all, wait_hits
from libs.clock import to_rfc3339


async def main(jobs: int, lead: float, split: bool) -> None:
    target = Target()
    await target.start()
    scheduler = Scheduler(split=split)
    await scheduler.start()
    try:
        due_ms = int(time.time() * 1000 + lead * 1000)
        bodies = [
            {
                "project_id": "bench",
                "payload": {"http": {"url": target.url}},
                "next_fire_at": to_rfc3339(due_ms),
            }
            for _ in range(jobs)
        ]
        ids, took = await submit_all(f"http://127.0.0.1:{scheduler.port}", bodies, rate=None)
        if time.time() * 1000 > due_ms:
            print(f"warning: submission took {took:.1f}s, longer than the lead; raise --lead")
        due_by_id = {job_id: float(due_ms) for job_id in ids if job_id}
        await wait_hits(target, len(due_by_id), timeout_s=120)
        report(
            f"burst: {jobs} HTTP jobs due at one instant",
            due_by_id,
            target.hits,
            len(due_by_id),
            took,
            float(due_ms),
        )
        print(await scheduler.lag_summary())
    finally:
        scheduler.stop()
        await target.stop()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--jobs", type=int, default=20000)
    parser.add_argument("--split", action="store_true", help="one process per service instead of `run all`")
    parser.add_argument("--lead", type=float, default=30.0)
    args = parser.parse_args()
    asyncio.run(main(args.jobs, args.lead, args.split))
