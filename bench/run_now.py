"""Jobs submitted without a fire time ("run now"): how long from the submit to the run's start?

    python -m dsched.bench.run_now [--jobs 50 --gap-ms 137]

On a fresh ``dsched run all``, ``--jobs`` ``echo`` jobs are submitted one at a time, ``--gap-ms`` apart (so each
meets the pipeline idle, as a user's "run this now" does), with no fire time: each is due at its acceptance. Then
each run's ``started_at - due_at`` is read back through ``GET /jobs/{id}/runs``: the path from the 202 through the
log, the writer, the picker and the work queue to the worker, on the scheduler's own clock.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from datetime import datetime

import aiohttp

from dsched.app.cli import run_loop
from dsched.bench.common import Scheduler, load_average, percentile

HEADERS = {"X-User-ID": "bench"}


def _ms(text: str) -> float:
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp() * 1000


async def main(jobs: int, gap_ms: float) -> None:
    print(f"load average at start: {load_average()}")
    scheduler = Scheduler()
    await scheduler.start()
    base = f"http://127.0.0.1:{scheduler.port}"
    try:
        async with aiohttp.ClientSession() as session:
            await asyncio.sleep(2.0)  # past start-up: shards assigned, loops idle
            ids = []
            for _ in range(jobs):
                body = {"project_id": "bench", "payload": "echo"}
                async with session.post(f"{base}/submit", json=body, headers=HEADERS) as resp:
                    ids.append((await resp.json())["job_id"])
                await asyncio.sleep(gap_ms / 1000)
            lags: list[float] = []
            deadline = time.monotonic() + 30
            for job_id in ids:
                while time.monotonic() < deadline:
                    async with session.get(f"{base}/jobs/{job_id}/runs", headers=HEADERS) as resp:
                        runs = (await resp.json())["runs"]
                    if runs and runs[0].get("started_at"):
                        lags.append(_ms(runs[0]["started_at"]) - _ms(runs[0]["due_at"]))
                        break
                    await asyncio.sleep(0.1)
        print(f"== {jobs} run-now jobs, {gap_ms:g} ms apart: {len(lags)} started")
        print(
            f"  start - due: p50 {percentile(lags, 0.5):.0f} ms, p90 {percentile(lags, 0.9):.0f} ms, "
            f"max {max(lags, default=0):.0f} ms"
        )
        print(f"load average at end: {load_average()}")
    finally:
        scheduler.stop()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--jobs", type=int, default=50)
    parser.add_argument("--gap-ms", type=float, default=137.0)
    args = parser.parse_args()
    run_loop(main(args.jobs, args.gap_ms))
