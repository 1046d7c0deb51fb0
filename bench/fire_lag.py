"""N HTTP jobs due at a steady rate to a local target: submit rate, throughput, lost, duplicates, fire lag.

    python -m dsched.bench.fire_lag --jobs 20000 --rate 1000 [--repeat 3] [--split [--workers 2]]
    python -m dsched.bench.fire_lag --rates 1000,1500,2000,2500 --seconds 20     # rising rates, one run each
    python -m dsched.bench.production fire_lag --split --workers 2 --rates 50,100,200 --seconds 20 --warmup 20

``--warmup S`` first runs S seconds at the first rate, reported but left out of the table: on the production stack
the servers' JVMs start cold with each benchmark, and the first measured rate would otherwise pay their warm-up.

Job i is submitted (``POST /submit``, 64 clients) at start + i/rate and is due ``--lead`` seconds after that, so
ingestion, writer, picker and worker all work concurrently at the target rate. Fire lag = arrival at the target
minus the due time. Each run starts a fresh scheduler; CPU is reported per job, per process and thread group.
"""

from __future__ import annotations

import argparse
import asyncio
import time

from dsched.app.cli import run_loop
from dsched.bench.common import (
    Scheduler,
    Target,
    describe_missing,
    load_average,
    print_cpu,
    report,
    server_pids,
    servers_cpu_s,
    submit_all,
    wait_hits,
)
from dsched.libs.clock import to_rfc3339


async def one_run(jobs: int, rate: float, lead: float, split: bool, workers: int) -> dict[str, float]:
    print(f"load average at start: {load_average()}")
    target = Target()
    await target.start()
    scheduler = Scheduler(split=split, workers=workers)
    await scheduler.start()
    cpu_before = scheduler.cpu_s()
    parts_before = scheduler.cpu_breakdown()
    try:
        start_ms = time.time() * 1000 + 500
        due = [start_ms + i * 1000 / rate + lead * 1000 for i in range(jobs)]
        bodies: list[dict[str, object]] = [
            {
                "project_id": "bench",
                "payload": {"http": {"url": target.url}},
                "next_fire_at": to_rfc3339(int(d)),
            }
            for d in due
        ]
        await asyncio.sleep(max(0, (start_ms - time.time() * 1000) / 1000))
        ids, took = await submit_all(f"http://127.0.0.1:{scheduler.port}", bodies, rate=rate)
        due_by_id = {job_id: float(int(d)) for job_id, d in zip(ids, due, strict=True) if job_id}
        await wait_hits(target, len(due_by_id), timeout_s=60 + jobs / rate)
        result = report(
            f"fire lag: {jobs} HTTP jobs at {rate:g}/s (lead {lead:g}s)",
            due_by_id,
            target.hits,
            len(due_by_id),
            took,
            min(due_by_id.values()) if due_by_id else 0,
        )
        count = max(1, len(due_by_id))
        cpu_ms = 1000 * (scheduler.cpu_s() - cpu_before) / count
        parts_after = scheduler.cpu_breakdown()
        print(f"{'scheduler_cpu_ms_per_job':>20}: {cpu_ms:.3f}")
        print_cpu(parts_before, parts_after, count)
        print(await scheduler.lag_summary())
        base = f"http://127.0.0.1:{scheduler.port}"
        if missing := await describe_missing(base, due_by_id, target.hits):  # after the CPU: the lookups cost some
            print(missing)
        print(f"load average at end: {load_average()}")
        return {
            **result,
            "cpu_ms_per_job": cpu_ms,
            "servers_cpu_ms_per_job": 1000 * servers_cpu_s(parts_before, parts_after) / count,
        }
    finally:
        scheduler.stop()
        await target.stop()


async def main(
    jobs: int,
    rates: list[float],
    seconds: float | None,
    lead: float,
    split: bool,
    workers: int,
    repeat: int,
    warmup: float,
) -> None:
    if warmup > 0:
        print(f"== warm-up: {warmup:g} s at {rates[0]:g}/s (not in the table)")
        await one_run(max(1, int(rates[0] * warmup)), rates[0], lead, split, workers)
    rows = []
    for rate in rates:
        for _ in range(repeat):
            count = int(rate * seconds) if seconds else jobs
            rows.append((rate, await one_run(count, rate, lead, split, workers)))
    servers = bool(server_pids())
    print(
        "\nrate  executed/s  lost  dup  p50_ms  p99_ms  max_ms  cpu_ms/job"
        + ("  servers_cpu_ms/job" if servers else "")
    )
    for rate, r in rows:
        print(
            f"{rate:>5g} {r['executed_per_s']:>10,.0f} {r['lost']:>5.0f} {r['duplicates']:>4.0f} "
            f"{r['lag_p50_ms']:>7.1f} {r['lag_p99_ms']:>7.1f} {r['lag_max_ms']:>7.1f} {r['cpu_ms_per_job']:>10.3f}"
            + (f" {r['servers_cpu_ms_per_job']:>19.3f}" if servers else "")
        )


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--jobs", type=int, default=20000)
    parser.add_argument("--split", action="store_true", help="one process per service instead of `run all`")
    parser.add_argument("--workers", type=int, default=1, help="worker processes with --split")
    parser.add_argument("--rate", type=float, default=1000)
    parser.add_argument("--rates", help="comma-separated rates, one run each (overrides --rate)")
    parser.add_argument("--seconds", type=float, help="jobs = rate x seconds (overrides --jobs)")
    parser.add_argument("--repeat", type=int, default=1, help="runs per rate")
    parser.add_argument("--lead", type=float, default=2.0)
    parser.add_argument("--warmup", type=float, default=0.0, help="seconds at the first rate before measuring")
    args = parser.parse_args()
    rates = [float(r) for r in args.rates.split(",")] if args.rates else [args.rate]
    run_loop(main(args.jobs, rates, args.seconds, args.lead, args.split, args.workers, args.repeat, args.warmup))
