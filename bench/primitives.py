"""What two primitives every SQLite-backed path uses cost on this machine, outside any service.

    python -m dsched.bench.primitives [--hops 20000] [--groups 400 --group 18]

- **Thread hop**: one ``loop.run_in_executor`` round trip of a function that does nothing (how every SQLite call
  leaves the event loop), wall and CPU (process, both threads) per hop.
- **Group commit**: ``--groups`` transactions of ``--group`` concurrent ``SqliteStore.put_jobs`` calls each (the
  shape of ingestion's accepted rows under 64 clients), wall and thread CPU per transaction, once with the loop
  idle and once with the loop thread kept ~75 % busy (3 ms of Python, then 1 ms asleep).

Compare the group figures with the same transaction inside ``run all`` (docs/benchmarks.md): the gap is time the
helper thread waits for a core.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from dsched.app.cli import run_loop
from dsched.libs import sqlite as sqlite_module
from dsched.libs.models import HttpTarget, Job, Payload, new_job_id
from dsched.libs.store.sqlite import SqliteStore

BUSY_S, IDLE_S = 0.003, 0.001  # the busy loop's duty cycle


async def thread_hops(hops: int) -> None:
    loop = asyncio.get_running_loop()
    with ThreadPoolExecutor(max_workers=1) as executor:
        await loop.run_in_executor(executor, int)
        wall, cpu = time.perf_counter(), time.process_time()
        for _ in range(hops):
            await loop.run_in_executor(executor, int)
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    print(f"thread hop: {1e6 * wall / hops:.1f} us wall, {1e6 * cpu / hops:.1f} us cpu per round trip ({hops})")


async def group_commits(groups: int, size: int, busy: bool) -> None:
    timings: list[tuple[float, float]] = []
    run_group = sqlite_module._run_group

    def timed(conn: Any, fns: list[Callable[[Any], Any]]) -> list[Any]:
        wall, cpu = time.perf_counter(), time.thread_time()
        try:
            return run_group(conn, fns)
        finally:
            timings.append((time.perf_counter() - wall, time.thread_time() - cpu))

    async def spin() -> None:
        while True:
            began = time.perf_counter()
            while time.perf_counter() - began < BUSY_S:
                pass
            await asyncio.sleep(IDLE_S)

    directory = Path(tempfile.mkdtemp(prefix="dsched-primitives-"))
    store = SqliteStore(directory / "store.db")
    await store.startup()
    sqlite_module._run_group = timed  # type: ignore[assignment]
    spinner = asyncio.create_task(spin()) if busy else None
    try:
        http = Payload(kind="http", http=HttpTarget(url="http://127.0.0.1:9/x"))
        for g in range(groups):
            jobs = [
                Job(job_id=new_job_id(g), user_id="u", project_id="p", created_ms=g, payload=http, next_fire_ms=2**41)
                for _ in range(size)
            ]
            await asyncio.gather(*(store.put_jobs([job]) for job in jobs))
    finally:
        sqlite_module._run_group = run_group  # type: ignore[assignment]
        if spinner is not None:
            spinner.cancel()
        await store.shutdown()
        shutil.rmtree(directory, ignore_errors=True)
    measured = sorted(timings[5:])  # the first transactions create pages and warm caches
    walls = sorted(wall for wall, _ in measured)
    cpu = sum(c for _, c in measured) / len(measured)
    print(
        f"group commit of {size} put_jobs, loop {'75 % busy' if busy else 'idle'}: wall p50 "
        f"{1e3 * walls[len(walls) // 2]:.2f} ms, mean {1e3 * sum(walls) / len(walls):.2f} ms; "
        f"helper thread cpu {1e3 * cpu:.2f} ms ({len(measured)} transactions)"
    )


async def main(hops: int, groups: int, size: int) -> None:
    await thread_hops(hops)
    await group_commits(groups, size, busy=False)
    await group_commits(groups, size, busy=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hops", type=int, default=20_000)
    parser.add_argument("--groups", type=int, default=400)
    parser.add_argument("--group", type=int, default=18)
    args = parser.parse_args()
    run_loop(main(args.hops, args.groups, args.group))
