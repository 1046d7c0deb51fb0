"""A dsched cluster of separate processes (``dsched run <service>``) plus the real backend servers.

Each service process has a *slot* (``picker-2``), a node id (``DSCHED_NODE_ID``; the slot name, or
``<slot>.r<n>`` after a restart that asked for a new identity) and one log file per slot that every
incarnation appends to, after a ``{"chaos": ...}`` marker line. The embedded roles (log and store, and with
``--backends embedded`` everything) share one ``DSCHED_DATA_DIR``.

The cluster also acts as the supervisor a real deployment has (systemd, Kubernetes): a process that exits
without the chaos runner having killed it is restarted after a short back-off, and the exit is recorded so
the report can show it (a service should not exit on its own).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Literal

import aiohttp
import orjson

from dsched.app.backends import make_backend
from dsched.libs.coordination.base import Coordination
from dsched.libs.coordination.keys import ASSIGNMENTS_PREFIX, LEADER_KEY, PICKERS_PREFIX
from dsched.libs.queue.base import QueueCounts
from dsched.libs.settings import Settings
from dsched.libs.store.base import JobStore
from dsched.libs.store.sqlite import SqliteStore

Backends = Literal["distributed", "embedded", "production"]
# The servers ``--use-servers`` may name: production's JVM servers, which take minutes to start on a small machine.
SHARED_SERVERS = ("kafka", "cassandra", "elasticmq")


def parse_use_servers(text: str) -> dict[str, int]:
    """``kafka=PORT,cassandra=PORT,elasticmq=PORT`` (servers on 127.0.0.1) -> ``{name: port}``: any of
    :data:`SHARED_SERVERS`, each at most once; the run starts the ones not named. ``ValueError`` says what is
    wrong."""
    found: dict[str, int] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, sep, port = part.partition("=")
        if not sep or name not in SHARED_SERVERS or name in found or not port.isdigit():
            raise ValueError(f"{part!r}: expected kafka=PORT,cassandra=PORT,elasticmq=PORT (any of them)")
        found[name] = int(port)
    if not found:
        raise ValueError("no server named: expected kafka=PORT,cassandra=PORT,elasticmq=PORT (any of them)")
    return found


ROLES_IN_START_ORDER = ("writer", "coordinator", "picker", "worker", "ingestion")

# Short timings so that every failover happens within a few seconds (see docs/chaos.md).
LEASE_TTL_S = 2.0
VISIBILITY_TIMEOUT_S = 3.0  # workers extend held and running messages every 0.75 s (issue 10)
SHARD_COUNT = 8
BUCKET_S = 10
BUCKET_GRACE_S = 3.0
SHUTDOWN_GRACE_S = 2.0
RESTART_BACKOFF_S = 0.5
# The runner silences gRPC's C core for itself (see runner.main); services get the user's own setting.
USER_GRPC_VERBOSITY = os.environ.get("GRPC_VERBOSITY")


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def dsched_binary() -> str:
    """``dsched`` of the running interpreter's environment."""
    candidate = Path(sys.executable).with_name("dsched")
    if candidate.is_file():
        return str(candidate)
    found = shutil.which("dsched")
    if found is None:
        raise RuntimeError(f"dsched not found next to {sys.executable} nor on PATH: run `make install`")
    return found


def _die_with_parent() -> list[str]:
    """Prefix that SIGKILLs the child if the runner dies (no orphaned cluster after a killed run).

    The kernel ties the signal to the forking *thread*, so only the main thread may use it.
    """
    import threading

    setpriv = shutil.which("setpriv")
    if setpriv is None or threading.current_thread() is not threading.main_thread():
        return []
    return [setpriv, "--pdeathsig", "KILL", "--"]


@dataclass(frozen=True)
class Shape:
    """How many processes of each role (ingestion and writer: one each)."""

    coordinators: int = 2
    pickers: int = 3
    workers: int = 3


@dataclass
class Event:
    """Something that happened to a process outside the fault plan (an exit on its own)."""

    at_ms: int
    slot: str
    what: str
    details: dict[str, Any] = field(default_factory=dict)


