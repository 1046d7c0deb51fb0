"""Build one implementation of a role for a contract test, by backend id, through the product's factory.

Each backend gets a fresh namespace (file, key prefix, queue, bucket, topic, keyspace) per test, so tests never
see each other's data even when they share one server.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import cast

import pytest

from dsched.app.backends import Backend, Role, make_backend
from dsched.libs.blobs.base import BlobStore
from dsched.libs.coordination.base import Coordination
from dsched.libs.log.base import SubmissionLog
from dsched.libs.queue.base import WorkQueue
from dsched.libs.settings import Settings
from dsched.libs.store.base import JobStore

# Visibility and receive limits the contract tests assume.
MAX_RECEIVES = 3


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


def test_settings(tmp_path: Path, **overrides: object) -> Settings:
    return Settings.from_env(data_dir=tmp_path, max_receives=MAX_RECEIVES, **overrides)


def _url(role: Role, backend: str, request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """The ``DSCHED_<ROLE>_URL`` of backend id ``backend`` in a fresh namespace ("" = the embedded default)."""
    if backend == "embedded":
        return ""
    if backend == "kafka":
        return f"kafka://{kafka_bootstrap(request)}/{unique('dsched-test')}?partitions=4&session_timeout_ms=6000"
    if backend == "scylla":
        keyspace = unique("dsched_test").replace("-", "_")
        return f"scylla://{cql_contact(request)}/{keyspace}?replication=SimpleStrategy:1"
    if backend == "etcd":
        return f"{request.getfixturevalue('etcd_server').url}/{unique('test')}"
    if backend in ("sqs", "s3"):
        moto = request.getfixturevalue("moto_server")
        name = unique("q" if backend == "sqs" else "b")
        return f"{backend}://{name}?endpoint={moto.endpoint}&region={moto.region}"
    if backend == "elasticmq":
        return str(request.getfixturevalue("elasticmq_server").url(unique("q")))
    raise NotImplementedError(backend)


def build(role: Role, backend: str, request: pytest.FixtureRequest, tmp_path: Path) -> Backend:
    """The implementation of ``role`` for backend id ``backend``, built by the product's own factory."""
    settings = test_settings(tmp_path, **{f"{role}_url": _url(role, backend, request, tmp_path)})
    if backend == "scylla":
        _prepare_keyspace(settings, request)
    return make_backend(role, settings)


def _prepare_keyspace(settings: Settings, request: pytest.FixtureRequest) -> None:
    import asyncio
    import concurrent.futures
    from typing import Any

    from dsched.libs.store.migrate import drop_keyspace, migrate

    def in_thread(coro: Any) -> Any:  # the fixture's event loop is running: use a private one
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            return pool.submit(asyncio.run, coro).result()

    in_thread(migrate(settings.store_url, settings))
    if os.environ.get("DSCHED_TEST_SCYLLA"):
        # A shared server outlives the session: clean up. The session's own Cassandra is deleted whole at
        # the end, and a DROP costs ~2 s of schema agreement per test.
        request.addfinalizer(lambda: in_thread(drop_keyspace(settings.store_url, settings)))


def build_log(backend: str, request: pytest.FixtureRequest, tmp_path: Path) -> SubmissionLog:
    return cast(SubmissionLog, build("log", backend, request, tmp_path))


def build_store(backend: str, request: pytest.FixtureRequest, tmp_path: Path) -> JobStore:
    return cast(JobStore, build("store", backend, request, tmp_path))


def build_coordination(backend: str, request: pytest.FixtureRequest, tmp_path: Path) -> Coordination:
    return cast(Coordination, build("coordination", backend, request, tmp_path))


def build_queue(backend: str, request: pytest.FixtureRequest, tmp_path: Path) -> WorkQueue:
    return cast(WorkQueue, build("queue", backend, request, tmp_path))


def build_blobs(backend: str, request: pytest.FixtureRequest, tmp_path: Path) -> BlobStore:
    return cast(BlobStore, build("blobs", backend, request, tmp_path))


def kafka_bootstrap(request: pytest.FixtureRequest) -> str:
    """``host:port`` of the Kafka under test: ``$DSCHED_TEST_KAFKA`` (e.g. the compose stack's), else the
    session's own broker (:func:`tests.helpers.servers.kafka_server`)."""
    external = os.environ.get("DSCHED_TEST_KAFKA")
    if external:
        return external.removeprefix("kafka://").strip("/")
    return str(request.getfixturevalue("kafka_server").bootstrap)


def cql_contact(request: pytest.FixtureRequest) -> str:
    """``host:port`` of the CQL server under test: ``$DSCHED_TEST_SCYLLA`` (a real ScyllaDB), else the
    session's Cassandra (:func:`tests.helpers.servers.cassandra_server`)."""
    external = os.environ.get("DSCHED_TEST_SCYLLA")
    if external:
        return external.removeprefix("scylla://").strip("/")
    return str(request.getfixturevalue("cassandra_server").contact)
