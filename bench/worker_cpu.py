"""CPU per run of the worker alone: ``--jobs`` HTTP run orders put in the embedded work queue, then the worker
service in this process (as ``run all``'s worker child runs it) until every one is recorded and acked. The target
is a bare aiohttp server in a child process, so its CPU is not counted. Prints the worker's CPU per run (its
event loop and SQLite threads: ``time.process_time``) and its runs per second.

    python -m dsched.bench.worker_cpu [--jobs 20000] [--repeat 3]

Load on the machine hardly moves the CPU figure, so it compares builds: run it from a checkout of each, alternating.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from aiohttp import web

from dsched.app.backends import make_backend
from dsched.app.cli import run_loop
from dsched.app.runner import started
from dsched.bench.common import free_port, load_average
from dsched.libs import logs
from dsched.libs.metrics import REGISTRY
from dsched.libs.models import HttpTarget, Job, Payload, RunOrder, new_job_id, run_id_for
from dsched.libs.queue.base import OutgoingMessage, WorkQueue
from dsched.libs.settings import Settings

SEND_CHUNK = 1000  # orders per queue send while filling the queue
DONE_WAIT_S = 300.0  # how long one measurement may take before it is given up
TARGET_START_S = 15.0  # how long the target may take to start listening
POLL_S = 0.1  # how often the worker's progress is looked at (reading the registry costs CPU too)


def serve(port: int) -> None:
    """The target: answers every request with 200 "ok" (run in a child process)."""

    async def hook(_request: web.Request) -> web.Response:
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_route("*", "/hook", hook)
    web.run_app(app, host="127.0.0.1", port=port, access_log=None, print=None)


def orders(url: str, jobs: int) -> list[OutgoingMessage]:
    now = int(time.time() * 1000)
    messages = []
    for _ in range(jobs):
        job = Job(
            job_id=new_job_id(now),
            user_id="bench",
            project_id="bench",
            payload=Payload(kind="http", http=HttpTarget(url=url)),
            next_fire_ms=now,
            created_ms=now - 2000,
            version=1,
        )
        order = RunOrder(
            run_id=run_id_for(job.job_id, now, 0), job=job, scheduled_ms=now, attempt=0, due_ms=now, dispatched_ms=now
        )
        messages.append(OutgoingMessage(body=order.model_dump_json().encode(), priority=job.priority))
    return messages


async def acked(queue: WorkQueue) -> bool:
    counts = await queue.counts()
    return counts.visible == 0 and counts.in_flight == 0


def succeeded() -> float:
    return REGISTRY.get_sample_value("dsched_runs_total", {"status": "succeeded"}) or 0.0


async def measure(url: str, jobs: int) -> tuple[float, float]:
    """CPU seconds and wall seconds the worker took for ``jobs`` runs on a fresh data directory, until all of them
    succeeded and were acked."""
    before = succeeded()
    data_dir = Path(tempfile.mkdtemp(prefix="dsched-worker-cpu-"))
    try:
        settings = Settings.from_env(data_dir=data_dir, port=0, node_id="bench").with_dev_defaults()
        queue = make_backend("queue", settings)
        await queue.startup()
        try:
            messages = orders(url, jobs)
            for i in range(0, len(messages), SEND_CHUNK):
                await queue.send(messages[i : i + SEND_CHUNK])
            stop = asyncio.Event()
            cpu, wall = time.process_time(), time.monotonic()
            async with started(settings, ["worker"], stop):
                deadline = time.monotonic() + DONE_WAIT_S
                # The run counter costs nothing to read; the queue's counts scan it, so they are asked last.
                while succeeded() - before < jobs or not await acked(queue):
                    if time.monotonic() > deadline:
                        raise TimeoutError(f"the worker did not finish {jobs} runs within {DONE_WAIT_S} s")
                    await asyncio.sleep(POLL_S)
                cpu, wall = time.process_time() - cpu, time.monotonic() - wall
                stop.set()
            return cpu, wall
        finally:
            await queue.shutdown()
    finally:
        shutil.rmtree(data_dir, ignore_errors=True)


async def target_listening(port: int) -> None:
    """Return once the target accepts connections (a refused call would fail the runs, not measure them)."""
    deadline = time.monotonic() + TARGET_START_S
    while True:
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.05)
        else:
            writer.close()
            return


async def main(port: int, jobs: int, repeat: int) -> None:
    logs.configure("WARNING")
    await target_listening(port)
    for _ in range(repeat):
        cpu, wall = await measure(f"http://127.0.0.1:{port}/hook", jobs)
        print(
            f"worker: {1000 * cpu / jobs:.3f} ms CPU per run, {jobs / wall:,.0f} runs/s "
            f"({jobs} runs, load {load_average()})"
        )


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--jobs", type=int, default=20000)
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--serve", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve(args.serve)
    else:
        port = free_port()
        target = subprocess.Popen([sys.executable, "-m", "dsched.bench.worker_cpu", "--serve", str(port)])
        try:
            run_loop(main(port, args.jobs, args.repeat))  # uvloop, as the worker runs
        finally:
            target.terminate()
            target.wait(10)
