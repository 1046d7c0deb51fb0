"""Apache Cassandra 5.0 as the CQL server for the Scylla store adapter, one node on 127.0.0.1.

Run from the jars of ``deploy/jars/cassandra/pom.xml`` (``make system-deps``) as
``org.apache.cassandra.service.CassandraDaemon`` with a minimal ``cassandra.yaml`` written here (its loader
rejects unknown keys), the module flags of Cassandra's ``conf/jvm17-server.options`` and the jamm agent (without
them Java 17 stops at start-up). Java 17 only: Cassandra 4.1 does not run on it and no Cassandra runs on 24+.

Data, commit log, hints and caches live under ``base_dir``, so a restart (even after SIGKILL) recovers every
acknowledged write from the commit log. ``unsafe_system=True`` (tests) skips fsyncs of system tables.

Ready means ``SELECT release_version FROM system.local`` answers over CQL on ``port``.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

from dsched.libs.servers.base import JavaServer, ServerError, free_port, jars_dir, port_open

# Cassandra's conf/jvm17-server.options (branch cassandra-5.0), the JPMS part.
JVM17_FLAGS = [
    "-Djdk.attach.allowAttachSelf=true",
    "--add-exports", "java.base/jdk.internal.misc=ALL-UNNAMED",
    "--add-exports", "java.management.rmi/com.sun.jmx.remote.internal.rmi=ALL-UNNAMED",
    "--add-exports", "java.rmi/sun.rmi.registry=ALL-UNNAMED",
    "--add-exports", "java.rmi/sun.rmi.server=ALL-UNNAMED",
    "--add-exports", "java.sql/java.sql=ALL-UNNAMED",
    "--add-exports", "java.base/java.lang.ref=ALL-UNNAMED",
    "--add-exports", "jdk.unsupported/sun.misc=ALL-UNNAMED",
    "--add-exports", "jdk.compiler/com.sun.tools.javac.file=ALL-UNNAMED",
    "--add-exports", "jdk.attach/sun.tools.attach=ALL-UNNAMED",
    "--add-opens", "java.base/java.lang.module=ALL-UNNAMED",
    "--add-opens", "java.base/jdk.internal.loader=ALL-UNNAMED",
    "--add-opens", "java.base/jdk.internal.ref=ALL-UNNAMED",
    "--add-opens", "java.base/jdk.internal.reflect=ALL-UNNAMED",
    "--add-opens", "java.base/jdk.internal.math=ALL-UNNAMED",
    "--add-opens", "java.base/jdk.internal.module=ALL-UNNAMED",
    "--add-opens", "java.base/jdk.internal.util.jar=ALL-UNNAMED",
    "--add-opens", "jdk.management/com.sun.management.internal=ALL-UNNAMED",
    "--add-opens", "java.base/sun.nio.ch=ALL-UNNAMED",
    "--add-opens", "java.base/java.io=ALL-UNNAMED",
    "--add-opens", "java.base/java.lang.reflect=ALL-UNNAMED",
    "--add-opens", "jdk.compiler/com.sun.tools.javac=ALL-UNNAMED",
    "--add-opens", "java.base/java.lang=ALL-UNNAMED",
    "--add-opens", "java.base/java.util=ALL-UNNAMED",
    "-Dio.netty.tryReflectionSetAccessible=true",
]  # fmt: skip

_LOGBACK = """\
<configuration scan="false">
  <appender name="out" class="ch.qos.logback.core.ConsoleAppender">
    <encoder><pattern>%-5level [%thread] %date{ISO8601} %F:%L - %msg%n</pattern></encoder>
  </appender>
  <root level="{level}"><appender-ref ref="out"/></root>
