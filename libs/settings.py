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
    otlp_endpoint: str = ""  # OTLP/HTTP collector for traces (e.g. http://127.0.0.1:4318); "" = tracing off

    # Backend URLs; "" = embedded (SQLite / local files under data_dir).
    log_url: str = ""
    store_url: str = ""
    coordination_url: str = ""
    queue_url: str = ""
    blobs_url: str = ""

    # `dsched run all`: OS processes in all (app/processes.py). 1 = the five services in one process; 2 (default) =
    # the worker in a child; N >= 3 = ingestion and coordinator in the first, writer and picker in a child, the
    # worker in N - 2 children.
    processes: int = 2

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
    # New submissions are answered 503 while the writers have more than this many log records left to store: from
    # the tenants over their share of the recent ones, and from every tenant over twice this (ingestion/admission.py);
    # 0 = never.
    max_writer_backlog: int = 20_000

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
    # A received run stays hidden this long past the worker's last heartbeat, which extends it every quarter of
    # this while the run is held or running: a run of a dead worker reappears within this (short on purpose).
    visibility_timeout_s: float = 5.0
    max_receives: int = 5  # deliveries before a message goes to the queue's dead-letter store
    # Output kept per run (the rest is discarded and the run says output_capped); beyond the inline part it is
    # spooled to a temp file and stored in the blob store.
    output_cap_bytes: int = 10 * 1024 * 1024
    output_inline_bytes: int = 4096  # larger run outputs go to the blob store
    allow_cmd: bool = False
    allow_private_http: bool = False
    retry_initial_s: float = 1.0  # default retry policy of jobs that do not set one
    retry_max_s: float = 300.0
    # HMAC signing secrets for outgoing HTTP, by "user" or "user/project" (JSON); two keys = rotation.
    signing_secrets: dict[str, list[str]] = Field(default_factory=dict)
    shutdown_grace_s: float = 5.0
    # A service starting while a backend is down retries its start-up this long (logged), then exits.
    startup_retry_s: float = 30.0

    # Authentication and tenants (issue 12; see ingestion/auth.py and README "Authentication").
    auth: str = "dev"  # dev | keys | jwt | keys,jwt
    auth_pepper: str = ""  # key for API-key hashes; "" = <data_dir>/auth.pepper, created on first use
    auth_cache_s: float = 2.0  # API-key cache TTL: a revocation applies on every instance within this
    trusted_user_header: str = ""  # e.g. X-Forwarded-User, honoured only from trusted_proxies
    trusted_role_header: str = ""  # optional role header from the proxy (default role: member)
    trusted_proxies: list[str] = Field(default_factory=list)  # addresses/CIDRs of the authenticating proxy
    metrics_public: bool = True  # /metrics without credentials (Prometheus scrapes); false = admin only
    jwt_jwks_url: str = ""
    jwt_public_key: str = ""  # PEM (or a path to one), instead of a JWKS URL
    jwt_issuer: str = ""
    jwt_audience: str = ""
    jwt_algorithms: list[str] = Field(default_factory=lambda: ["RS256", "ES256"])
    jwt_leeway_s: float = 30.0
    jwt_tenant_claim: str = "tenant"
    jwt_role_claim: str = "role"
    jwt_default_role: str = ""  # role of a token without the role claim ("" = rejected with 403)
    jwt_jwks_ttl_s: float = 300.0
    tenant_submit_rate: float = 0.0  # submits per second per tenant (0 = unlimited), shared via the store
    tenant_submit_burst: int = 0  # burst on top of the rate (0 = max(1, rate))
    tenant_max_active_jobs: int = 0  # 0 = unlimited
    tenant_max_payload_bytes: int = 0  # largest job definition (body, batch item) per tenant; 0 = unlimited
    tenant_max_stored_bytes: int = 0  # total definition bytes of a tenant's active jobs; 0 = unlimited
    tenant_limits: dict[str, dict[str, float]] = Field(default_factory=dict)  # per-tenant overrides (JSON)
    tenant_fair_dispatch: bool = True  # workers serve tenants round-robin when many runs are ready

    @field_validator("shard_count", "bucket_s", "log_partitions", "worker_concurrency", "processes")
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
        # "Says otherwise" = the field was set at all: by an environment variable in any case
        # (dsched_allow_cmd=false counts, as pydantic-settings reads names case-insensitively), a .env or
        # secrets file, or an explicit override. A case-sensitive os.environ lookup missed the lower-case name
        # and turned cmd: on against the operator's word.
        updates: dict[str, Any] = {}
        for name in ("allow_cmd", "allow_private_http"):
            if name not in self.model_fields_set:
                updates[name] = True
        return self.model_copy(update=updates)

    def signing_secrets_for(self, user_id: str, project_id: str) -> list[str] | None:
        return self.signing_secrets.get(f"{user_id}/{project_id}") or self.signing_secrets.get(user_id)

    @property
    def bucket_ms(self) -> int:
        return self.bucket_s * 1000
