"""The production topology on one machine, without Docker: ``make stack`` (``python -m dsched.libs.servers.stack``).

Starts the real servers — etcd (coordination), Apache Kafka (submissions log), Apache Cassandra (the Scylla
store), ElasticMQ (the SQS work queue), moto (S3 blobs) and, when installed, Prometheus — then applies the CQL
migrations, creates the topics, and starts the services as separate ``dsched run <service>`` processes:
ingestion x1 (the API, on ``DSCHED_PORT``, default 8080), writer x2, coordinator x2, picker x2, worker x2.
Each service process gets the environment the compose stack gives its containers (``deploy/docker-compose.yml``)
with 127.0.0.1 URLs, plus ``DSCHED_ALLOW_CMD`` / ``DSCHED_ALLOW_PRIVATE_HTTP`` on unless the environment says
otherwise (as ``dsched run all`` does), so every README example works against it (under ``DSCHED_AUTH=keys``
with the admin key below in place of ``X-User-ID``).

Everything lives under ``<DSCHED_DATA_DIR>/stack`` (default ``.dsched/stack``); the ports chosen on the first
start are kept in ``stack.json`` there, so a second ``make stack`` resumes with the same data and URLs —
except S3: moto keeps blobs in memory, so offloaded payloads and outputs of an earlier run are gone.

Authentication: API keys (``DSCHED_AUTH=keys``, as the compose stack), unless ``--auth`` or ``DSCHED_AUTH`` says
otherwise. On the first start it creates an admin key of tenant ``demo`` and keeps it in ``<data dir>/admin.key``
(mode 0600; printed as a path, never on the terminal): the README's examples send it as ``Authorization: Bearer``.

A service process that exits is started again after a second (at most ``MAX_RESTARTS`` times per service), as
the compose stack's ``restart: unless-stopped`` does. Ctrl-C or SIGTERM stops the services first (SIGTERM: runs
in flight finish or are handed back), then the servers.

The :class:`Stack` class is what the production acceptance test and ``chaos --backends production`` use: its
``services`` and servers can be killed, paused and restarted one by one.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from dsched.libs.servers.base import ServerProcess, free_port, http_ok
from dsched.libs.servers.cassandra import CassandraServer
from dsched.libs.servers.elasticmq import ElasticMQServer
from dsched.libs.servers.etcd import EtcdServer
from dsched.libs.servers.kafka import KafkaServer
from dsched.libs.servers.moto import MotoServer

REPLICAS = {"ingestion": 1, "writer": 2, "coordinator": 2, "picker": 2, "worker": 2}
TOPIC = "dsched.submissions"
MAX_RESTARTS = 20
ADMIN_KEY_FILE = "admin.key"  # make stack's admin key (DSCHED_AUTH=keys), under the stack's data dir
# Fixed at creation, as in deploy/docker-compose.yml: every service must agree (the store refuses another layout).
LAYOUT = {"DSCHED_SHARD_COUNT": "16", "DSCHED_BUCKET_S": "60", "DSCHED_LOG_PARTITIONS": "8"}


class ServiceProcess(ServerProcess):
    """One ``dsched run <service>`` process; ready once its ``/health`` answers 200."""

    start_timeout_s = 120.0
    stop_timeout_s = 30.0  # SIGTERM: the worker finishes or hands back its runs
    probe_interval_s = 0.1

    def __init__(self, base_dir: Path, service: str, index: int, env: dict[str, str], health_port: int) -> None:
        self.name = f"{service}-{index}"
        self.service = service
        self.index = index
        self.env = env
        self.health_port = health_port
        super().__init__(base_dir)
        self.restarts = 0

    def _command(self) -> list[str]:
        return [sys.executable, "-m", "dsched.app.cli", "run", self.service]

    def _env(self) -> dict[str, str]:
        return self.env

    def _healthy(self) -> bool:
        return http_ok(f"http://127.0.0.1:{self.health_port}/health") is not None

    @property
    def exited(self) -> bool:
        """Started once and no longer running (crashed, or killed by a test)."""
        return self._proc is not None and self._proc.poll() is not None


@dataclass
class Ports:
    """Every port of the stack; persisted so a restarted stack keeps its URLs (and etcd its peer URL)."""

    api: int
    etcd_client: int = field(default_factory=free_port)
    etcd_peer: int = field(default_factory=free_port)
    kafka: int = field(default_factory=free_port)
    kafka_controller: int = field(default_factory=free_port)
    cassandra: int = field(default_factory=free_port)
    cassandra_storage: int = field(default_factory=free_port)
    elasticmq: int = field(default_factory=free_port)
    moto: int = field(default_factory=free_port)
    prometheus: int = field(default_factory=free_port)
    metrics: dict[str, int] = field(default_factory=dict)

    @classmethod
    def load_or_create(cls, path: Path, api: int, replicas: dict[str, int]) -> Ports:
        if path.is_file():
            data = json.loads(path.read_text())
            data["api"] = api
            ports = cls(**data)
        else:
            ports = cls(api=api)
        for service, count in replicas.items():
            for i in range(count):
                if service != "ingestion":
                    ports.metrics.setdefault(f"{service}-{i}", free_port())
        path.write_text(json.dumps(ports.__dict__, indent=2))
        return ports


@dataclass
class StackServers:
    """The backend servers of a stack."""

    etcd: EtcdServer
    kafka: KafkaServer
    cassandra: CassandraServer
    elasticmq: ElasticMQServer
    moto: MotoServer


class Stack:
    """The servers and the service processes of the production topology, under ``data_dir``."""

    def __init__(
        self,
        data_dir: Path,
        *,
        api_port: int | None = None,
        replicas: dict[str, int] | None = None,
        prometheus: bool = True,
        extra_env: dict[str, str] | None = None,
        kafka_session_timeout_ms: int = 10_000,
        servers: StackServers | None = None,
        namespace: str = "dsched",
    ) -> None:
        """``servers``: run on servers someone else started (and stops), e.g. a test session's; then
        ``namespace`` keeps this stack's topic, keyspace, queue, bucket and etcd prefix apart from others'."""
        self.data_dir = data_dir.resolve()
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.replicas = {**REPLICAS, **(replicas or {})}
        self.ports = Ports.load_or_create(self.data_dir / "stack.json", api_port or free_port(), self.replicas)
        self.namespace = namespace
        self.topic = TOPIC if namespace == "dsched" else f"{namespace}.submissions"
        self.keyspace = namespace.replace("-", "_")
        self.queue = f"{namespace}-runs"
        self.bucket = f"{namespace}-blobs"
        self.owns_servers = servers is None
        self.backends = servers or self._own_servers()
        self.prometheus: ServerProcess | None = None
        self._want_prometheus = prometheus
        self.kafka_session_timeout_ms = kafka_session_timeout_ms
        self.extra_env = dict(extra_env or {})
        self.services: list[ServiceProcess] = []
        self._stopping = False

    def _own_servers(self) -> StackServers:
        p = self.ports
        moto = MotoServer(self.data_dir / "moto")
        moto.port = p.moto
        servers = StackServers(
            etcd=EtcdServer(
                self.data_dir / "etcd", client_port=p.etcd_client, peer_port=p.etcd_peer, member_name="dsched-stack"
            ),
            kafka=KafkaServer(
                self.data_dir / "kafka",
                port=p.kafka,
                controller_port=p.kafka_controller,
                partitions=8,
                log_level="WARN",
            ),
            cassandra=CassandraServer(
                self.data_dir / "cassandra", port=p.cassandra, storage_port=p.cassandra_storage, log_level="WARN"
            ),
            elasticmq=ElasticMQServer(self.data_dir / "elasticmq", port=p.elasticmq),
            moto=moto,
        )
        for jvm in (servers.kafka, servers.cassandra, servers.elasticmq):
            jvm.quick_start = False  # long-running: peak speed over start-up time
        return servers

    @property
    def etcd(self) -> EtcdServer:
        return self.backends.etcd

    @property
    def kafka(self) -> KafkaServer:
        return self.backends.kafka

    @property
    def cassandra(self) -> CassandraServer:
        return self.backends.cassandra

    @property
    def elasticmq(self) -> ElasticMQServer:
        return self.backends.elasticmq

    @property
    def moto(self) -> MotoServer:
        return self.backends.moto

    # -- URLs and environment

    def urls(self) -> dict[str, str]:
        return {
            "DSCHED_LOG_URL": self.kafka.url(
                self.topic, partitions=8, session_timeout_ms=self.kafka_session_timeout_ms
            ),
            "DSCHED_STORE_URL": self.cassandra.url(self.keyspace),
            "DSCHED_COORDINATION_URL": f"{self.etcd.url}/{self.namespace}",
            "DSCHED_QUEUE_URL": self.elasticmq.url(self.queue),
            "DSCHED_BLOBS_URL": f"s3://{self.bucket}?endpoint={self.moto.endpoint}&region={self.moto.region}",
        }

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.ports.api}"

    def service_env(self, name: str) -> dict[str, str]:
        env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("DSCHED_")},
            "DSCHED_HOST": "127.0.0.1",
            "DSCHED_NODE_ID": name,
            "DSCHED_DATA_DIR": str(self.data_dir / "dsched"),
            "DSCHED_LOG_LEVEL": os.environ.get("DSCHED_LOG_LEVEL", "INFO"),
            **LAYOUT,
            **self.urls(),
        }
        # The operator's DSCHED_* settings apply (but never the URLs the stack owns), and `dsched run all`'s
        # dev defaults: cmd: and loopback HTTP on unless the environment says otherwise.
        env.update({k: v for k, v in os.environ.items() if k.startswith("DSCHED_") and k not in self.urls()})
        env.setdefault("DSCHED_ALLOW_CMD", "true")
        env.setdefault("DSCHED_ALLOW_PRIVATE_HTTP", "true")
        if name == "ingestion-0":
            env["DSCHED_PORT"] = str(self.ports.api)
            env["DSCHED_METRICS_PORT"] = "0"  # /metrics and /health are on the API port
        else:
            env["DSCHED_METRICS_PORT"] = str(self.ports.metrics[name])
        env.update(self.extra_env)
        return env

    def metrics_targets(self) -> dict[str, list[str]]:
        targets: dict[str, list[str]] = {"ingestion": [f"127.0.0.1:{self.ports.api}"]}
        for name, port in sorted(self.ports.metrics.items()):
            targets.setdefault(name.rsplit("-", 1)[0], []).append(f"127.0.0.1:{port}")
        return targets

    # -- lifecycle

    @property
    def servers(self) -> list[ServerProcess]:
        """The servers this stack started and stops (none when it runs on someone else's)."""
        found: list[ServerProcess] = [self.etcd, self.kafka, self.cassandra, self.elasticmq, self.moto]
        return (found if self.owns_servers else []) + ([self.prometheus] if self.prometheus is not None else [])

    async def start_servers(self) -> None:
        """Start every server at once (each waits for its own readiness), then schema and topics."""
        await asyncio.gather(*(s.astart() for s in self.servers))
        await self._init_backends()

    async def _init_backends(self) -> None:
        """The compose stack's init jobs: ``dsched db migrate`` and the topics (both idempotent)."""
        from dsched.libs.log.kafka import KafkaLog
        from dsched.libs.settings import Settings
        from dsched.libs.store.migrate import migrate

        settings = Settings.from_env(data_dir=self.data_dir / "dsched", log_partitions=8)
        await migrate(self.cassandra.url(self.keyspace), settings)
        log = KafkaLog.from_url(self.kafka.url(self.topic, partitions=8), settings)
        await log.startup()  # creates the topic and its .dlq topic
        await log.shutdown()

    async def start_services(self) -> None:
        """Start the service processes; ingestion first, so the API answers while the others join."""
        self.services = []
        for service, count in self.replicas.items():
            for i in range(count):
                name = f"{service}-{i}"
                port = self.ports.api if service == "ingestion" else self.ports.metrics[name]
                self.services.append(
                    ServiceProcess(self.data_dir / "services" / name, service, i, self.service_env(name), port)
                )
        await asyncio.gather(*(s.astart() for s in self.services))

    async def start(self) -> float:
        """Servers, then services; returns the seconds it took."""
        started = time.monotonic()
        if self._want_prometheus:
            self._make_prometheus()
        await self.start_servers()
        await self.start_services()
        return time.monotonic() - started

    def _make_prometheus(self) -> None:
        try:
            from dsched.libs.servers.prometheus import PrometheusServer, prometheus_binary
        except ImportError:
            return
        if prometheus_binary() is None:
            return
        self.prometheus = PrometheusServer.for_dsched(
            self.metrics_targets(), self.data_dir / "prometheus", port=self.ports.prometheus
        )

    async def stop(self) -> None:
        """Services first (SIGTERM, in parallel), then the servers."""
        self._stopping = True
        await asyncio.gather(*(s.astop() for s in self.services), return_exceptions=True)
        await asyncio.gather(*(s.astop() for s in reversed(self.servers)), return_exceptions=True)

    def close(self) -> None:
        """Synchronous last resort (atexit, a failed start): kill whatever still runs."""
        for process in [*self.services, *self.servers]:
            with contextlib.suppress(Exception):
                process.stop(kill=True)

    async def admin_key(self, tenant: str = "demo") -> Path:
        """The file holding an admin key of ``tenant`` for this stack's store, created with ``dsched keys create``
        (run with the ingestion process's environment: same store and pepper) the first time; kept afterwards, so
        a restarted stack (same data) keeps answering to it."""
        path = self.data_dir / ADMIN_KEY_FILE
        if path.is_file() and path.read_text().strip():
            return path
        command = [sys.executable, "-m", "dsched.app.cli", "keys", "create", "--tenant", tenant, "--role", "admin"]
        process = await asyncio.create_subprocess_exec(
            *command,
            "--name",
            "make stack",
            env=self.service_env("ingestion-0"),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        out, err = await process.communicate()
        lines = out.decode().strip().splitlines()
        if process.returncode != 0 or not lines or not lines[-1].startswith("dsk_"):
            raise RuntimeError(f"dsched keys create failed ({process.returncode}): {err.decode()[-500:]}")
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as file:
            file.write(lines[-1] + "\n")
        return path

    def service(self, name: str) -> ServiceProcess:
        return next(s for s in self.services if s.name == name)

    async def supervise(self, stop: asyncio.Event, interval_s: float = 1.0) -> None:
        """Until ``stop``: start again any service process that exited (bounded by ``MAX_RESTARTS``)."""
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), interval_s)
            if stop.is_set() or self._stopping:
                return
            for process in self.services:
                if process.exited and process.restarts < MAX_RESTARTS:
                    process.restarts += 1
                    print(f"dsched stack: {process.name} exited; starting it again ({process.restarts})", flush=True)
                    with contextlib.suppress(Exception):
                        await process.astop()
                        await process.astart()

    def describe(self) -> list[str]:
        """One line per server and service: where it listens."""
        lines = [
            f"etcd         {self.etcd.url}",
            f"kafka        {self.kafka.bootstrap}  (KRaft, topic {self.topic})",
            f"cassandra    {self.cassandra.contact}  (CQL, keyspace {self.keyspace})",
            f"elasticmq    {self.elasticmq.endpoint}  (SQS, queue {self.queue})",
            f"moto (S3)    {self.moto.endpoint}  (bucket {self.bucket})",
        ]
        if self.prometheus is not None:
            lines.append(f"prometheus   http://127.0.0.1:{self.ports.prometheus}")
        for process in self.services:
            where = "API " + self.api_url if process.service == "ingestion" else f"metrics :{process.health_port}"
            lines.append(f"{process.name:<12} pid {process.pid}  {where}")
        lines.append(f"data         {self.data_dir}")
        return lines


