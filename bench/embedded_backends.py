"""Micro-benchmark of the embedded hot paths: work-queue send→receive→ack and log append throughput.

    python -m dsched.bench.embedded_backends [--items 20000] [--dir /path/on/the/disk/to/test]

Each scenario runs on a fresh SQLite file in a temporary directory (under ``--dir`` if given, so the disk that
will hold the data dir can be measured) and prints items per second.
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

from dsched.libs.log.sqlite import SqliteLog
from dsched.libs.queue.base import OutgoingMessage
from dsched.libs.queue.sqlite import SqliteQueue


async def queue_pipeline(path: Path, items: int, consumers: int, ack_each: bool) -> None:
    """A producer sends batches of 10 while ``consumers`` loops receive up to 10 and ack them."""
    queue = SqliteQueue(path, max_receives=5)
    await queue.startup()
    acked = 0
    done = asyncio.Event()

    async def produce() -> None:
        for start in range(0, items, 10):
            await queue.send([OutgoingMessage(f"run-{i}".encode()) for i in range(start, min(items, start + 10))])

    async def consume() -> None:
        nonlocal acked
        while not done.is_set():
            messages = await queue.receive(10, wait_s=0.2, visibility_s=30)
            if ack_each:  # a worker acking each run as it finishes
                await asyncio.gather(*(queue.ack([m.receipt]) for m in messages))
            elif messages:
                await queue.ack([m.receipt for m in messages])
            acked += len(messages)
            if acked >= items:
                done.set()

    try:
        await asyncio.gather(produce(), *(consume() for _ in range(consumers)))
    finally:
        await queue.shutdown()


async def log_appends(path: Path, items: int, concurrency: int, per_append: int) -> None:
    """``concurrency`` tasks appending ``per_append`` records per call (like concurrent HTTP requests)."""
    log = SqliteLog(path, partitions=4)
    await log.startup()
    calls = items // per_append

    async def task(t: int) -> None:
        for i in range(t, calls, concurrency):
            await log.append([(f"job-{i}-{j}", b'{"op":"submit"}' * 20) for j in range(per_append)])

    try:
        await asyncio.gather(*(task(t) for t in range(concurrency)))
    finally:
        await log.shutdown()


async def measure(name: str, items: int, directory: Path, run: Callable[[Path], Awaitable[None]]) -> None:
    with tempfile.TemporaryDirectory(dir=directory) as tmp:
        start = time.perf_counter()
        await run(Path(tmp) / "bench.db")
        elapsed = time.perf_counter() - start
    print(f"{name:<58} {items:>7} items  {elapsed:6.2f} s  {items / elapsed:>9,.0f} /s", flush=True)


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--items", type=int, default=20_000)
    parser.add_argument("--dir", type=Path, default=None)
    args = parser.parse_args()
    n: int = args.items
    d: Path = args.dir or Path(tempfile.gettempdir())

    await measure(
        "queue send(10) -> receive(10) -> ack(batch), 8 consumers",
        n,
        d,
        lambda p: queue_pipeline(p, n, consumers=8, ack_each=False),
    )
    await measure(
        "queue send(10) -> receive(10) -> ack(each), 8 consumers",
        n,
        d,
        lambda p: queue_pipeline(p, n, consumers=8, ack_each=True),
    )
    await measure("log append 1 record/call, 200 concurrent callers", n, d, lambda p: log_appends(p, n, 200, 1))
    await measure(
        "log append 1 record/call, 1 caller (no coalescing)",
        n // 10,
        d,
        lambda p: log_appends(p, n // 10, 1, 1),
    )
    await measure("log append 100 records/call, 1 caller", n, d, lambda p: log_appends(p, n, 1, 100))


if __name__ == "__main__":
    asyncio.run(main())
