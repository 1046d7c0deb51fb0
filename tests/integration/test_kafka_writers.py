"""Two writer processes in one Kafka consumer group (Apache Kafka 4 + the Scylla store on Cassandra 5).

Both writers share the submissions topic's partitions. One is SIGKILLed while updates keep arriving: after its
session times out its partitions move to the survivor, which resumes from the last commit (the killed writer
committed only what it had stored). Every job must end at its last logged definition: nothing lost, nothing
applied out of order.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import orjson

from dsched.libs.log.kafka import KafkaLog
from dsched.libs.models import Job, Payload, Submission
from dsched.libs.servers import CassandraServer, KafkaServer
from dsched.libs.store.migrate import migrate
from dsched.libs.store.scylla import ScyllaStore
from tests.helpers import backends

JOBS = 40
ROUNDS = 30
SESSION_TIMEOUT_MS = 6000
DEADLINE_S = 90.0


def _submission(job_id: str, version: int, now: int) -> bytes:
    job = Job(
        job_id=job_id,
        user_id="writers",
        project_id="p",
        name=f"v{version}",
        payload=Payload(kind="echo", text="x"),
        next_fire_ms=now + 3_600_000,  # far ahead: nothing fires during the test
        created_ms=now,
    )
    op = "submit" if version == 0 else "update"
    return Submission(op=op, job=job, at_ms=now).model_dump_json().encode()


def _writer(env: dict[str, str], log_path: Path) -> subprocess.Popen[bytes]:
    with open(log_path, "wb") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "dsched.app.cli", "run", "writer"],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )


def _assignments(log_path: Path) -> list[list[int]]:
    """Every partition assignment a writer logged, in order (``kafka_partitions_assigned`` lines)."""
    found = []
    for line in log_path.read_text(errors="replace").splitlines():
        if '"kafka_partitions_assigned"' in line:
            found.append(orjson.loads(line)["partitions"])
    return found


async def _wait_for(what: str, check: object, deadline_s: float = DEADLINE_S) -> None:
    end = time.monotonic() + deadline_s
    while not await asyncio.to_thread(check):  # type: ignore[arg-type]
        assert time.monotonic() < end, f"timed out waiting for {what}"
        await asyncio.sleep(0.2)


async def test_killing_one_of_two_writers_moves_its_partitions_and_loses_nothing(
    kafka_server: KafkaServer, cassandra_server: CassandraServer, tmp_path: Path
) -> None:
    topic = backends.unique("writers")
    keyspace = backends.unique("writers").replace("-", "_")
    log_url = kafka_server.url(topic, partitions=4, session_timeout_ms=SESSION_TIMEOUT_MS)
    settings = backends.test_settings(tmp_path, log_url=log_url, store_url=cassandra_server.url(keyspace))
    await migrate(settings.store_url, settings)
    log = KafkaLog.from_url(settings.log_url, settings)
    store = ScyllaStore.from_url(settings.store_url, settings)
    await log.startup()  # creates the topic before the writers subscribe
    await store.startup()
    env = {
        **os.environ,
        "DSCHED_LOG_URL": log_url,
        "DSCHED_STORE_URL": settings.store_url,
        "DSCHED_DATA_DIR": str(tmp_path),
        "DSCHED_METRICS_PORT": "0",
        "DSCHED_LOG_LEVEL": "INFO",
    }
    logs = [tmp_path / "writer-a.log", tmp_path / "writer-b.log"]
    writers = [_writer(env, path) for path in logs]
    job_ids = [f"job-{i:03d}" for i in range(JOBS)]
    try:
        await _wait_for(
            "both writers to own partitions",
            lambda: all(_assignments(p)[-1:] != [[]] and _assignments(p) for p in logs),
        )
        now = int(time.time() * 1000)
        for version in range(ROUNDS):
            await log.append([(job_id, _submission(job_id, version, now)) for job_id in job_ids])
            if version == ROUNDS // 3:
                writers[0].send_signal(signal.SIGKILL)  # mid-stream: its last batch may be stored, not committed
                writers[0].wait(timeout=10)
            await asyncio.sleep(0.05)

        async def all_final() -> bool:
            jobs = await store.get_jobs(job_ids)
            return len(jobs) == JOBS and all(job.name == f"v{ROUNDS - 1}" for job in jobs.values())

        end = time.monotonic() + DEADLINE_S
        while not await all_final():
            jobs = await store.get_jobs(job_ids)
            behind = sorted(j for j in job_ids if j not in jobs or jobs[j].name != f"v{ROUNDS - 1}")
            assert time.monotonic() < end, f"{len(behind)} jobs never reached their last definition: {behind[:5]}"
            await asyncio.sleep(0.5)
        first, survivor = _assignments(logs[0]), _assignments(logs[1])
        assert first and first[0], "the killed writer never owned a partition: the test proved nothing"
        assert survivor[-1] == [0, 1, 2, 3], f"the survivor did not take every partition: {survivor}"
        # Versions are log offsets: each job's stored version is that of its last record, never an older one.
        jobs = await store.get_jobs(job_ids)
        assert all(job.version >= ROUNDS - 1 for job in jobs.values())
    finally:
        for writer in writers:
            if writer.poll() is None:
                writer.terminate()
                writer.wait(timeout=30)
        await store.shutdown()
        await log.shutdown()
