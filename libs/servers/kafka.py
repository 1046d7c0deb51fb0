"""Apache Kafka 4 in KRaft mode: one process that is both broker and controller, on 127.0.0.1.

The jars come from ``deploy/jars/kafka/pom.xml`` (``make system-deps``). The first start formats the storage
(``kafka.tools.StorageTool format`` with a static one-voter quorum); later starts reuse it, so a restart keeps
every topic, record and committed offset. Internal topics have replication factor 1 and few partitions (a
fast start), the group join has no initial delay, and topics are auto-created with ``partitions`` partitions.

Ready means a topic can be created and described through the admin API (the controller elected itself and the
broker registered), not merely that the port is open.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import subprocess
import uuid
from pathlib import Path

from dsched.libs.servers.base import JavaServer, ServerError, classpath, free_port, java_binary, port_open

READY_TOPIC = "__dsched_ready"

_LOG4J2 = """\
status = warn
appender.out.type = Console
appender.out.name = out
appender.out.layout.type = PatternLayout
appender.out.layout.pattern = [%d] %p %m (%c)%n
rootLogger.level = {level}
rootLogger.appenderRef.out.ref = out
# The request log and the state-change log repeat every client call; keep them quiet.
logger.request.name = kafka.request.logger
logger.request.level = warn
logger.state.name = state.change.logger
logger.state.level = warn
"""


class KafkaServer(JavaServer):
    """One KRaft node (broker + controller). ``bootstrap`` is ``127.0.0.1:PORT``; ``url(topic)`` a log URL."""

    name = "kafka"
    jar_set = "kafka"
    main_class = "kafka.Kafka"
    start_timeout_s = 120.0
    heap_mb = 384
    probe_interval_s = 0.25

    def __init__(
        self,
        base_dir: Path | None = None,
        *,
        port: int | None = None,
        controller_port: int | None = None,
        partitions: int = 4,
        heap_mb: int | None = None,
        log_level: str = "INFO",
    ) -> None:
        super().__init__(base_dir)
        self.port = port or free_port()
        self.controller_port = controller_port or free_port()
        self.partitions = partitions
        self.log_level = log_level
        if heap_mb is not None:
            self.heap_mb = heap_mb
        self.data_dir = self.base_dir / "data"
        self.config_path = self.base_dir / "server.properties"
        self.log4j_path = self.base_dir / "log4j2.properties"

    @property
    def host(self) -> str:
        return "127.0.0.1"

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"

    def url(self, topic: str = "dsched.submissions", **params: object) -> str:
        """A ``kafka://`` submissions-log URL for ``topic`` on this broker."""
        query = "&".join(f"{k}={v}" for k, v in params.items())
        return f"kafka://{self.bootstrap}/{topic}" + (f"?{query}" if query else "")

    def _properties(self) -> str:
        internal = min(self.partitions, 4)
        lines = {
            "process.roles": "broker,controller",
            "node.id": "1",
            "controller.quorum.voters": f"1@127.0.0.1:{self.controller_port}",
            "listeners": f"PLAINTEXT://127.0.0.1:{self.port},CONTROLLER://127.0.0.1:{self.controller_port}",
            "advertised.listeners": f"PLAINTEXT://127.0.0.1:{self.port}",
            "controller.listener.names": "CONTROLLER",
            "inter.broker.listener.name": "PLAINTEXT",
            "listener.security.protocol.map": "CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT",
            "log.dirs": str(self.data_dir),
            "num.partitions": str(self.partitions),
            "auto.create.topics.enable": "true",
            "offsets.topic.replication.factor": "1",
            "offsets.topic.num.partitions": str(internal),
            "transaction.state.log.replication.factor": "1",
            "transaction.state.log.min.isr": "1",
            "transaction.state.log.num.partitions": str(internal),
            "share.coordinator.state.topic.replication.factor": "1",
            "share.coordinator.state.topic.min.isr": "1",
            "group.initial.rebalance.delay.ms": "0",
            # A member that left is replaced at once; one that died is noticed after its session timeout.
            "group.consumer.session.timeout.ms": "45000",
            "num.network.threads": "2",
            "num.io.threads": "2",
            "num.recovery.threads.per.data.dir": "1",
            "background.threads": "2",
            "log.retention.hours": "168",
            "log.segment.bytes": str(64 * 1024 * 1024),
        }
        return "".join(f"{k}={v}\n" for k, v in lines.items())

    def _prepare(self) -> None:
        self.config_path.write_text(self._properties())
        self.log4j_path.write_text(_LOG4J2.format(level=self.log_level))
        if (self.data_dir / "meta.properties").exists():
            return  # formatted before: a restart keeps everything
        self.data_dir.mkdir(parents=True, exist_ok=True)
        cluster_id = _cluster_id()
        command = [
            java_binary(),
            "-Xmx256m",
            "-XX:TieredStopAtLevel=1",
            *self._log_options(),
            "-cp",
            classpath(self.jar_set),
            "kafka.tools.StorageTool",
            "format",
            f"--cluster-id={cluster_id}",  # one argument: an id may begin with "-", which argparse takes for an option
            "--config",
            str(self.config_path),
        ]
        done = subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)
        if done.returncode != 0:
            raise ServerError(f"kafka storage format failed:\n{done.stdout}\n{done.stderr}")

    def _log_options(self) -> list[str]:
        return [f"-Dlog4j2.configurationFile=file:{self.log4j_path}", f"-Dkafka.logs.dir={self.base_dir}"]

    def _jvm_options(self) -> list[str]:
        return self._log_options()

    def _main_args(self) -> list[str]:
        return [str(self.config_path)]

    def _healthy(self) -> bool:
        if not port_open(self.port):
            return False
        return _in_thread(_can_create_topic(self.bootstrap))


def _cluster_id() -> str:
    """A Kafka cluster id: 16 random bytes, URL-safe base64 without padding (what ``random-uuid`` prints)."""
    import base64

    return base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")


def _in_thread(coro: object) -> bool:
    # The caller may be inside a running event loop (an async test): run the check on a private loop.
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return bool(pool.submit(asyncio.run, coro).result())  # type: ignore[arg-type]


async def _can_create_topic(bootstrap: str) -> bool:
    from aiokafka.admin import AIOKafkaAdminClient, NewTopic
    from aiokafka.errors import KafkaError

    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=3000)
    try:
        async with asyncio.timeout(5):
            await admin.start()
            if READY_TOPIC not in await admin.list_topics():
                await admin.create_topics([NewTopic(READY_TOPIC, 1, 1)])
            described = await admin.describe_topics([READY_TOPIC])
            partitions = described[0].get("partitions", []) if described else []
            return bool(partitions) and all(p.get("leader", -1) >= 0 for p in partitions)
    except (KafkaError, OSError, TimeoutError):
        return False
    finally:
        try:
            await admin.close()
        except Exception:  # a half-started client: nothing to release
            pass
