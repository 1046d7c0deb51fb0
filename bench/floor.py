"""The floor for a burst: a bare event loop (``loop.call_at`` + one aiohttp session) sending N GETs to a target at
one due instant, in its own process, as the scheduler would. Run by :mod:`bench.burst` beside dsched in the same run.

    python -m dsched.bench.floor --url http://127.0.0.1:PORT/hook --jobs 20000 --due-ms EPOCH_MS

Prints one JSON line: ``{"cpu_s": ..., "failed": ...}`` (the arrival times are recorded by the target).
"""

from __future__ import annotations

import argparse
import asyncio
import resource
import sys
import time

import aiohttp
import orjson

from dsched.app.cli import run_loop

# aiohttp's default pool (connections are reused; the worker's runs are bounded by DSCHED_WORKER_CONCURRENCY).
# Unlimited, 5,000 GETs at one instant open 5,000 connections at once: measured 37/s under load, mostly timeouts.
CONNECTIONS = 100


async def main(url: str, jobs: int, due_ms: int) -> None:
    loop = asyncio.get_running_loop()
    start = resource.getrusage(resource.RUSAGE_SELF)  # after imports and start-up
    failed = 0
    tasks: set[asyncio.Task[None]] = set()
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=CONNECTIONS)) as session:

        async def get(i: int) -> None:
            nonlocal failed
            try:
                async with session.get(url, headers={"X-Dsched-Job-Id": f"floor-{i}"}) as resp:
                    await resp.read()
            except aiohttp.ClientError:
                failed += 1

        def fire(i: int) -> None:
            task = loop.create_task(get(i))
            tasks.add(task)
            task.add_done_callback(tasks.discard)

        when = loop.time() + max(0.0, due_ms / 1000 - time.time())
        for i in range(jobs):
            loop.call_at(when, fire, i)
        await asyncio.sleep(max(0.0, due_ms / 1000 - time.time()) + 0.01)
        for _ in range(100_000):  # bounded: every request ends within its own timeout
            if not tasks:
                break
            await asyncio.gather(*list(tasks), return_exceptions=True)
    usage = resource.getrusage(resource.RUSAGE_SELF)
    cpu_s = usage.ru_utime + usage.ru_stime - start.ru_utime - start.ru_stime
    sys.stdout.write(orjson.dumps({"cpu_s": cpu_s, "failed": failed}).decode() + "\n")


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--url", required=True)
    parser.add_argument("--jobs", type=int, default=20000)
    parser.add_argument("--due-ms", type=int, required=True)
    args = parser.parse_args()
    run_loop(main(args.url, args.jobs, args.due_ms))