async def run(data_dir: Path, api_port: int, prometheus: bool, auth: str = "keys") -> int:
    """``make stack``: start everything, print where it listens (and, with API keys, where the admin key is),
    supervise until SIGTERM/SIGINT, stop everything."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    stack = Stack(data_dir, api_port=api_port, prometheus=prometheus, extra_env={"DSCHED_AUTH": auth})
    print(f"dsched stack: starting servers and services under {stack.data_dir}", flush=True)
    try:
        starting = asyncio.ensure_future(stack.start())
        stopped = asyncio.ensure_future(stop.wait())
        await asyncio.wait([starting, stopped], return_when=asyncio.FIRST_COMPLETED)
        if not starting.done():
            starting.cancel()
            with contextlib.suppress(BaseException):
                await starting
        else:
            took = starting.result()
            for line in stack.describe():
                print(f"  {line}", flush=True)
            if "keys" in auth.split(","):
                try:
                    key_file = await stack.admin_key()
                except RuntimeError as exc:  # the stack still serves; keys can be created by hand (README)
                    print(f"dsched stack: no admin key: {exc}", flush=True)
                else:
                    print(f"dsched stack: DSCHED_AUTH={auth}; admin key of tenant demo in {key_file}:", flush=True)
                    print(f'  curl -H "Authorization: Bearer $(cat {key_file})" {stack.api_url}/jobs', flush=True)
            print(f"dsched stack: ready in {took:.1f} s — API at {stack.api_url}; Ctrl-C stops everything", flush=True)
            await stack.supervise(stop)
        stopped.cancel()
    finally:
        print("dsched stack: stopping", flush=True)
        await stack.stop()
        stack.close()
    print("dsched stack: stopped", flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dsched.libs.servers.stack", description=__doc__.splitlines()[0])
    default_dir = Path(os.environ.get("DSCHED_DATA_DIR", ".dsched")) / "stack"
    parser.add_argument("--data-dir", type=Path, default=default_dir)
    parser.add_argument("--port", type=int, default=int(os.environ.get("DSCHED_PORT", "8080")))
    parser.add_argument("--no-prometheus", action="store_true")
    parser.add_argument(
        "--auth", default=os.environ.get("DSCHED_AUTH") or "keys", help="DSCHED_AUTH of the services (default: keys)"
    )
    args = parser.parse_args(argv)
    return asyncio.run(run(args.data_dir, args.port, not args.no_prometheus, args.auth))


if __name__ == "__main__":
    raise SystemExit(main())
