"""Configuration: one settings object, read from ``DSCHED_*`` environment variables.

Every backend role is selected by its own URL; an empty URL means the embedded backend under ``data_dir``,
so roles mix freely (e.g. etcd coordination with an embedded store).
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Any

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

SERVICES = ("ingestion", "writer", "coordinator", "picker", "worker")


class Settings(BaseSettings):
    """All knobs of every service. Field ``foo`` is read from ``DSCHED_FOO``."""

    model_config = SettingsConfigDict(env_prefix="DSCHED_", extra="ignore")

    # HTTP API (ingestion) and per-process metrics/health endpoint.
    host: str = "127.0.0.1"
    port: int = 8080
    metrics_port: int = 0  # services other than ingestion serve /metrics and /health here; 0 = off
    data_dir: Path = Path("./.dsched")
    log_level: str = "INFO"

    # Backend URLs; "" = embedded (SQLite / local files under data_dir).
    log_url: str = ""
    store_url: str = ""
    coordination_url: str = ""
    queue_url: str = ""
    blobs_url: str = ""

    # Identity of this process in the cluster (pickers, workers, coordinators).
    node_id: str = Field(default_factory=lambda: f"{socket.gethostname()}-{os.getpid()}")

    # Sharded time buckets. Fixed at creation: the store refuses to start with different values.
    shard_count: int = 16
    bucket_s: int = 60
    # How far behind "now" a picker keeps rescanning before it moves its checkpoint past a bucket.
    bucket_grace_s: float = 10.0

    # Ingestion.
    max_body_bytes: int = 1024 * 1024
    payload_offload_bytes: int = 1024
    log_partitions: int = 4

    # Writer.
    writer_batch: int = 500

    # Coordination.
    lease_ttl_s: float = 5.0

    # Picker.
    picker_tick_s: float = 0.1
    picker_lookahead_s: float = 1.0
    picker_batch: int = 2000
    # Runs go to the queue this early; the worker holds each until its due time, so the queue hop and the
    # receive are off the fire-lag path. A pause or delete applies to runs due later than this.
    dispatch_ahead_ms: int = 100

    # Worker.
    worker_concurrency: int = 64
    visibility_timeout_s: float = 30.0
    max_receives: int = 5  # deliveries before a message goes to the queue's dead-letter store
    output_cap_bytes: int = 64 * 1024
    output_inline_bytes: int = 4096  # larger run outputs go to the blob store
    allow_cmd: bool = False
    allow_private_http: bool = False
    retry_initial_s: float = 1.0  # default retry policy of jobs that do not set one
    retry_max_s: float = 300.0
    # HMAC signing secrets for outgoing HTTP, by "user" or "user/project" (JSON); two keys = rotation.
    signing_secrets: dict[str, list[str]] = Field(default_factory=dict)
    shutdown_grace_s: float = 5.0

    @field_validator("shard_count", "bucket_s", "log_partitions", "worker_concurrency")
    @classmethod
    def _positive(cls, value: int) -> int:
        if value <= 0:
            raise ValueError("must be > 0")
        return value

    @classmethod
    def from_env(cls, **overrides: Any) -> Settings:
        """Read the environment; ``overrides`` win over it (used by tests and the CLI)."""
        return cls(**overrides)

    def with_dev_defaults(self) -> Settings:
        """What ``dsched run all`` uses: ``cmd:`` and loopback HTTP on unless the environment says otherwise."""
        updates: dict[str, Any] = {}
        if "DSCHED_ALLOW_CMD" not in os.environ:
            updates["allow_cmd"] = True
        if "DSCHED_ALLOW_PRIVATE_HTTP" not in os.environ:
            updates["allow_private_http"] = True
        return self.model_copy(update=updates)

    def signing_secrets_for(self, user_id: str, project_id: str) -> list[str] | None:
        return self.signing_secrets.get(f"{user_id}/{project_id}") or self.signing_secrets.get(user_id)

    @property
    def bucket_ms(self) -> int:
        return self.bucket_s * 1000
