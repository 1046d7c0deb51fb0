"""One fixture per role, parametrized over every implementation (dramatiq's way).

The test id names the backend: ``test_x[embedded]``, ``test_x[etcd]``, ``test_x[sqs]`` (moto),
``test_x[elasticmq]``, ``test_x[s3]`` (moto), ``test_x[kafka]`` (Apache Kafka 4), ``test_x[scylla]`` (the Scylla
adapter on Cassandra 5, or on a ScyllaDB named by ``DSCHED_TEST_SCYLLA``). Real servers come from the session
fixtures in ``tests/helpers/servers.py`` (:mod:`libs.servers`), started once per session; none is ever skipped.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from dsched.libs.blobs.base import BlobStore
from dsched.libs.coordination.base import Coordination
from dsched.libs.log.base import SubmissionLog
from dsched.libs.queue.base import WorkQueue
from dsched.libs.store.base import JobStore
from tests.helpers import backends

LOG_BACKENDS = ["embedded", "kafka"]
STORE_BACKENDS = ["embedded", "scylla"]
COORDINATION_BACKENDS = ["embedded", "etcd"]
QUEUE_BACKENDS = ["embedded", "sqs", "elasticmq"]
BLOB_BACKENDS = ["embedded", "s3"]


@pytest.fixture(params=LOG_BACKENDS)
async def log(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[SubmissionLog]:
    impl = backends.build_log(request.param, request, tmp_path)
    await impl.startup()
    try:
        yield impl
    finally:
        await impl.shutdown()


@pytest.fixture(params=STORE_BACKENDS)
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[JobStore]:
    impl = backends.build_store(request.param, request, tmp_path)
    await impl.startup()
    try:
        yield impl
    finally:
        await impl.shutdown()


@pytest.fixture(params=COORDINATION_BACKENDS)
async def coordination(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Coordination]:
    impl = backends.build_coordination(request.param, request, tmp_path)
    await impl.startup()
    try:
        yield impl
    finally:
        await impl.shutdown()


@pytest.fixture(params=QUEUE_BACKENDS)
async def queue(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[WorkQueue]:
    impl = backends.build_queue(request.param, request, tmp_path)
    await impl.startup()
    try:
        yield impl
    finally:
        await impl.shutdown()


@pytest.fixture(params=BLOB_BACKENDS)
async def blobs(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[BlobStore]:
    impl = backends.build_blobs(request.param, request, tmp_path)
    await impl.startup()
    try:
        yield impl
    finally:
        await impl.shutdown()
