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
    raise NotImplementedError(backend)  # kafka-mock / kafka: added by the Kafka adapter work


def build_store(backend: str, request: pytest.FixtureRequest, tmp_path: Path) -> JobStore:
    if backend == "embedded":
        from libs.store.sqlite import SqliteStore

        return SqliteStore(tmp_path / "store.db")
    raise NotImplementedError(backend)  # scylla: added by the Scylla adapter work


def build_coordination(backend: str, request: pytest.FixtureRequest, tmp_path: Path) -> Coordination:
    if backend == "embedded":
        from libs.coordination.sqlite import SqliteCoordination

        return SqliteCoordination(tmp_path / "coordination.db")
    raise NotImplementedError(backend)  # etcd: added by the etcd adapter work


def build_queue(backend: str, request: pytest.FixtureRequest, tmp_path: Path) -> WorkQueue:
    if backend == "embedded":
        from libs.queue.sqlite import SqliteQueue

        return SqliteQueue(tmp_path / "queue.db", max_receives=MAX_RECEIVES)
    raise NotImplementedError(backend)  # sqs: added by the SQS adapter work


def build_blobs(backend: str, request: pytest.FixtureRequest, tmp_path: Path) -> BlobStore:
    if backend == "embedded":
        from libs.blobs.files import FileBlobStore

        return FileBlobStore(tmp_path / "blobs")
    raise NotImplementedError(backend)  # s3: added by the S3 adapter work


def env_or_skip(var: str, what: str) -> str:
    value = os.environ.get(var, "")
    if not value:
        pytest.skip(f"{what}: no server here; set {var} to run against one")
    return value
