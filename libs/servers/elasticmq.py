"""ElasticMQ (an SQS-compatible server) on 127.0.0.1, with queues and messages kept on disk.

Run from the jars of ``deploy/jars/elasticmq/pom.xml`` (``make system-deps``), main class
``org.elasticmq.server.Main``, configured by a HOCON file written here: the SQS endpoint bound to 127.0.0.1
only (ElasticMQ binds 0.0.0.0 by default), the stats endpoint off, region ``us-east-1``, queue definitions
persisted to ``queues.conf`` (``queues-storage``) and messages to an H2 database (``messages-storage``) — so a
restart, even after SIGKILL, keeps every queue and every message not yet deleted. ≥ 1.4 speaks the SQS JSON
protocol that current botocore uses.

Ready means a ``CreateQueue`` of a probe queue answers ``200`` on the SQS endpoint.
"""

from __future__ import annotations

from pathlib import Path

from dsched.libs.servers.base import JavaServer, free_port, http_ok

READY_QUEUE = "dsched-ready"
REGION = "us-east-1"


class ElasticMQServer(JavaServer):
    """One ElasticMQ node. ``endpoint`` is ``http://127.0.0.1:PORT``; ``url(queue)`` a ``sqs://`` queue URL."""

    name = "elasticmq"
    jar_set = "elasticmq"
    main_class = "org.elasticmq.server.Main"
    start_timeout_s = 60.0
    heap_mb = 256
    probe_interval_s = 0.1

    def __init__(self, base_dir: Path | None = None, *, port: int | None = None, heap_mb: int | None = None) -> None:
        super().__init__(base_dir)
        self.port = port or free_port()
        if heap_mb is not None:
            self.heap_mb = heap_mb
        self.data_dir = self.base_dir / "data"
        self.config_path = self.base_dir / "elasticmq.conf"

    @property
    def host(self) -> str:
        return "127.0.0.1"

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def region(self) -> str:
        return REGION

    def url(self, queue: str = "dsched-runs") -> str:
        """A ``sqs://`` work-queue URL for ``queue`` on this server."""
        return f"sqs://{queue}?endpoint={self.endpoint}&region={REGION}"

    def _config(self) -> str:
        return f"""\
include classpath("application.conf")
node-address {{
  protocol = http
  host = "127.0.0.1"
  port = {self.port}
  context-path = ""
}}
rest-sqs {{
  enabled = true
  bind-port = {self.port}
  bind-hostname = "127.0.0.1"
  sqs-limits = strict
}}
rest-stats {{
  enabled = false
}}
generate-node-address = false
aws {{
  region = "{REGION}"
  accountId = "000000000000"
}}
queues-storage {{
  enabled = true
  path = "{self.data_dir / "queues.conf"}"
}}
messages-storage {{
  enabled = true
  driver-class = "org.h2.Driver"
  uri = "jdbc:h2:{self.data_dir / "messages"};WRITE_DELAY=0"
  username = ""
  password = ""
  prune-data-on-init = false
}}
"""

    def _prepare(self) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(self._config())

    def _jvm_options(self) -> list[str]:
        return [f"-Dconfig.file={self.config_path}"]

    def _healthy(self) -> bool:
        return http_ok(f"{self.endpoint}/?Action=CreateQueue&QueueName={READY_QUEUE}") is not None
