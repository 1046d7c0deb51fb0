"""Session-wide fixtures shared by every test package."""

from __future__ import annotations

from tests.helpers.servers import cassandra_server, elasticmq_server, etcd_server, kafka_server, moto_server  # noqa: F401
