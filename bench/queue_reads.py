"""What a picker's reads of the queue table cost Cassandra as the rate per shard grows.

    python -m dsched.bench.queue_reads [--rate 400 --seconds 60 --shards 1]

Starts Cassandra (the Scylla adapter's server), stores ``--rate`` x ``--seconds`` jobs spread over ``--shards``,
due one after another for ``--seconds`` from the start of the next time bucket, and runs one picker (its real
loop, against that store; embedded coordination and work queue) until it has sent them all. One shard at 400/s is
what 16 shards see at 6,400 jobs/s. Each dispatched entry is deleted: a tombstone that reads of its bucket step
over.

Prints the CPU per job of Cassandra and of this process (the picker), Cassandra's reads of ``job_queue`` with the
tombstones each stepped over (``system_views``), its warnings about them, and how far ahead of its due time each
run reached the queue. Run it from two checkouts to compare builds (``PYTHONPATH``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import orjson

from dsched.libs import logs
from dsched.libs.clock import now_ms
from dsched.libs.coordination.keys import ASSIGNMENTS_PREFIX
from dsched.libs.coordination.sqlite import SqliteCoordination
from dsched.libs.models import Job, Payload
from dsched.libs.queue.base import OutgoingMessage
from dsched.libs.queue.sqlite import SqliteQueue
from dsched.libs.servers.cassandra import CassandraServer
from dsched.libs.settings import Settings
from dsched.libs.sharding import entry_for, initial_checkpoint
from dsched.libs.store.migrate import migrate
from dsched.libs.store.scylla import ScyllaStore
from dsched.picker.service import Picker

KEYSPACE = "bench_queue_reads"
LEAD_MS = 5_000  # the first job is due this long after the last is stored
STORE_CHUNK = 1_000
PICKER_START_AHEAD_MS = 2_000  # the picker starts this long before the first due time
DRAIN_MARGIN_S = 60.0  # after the last due time, how long the picker may take to send the rest


class RecordingQueue:
    """The embedded work queue, noting for each run sent how far ahead of its due time (ms; negative: late)."""

    def __init__(self, inner: SqliteQueue, expected: int) -> None:
        self.inner, self.expected = inner, expected
        self.ahead_ms: list[int] = []
        self.all_sent = asyncio.Event()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    async def send(self, messages: Sequence[OutgoingMessage]) -> None:
        await self.inner.send(messages)
        sent = now_ms()
        self.ahead_ms.extend(orjson.loads(m.body)["due_ms"] - sent for m in messages)
        if len(self.ahead_ms) >= self.expected:
            self.all_sent.set()


def cpu_s(pid: int) -> float:
    """User + system CPU seconds of process ``pid``."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def percentile(values: list[int], share: float) -> int:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(share * len(ordered)))] if ordered else 0


async def queue_counters(store: ScyllaStore) -> dict[str, dict[str, Any]]:
    """Cassandra's read counters for this keyspace's ``job_queue``, by virtual table."""
    found: dict[str, dict[str, Any]] = {}
    for view in ("local_read_latency", "tombstones_per_read", "rows_per_read"):
        rows = await store._request(f"SELECT * FROM system_views.{view}", None)
        for row in rows:
            if row.get("keyspace_name") == KEYSPACE and row.get("table_name") == "job_queue":
                found[view] = {k: v for k, v in row.items() if k not in ("keyspace_name", "table_name")}
    return found


