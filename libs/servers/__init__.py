"""Launchers for the real servers dsched runs on: etcd, moto (S3), Kafka, Cassandra, ElasticMQ, Prometheus.

One class per server, each a :class:`~libs.servers.base.ServerProcess`: it starts on free 127.0.0.1 ports,
waits for real readiness (a query answers), and can ``stop`` (SIGTERM, or SIGKILL with ``kill=True``),
``restart`` (same ports, same data), ``pause``/``resume`` (SIGSTOP/SIGCONT) — with async twins ``astart``,
``astop``, ``arestart``. Used by the test fixtures, the chaos suite, the benchmarks and ``make stack``::

    with KafkaServer() as kafka, CassandraServer() as cassandra, ElasticMQServer() as mq:
        log_url = kafka.url("dsched.submissions")
        store_url = cassandra.url("dsched")
        queue_url = mq.url("dsched-runs")
        cassandra.restart(kill=True)   # a crash: the commit log recovers every acknowledged write

The JVM servers run from jars fetched by ``make system-deps`` (``python -m dsched.libs.servers.jars``) into
``.cache/jars/<server>`` from the poms in ``deploy/jars/``; etcd and Prometheus come from Debian; moto from PyPI.
"""

from __future__ import annotations

from dsched.libs.servers.base import ServerError, ServerProcess, free_port
from dsched.libs.servers.cassandra import CassandraServer
from dsched.libs.servers.elasticmq import ElasticMQServer
from dsched.libs.servers.etcd import EtcdCluster, EtcdServer, etcd_binary
from dsched.libs.servers.kafka import KafkaServer
from dsched.libs.servers.moto import MotoServer, moto_binary

__all__ = [
    "CassandraServer",
    "ElasticMQServer",
    "EtcdCluster",
    "EtcdServer",
    "KafkaServer",
    "MotoServer",
    "ServerError",
    "ServerProcess",
    "etcd_binary",
    "free_port",
    "moto_binary",
]
