"""Benchmarks on the production backends: Kafka, Cassandra (the Scylla store), etcd, ElasticMQ, S3 (moto).

    python -m dsched.bench.production fire_lag --split --workers 2 --rates 50,100,200 --seconds 20 [--warmup 20]
    python -m dsched.bench.production burst --split --workers 2 --jobs 20000

Starts the servers (:class:`libs.servers.stack.Stack`, without its service processes), applies the schema and
creates the topics, then runs the named benchmark module (``bench.fire_lag``, ``bench.burst``) with the
``DSCHED_*_URL`` of these servers in its environment, so the services it starts use them. Each benchmark run
gets a namespace of its own (topic, keyspace, queue, bucket, etcd prefix). The servers are stopped at the end.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

from dsched.bench.common import KEEP_DATA_ENV, SERVER_PIDS_ENV
from dsched.libs.servers.stack import LAYOUT, Stack

# Settings a caller may give the benchmark's services (the backends' URLs and the layout come from the stack).
PASSED_THROUGH = frozenset({KEEP_DATA_ENV, "DSCHED_LOG_LEVEL"})


async def main(argv: list[str]) -> int:
    if not argv or argv[0] not in ("fire_lag", "burst"):
        print(__doc__)
        return 2
    with tempfile.TemporaryDirectory(prefix="dsched-bench-prod-") as tmp:
        servers = Stack(Path(tmp) / "servers", prometheus=False)
        await asyncio.gather(*(s.astart() for s in servers.servers))
        try:
            stack = Stack(
                Path(tmp) / "run",
                prometheus=False,
                servers=servers.backends,
                namespace=f"bench-{uuid.uuid4().hex[:6]}",
                kafka_session_timeout_ms=6000,
            )
            await stack.start_servers()  # schema and topics in the run's namespace
            env = {k: v for k, v in os.environ.items() if not k.startswith("DSCHED_") or k in PASSED_THROUGH}
            env.update({**LAYOUT, **stack.urls(), "DSCHED_LEASE_TTL_S": "3"})
            # The benchmark reports the servers' CPU beside the services' (what saturates first on shared cores).
            env[SERVER_PIDS_ENV] = ",".join(f"{s.name}={s.pid}" for s in servers.servers if s.pid is not None)
            command = [sys.executable, "-m", f"dsched.bench.{argv[0]}", *argv[1:]]
            return (await asyncio.to_thread(subprocess.run, command, env=env, check=False)).returncode
        finally:
            await servers.stop()
            servers.close()


if __name__ == "__main__":
    raise SystemExit(asyncio.run(main(sys.argv[1:])))
