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
import importlib
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, cast, overload
from urllib.parse import urlsplit

from dsched.libs.blobs.base import BlobStore
from dsched.libs.coordination.base import Coordination
from dsched.libs.errors import BackendConfigError
from dsched.libs.log.base import SubmissionLog
from dsched.libs.queue.base import WorkQueue
from dsched.libs.retrying import until_up
from dsched.libs.settings import Settings
from dsched.libs.store.base import JobStore

Role = Literal["log", "store", "coordination", "queue", "blobs"]
Backend = SubmissionLog | JobStore | Coordination | WorkQueue | BlobStore
ROLES: tuple[Role, ...] = ("log", "store", "coordination", "queue", "blobs")


def _embedded_path(url: str, default: Path) -> Path:
    if not url:
        return default
    parts = urlsplit(url)
    return Path(parts.netloc + parts.path) if parts.netloc else Path(parts.path)


def _class(module: str, name: str) -> Any:
    """Production modules are imported only when their URL is used (the embedded path needs none of them)."""
    return getattr(importlib.import_module(module), name)


# (role, URL scheme) -> how to build it. The first scheme of each role is its embedded default (empty URL).
_BUILDERS: dict[tuple[Role, str], Callable[[str, Settings], Any]] = {
    ("log", "sqlite"): lambda url, s: _class("dsched.libs.log.sqlite", "SqliteLog")(
        _embedded_path(url, s.data_dir / "log.db"), partitions=s.log_partitions
    ),
    ("log", "kafka"): lambda url, s: _class("dsched.libs.log.kafka", "KafkaLog").from_url(url, s),
    ("store", "sqlite"): lambda url, s: _class("dsched.libs.store.sqlite", "SqliteStore")(
        _embedded_path(url, s.data_dir / "store.db")
    ),
    ("store", "scylla"): lambda url, s: _class("dsched.libs.store.scylla", "ScyllaStore").from_url(url, s),
    ("coordination", "sqlite"): lambda url, s: _class("dsched.libs.coordination.sqlite", "SqliteCoordination")(
        _embedded_path(url, s.data_dir / "coordination.db")
    ),
    ("coordination", "etcd"): lambda url, s: _class("dsched.libs.coordination.etcd", "EtcdCoordination").from_url(
        url, s
    ),
    ("queue", "sqlite"): lambda url, s: _class("dsched.libs.queue.sqlite", "SqliteQueue")(
        _embedded_path(url, s.data_dir / "queue.db"), max_receives=s.max_receives
    ),
    ("queue", "sqs"): lambda url, s: _class("dsched.libs.queue.sqs", "SqsQueue").from_url(url, s),
    ("blobs", "file"): lambda url, s: _class("dsched.libs.blobs.files", "FileBlobStore")(
        _embedded_path(url, s.data_dir / "blobs")
    ),
    ("blobs", "s3"): lambda url, s: _class("dsched.libs.blobs.s3", "S3BlobStore").from_url(url, s),
}


@overload
def make_backend(role: Literal["log"], settings: Settings) -> SubmissionLog: ...
@overload
def make_backend(role: Literal["store"], settings: Settings) -> JobStore: ...
@overload
def make_backend(role: Literal["coordination"], settings: Settings) -> Coordination: ...
@overload
def make_backend(role: Literal["queue"], settings: Settings) -> WorkQueue: ...
@overload
def make_backend(role: Literal["blobs"], settings: Settings) -> BlobStore: ...
@overload
def make_backend(role: Role, settings: Settings) -> Backend: ...
def make_backend(role: Role, settings: Settings) -> Backend:
    """The implementation of ``role`` that ``DSCHED_<ROLE>_URL`` selects (not started)."""
    url = getattr(settings, f"{role}_url")
    schemes = [scheme for r, scheme in _BUILDERS if r == role]
    scheme = urlsplit(url).scheme if url else schemes[0]
    build = _BUILDERS.get((role, scheme))
    if build is None:
        choices = " or ".join(f"{s}://" for s in schemes)
        raise BackendConfigError(f"DSCHED_{role.upper()}_URL: unsupported scheme {scheme!r} (use {choices})")
    backend: Backend = build(url, settings)
    return backend


async def _start(role: Role, settings: Settings) -> Any:
    """A fresh instance of ``role``, started; one that fails to start is shut down (the next try starts anew)."""
    impl = make_backend(role, settings)
    try:
        await impl.startup()
    except BaseException:
        with contextlib.suppress(Exception):
            await impl.shutdown()
        raise
    return impl


@dataclass
class Backends:
    """The started backends of the roles one process uses. Asking for a role that was not opened raises
    :class:`RuntimeError` (a bug in the caller's role list, never a configuration problem)."""

    _impls: dict[str, Any] = field(default_factory=dict)

    def _role(self, role: Role) -> Any:
        impl = self._impls.get(role)
        if impl is None:
            raise RuntimeError(f"the {role} backend was not opened in this process")
        return impl

    def has(self, role: Role) -> bool:
        return role in self._impls

    @property
    def log(self) -> SubmissionLog:
        return cast(SubmissionLog, self._role("log"))

    @property
    def store(self) -> JobStore:
        return cast(JobStore, self._role("store"))

    @property
    def coordination(self) -> Coordination:
        return cast(Coordination, self._role("coordination"))

    @property
    def queue(self) -> WorkQueue:
        return cast(WorkQueue, self._role("queue"))

    @property
    def blobs(self) -> BlobStore:
        return cast(BlobStore, self._role("blobs"))

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
            for role in ROLES:
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
                backends._impls[role] = impl
            if backends.has("store"):
                await backends.store.check_layout(settings.shard_count, settings.bucket_ms)
            yield backends
        finally:
            for impl in reversed(backends._impls.values()):
                with contextlib.suppress(Exception):
                    await impl.shutdown()