class ServiceProcess:
    """One ``dsched run <role>`` slot across its incarnations."""

    def __init__(self, slot: str, role: str, env: dict[str, str], log_path: Path) -> None:
        self.slot = slot
        self.role = role
        self.env = env
        self.log_path = log_path
        self.node_id = slot
        self.incarnation = 0
        self.proc: subprocess.Popen[bytes] | None = None
        self.frozen = False
        self.held_down = False  # the runner killed it and restarts it itself: the supervisor keeps off
        self.started_offset = 0  # log offset of the current incarnation's first line
        self.started_at_ms = 0

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None and self.alive else None

    def start(self, *, new_identity: bool = False) -> None:
        """Start a new incarnation (no-op if running). ``new_identity``: a fresh node id, like a new pod."""
        if self.alive:
            return
        self.incarnation += 1
        if new_identity:
            self.node_id = f"{self.slot}.r{self.incarnation}"
        self.started_at_ms = now_ms()
        marker = {
            "chaos": "start",
            "slot": self.slot,
            "node": self.node_id,
            "incarnation": self.incarnation,
            "at_ms": self.started_at_ms,
        }
        with self.log_path.open("ab") as log:
            log.write(orjson.dumps(marker) + b"\n")
            self.started_offset = log.tell()
            env = {**self.env, "DSCHED_NODE_ID": self.node_id}
            self.proc = subprocess.Popen(
                [*_die_with_parent(), dsched_binary(), "run", self.role],
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                start_new_session=True,  # a terminal's Ctrl-C reaches the runner only
            )
        self.frozen = False

    def signal(self, sig: int) -> bool:
        if self.proc is None or self.proc.poll() is not None:
            return False
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.proc.pid, sig)
            return True
        return False

    async def kill(self) -> int | None:
        """SIGKILL and reap; returns the pid killed (None if it was not running)."""
        pid, proc = self.pid, self.proc
        if pid is None or proc is None:
            return None
        self.signal(signal.SIGKILL)
        await _reap(proc, 5.0)
        self.frozen = False
        return pid

    def freeze(self) -> bool:
        if self.frozen or not self.signal(signal.SIGSTOP):
            return False
        self.frozen = True
        return True

    def thaw(self) -> bool:
        if not self.frozen:
            return False
        self.frozen = False
        return self.signal(signal.SIGCONT)

    async def terminate(self, timeout_s: float) -> int | None:
        """SIGTERM (after SIGCONT if frozen), wait ``timeout_s``, then SIGKILL; returns the exit code."""
        proc = self.proc
        if proc is None:
            return None
        if proc.poll() is None:
            if self.frozen:
                self.thaw()
            self.signal(signal.SIGTERM)
            if not await _reap(proc, timeout_s):
                self.signal(signal.SIGKILL)
                await _reap(proc, 5.0)
        return proc.returncode

    def log_since_start(self) -> str:
        try:
            with self.log_path.open("rb") as log:
                log.seek(self.started_offset)
                return log.read().decode(errors="replace")
        except OSError:
            return ""

    def has_started(self) -> bool:
        """The current incarnation logged ``started`` (its backends are open and its loops run)."""
        return '"event":"started"' in self.log_since_start()

    def log_tail(self, lines: int = 15) -> str:
        return "\n".join(self.log_since_start().splitlines()[-lines:])


