"""Build one implementation of a role for a contract test, by backend id.

Each backend gets a fresh namespace (file, key prefix, queue, bucket, topic, keyspace) per test, so tests never
see each other's data even when they share one server.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import pytest

from libs.blobs.base import BlobStore
from libs.coordination.base import Coordination
from libs.log.base import SubmissionLog
from libs.queue.base import WorkQueue
from libs.settings import Settings
from libs.store.base import JobStore

# Visibility and receive limits the contract tests assume.
MAX_RECEIVES = 3


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


def test_settings(tmp_path: Path, **overrides: object) -> Settings:
    return Settings.from_env(data_dir=tmp_path, max_receives=MAX_RECEIVES, **overrides)


def build_log(backend: str, request: pytest.FixtureRequest, tmp_path: Path) -> SubmissionLog:
    if backend == "embedded":
        from libs.log.sqlite import SqliteLog

        return SqliteLog(tmp_path / "log.db", partitions=4)
    if backend == "kafka":
        from libs.log.kafka import KafkaLog

        servers = kafka_bootstrap(request)
        query = "partitions=4&session_timeout_ms=6000"
        settings = test_settings(tmp_path, log_url=f"kafka://{servers}/{unique('dsched-test')}?{query}")
        return KafkaLog.from_url(settings.log_url, settings)
    raise NotImplementedError(backend)


def build_store(backend: str, request: pytest.FixtureRequest, tmp_path: Path) -> JobStore:
    if backend == "embedded":
        from libs.store.sqlite import SqliteStore

        return SqliteStore(tmp_path / "store.db")
    if backend == "scylla":
        import asyncio
        import concurrent.futures
        from typing import Any

        from libs.store.migrate import drop_keyspace, migrate
        from libs.store.scylla import ScyllaStore

        hosts = cql_contact(request)
        keyspace = unique("dsched_test").replace("-", "_")
        url = f"scylla://{hosts}/{keyspace}?replication=SimpleStrategy:1"
        settings = test_settings(tmp_path, store_url=url)

        def in_thread(coro: Any) -> Any:  # the fixture's event loop is running: use a private one
            with concurrent.futures.ThreadPoolExecutor(1) as pool:
                return pool.submit(asyncio.run, coro).result()

        in_thread(migrate(settings.store_url, settings))
        if os.environ.get("DSCHED_TEST_SCYLLA"):
            # A shared server outlives the session: clean up. The session's own Cassandra is deleted whole at
            # the end, and a DROP costs ~2 s of schema agreement per test.
            request.addfinalizer(lambda: in_thread(drop_keyspace(settings.store_url, settings)))
        return ScyllaStore.from_url(settings.store_url, settings)
    raise NotImplementedError(backend)


def build_coordination(backend: str, request: pytest.FixtureRequest, tmp_path: Path) -> Coordination:
    if backend == "embedded":
        from libs.coordination.sqlite import SqliteCoordination

        return SqliteCoordination(tmp_path / "coordination.db")
    if backend == "etcd":
        from libs.coordination.etcd import EtcdCoordination

        etcd = request.getfixturevalue("etcd_server")
        settings = test_settings(tmp_path, coordination_url=f"{etcd.url}/{unique('test')}")
        return EtcdCoordination.from_url(settings.coordination_url, settings)
    raise NotImplementedError(backend)


def build_queue(backend: str, request: pytest.FixtureRequest, tmp_path: Path) -> WorkQueue:
    if backend == "embedded":
        from libs.queue.sqlite import SqliteQueue

        return SqliteQueue(tmp_path / "queue.db", max_receives=MAX_RECEIVES)
    if backend == "sqs":
        from libs.queue.sqs import SqsQueue

        moto = request.getfixturevalue("moto_server")
        url = f"sqs://{unique('q')}?endpoint={moto.endpoint}&region={moto.region}"
        settings = test_settings(tmp_path, queue_url=url)
        return SqsQueue.from_url(settings.queue_url, settings)
    if backend == "elasticmq":
        from libs.queue.sqs import SqsQueue

        mq = request.getfixturevalue("elasticmq_server")
        settings = test_settings(tmp_path, queue_url=mq.url(unique("q")))
        return SqsQueue.from_url(settings.queue_url, settings)
    raise NotImplementedError(backend)


def build_blobs(backend: str, request: pytest.FixtureRequest, tmp_path: Path) -> BlobStore:
    if backend == "embedded":
        from libs.blobs.files import FileBlobStore

        return FileBlobStore(tmp_path / "blobs")
    if backend == "s3":
        from libs.blobs.s3 import S3BlobStore

        moto = request.getfixturevalue("moto_server")
        url = f"s3://{unique('b')}?endpoint={moto.endpoint}&region={moto.region}"
        settings = test_settings(tmp_path, blobs_url=url)
        return S3BlobStore.from_url(settings.blobs_url, settings)
    raise NotImplementedError(backend)


def kafka_bootstrap(request: pytest.FixtureRequest) -> str:
    """``host:port`` of the Kafka under test: ``$DSCHED_TEST_KAFKA`` (e.g. the compose stack's), else the
    session's own broker (:func:`tests.servers.kafka_server`)."""
    external = os.environ.get("DSCHED_TEST_KAFKA")
    if external:
        return external.removeprefix("kafka://").strip("/")
    return str(request.getfixturevalue("kafka_server").bootstrap)


def cql_contact(request: pytest.FixtureRequest) -> str:
    """``host:port`` of the CQL server under test: ``$DSCHED_TEST_SCYLLA`` (a real ScyllaDB), else the
    session's Cassandra (:func:`tests.servers.cassandra_server`)."""
    external = os.environ.get("DSCHED_TEST_SCYLLA")
    if external:
        return external.removeprefix("scylla://").strip("/")
    return str(request.getfixturevalue("cassandra_server").contact)
