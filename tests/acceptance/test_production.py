"""The production topology end to end: Kafka + Cassandra (Scylla store) + etcd + ElasticMQ + S3 (moto), with
ingestion, writer x2, coordinator x2, picker x2 and worker x2 as separate ``dsched run`` processes
(:class:`libs.servers.stack.Stack` on the session's servers, in a namespace of its own).

- Start-up order: a SIGKILLed ingestion — and a SIGKILLed ``dsched run all`` on these backends — answers
  ``/health`` and accepts a submit after its restart before its writer has rejoined the consumer group.
- A mixed workload (immediate ``cmd:``, scheduled and recurring HTTP calls, a payload over 1 KiB, a failing job
  that is retried then dead-lettered, at-most-once calls) survives SIGKILLs of a writer, a picker, the leading
  coordinator and a worker mid-run, and a restart of the Kafka broker, Cassandra and ElasticMQ: every accepted
  job runs, and no at-most-once job runs twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import orjson
import pytest

from dsched.libs.servers import CassandraServer, ElasticMQServer, EtcdServer, KafkaServer, MotoServer, free_port
from dsched.libs.servers.stack import ServiceProcess, Stack, StackServers
from dsched.libs.settings import Settings
from tests.helpers.processes import Http
from tests.helpers.targets import CountingTarget

# Two Kafka/Cassandra/ElasticMQ restarts and nine processes on a shared 2-core machine: minutes, not seconds.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

TTL_S = 2.0
# A sanity bound, not the figure: on this shared 2-core machine (load average 25+) a Python process with
# aiobotocore and the Cassandra driver takes 15-35 s to start; the test's real check is the order above.
STARTUP_BOUND_S = 60.0
ENV = {
    "DSCHED_SHARD_COUNT": "8",
    "DSCHED_BUCKET_S": "10",
    "DSCHED_BUCKET_GRACE_S": "2",
    "DSCHED_LEASE_TTL_S": str(TTL_S),
    "DSCHED_VISIBILITY_TIMEOUT_S": "5",
    "DSCHED_SHUTDOWN_GRACE_S": "2",
}


@pytest.fixture
def target() -> Iterator[CountingTarget]:
    server = CountingTarget()
    yield server
    server.close()


@pytest.fixture(scope="module")
def stack(
    tmp_path_factory: pytest.TempPathFactory,
    etcd_server: EtcdServer,
    kafka_server: KafkaServer,
    cassandra_server: CassandraServer,
    elasticmq_server: ElasticMQServer,
    moto_server: MotoServer,
) -> Iterator[Stack]:
    """One stack for the module (starting nine processes costs a minute or two here); each test leaves every
    service running (the ones it kills are started again)."""
    servers = StackServers(etcd_server, kafka_server, cassandra_server, elasticmq_server, moto_server)
    stack = Stack(
        tmp_path_factory.mktemp("stack"),
        servers=servers,
        namespace=f"prod-{uuid.uuid4().hex[:8]}",
        prometheus=False,
        extra_env=ENV,
        kafka_session_timeout_ms=6000,
    )
    try:
        asyncio.run(stack.start_servers())  # the servers run already: this is schema and topics
        asyncio.run(stack.start_services())
        yield stack
    finally:
        asyncio.run(stack.stop())
        stack.close()


async def _leader(stack: Stack) -> str | None:
    from dsched.libs.coordination.etcd import EtcdCoordination
    from dsched.libs.coordination.keys import LEADER_KEY

    url = stack.urls()["DSCHED_COORDINATION_URL"]
    coordination = EtcdCoordination.from_url(url, Settings.from_env(coordination_url=url))
    await coordination.startup()
    try:
        value = await coordination.get(LEADER_KEY)
    finally:
        await coordination.shutdown()
    return value.decode() if value else None


async def _restarted_answers(process: ServiceProcess, http: Http) -> tuple[float, float]:
    """SIGKILL ``process`` and start it again: (seconds until it answers /health and accepted a submit,
    the wall-clock time /health first answered)."""
    await process.astop(kill=True)
    started = time.monotonic()
    await process.astart()  # returns once /health answers 200
    answered_at = time.time()
    status, body = await asyncio.to_thread(http.call, "POST", "/submit", {"project_id": "p", "payload": "hi"})
    assert status == 202, body
    return time.monotonic() - started, answered_at


def _assigned_at(log_path: Path, after: float) -> float | None:
    """When the writer in ``log_path`` was last given partitions after wall time ``after`` (its log line)."""
    found = None
    for line in log_path.read_text(errors="replace").splitlines():
        if '"kafka_partitions_assigned"' in line:
            stamp = orjson.loads(line)["timestamp"]
            at = datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()
            if at > after and orjson.loads(line).get("partitions"):
                found = at
    return found


async def test_a_restarted_api_answers_before_the_writer_joins_its_group(stack: Stack) -> None:
    http = Http(stack.ports.api)
    took, _ = await _restarted_answers(stack.service("ingestion-0"), http)
    # The case: `dsched run all` runs a writer (a group member) in the same process as the API. After a
    # SIGKILL the group keeps the dead member until its session times out (60 s here), so the new member's join
    # waits for that; the API must not.
    env = stack.service_env("ingestion-0")
    env["DSCHED_PORT"] = str(port := free_port())
    env["DSCHED_LOG_URL"] = stack.kafka.url(stack.topic, partitions=8, session_timeout_ms=60_000)
    all_in_one = ServiceProcess(stack.data_dir / "services" / "all", "all", 0, env, port)
    try:
        first_start = time.time()
        await all_in_one.astart()
        end = time.monotonic() + 90
        while _assigned_at(all_in_one.log_path, first_start) is None:  # a full member, so its death is felt
            assert time.monotonic() < end, "the writer never joined its group"
            await asyncio.sleep(0.5)
        killed_at = time.time()
        took_all, answered_at = await _restarted_answers(all_in_one, Http(port))
        end = time.monotonic() + 120
        while (assigned := _assigned_at(all_in_one.log_path, killed_at)) is None:
            assert time.monotonic() < end, "the restarted writer never rejoined its group"
            await asyncio.sleep(0.5)
    finally:
        await all_in_one.astop()
    print(
        f"restart to an accepted submit: ingestion {took:.1f} s, run all {took_all:.1f} s; "
        f"its writer rejoined {assigned - answered_at:.1f} s after the API answered"
    )
    assert answered_at < assigned, "the API waited for the writer's group join"
    assert took <= STARTUP_BOUND_S and took_all <= STARTUP_BOUND_S


def _at(epoch_s: float) -> str:
    return datetime.fromtimestamp(epoch_s, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


async def _wait_until(what: str, check: object, timeout_s: float) -> None:
    end = time.monotonic() + timeout_s
    while not await asyncio.to_thread(check):  # type: ignore[arg-type]
        assert time.monotonic() < end, f"timed out waiting for {what}"
        await asyncio.sleep(0.5)


async def test_every_accepted_job_runs_through_kills_and_server_restarts(stack: Stack, target: CountingTarget) -> None:
    http = Http(stack.ports.api)
    stop = asyncio.Event()
    supervisor = asyncio.create_task(stack.supervise(stop, interval_s=0.5))  # restarts what we kill
    try:
        now = time.time()
        echo = [http.submit(payload=f"cmd:echo job-{i}") for i in range(10)]
        slow = [http.submit(payload="cmd:sleep 2; echo slow") for _ in range(6)]  # in flight at the worker kill
        scheduled = [
            http.submit(payload={"http": {"url": target.url, "method": "POST"}}, next_fire_at=_at(now + 4 + i * 0.5))
            for i in range(20)
        ]
        big_text = "x" * 3000
        big = http.submit(payload=f"cmd:echo {big_text}")
        recurring = http.submit(payload="tick", cron_schedule="@every 2s")
        failing = http.submit(
            payload="cmd:exit 3", max_retries=1, retry={"backoff": "fixed", "initial_s": 0.5, "jitter": False}
        )
        at_most_once = [
            http.submit(
                payload={"http": {"url": target.url, "method": "POST"}},
                execution="at_most_once",
                next_fire_at=_at(now + 3 + i * 0.5),
            )
            for i in range(10)
        ]

        # Faults while the scheduled jobs come due (the supervisor starts each killed process again).
        await asyncio.sleep(1.0)
        await stack.service("writer-0").astop(kill=True)
        await stack.service("worker-0").astop(kill=True)  # mid-run: the slow jobs are running
        await asyncio.sleep(1.0)
        await stack.service("picker-0").astop(kill=True)
        leader = await _leader(stack)
        assert leader is not None
        await stack.service(leader).astop(kill=True)
        await asyncio.sleep(2.0)
        await stack.kafka.arestart(kill=True)
        await stack.cassandra.arestart()
        await stack.elasticmq.arestart(kill=True)

        always = [*echo, *slow, *scheduled, big, recurring]
        done = await asyncio.to_thread(http.wait_all_succeeded, always, 180.0)
        assert any(big_text in (r.get("output") or "") for r in done[big]), "the > 1 KiB command's output"
        await _wait_until(
            "three runs of the recurring job",
            lambda: sum(r["status"] == "succeeded" for r in http.runs(recurring)) >= 3,
            60.0,
        )
        await _wait_until("the failing job's dead letter", lambda: _dead_letter_of(http, failing), 90.0)
        runs = http.runs(failing)
        assert sorted(r["attempt"] for r in runs if r["status"] == "failed") == [0, 1]
        await _wait_until("a run of every at-most-once job", lambda: all(http.runs(j) for j in at_most_once), 90.0)
        twice = {j: target.calls[j] for j in at_most_once if target.calls.get(j, 0) > 1}
        assert not twice, f"at-most-once jobs called more than once: {twice}"
        assert all(j in target.calls for j in scheduled)
    finally:
        stop.set()
        with contextlib.suppress(Exception):
            await supervisor


def _dead_letter_of(http: Http, job_id: str) -> bool:
    status, body = http.call("GET", "/dead-letters")
    return status == 200 and any(d.get("job_id") == job_id for d in body.get("dead_letters", []))