async def run(rate: int, seconds: int, shards: int, directory: Path) -> None:
    jobs_count = rate * seconds
    settings = Settings.from_env(data_dir=directory, shard_count=shards, bucket_s=60)
    server = CassandraServer(directory / "cassandra", unsafe_system=True)
    await server.astart()
    try:
        url = server.url(KEYSPACE)
        await migrate(url, settings)
        store = ScyllaStore.from_url(url, settings)
        await store.startup()
        queue = SqliteQueue(directory / "queue.db", max_receives=5)
        await queue.startup()
        coordination = SqliteCoordination(directory / "coordination.db")
        await coordination.startup()
        try:
            start = now_ms()
            for shard in range(shards):
                await store.advance_checkpoint(
                    shard, None, initial_checkpoint(start, settings.bucket_ms, int(settings.bucket_grace_s * 1000))
                )
            # From the start of a bucket (storing goes at >= 4,000/s): each bucket holds the jobs of a whole
            # bucket_s, as in a steady state, and two runs of the bench compare.
            earliest = start + LEAD_MS + jobs_count * 1000 // 4_000
            first_due = -(-earliest // settings.bucket_ms) * settings.bucket_ms
            payload = Payload(kind="echo", text="x")
            for chunk in range(0, jobs_count, STORE_CHUNK):
                jobs = [
                    Job(
                        job_id=f"bench-{i:09d}",
                        user_id=f"tenant-{i % 8}",
                        project_id="p",
                        payload=payload,
                        next_fire_ms=first_due + i * 1000 // rate,
                        created_ms=start,
                    )
                    for i in range(chunk, min(jobs_count, chunk + STORE_CHUNK))
                ]
                entries = [
                    entry_for(
                        job,
                        job.next_fire_ms,
                        scheduled_ms=job.next_fire_ms,
                        attempt=0,
                        kind="schedule",
                        shard_count=shards,
                        bucket_ms=settings.bucket_ms,
                        now=start,
                    )
                    for job in jobs
                    if job.next_fire_ms is not None
                ]
                await store.put_jobs_and_entries(jobs, entries)
            print(f"stored {jobs_count:,} jobs in {(now_ms() - start) / 1000:.1f} s; due from then + "
                  f"{(first_due - now_ms()) / 1000:.1f} s at {rate}/s over {seconds} s, {shards} shard(s)")  # fmt: skip
            recording = RecordingQueue(queue, jobs_count)
            picker = Picker(
                store=store,
                queue=recording,  # type: ignore[arg-type]
                coordination=coordination,
                settings=settings,
                node_id="bench-picker",
            )
            await coordination.put(ASSIGNMENTS_PREFIX + picker.node_id, orjson.dumps({"shards": list(range(shards))}))
            # Started just ahead of the first due time: its reads of the still empty bucket while waiting for it
            # would crowd Cassandra's histograms.
            await asyncio.sleep(max(0.0, (first_due - PICKER_START_AHEAD_MS - now_ms()) / 1000))
            pid = server.pid
            assert pid is not None
            cassandra_before, own_before, wall_before = cpu_s(pid), time.process_time(), time.monotonic()
            stop = asyncio.Event()
            async with picker.open():
                task = asyncio.create_task(picker.run(stop))
                budget_s = (first_due - now_ms()) / 1000 + seconds + DRAIN_MARGIN_S
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(recording.all_sent.wait(), timeout=budget_s)
                stop.set()
                await asyncio.wait_for(task, timeout=30)
            cassandra_cpu, own_cpu = cpu_s(pid) - cassandra_before, time.process_time() - own_before
            wall = time.monotonic() - wall_before
            counters = await queue_counters(store)
        finally:
            await coordination.shutdown()
            await queue.shutdown()
            with contextlib.suppress(Exception):
                await store.shutdown()
        warnings = sum(1 for line in server.log_path.read_text(errors="replace").splitlines() if "tombstone" in line)
    finally:
        await server.astop()
    sent = recording.ahead_ms
    print(f"sent: {len(sent):,} of {jobs_count:,} in {wall:.1f} s")
    print(f"ahead of due (ms; negative = late): p50 {percentile(sent, 0.5)}, p1 {percentile(sent, 0.01)}, "
          f"min {min(sent, default=0)}")  # fmt: skip
    per_job = 1000 / max(1, len(sent))
    print(f"cpu ms/job: cassandra {cassandra_cpu * per_job:.3f}, picker process {own_cpu * per_job:.3f}")
    for view, values in counters.items():
        print(f"job_queue {view}: {values}")
    print(f"cassandra log lines about tombstones: {warnings}")


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rate", type=int, default=400, help="jobs due per second (all shards)")
    parser.add_argument("--seconds", type=int, default=60, help="for how long jobs fall due")
    parser.add_argument("--shards", type=int, default=1)
    args = parser.parse_args(argv)
    logs.configure("WARNING")
    with tempfile.TemporaryDirectory(prefix="dsched-bench-queue-reads-") as directory:
        asyncio.run(run(args.rate, args.seconds, args.shards, Path(directory)))


if __name__ == "__main__":
    main()
