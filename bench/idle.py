"""What a ``dsched run all`` with nothing to do costs: CPU (share of one core) and RSS while idle.

    python -m dsched.bench.idle [--seconds 30]

A fresh ``run all`` (all its processes counted), left ``--seconds`` alone after start-up settles: what its polls,
ticks, keepalives and samplers burn on a laptop that runs it all day.
"""

from __future__ import annotations

import argparse
import asyncio
import time

from dsched.app.cli import run_loop
from dsched.bench.common import Scheduler, load_average

SETTLE_S = 5.0  # start-up work (schema, first loads, shard assignment) is not idle


async def main(seconds: float) -> None:
    print(f"load average at start: {load_average()}")
    scheduler = Scheduler()
    await scheduler.start()
    try:
        await asyncio.sleep(SETTLE_S)
        cpu0, t0 = scheduler.cpu_s(), time.monotonic()
        await asyncio.sleep(seconds)
        share = 100 * (scheduler.cpu_s() - cpu0) / (time.monotonic() - t0)
        print(f"== idle for {seconds:g} s: CPU {share:.2f} % of one core, RSS {scheduler.rss_mb():.0f} MiB")
        print(f"load average at end: {load_average()}")
    finally:
        scheduler.stop()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=30.0)
    args = parser.parse_args()
    run_loop(main(args.seconds))
