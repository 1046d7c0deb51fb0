"""Ingestion throughput: single submits from 64 clients, then batches through ``POST /submit/batch``.

    python -m dsched.bench.submit --jobs 20000 [--clients 64] [--batch-jobs 100000 --batch 1000 --batch-clients 4]
    python -m dsched.bench.submit --jobs 20000 --batch-jobs 0 --floor     # single submits against their floor

With ``--floor`` the same clients first send the same submits to a bare aiohttp JSON endpoint in its own process
(:mod:`bench.submit_floor`: parse the body, answer 202), and the single submits are reported as a ratio of it.

Jobs are due in a day (they are stored, not run). Single: submits/s and request latency p50/p99 over ``--jobs``
unpaced submits from ``--clients`` concurrent clients (one connection each). Batch: jobs/s and request latency
over ``--batch-jobs`` jobs. CPU ms per job of the scheduler (all processes) for each phase; the writer's storing of
what was accepted continues after the last 202 and is counted until it has caught up.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time

import aiohttp

from dsched.app.cli import run_loop
from dsched.bench.common import Scheduler, free_port, load_average, percentile, process_cpu_s, submit_batches
from dsched.libs.clock import to_rfc3339


async def single(base: str, bodies: list[dict[str, object]], clients: int) -> tuple[int, float, list[float]]:
    latencies: list[float] = []
    accepted = 0
    next_index = 0
    start = time.monotonic()
    connector = aiohttp.TCPConnector(limit=clients)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def client() -> None:
            nonlocal accepted, next_index
            while next_index < len(bodies):
                body = bodies[next_index]
                next_index += 1
                began = time.monotonic()
                try:
                    async with session.post(f"{base}/submit", json=body, headers={"X-User-ID": "bench"}) as resp:
                        await resp.read()
                        accepted += resp.status == 202
                except aiohttp.ClientError:
                    continue
                latencies.append(1000 * (time.monotonic() - began))

        await asyncio.gather(*(client() for _ in range(clients)))
    return accepted, time.monotonic() - start, latencies


async def floor(bodies: list[dict[str, object]], clients: int) -> float:
    """The bare endpoint's single submits/s with these clients (printed with its latency and CPU per request)."""
    port = free_port()
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "dsched.bench.submit_floor", "--port", str(port), stdout=asyncio.subprocess.PIPE
    )
    try:
        assert proc.stdout is not None
        if (await asyncio.wait_for(proc.stdout.readline(), 30)).strip() != b"ready":
            raise RuntimeError("the floor's server did not start")
        cpu0 = process_cpu_s(proc.pid)
        accepted, took, lat = await single(f"http://127.0.0.1:{port}", bodies, clients)
        cpu = process_cpu_s(proc.pid) - cpu0
    finally:
        proc.terminate()
        await proc.wait()
    print(f"== floor (bare aiohttp JSON endpoint): {len(bodies)} single submits from {clients} clients")
    print(f"  accepted {accepted}, {accepted / took:,.0f}/s")
    print(f"  latency p50 {percentile(lat, 0.5):.1f} ms, p99 {percentile(lat, 0.99):.1f} ms")
    print(f"  server cpu {1000 * cpu / max(1, accepted):.3f} ms/request")
    return accepted / took


async def main(
    jobs: int, clients: int, batch_jobs: int, batch: int, batch_clients: int, split: bool, with_floor: bool
) -> None:
    print(f"load average at start: {load_average()}")
    due = to_rfc3339(int(time.time() * 1000) + 86_400_000)
    body: dict[str, object] = {"project_id": "bench", "payload": {"http": {"url": "http://127.0.0.1:9/x"}}}
    bodies = [dict(body, next_fire_at=due) for _ in range(jobs)]
    floor_rate = await floor(bodies, clients) if with_floor and jobs else 0.0
    scheduler = Scheduler(split=split)
    await scheduler.start()
    base = f"http://127.0.0.1:{scheduler.port}"
    try:
        if jobs:
            cpu0 = scheduler.cpu_s()
            accepted, took, lat = await single(base, [dict(body, next_fire_at=due) for _ in range(jobs)], clients)
            cpu1 = scheduler.cpu_s()
            print(f"== single submits: {jobs} from {clients} clients")
            print(f"  accepted {accepted}, {accepted / took:,.0f}/s")
            print(f"  latency p50 {percentile(lat, 0.5):.1f} ms, p99 {percentile(lat, 0.99):.1f} ms")
            print(f"  cpu (until the last 202) {1000 * (cpu1 - cpu0) / max(1, accepted):.3f} ms/job")
            if floor_rate:
                print(f"  ratio to the floor: {100 * accepted / took / floor_rate:.0f} %")
        if batch_jobs:
            cpu0 = scheduler.cpu_s()
            ids, took, lat = await submit_batches(
                base, [dict(body, next_fire_at=due) for _ in range(batch_jobs)], batch=batch, concurrency=batch_clients
            )
            cpu1 = scheduler.cpu_s()
            accepted = sum(1 for i in ids if i)
            print(f"== batch submits: {batch_jobs} in batches of {batch} from {batch_clients} clients")
            print(f"  accepted {accepted}, {accepted / took:,.0f} jobs/s")
            print(f"  request latency p50 {percentile(lat, 0.5):.0f} ms, p99 {percentile(lat, 0.99):.0f} ms")
            print(f"  cpu (until the last 202) {1000 * (cpu1 - cpu0) / max(1, accepted):.3f} ms/job")
        print(f"load average at end: {load_average()}")
    finally:
        scheduler.stop()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--jobs", type=int, default=20000, help="single submits (0: skip)")
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--batch-jobs", type=int, default=100000, help="jobs sent in batches (0: skip)")
    parser.add_argument("--batch", type=int, default=1000)
    parser.add_argument("--batch-clients", type=int, default=4)
    parser.add_argument("--split", action="store_true", help="one process per service instead of `run all`")
    parser.add_argument("--floor", action="store_true", help="first the same single submits to a bare endpoint")
    args = parser.parse_args()
    run_loop(main(args.jobs, args.clients, args.batch_jobs, args.batch, args.batch_clients, args.split, args.floor))