</configuration>
"""


class CassandraServer(JavaServer):
    """One Cassandra node. ``contact`` is ``127.0.0.1:PORT``; ``url(keyspace)`` a ``scylla://`` store URL."""

    name = "cassandra"
    jar_set = "cassandra"
    main_class = "org.apache.cassandra.service.CassandraDaemon"
    start_timeout_s = 180.0
    stop_timeout_s = 30.0
    heap_mb = 1024
    probe_interval_s = 0.5

    def __init__(
        self,
        base_dir: Path | None = None,
        *,
        port: int | None = None,
        storage_port: int | None = None,
        heap_mb: int | None = None,
        unsafe_system: bool = False,
        log_level: str = "INFO",
    ) -> None:
        super().__init__(base_dir)
        self.port = port or free_port()
        self.storage_port = storage_port or free_port()
        self.unsafe_system = unsafe_system
        self.log_level = log_level
        if heap_mb is not None:
            self.heap_mb = heap_mb
        self.data_dir = self.base_dir / "data"
        self.config_path = self.base_dir / "cassandra.yaml"
        self.logback_path = self.base_dir / "logback.xml"

    @property
    def host(self) -> str:
        return "127.0.0.1"

    @property
    def contact(self) -> str:
        return f"127.0.0.1:{self.port}"

    def url(self, keyspace: str = "dsched") -> str:
        """A ``scylla://`` store URL for ``keyspace`` on this node (replication factor 1)."""
        return f"scylla://{self.contact}/{keyspace}?replication=SimpleStrategy:1"

    def _yaml(self) -> str:
        d = self.data_dir
        return f"""\
cluster_name: dsched
num_tokens: 1
initial_token: 0
partitioner: org.apache.cassandra.dht.Murmur3Partitioner
endpoint_snitch: SimpleSnitch
listen_address: 127.0.0.1
rpc_address: 127.0.0.1
storage_port: {self.storage_port}
native_transport_port: {self.port}
start_native_transport: true
seed_provider:
  - class_name: org.apache.cassandra.locator.SimpleSeedProvider
    parameters:
      - seeds: "127.0.0.1:{self.storage_port}"
data_file_directories: ["{d / "data"}"]
commitlog_directory: "{d / "commitlog"}"
saved_caches_directory: "{d / "saved_caches"}"
hints_directory: "{d / "hints"}"
cdc_raw_directory: "{d / "cdc_raw"}"
commitlog_sync: periodic
commitlog_sync_period: 10000ms
commitlog_segment_size: 8MiB
auto_snapshot: false
snapshot_before_compaction: false
concurrent_reads: 8
concurrent_writes: 8
concurrent_counter_writes: 4
concurrent_compactors: 1
key_cache_size: 8MiB
# The contract tests create and drop a keyspace per test; a schema change must not wait for a flush.
memtable_heap_space: 128MiB
memtable_offheap_space: 128MiB
"""

    def _prepare(self) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(self._yaml())
        self.logback_path.write_text(_LOGBACK.replace("{level}", self.log_level))

    def _jvm_options(self) -> list[str]:
        jamm = sorted(jars_dir(self.jar_set).glob("jamm-*.jar"))
        if not jamm:
            raise ServerError(f"jamm agent jar not in {jars_dir(self.jar_set)}: run `make system-deps`")
        options = [
            *JVM17_FLAGS,
            f"-javaagent:{jamm[-1]}",
            f"-Dcassandra.config=file://{self.config_path}",
            f"-Dlogback.configurationFile=file://{self.logback_path}",
            f"-Dcassandra.storagedir={self.data_dir}",
            f"-Dcassandra.logdir={self.base_dir}",
            "-Dcassandra-foreground=yes",
            "-Dcassandra.skip_wait_for_gossip_to_settle=0",
            "-Dcassandra.ring_delay_ms=100",
            "-Dcassandra.load_ring_state=true",
            "-XX:+HeapDumpOnOutOfMemoryError",
            f"-XX:HeapDumpPath={self.base_dir}",
            "-XX:MaxDirectMemorySize=256m",
        ]
        if self.unsafe_system:
            options.append("-Dcassandra.unsafesystem=true")
        return options

    def _healthy(self) -> bool:
        if not port_open(self.port):
            return False
        return cql_answers(self.port)


def cql_answers(port: int, host: str = "127.0.0.1") -> bool:
    """True if a CQL query answers on ``host:port`` (the driver connects and reads ``system.local``)."""
    from cassandra.cluster import EXEC_PROFILE_DEFAULT, Cluster, ExecutionProfile
    from cassandra.policies import WhiteListRoundRobinPolicy

    profile = ExecutionProfile(load_balancing_policy=WhiteListRoundRobinPolicy([host]), request_timeout=5)
    cluster = Cluster(
        [host],
        port=port,
        protocol_version=4,
        connect_timeout=3,
        control_connection_timeout=3,
        execution_profiles={EXEC_PROFILE_DEFAULT: profile},
    )
    try:
        session = cluster.connect()
        row = session.execute("SELECT release_version FROM system.local").one()
        return row is not None
    except Exception:  # the driver raises many kinds (NoHostAvailable, OperationTimedOut, …) while warming up
        return False
    finally:
        with contextlib.suppress(Exception):
            cluster.shutdown()
