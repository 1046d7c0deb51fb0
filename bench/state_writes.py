"""What one job-state write costs the embedded store, outside any service.

    python -m dsched.bench.state_writes [--jobs 20000 --batch 100 --rounds 2 --repeat 3]

Stores ``--jobs`` HTTP jobs with ~1 KB definitions (the size of the burst bench's), then writes their states in
``update_job_states`` calls of ``--batch``: a "queued" write, then a finished state with its ``last_run``, as the
picker and the worker do, ``--rounds`` times over. Prints the process's CPU time (event loop and SQLite threads)
and the wall time per state write. To compare two builds, run it from a checkout of each, alternating.
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from pathlib import Path

from dsched.libs.models import HttpTarget, Job, JobState, JobStatus, LastRun, Payload, RunStatus
from dsched.libs.store.sqlite import SqliteStore


async def one_run(jobs: int, batch: int, rounds: int) -> tuple[float, float]:
    """(µs of CPU, µs of wall) per state write."""
    with tempfile.TemporaryDirectory() as directory:
        store = SqliteStore(Path(directory) / "store.db")
        await store.startup()
        try:
            target = HttpTarget(url="http://127.0.0.1:9/" + "p" * 600, method="GET", headers={"x-bench": "h" * 200})
            payload = Payload(kind="http", http=target)
            stored = [
                Job(
                    job_id=f"bench-{i:012d}",
                    user_id="u",
                    project_id="p",
                    payload=payload,
                    next_fire_ms=1,
                    created_ms=1,
                )
                for i in range(jobs)
            ]
            for start in range(0, jobs, 1000):
                await store.put_jobs(stored[start : start + 1000])
            finished = LastRun(run_id="r", status=RunStatus.SUCCEEDED, attempt=0, scheduled_ms=1, finished_ms=2)
            cpu, wall = time.process_time(), time.perf_counter()
            for _ in range(rounds):
                for start in range(0, jobs, batch):
                    chunk = stored[start : start + batch]
                    await store.update_job_states([JobState(job_id=j.job_id, state=JobStatus.QUEUED) for j in chunk])
                    await store.update_job_states(
                        [JobState(job_id=j.job_id, state=JobStatus.SUCCEEDED, last_run=finished) for j in chunk]
                    )
            writes = 2 * rounds * jobs
            return (time.process_time() - cpu) / writes * 1e6, (time.perf_counter() - wall) / writes * 1e6
        finally:
            await store.shutdown()


async def main(jobs: int, batch: int, rounds: int, repeat: int) -> None:
    for run in range(1, repeat + 1):
        cpu_us, wall_us = await one_run(jobs, batch, rounds)
        print(f"run {run}: {cpu_us:.1f} µs of CPU and {wall_us:.1f} µs of wall per state write")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=20_000)
    parser.add_argument("--batch", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    asyncio.run(main(args.jobs, args.batch, args.rounds, args.repeat))
