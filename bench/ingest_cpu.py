"""CPU per job of the submit path on ``POST /submit/batch``: ingestion alone (the service in this process, no
writer, picker or worker), or with ``--writer`` ingestion and the writer, counted until the writer has stored the
last accepted job. ``--batches`` requests of ``--batch`` HTTP jobs, measured with ``time.process_time`` (client
included; it only encodes the bodies). Load on the machine hardly moves it, so it compares builds.

    python -m dsched.bench.ingest_cpu [--batch 1000 --batches 10] [--writer]
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path

import aiohttp

from dsched.app.cli import run_loop
from dsched.app.runner import started
from dsched.bench.common import load_average
from dsched.libs import logs
from dsched.libs.clock import to_rfc3339
from dsched.libs.models import ACCEPTED_VERSION
from dsched.libs.settings import Settings

WARM_UP = 2  # requests before the measurement (first-use costs: imports, caches, the store's first pages)
STORED_WAIT_S = 60.0  # how long --writer waits for the writer to store the last accepted job


async def main(batch: int, batches: int, writer: bool) -> None:
    logs.configure("WARNING")
    data_dir = Path(tempfile.mkdtemp(prefix="dsched-ingest-cpu-"))
    settings = Settings.from_env(data_dir=data_dir, port=0, node_id="bench").with_dev_defaults()
    due = to_rfc3339(int(time.time() * 1000) + 86_400_000)
    job = {"project_id": "bench", "payload": {"http": {"url": "http://127.0.0.1:9/x"}}, "next_fire_at": due}
    body = {"jobs": [job] * batch}
    try:
        await measure(settings, body, batch, batches, writer)
    finally:
        shutil.rmtree(data_dir, ignore_errors=True)


async def measure(settings: Settings, body: Mapping[str, object], batch: int, batches: int, writer: bool) -> None:
    services = ["ingestion", "writer"] if writer else ["ingestion"]
    async with started(settings, services, asyncio.Event()) as instances:
        ingestion = instances["ingestion"]
        url = f"http://127.0.0.1:{ingestion.port}/submit/batch"  # type: ignore[attr-defined]
        last_id = ""
        async with aiohttp.ClientSession() as session:
            start = 0.0
            for i in range(WARM_UP + batches):
                if i == WARM_UP:
                    start = time.process_time()
                async with session.post(url, json=body, headers={"X-User-ID": "bench"}) as resp:
                    assert resp.status == 202, await resp.text()
                    last_id = (await resp.json())["results"][-1]["job_id"]
            if writer:
                await stored(ingestion.store, last_id)  # type: ignore[attr-defined]
            used = time.process_time() - start
    what = "ingestion + writer" if writer else "ingestion"
    print(f"{what}, batch: {1000 * used / (batch * batches):.3f} ms CPU per job (load {load_average()})")


async def stored(store: object, job_id: str) -> None:
    """Return once the writer has replaced the accepted row of ``job_id`` with the logged definition."""
    deadline = time.monotonic() + STORED_WAIT_S
    while time.monotonic() < deadline:
        job = (await store.get_jobs([job_id])).get(job_id)  # type: ignore[attr-defined]
        if job is not None and job.version != ACCEPTED_VERSION:
            return
        await asyncio.sleep(0.005)
    raise TimeoutError(f"the writer did not store {job_id} within {STORED_WAIT_S} s")


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, default=1000)
    parser.add_argument("--batches", type=int, default=10)
    parser.add_argument("--writer", action="store_true", help="also run the writer, until it has stored every job")
    args = parser.parse_args()
    run_loop(main(args.batch, args.batches, args.writer))  # uvloop, as the services run
