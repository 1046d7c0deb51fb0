"""Session fixtures for the real servers of :mod:`libs.servers` (one of each per test session).

Register them in a conftest (``tests/conftest.py`` does) with
``from tests.helpers.servers import etcd_server, moto_server, kafka_server, cassandra_server, elasticmq_server``.
Tests isolate themselves inside a shared server by namespace: a key prefix, queue, bucket, topic or keyspace
of their own. A server that is not installed fails the test with the command that installs it — never a skip:
``make test`` installs every one of them (``make system-deps``).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from typing import TypeVar

import pytest

from dsched.libs.servers.base import ServerProcess, have_jars
from dsched.libs.servers.cassandra import CassandraServer
from dsched.libs.servers.elasticmq import ElasticMQServer
from dsched.libs.servers.etcd import DEFAULT_ETCD_BINARY, ETCD_BINARY_ENV, EtcdServer, etcd_binary
from dsched.libs.servers.kafka import KafkaServer
from dsched.libs.servers.moto import MotoServer, moto_binary

S = TypeVar("S", bound=ServerProcess)


def _serve(server: S) -> Iterator[S]:
    try:
        server.start()
        yield server
    finally:
        server.close()


def _require_jars(server: str) -> None:
    if not have_jars(server):
        pytest.fail(f"{server} jars are missing: run `make system-deps` (Maven + Java 17)", pytrace=False)


@pytest.fixture(scope="session")
def etcd_server() -> Iterator[EtcdServer]:
    """A real etcd for the whole session; tests isolate themselves with a key prefix in the URL."""
    if etcd_binary() is None:
        where = os.environ.get(ETCD_BINARY_ENV) or f"{DEFAULT_ETCD_BINARY} or PATH"
        pytest.fail(f"etcd is not installed (not at {where}): run `make test`, which installs it", pytrace=False)
    yield from _serve(EtcdServer())


@pytest.fixture(scope="session")
def moto_server() -> Iterator[MotoServer]:
    """A real moto server (SQS, S3) for the whole session; tests isolate themselves by queue/bucket name."""
    if moto_binary() is None:
        pytest.fail(f"moto_server not found next to {sys.executable}: run `make test`", pytrace=False)
    yield from _serve(MotoServer())


@pytest.fixture(scope="session")
def kafka_server() -> Iterator[KafkaServer]:
    """Apache Kafka (KRaft, one node) for the whole session; tests use topics and groups of their own."""
    _require_jars("kafka")
    yield from _serve(KafkaServer(partitions=4))


@pytest.fixture(scope="session")
def cassandra_server() -> Iterator[CassandraServer]:
    """Apache Cassandra 5 (the CQL server for the Scylla adapter) for the session; a keyspace per test."""
    _require_jars("cassandra")
    yield from _serve(CassandraServer(unsafe_system=True))


@pytest.fixture(scope="session")
def elasticmq_server() -> Iterator[ElasticMQServer]:
    """ElasticMQ (SQS) for the whole session; tests use queues of their own."""
    _require_jars("elasticmq")
    yield from _serve(ElasticMQServer())
