"""What the dashboard and ``dsched jobs list`` ask of the API when one tenant has many jobs.

    python -m dsched.bench.console --jobs 100000 [--repeat 5]

On a fresh ``dsched run all``: submit N jobs of one tenant (due in 2099, in 7 projects, named ``job-<i>``) through
``POST /submit/batch``, wait until the writer stored them all, then time each query of the jobs page ``--repeat``
times and print the median and the slowest: the first and second page, a project filter, a status filter, a search
by name that matches one of the oldest jobs, a search that matches nothing, and an exact job id.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from typing import Any
from urllib.parse import quote

import aiohttp

from dsched.app.cli import run_loop
from dsched.bench.common import Scheduler, load_average, submit_batches

PROJECTS = 7
STORED_WAIT_S = 600.0  # how long the writer may take to store every job


async def _get(session: aiohttp.ClientSession, base: str, path: str) -> tuple[float, dict[str, Any]]:
    began = time.perf_counter()
    async with session.get(base + path, headers={"X-User-ID": "bench"}) as resp:
        data: dict[str, Any] = await resp.json()
        if resp.status != 200:
            raise RuntimeError(f"GET {path}: {resp.status} {data}")
    return (time.perf_counter() - began) * 1000, data


async def main(jobs: int, repeat: int) -> None:
    print(f"load average at start: {load_average()}")
    scheduler = Scheduler()
    await scheduler.start()
    base = f"http://127.0.0.1:{scheduler.port}"
    try:
        bodies: list[dict[str, object]] = [
            {
                "project_id": f"proj-{i % PROJECTS}",
                "name": f"job-{i}",
                "payload": f"payload {i}",
                "next_fire_at": "2099-01-01T00:00:00Z",
            }
            for i in range(jobs)
        ]
        ids, took, _ = await submit_batches(base, bodies)
        print(f"submitted {sum(1 for i in ids if i)} jobs in {took:.1f} s")
        async with aiohttp.ClientSession() as session:
            deadline = time.monotonic() + STORED_WAIT_S
            while (await _get(session, base, "/jobs?limit=1&status=submitted"))[1]["jobs"]:
                if time.monotonic() > deadline:
                    raise RuntimeError("the writer did not store every job in time")
                await asyncio.sleep(2)
            first = (await _get(session, base, "/jobs?limit=25"))[1]
            queries = {
                "page 1": "/jobs?limit=25",
                "page 2": f"/jobs?limit=25&cursor={quote(first['next_cursor'])}",
                "project filter": "/jobs?limit=25&project_id=proj-3",
                "status filter": "/jobs?limit=25&status=scheduled",
                "name among the oldest": f"/jobs?limit=25&q=job-{min(42, jobs - 1)}",
                "search without a match": "/jobs?limit=25&q=nothing-like-this",
                "exact id": f"/jobs?limit=25&q={first['jobs'][-1]['job_id']}",
            }
            print(f"{'query':<24} {'median_ms':>10} {'max_ms':>8} {'rows':>5}")
            for name, path in queries.items():
                times, rows = [], 0
                for _ in range(repeat):
                    ms, data = await _get(session, base, path)
                    times.append(ms)
                    rows = len(data["jobs"])
                print(f"{name:<24} {statistics.median(times):>10.1f} {max(times):>8.1f} {rows:>5}")
    finally:
        scheduler.stop()
    print(f"load average at end: {load_average()}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=100_000)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    run_loop(main(args.jobs, args.repeat))