class Cluster:
    """Backend servers + service processes + a coordination client to look at leader and assignments."""

    def __init__(
        self,
        run_dir: Path,
        shape: Shape,
        backends: Backends,
        on_event: Callable[[Event], None],
        use_servers: dict[str, int] | None = None,
    ) -> None:
        """``use_servers`` (production only, see :func:`parse_use_servers`): those of Kafka, Cassandra and
        ElasticMQ already running on these 127.0.0.1 ports (a test session's, ``make stack``'s); the run neither
        starts nor stops them and keeps to a topic, keyspace and queue of its own, and starts the ones not named.
        etcd and moto are always the run's own (its faults restart etcd)."""
        self.run_dir = run_dir
        self.use_servers = dict(use_servers or {})
        self.shape = shape
        self.backends = backends
        self.on_event = on_event
        self.data_dir = run_dir / "data"
        self.log_dir = run_dir / "logs"
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.etcd: Any = None  # libs.servers.EtcdServer unless embedded
        self.moto: Any = None  # libs.servers.MotoServer unless embedded (production: S3 only)
        # production: libs.servers.KafkaServer / CassandraServer / ElasticMQServer (log, store, queue)
        self.kafka: Any = None
        self.cassandra: Any = None
        self.elasticmq: Any = None
        self.port = _free_port()
        self.unique = uuid.uuid4().hex[:10]
        self.processes: dict[str, ServiceProcess] = {}
        self.coordination: Coordination | None = None
        self._store: JobStore | None = None
        self._supervisor: asyncio.Task[None] | None = None
        self.env: dict[str, str] = {}

    # -- settings ------------------------------------------------------------------------------------------
    def urls(self) -> dict[str, str]:
        if self.backends == "embedded":
            return {}
        if self.etcd is None or self.moto is None:
            raise RuntimeError("the backend servers are not set up: call start_backends() first")
        endpoint = self.moto.endpoint
        urls = {
            "DSCHED_COORDINATION_URL": f"{self.etcd.url}/chaos-{self.unique}",
            "DSCHED_QUEUE_URL": f"sqs://chaos-{self.unique}?endpoint={endpoint}&region=us-east-1",
            "DSCHED_BLOBS_URL": f"s3://chaos-{self.unique}?endpoint={endpoint}&region=us-east-1",
        }
        if self.backends == "production":
            urls["DSCHED_LOG_URL"] = self.kafka.url(f"chaos-{self.unique}", partitions=4, session_timeout_ms=6000)
            urls["DSCHED_STORE_URL"] = self.cassandra.url(f"chaos_{self.unique}")
            urls["DSCHED_QUEUE_URL"] = self.elasticmq.url(f"chaos-{self.unique}")
        return urls

    def settings(self) -> Settings:
        """Settings equal to the services' (for the runner's own backend clients)."""
        urls = self.urls()
        return Settings(
            data_dir=self.data_dir,
            shard_count=SHARD_COUNT,
            bucket_s=BUCKET_S,
            lease_ttl_s=LEASE_TTL_S,
            coordination_url=urls.get("DSCHED_COORDINATION_URL", ""),
            queue_url=urls.get("DSCHED_QUEUE_URL", ""),
            blobs_url=urls.get("DSCHED_BLOBS_URL", ""),
            store_url=urls.get("DSCHED_STORE_URL", ""),
            log_url=urls.get("DSCHED_LOG_URL", ""),
            log_partitions=4,
        )

    def _base_env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("DSCHED_") and k != "GRPC_VERBOSITY"}
        if USER_GRPC_VERBOSITY is not None:
            env["GRPC_VERBOSITY"] = USER_GRPC_VERBOSITY
        env.update(
            {
                "DSCHED_DATA_DIR": str(self.data_dir),
                "DSCHED_HOST": "127.0.0.1",
                "DSCHED_PORT": str(self.port),
                "DSCHED_SHARD_COUNT": str(SHARD_COUNT),
                "DSCHED_BUCKET_S": str(BUCKET_S),
                "DSCHED_BUCKET_GRACE_S": str(BUCKET_GRACE_S),
                "DSCHED_LEASE_TTL_S": str(LEASE_TTL_S),
                "DSCHED_VISIBILITY_TIMEOUT_S": str(VISIBILITY_TIMEOUT_S),
                "DSCHED_SHUTDOWN_GRACE_S": str(SHUTDOWN_GRACE_S),
                "DSCHED_WORKER_CONCURRENCY": "16",
                "DSCHED_ALLOW_CMD": "true",
                "DSCHED_ALLOW_PRIVATE_HTTP": "true",
                "DSCHED_LOG_LEVEL": "INFO",
            }
        )
        env.update(self.urls())
        return env

    # -- lifecycle -----------------------------------------------------------------------------------------
    def _own_jvm_servers(self) -> list[Any]:
        """The production JVM servers this run starts and stops: those ``use_servers`` does not name."""
        servers = {"kafka": self.kafka, "cassandra": self.cassandra, "elasticmq": self.elasticmq}
        return [server for name, server in servers.items() if name not in self.use_servers and server is not None]

    async def start_backends(self) -> None:
        if self.backends == "embedded":
            return
        from dsched.libs.servers import CassandraServer, ElasticMQServer, EtcdServer, KafkaServer, MotoServer

        self.etcd = EtcdServer(self.run_dir / "etcd")
        self.moto = MotoServer(self.run_dir / "moto")
        servers = [self.etcd, self.moto]
        if self.backends == "production":
            shared = self.use_servers
            self.kafka = KafkaServer(self.run_dir / "kafka", port=shared.get("kafka"), partitions=4, log_level="WARN")
            self.cassandra = CassandraServer(
                self.run_dir / "cassandra", port=shared.get("cassandra"), unsafe_system=True, log_level="WARN"
            )
            self.elasticmq = ElasticMQServer(self.run_dir / "elasticmq", port=shared.get("elasticmq"))
            servers += self._own_jvm_servers()
        await asyncio.gather(*(server.astart() for server in servers))
        if self.backends == "production":  # what `dsched db migrate` and the topic init job do
            from dsched.libs.store.migrate import migrate

            settings = self.settings()
            await migrate(settings.store_url, settings)
            log = make_backend("log", settings)
            await log.startup()
            await log.shutdown()

    async def start(self, ready_timeout_s: float = 90.0) -> float:
        """Start backends and every service; wait until ready; returns the seconds it took (the services')."""
        await self.start_backends()
        started = time.monotonic()  # the JVM servers' start-up (production) is not the services' readiness
        self.env = self._base_env()
        slots: list[tuple[str, str]] = [("writer", "writer"), ("ingestion", "ingestion")]
        slots += [(f"coordinator-{i + 1}", "coordinator") for i in range(self.shape.coordinators)]
        slots += [(f"picker-{i + 1}", "picker") for i in range(self.shape.pickers)]
        slots += [(f"worker-{i + 1}", "worker") for i in range(self.shape.workers)]
        for slot, role in slots:
            self.processes[slot] = ServiceProcess(slot, role, self.env, self.log_dir / f"{slot}.log")
        # The writer pins every shard's checkpoint before anything else touches the store.
        self.processes["writer"].start()
        await self._wait(lambda: self.processes["writer"].has_started(), 60.0, "the writer did not start")
        for process in self.processes.values():
            process.start()
        self.coordination = make_backend("coordination", self.settings())
        await self.coordination.startup()
        self._supervisor = asyncio.create_task(self._supervise())
        await self._wait_ready(ready_timeout_s - (time.monotonic() - started))
        return time.monotonic() - started

    async def _wait(self, condition: Callable[[], bool], timeout_s: float, what: str) -> None:
        deadline = time.monotonic() + timeout_s
        while not condition():
            for process in self.processes.values():
                if process.proc is not None and process.proc.poll() is not None and not process.held_down:
                    raise RuntimeError(
                        f"{process.slot} exited with {process.proc.returncode} while starting:\n{process.log_tail()}"
                    )
            if time.monotonic() > deadline:
                raise RuntimeError(what)
            await asyncio.sleep(0.1)

    async def _wait_ready(self, timeout_s: float) -> None:
        """Every process logged ``started``, the API answers, and all shards are assigned to live pickers."""
        deadline = time.monotonic() + max(timeout_s, 5.0)
        pickers = {p.node_id for p in self.role("picker")}
        async with aiohttp.ClientSession() as session:
            while True:
                problems = [p.slot for p in self.processes.values() if not p.has_started()]
                if not problems:
                    try:
                        async with session.get(f"{self.api}/health", timeout=aiohttp.ClientTimeout(total=2)) as r:
                            if r.status != 200:
                                problems.append("api")
                    except (aiohttp.ClientError, TimeoutError):
                        problems.append("api")
                if not problems:
                    assignment = await self.assignments()
                    owners = {n for n, shards in assignment.items() if shards}
                    covered = {s for shards in assignment.values() for s in shards}
                    if owners != pickers or covered != set(range(SHARD_COUNT)):
                        problems.append(f"assignment {assignment}")
                if not problems:
                    return
                if time.monotonic() > deadline:
                    tails = "\n".join(
                        f"--- {p.slot}\n{p.log_tail()}" for p in self.processes.values() if p.slot in problems
                    )
                    raise RuntimeError(f"cluster not ready: waiting for {problems}\n{tails}")
                await asyncio.sleep(0.2)

    async def _supervise(self) -> None:
        """Restart processes that exited on their own (not killed by the fault plan)."""
        while True:
            await asyncio.sleep(0.2)
            for process in self.processes.values():
                if process.held_down or process.proc is None or process.proc.poll() is None:
                    continue
                code = process.proc.returncode
                tail = process.log_tail(5)
                self.on_event(
                    Event(
                        now_ms(),
                        process.slot,
                        "exited_on_its_own",
                        {"exit_code": code, "node": process.node_id, "log_tail": tail},
                    )
                )
                process.held_down = True
                try:
                    await asyncio.sleep(RESTART_BACKOFF_S)
                    process.start()
                finally:
                    process.held_down = False

    async def stop(self) -> dict[str, int | None]:
        """SIGTERM every service (in parallel; a frozen one is thawed first) and return their exit codes."""
        if self._supervisor is not None:
            self._supervisor.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._supervisor
            self._supervisor = None
        # Ingestion first (no new work), workers last (they hand back what they run).
        order = ["ingestion", "writer", "picker", "coordinator", "worker"]
        codes: dict[str, int | None] = {}
        for role in order:
            procs = self.role(role)
            results = await asyncio.gather(*(p.terminate(SHUTDOWN_GRACE_S + 5.0) for p in procs))
            codes.update({p.slot: code for p, code in zip(procs, results, strict=True)})
        return codes

    async def close(self) -> None:
        """Release everything: processes (killed if still running), clients, backend servers."""
        for process in self.processes.values():
            if process.alive:
                process.thaw()
                await process.kill()
        if self.coordination is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.coordination.shutdown(), 10)
            self.coordination = None
        if self._store is not None:
            await self._store.shutdown()
            self._store = None
        owned = [self.moto, self.etcd, *self._own_jvm_servers()]
        for server in owned:
            if server is not None:
                with contextlib.suppress(Exception):
                    server.resume()
                    await server.astop()
                    server.close()

    # -- lookups -------------------------------------------------------------------------------------------
    @property
    def api(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def role(self, role: str) -> list[ServiceProcess]:
        return [p for p in self.processes.values() if p.role == role]

    def by_node(self, node_id: str) -> ServiceProcess | None:
        for process in self.processes.values():
            if process.node_id == node_id:
                return process
        return None

    def by_pid(self, pid: int) -> ServiceProcess | None:
        for process in self.processes.values():
            if process.pid == pid:
                return process
        return None

    def coordination_client(self) -> Coordination:
        """The runner's own coordination client, open from :meth:`start` until :meth:`close`."""
        if self.coordination is None:
            raise RuntimeError("the cluster has no coordination client: not started, or closed")
        return self.coordination

    async def leader(self) -> str | None:
        """The coordinator holding the ``leader`` key (the key's value is its node id); None if nobody or the
        coordination backend does not answer within a second."""
        coordination = self.coordination_client()
        try:
            value = await asyncio.wait_for(coordination.get(LEADER_KEY), 1.0)
        except Exception:
            return None
        return value.decode() if value else None

    async def assignments(self) -> dict[str, list[int]]:
        """Shards per *live* picker (assignments of pickers without a live ``pickers/`` key are dropped)."""
        coordination = self.coordination_client()
        try:
            raw = await asyncio.wait_for(coordination.get_prefix(ASSIGNMENTS_PREFIX), 1.0)
            members = await asyncio.wait_for(coordination.get_prefix(PICKERS_PREFIX), 1.0)
        except Exception:
            return {}
        live = {k[len(PICKERS_PREFIX) :] for k in members}
        result: dict[str, list[int]] = {}
        for key, value in raw.items():
            node = key[len(ASSIGNMENTS_PREFIX) :]
            with contextlib.suppress(ValueError, KeyError, TypeError):
                shards = [int(s) for s in orjson.loads(value)["shards"]]
                if node in live:
                    result[node] = shards
        return result

    async def store(self) -> JobStore:
        """The job store, opened by the runner: the embedded one read-mostly (WAL: never blocks the services),
        or a client of the production store."""
        if self._store is None:
            store: JobStore
            if self.backends == "production":
                store = make_backend("store", self.settings())
            else:
                store = SqliteStore(self.data_dir / "store.db")
            await store.startup()
            self._store = store
        return self._store

    async def queue_counts(self) -> QueueCounts | None:
        """Visible / in-flight / dead-lettered messages of the work queue (None if it cannot be read)."""
        queue = make_backend("queue", self.settings())
        try:
            await asyncio.wait_for(queue.startup(), 10)
            return await asyncio.wait_for(queue.counts(), 10)
        except Exception:
            return None
        finally:
            with contextlib.suppress(Exception):
                await queue.shutdown()


async def _reap(proc: subprocess.Popen[bytes], timeout_s: float) -> bool:
    """Wait up to ``timeout_s`` for ``proc`` to exit; whether it did."""
    deadline = time.monotonic() + timeout_s
    while proc.poll() is None:
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.02)
    return True


def _free_port() -> int:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def log_lines(path: Path) -> list[dict[str, Any]]:
    """The JSON lines of a service log (other lines, e.g. a one-line startup error, are skipped)."""
    lines: list[dict[str, Any]] = []
    try:
        raw: IO[bytes]
        with path.open("rb") as raw:
            for line in raw:
                if line.startswith(b"{"):
                    with contextlib.suppress(orjson.JSONDecodeError):
                        lines.append(orjson.loads(line))
    except OSError:
        pass
    return lines
