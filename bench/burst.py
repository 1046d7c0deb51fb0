"""N jobs due at one instant: how fast are they all executed, against the floor measured in the same run?

    python -m dsched.bench.burst --jobs 20000 [--kind http|echo] [--split [--workers 2]] [--submit batch|single]
        [--no-floor]
    python -m dsched.bench.burst --jobs 20000 --repeat 5     # five runs, each with its floor; the median ratio

For ``http`` jobs the floor runs first (:mod:`bench.floor`: a bare ``loop.call_at`` loop with one aiohttp session
in its own process, the same GETs to the same target at one due instant), then dsched. All of dsched's jobs are
submitted first (due ``--lead`` seconds after the start, enough to submit them all; by default through
``POST /submit/batch``); throughput = N / (last execution - due instant). ``http`` jobs call the local target, whose
arrival time is the execution time; ``echo`` jobs (no I/O: the scheduler's own overhead) are timed by their runs'
finish times, read from the embedded store afterwards. CPU is reported per job for the submit phase and the fire
phase, per process and per thread group (event loop vs helper threads).
"""

from __future__ import annotations

import argparse
import asyncio
import math
import statistics
import sys
import time

import aiohttp
import orjson

from dsched.app.cli import run_loop
from dsched.bench.common import (
    Scheduler,
    Target,
    describe_missing,
    load_average,
    print_cpu,
    report,
    submit_all,
    submit_batches,
    wait_hits,
)
from dsched.libs.clock import to_rfc3339
from dsched.libs.models import run_id_for
from dsched.libs.store.sqlite import SqliteStore

FLOOR_LEAD_S = 3.0  # the floor process starts and schedules its calls within this


async def wait_succeeded(base: str, expected: int, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    async with aiohttp.ClientSession() as session:
        while time.monotonic() < deadline:
            async with session.get(f"{base}/queue/stats") as resp:
                if (await resp.json())["succeeded"] >= expected:
                    return
            await asyncio.sleep(0.5)


async def floor(target: Target, jobs: int) -> dict[str, float]:
    """The bare loop's burst through ``target``: executed/s and CPU ms per job."""
    target.hits.clear()
    due_ms = int(time.time() * 1000 + FLOOR_LEAD_S * 1000)
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "dsched.bench.floor",
        "--url",
        target.url,
        "--jobs",
        str(jobs),
        "--due-ms",
        str(due_ms),
        stdout=asyncio.subprocess.PIPE,
    )
    out, _ = await proc.communicate()
    result = orjson.loads(out.splitlines()[-1])
    hits = [at for job_id, at in target.hits if job_id.startswith("floor-")]
    target.hits.clear()
    span_s = (max(hits) - due_ms) / 1000 if hits else float("nan")
    rate = len(hits) / span_s if span_s > 0 else float("nan")
    cpu_ms = 1000 * result["cpu_s"] / max(1, jobs)
    print(f"== floor (bare call_at loop): {len(hits)} of {jobs} hit, {rate:,.0f}/s, cpu {cpu_ms:.3f} ms/job")
    return {"executed_per_s": rate, "cpu_ms_per_job": cpu_ms}


async def main(
    jobs: int, lead: float, split: bool, workers: int, kind: str, submit: str, with_floor: bool, repeat: int
) -> None:
    """``repeat`` runs in a row, each with its own floor; then one line per run and the median ratio (this
    machine's speed drifts by tens of percent within minutes, so one run's ratio says little)."""
    rows = [await one_run(jobs, lead, split, workers, kind, submit, with_floor) for _ in range(repeat)]
    if repeat > 1:
        print("\nrun  floor/s  dsched/s  ratio  cpu_ms/job  lost  dup")
        for i, r in enumerate(rows, 1):
            print(
                f"{i:>3} {r['floor_per_s']:>8,.0f} {r['executed_per_s']:>9,.0f} {100 * r['ratio']:>5.0f} % "
                f"{r['cpu_ms_per_job']:>10.3f} {r['lost']:>5.0f} {r['duplicates']:>4.0f}"
            )
        ratios = [r["ratio"] for r in rows if not math.isnan(r["ratio"])]  # NaN without a floor
        if ratios:
            print(f"median ratio to the floor: {100 * statistics.median(ratios):.0f} % over {len(ratios)} runs")


