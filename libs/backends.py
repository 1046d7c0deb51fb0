"""Pick each role's implementation from its URL (embedded when the URL is empty).

=============  =======================================================  ===========================
role           URL forms                                                implementation
- log: "" | ``sqlite:///path/log.db`` (SqliteLog) | ``kafka://h1:9092,h2:9092/topic`` (KafkaLog)
- store: "" | ``sqlite:///path/store.db`` (SqliteStore) | ``scylla://h1:9042,h2:9042/keyspace`` (ScyllaStore)
- coordination: "" | ``sqlite:///path/coord.db`` (SqliteCoordination) | ``etcd://h1:2379,h2:2379[/prefix]``
  (EtcdCoordination)
- queue: "" | ``sqlite:///path/queue.db`` (SqliteQueue) | ``sqs://name?endpoint=…&region=…`` (SqsQueue)
- blobs: "" | ``file:///path/dir`` (FileBlobStore) | ``s3://bucket?endpoint=…&region=…`` (S3BlobStore)

Production modules are imported only when their URL is used, so the embedded path needs none of their packages.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from libs.blobs.base import BlobStore
from libs.coordination.base import Coordination
from libs.errors import BackendConfigError
from libs.log.base import SubmissionLog
from libs.queue.base import WorkQueue
from libs.retrying import until_up
from libs.settings import Settings
from libs.store.base import JobStore


def _scheme(url: str) -> str:
    return urlsplit(url).scheme if url else ""


def _sqlite_path(url: str, default: Path) -> Path:
    if not url:
        return default
    parts = urlsplit(url)
    return Path(parts.netloc + parts.path) if parts.netloc else Path(parts.path)


def make_log(settings: Settings) -> SubmissionLog:
    url = settings.log_url
    scheme = _scheme(url)
    if scheme in ("", "sqlite"):
        from libs.log.sqlite import SqliteLog

        return SqliteLog(_sqlite_path(url, settings.data_dir / "log.db"), partitions=settings.log_partitions)
    if scheme == "kafka":
        from libs.log.kafka import KafkaLog

        return KafkaLog.from_url(url, settings)
    raise BackendConfigError(f"DSCHED_LOG_URL: unsupported scheme {scheme!r} (use sqlite:// or kafka://)")


def make_store(settings: Settings) -> JobStore:
    url = settings.store_url
    scheme = _scheme(url)
    if scheme in ("", "sqlite"):
        from libs.store.sqlite import SqliteStore

        return SqliteStore(_sqlite_path(url, settings.data_dir / "store.db"))
    if scheme == "scylla":
        from libs.store.scylla import ScyllaStore

        return ScyllaStore.from_url(url, settings)
    raise BackendConfigError(f"DSCHED_STORE_URL: unsupported scheme {scheme!r} (use sqlite:// or scylla://)")


def make_coordination(settings: Settings) -> Coordination:
    url = settings.coordination_url
    scheme = _scheme(url)
    if scheme in ("", "sqlite"):
        from libs.coordination.sqlite import SqliteCoordination

        return SqliteCoordination(_sqlite_path(url, settings.data_dir / "coordination.db"))
    if scheme == "etcd":
        from libs.coordination.etcd import EtcdCoordination

        return EtcdCoordination.from_url(url, settings)
    raise BackendConfigError(f"DSCHED_COORDINATION_URL: unsupported scheme {scheme!r} (use sqlite:// or etcd://)")


def make_queue(settings: Settings) -> WorkQueue:
    url = settings.queue_url
    scheme = _scheme(url)
    if scheme in ("", "sqlite"):
        from libs.queue.sqlite import SqliteQueue

        return SqliteQueue(_sqlite_path(url, settings.data_dir / "queue.db"), max_receives=settings.max_receives)
    if scheme == "sqs":
        from libs.queue.sqs import SqsQueue

        return SqsQueue.from_url(url, settings)
    raise BackendConfigError(f"DSCHED_QUEUE_URL: unsupported scheme {scheme!r} (use sqlite:// or sqs://)")


def make_blobs(settings: Settings) -> BlobStore:
    url = settings.blobs_url
    scheme = _scheme(url)
    if scheme in ("", "file"):
        from libs.blobs.files import FileBlobStore

        return FileBlobStore(_sqlite_path(url, settings.data_dir / "blobs"))
    if scheme == "s3":
        from libs.blobs.s3 import S3BlobStore

        return S3BlobStore.from_url(url, settings)
    raise BackendConfigError(f"DSCHED_BLOBS_URL: unsupported scheme {scheme!r} (use file:// or s3://)")


_FACTORIES: dict[str, Callable[[Settings], SubmissionLog | JobStore | Coordination | WorkQueue | BlobStore]] = {
    "log": make_log,
    "store": make_store,
    "coordination": make_coordination,
    "queue": make_queue,
    "blobs": make_blobs,
}


async def _start(role: str, settings: Settings) -> Any:
    """A fresh instance of ``role``, started; one that fails to start is shut down (the next try starts anew)."""
    impl = _FACTORIES[role](settings)
    try:
        await impl.startup()
    except BaseException:
        with contextlib.suppress(Exception):
            await impl.shutdown()
        raise
    return impl


@dataclass
class Backends:
    """The backends one process uses; roles it does not need stay None."""

    log: SubmissionLog | None = None
    store: JobStore | None = None
    coordination: Coordination | None = None
    queue: WorkQueue | None = None
    blobs: BlobStore | None = None
    _started: list[Any] = field(default_factory=list)

    @classmethod
    @contextlib.asynccontextmanager
    async def open(cls, settings: Settings, roles: set[str]) -> AsyncIterator[Backends]:
        """Build and start the given roles; stops them in reverse order on exit.

        A backend that cannot be reached is tried again for ``settings.startup_retry_s`` (each failure logged as
        ``startup_retry``): a service started during a short outage waits for it instead of exiting. Any failure
        to build or reach a backend is raised as :class:`BackendConfigError` with one line.
        """
        backends = cls()
        try:
            for role in ("log", "store", "coordination", "queue", "blobs"):
                if role not in roles:
                    continue
                try:
                    impl = await until_up(
                        f"{role} backend",
                        functools.partial(_start, role, settings),
                        budget_s=settings.startup_retry_s,
                        fatal=(BackendConfigError,),
                    )
                except BackendConfigError:
                    raise
                except Exception as exc:  # one clear line instead of a driver's traceback
                    url = getattr(settings, f"{role}_url") or "embedded"
                    raise BackendConfigError(f"{role} backend {url!r}: {type(exc).__name__}: {exc}") from exc
                setattr(backends, role, impl)
                backends._started.append(impl)
            if backends.store is not None:
                await backends.store.check_layout(settings.shard_count, settings.bucket_ms)
            yield backends
        finally:
            for impl in reversed(backends._started):
                with contextlib.suppress(Exception):
                    await impl.shutdown()
