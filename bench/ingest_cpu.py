"""CPU per job of ingestion alone on ``POST /submit/batch``: the service in this process (no writer, picker or
worker), ``--batches`` requests of ``--batch`` HTTP jobs, measured with ``time.process_time`` (client included; it
only encodes the bodies). Load on the machine hardly moves it, so it compares builds.

    python -m dsched.bench.ingest_cpu [--batch 1000 --batches 10]
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import tempfile
import time
from pathlib import Path

import aiohttp

from dsched.app.runner import started
from dsched.bench.common import load_average
from dsched.libs import logs
from dsched.libs.clock import to_rfc3339
from dsched.libs.settings import Settings

WARM_UP = 2  # requests before the measurement (first-use costs: imports, caches, the store's first pages)


async def main(batch: int, batches: int) -> None:
    logs.configure("WARNING")
    data_dir = Path(tempfile.mkdtemp(prefix="dsched-ingest-cpu-"))
    settings = Settings.from_env(data_dir=data_dir, port=0, node_id="bench").with_dev_defaults()
    due = to_rfc3339(int(time.time() * 1000) + 86_400_000)
    job = {"project_id": "bench", "payload": {"http": {"url": "http://127.0.0.1:9/x"}}, "next_fire_at": due}
    body = {"jobs": [job] * batch}
    try:
        await measure(settings, body, batch, batches)
    finally:
        shutil.rmtree(data_dir, ignore_errors=True)


async def measure(settings: Settings, body: dict[str, object], batch: int, batches: int) -> None:
    async with started(settings, ["ingestion"], asyncio.Event()) as services:
        url = f"http://127.0.0.1:{services['ingestion'].port}/submit/batch"  # type: ignore[attr-defined]
        async with aiohttp.ClientSession() as session:
            start = 0.0
            for i in range(WARM_UP + batches):
                if i == WARM_UP:
                    start = time.process_time()
                async with session.post(url, json=body, headers={"X-User-ID": "bench"}) as resp:
                    assert resp.status == 202, await resp.text()
            used = time.process_time() - start
    print(f"ingestion batch: {1000 * used / (batch * batches):.3f} ms CPU per job (load {load_average()})")


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, default=1000)
    parser.add_argument("--batches", type=int, default=10)
    args = parser.parse_args()
    asyncio.run(main(args.batch, args.batches))