async def one_run(
    jobs: int, lead: float, split: bool, workers: int, kind: str, submit: str, with_floor: bool
) -> dict[str, float]:
    print(f"load average at start: {load_average()}")
    target = Target()
    await target.start()
    floor_result = await floor(target, jobs) if with_floor and kind == "http" else None
    scheduler = Scheduler(split=split, workers=workers)
    await scheduler.start()
    cpu_before = scheduler.cpu_s()
    parts_before = scheduler.cpu_breakdown()
    base = f"http://127.0.0.1:{scheduler.port}"
    try:
        due_ms = int(time.time() * 1000 + lead * 1000)
        payload: object = {"http": {"url": target.url}} if kind == "http" else "noop"
        bodies: list[dict[str, object]] = [
            {"project_id": "bench", "payload": payload, "next_fire_at": to_rfc3339(due_ms)} for _ in range(jobs)
        ]
        if submit == "batch":
            ids, took, _ = await submit_batches(base, bodies)
        else:
            ids, took = await submit_all(base, bodies, rate=None)
        if time.time() * 1000 > due_ms:
            print(f"warning: submission took {took:.1f}s, longer than the lead; raise --lead")
        await asyncio.sleep(max(0.0, due_ms / 1000 - time.time() - 0.05))
        cpu_at_due = scheduler.cpu_s()
        parts_at_due = scheduler.cpu_breakdown()
        due_by_id = {job_id: float(due_ms) for job_id in ids if job_id}
        if kind == "http":
            await wait_hits(target, len(due_by_id), timeout_s=600, not_before_ms=due_ms)
            hits = target.hits
        else:
            await asyncio.sleep(max(0.0, due_ms / 1000 - time.time()))
            await wait_succeeded(base, len(due_by_id), timeout_s=600)
            store = SqliteStore(scheduler.data_dir / "store.db")
            await store.startup()
            try:
                runs = await store.get_runs([run_id_for(j, due_ms, 0) for j in due_by_id])
            finally:
                await store.shutdown()
            hits = [(r.job_id, float(r.finished_ms or 0)) for r in runs.values() if r.status == "succeeded"]
        result = report(
            f"burst: {jobs} {kind} jobs due at one instant", due_by_id, hits, len(due_by_id), took, float(due_ms)
        )
        cpu_end = scheduler.cpu_s()
        count = max(1, len(due_by_id))
        result["cpu_ms_per_job"] = 1000 * (cpu_end - cpu_before) / count
        result["floor_per_s"] = floor_result["executed_per_s"] if floor_result is not None else float("nan")
        result["ratio"] = result["executed_per_s"] / result["floor_per_s"]
        print(f"{'scheduler_cpu_ms_per_job':>36}: {result['cpu_ms_per_job']:.3f}")
        print(f"{'  of which submit phase':>36}: {1000 * (cpu_at_due - cpu_before) / count:.3f}")
        print(f"{'  of which fire phase':>36}: {1000 * (cpu_end - cpu_at_due) / count:.3f}")
        print("submit phase by process/thread:")
        print_cpu(parts_before, parts_at_due, count)
        print("fire phase by process/thread:")
        print_cpu(parts_at_due, scheduler.cpu_breakdown(), count)
        if floor_result is not None:
            print(f"{'ratio to the floor':>36}: {100 * result['ratio']:.0f} %")
        print(await scheduler.lag_summary())
        if missing := await describe_missing(base, due_by_id, hits):  # after the CPU: the lookups cost some
            print(missing)
        print(f"load average at end: {load_average()}")
        return result
    finally:
        scheduler.stop()
        await target.stop()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--jobs", type=int, default=20000)
    parser.add_argument("--split", action="store_true", help="one process per service instead of `run all`")
    parser.add_argument("--workers", type=int, default=1, help="worker processes with --split")
    parser.add_argument("--kind", choices=["http", "echo"], default="http")
    parser.add_argument("--submit", choices=["batch", "single"], default="batch")
    parser.add_argument("--no-floor", action="store_true", help="skip the bare-loop floor (http only)")
    parser.add_argument("--lead", type=float, default=30.0)
    parser.add_argument("--repeat", type=int, default=1, help="runs in a row, each with its own floor")
    args = parser.parse_args()
    run_loop(
        main(
            args.jobs,
            args.lead,
            args.split,
            args.workers,
            args.kind,
            args.submit,
            not args.no_floor,
            max(1, args.repeat),
        )
    )
