"""Distributed acceptance: every service its own process, on real etcd + SQS + S3 (log and store embedded).

Two coordinators, two pickers, two workers, writer and ingestion run as separate ``dsched run`` processes. Mid-run the
leading coordinator and one picker are killed with SIGKILL. Every due job must still run, and the jobs of the dead
picker's shards must fire within lease TTL + 1 s of their due time.
"""

from __future__ import annotations

import asyncio
import signal
import threading
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import orjson
import pytest

from dsched.app.backends import make_backend
from dsched.libs.servers import EtcdServer, MotoServer
from dsched.libs.settings import Settings
from dsched.libs.sharding import shard_for
from tests.helpers.processes import Http, Service, base_env, free_port

TTL_S = 2.0
SHARDS = 8


class Target:
    """A local HTTP endpoint recording when each job's call arrived (first arrival per job)."""

    def __init__(self) -> None:
        self.hits: dict[str, float] = {}
        self.count = 0
        lock = threading.Lock()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                job_id = self.headers.get("X-Dsched-Job-Id", "")
                with lock:
                    outer.count += 1
                    outer.hits.setdefault(job_id, time.time())
                self.rfile.read(int(self.headers.get("Content-Length") or 0))
                self.send_response(200)
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def target() -> Iterator[Target]:
    t = Target()
    yield t
    t.close()


def read_coordination(url: str) -> tuple[str | None, dict[str, list[int]]]:
    """The current leader and shard assignment, read straight from etcd."""

    async def read() -> tuple[str | None, dict[str, list[int]]]:
        coordination = make_backend("coordination", Settings.from_env(coordination_url=url))
        await coordination.startup()
        try:
            leader = await coordination.get("leader")
            raw = await coordination.get_prefix("assignments/")
        finally:
            await coordination.shutdown()
        assignments = {k.split("/", 1)[1]: list(orjson.loads(v)["shards"]) for k, v in raw.items()}
        return (leader.decode() if leader else None), assignments

    return asyncio.run(read())


def at(epoch_s: float) -> str:
    return datetime.fromtimestamp(epoch_s, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def test_failover_of_leader_and_picker_on_etcd_sqs_s3(
    tmp_path: Path, services: list[Service], etcd_server: EtcdServer, moto_server: MotoServer, target: Target
) -> None:
    namespace = uuid.uuid4().hex[:10]
    coordination_url = f"{etcd_server.url}/accept-{namespace}"
    port = free_port()
    env = base_env(
        tmp_path / "data",
        port,
        DSCHED_COORDINATION_URL=coordination_url,
        DSCHED_QUEUE_URL=f"sqs://runs-{namespace}?endpoint={moto_server.endpoint}&region=us-east-1",
        DSCHED_BLOBS_URL=f"s3://blobs-{namespace}?endpoint={moto_server.endpoint}&region=us-east-1",
        DSCHED_LEASE_TTL_S=str(TTL_S),
        DSCHED_SHARD_COUNT=str(SHARDS),
        DSCHED_VISIBILITY_TIMEOUT_S="5",
    )
    procs: dict[str, Service] = {}
    for name, what in [
        ("ingestion", "ingestion"),
        ("writer", "writer"),
        ("coord-1", "coordinator"),
        ("coord-2", "coordinator"),
        ("picker-1", "picker"),
        ("picker-2", "picker"),
        ("worker-1", "worker"),
        ("worker-2", "worker"),
    ]:
        procs[name] = Service(what, {**env, "DSCHED_NODE_ID": name}, tmp_path, name).start()
        services.append(procs[name])
    http = Http(port)
    http.wait_healthy()
    deadline = time.monotonic() + 30
    leader, assignments = None, {}
    while time.monotonic() < deadline:
        leader, assignments = read_coordination(coordination_url)
        if leader and all(assignments.get(p) for p in ("picker-1", "picker-2")):
            break
        time.sleep(0.2)
    assert leader in ("coord-1", "coord-2") and assignments.get("picker-1") and assignments.get("picker-2")

    # 80 jobs due one every 100 ms from 3 s ahead, plus some that are due at once.
    start = time.time() + 3.0
    due: dict[str, float] = {}
    for i in range(80):
        when = start + i * 0.1
        job_id = http.submit(payload={"http": {"url": target.url, "method": "POST"}}, next_fire_at=at(when))
        due[job_id] = when
    for _ in range(10):
        due[http.submit(payload={"http": {"url": target.url, "method": "POST"}})] = time.time()

    # Mid-run: SIGKILL the leading coordinator and picker-1.
    time.sleep(max(0.0, start + 2.0 - time.time()))
    dead_shards = set(read_coordination(coordination_url)[1].get("picker-1", []))
    killed_at = time.time()
    procs[leader].kill(signal.SIGKILL)
    procs["picker-1"].kill(signal.SIGKILL)

    deadline = time.monotonic() + 45
    while time.monotonic() < deadline and set(due) - set(target.hits):
        time.sleep(0.2)
    missing = set(due) - set(target.hits)
    assert not missing, f"{len(missing)} due jobs never ran"

    new_leader, new_assignments = read_coordination(coordination_url)
    assert new_leader is not None and new_leader != leader
    assert set(new_assignments.get("picker-2", [])) == set(range(SHARDS))
    affected = {j: w for j, w in due.items() if shard_for(j, SHARDS) in dead_shards and w >= killed_at}
    assert affected, "the workload must have jobs on the dead picker's shards after the kill"
    lateness = {j: target.hits[j] - w for j, w in affected.items()}
    worst = max(lateness.values())
    print(f"affected jobs: {len(affected)}, worst lateness {worst:.2f}s")
    assert worst <= TTL_S + 1.0, f"dead picker's jobs fired up to {worst:.2f}s late"
