"""The job store on ScyllaDB (or Apache Cassandra), through the DataStax ``cassandra-driver``.

URL: ``scylla://[user:password@]host1:9042,host2:9042/keyspace?dc=dc1&consistency=LOCAL_QUORUM&replication=…``

- ``dc``: the local datacenter of ``DCAwareRoundRobinPolicy`` (default: the DC of the first node reached);
  requests are routed token-aware to a replica in it.
- ``consistency`` (default ``LOCAL_QUORUM``) for reads and writes; ``serial_consistency`` (default
  ``SERIAL``) for the Paxos phase of the LWTs.
- ``replication``: used by ``dsched db migrate`` when it creates the keyspace: ``SimpleStrategy:1`` (the
  default, for one node) or ``NetworkTopologyStrategy:dc1=3,dc2=3``.

Driver: ``cassandra-driver`` rather than ScyllaDB's fork ``scylla-driver``. Both install the same
``cassandra`` package with the same API; the fork adds shard-aware routing (one connection per Scylla CPU
shard), a throughput optimisation that changes no semantics. ``cassandra-driver`` is the one pinned in the
``prod`` extra, ships wheels with the libev reactor, and also talks to Cassandra; a deployment that wants
shard-awareness installs ``scylla-driver`` in its place without a code change (never both: same package).

The driver is thread-based: its I/O runs on a reactor thread and results arrive through ``ResponseFuture``
callbacks. :func:`bridge` turns one into an asyncio future (``loop.call_soon_threadsafe``); blocking
calls (building the ``Cluster``, which resolves contact points, ``connect``, ``prepare``, ``shutdown``) run
in worker threads. Every statement is prepared once at startup; at most ``MAX_IN_FLIGHT`` requests per
store are in flight, and a batch method sends its rows as concurrent single-partition statements (the
recommended alternative to a multi-partition ``BATCH``). Rows of the same partition (a user's index rows, a
queue bucket's entries) go as one single-partition ``UNLOGGED BATCH`` of up to ``PARTITION_BATCH_ROWS``:
one request and one mutation instead of one per row, applied together.

Schema (``db/migrations``) and the method mapping are in :mod:`libs.store.base`. Specific choices:

- Jobs: ``put_jobs`` writes only ``user_id`` and ``definition`` (JSON); ``update_job_states`` writes only the
  given state columns (the others bound as ``UNSET``, so no tombstones) ``USING TIMESTAMP`` of the update's
  decision time (``JobState.at_us``), so a cell keeps the value decided last whatever the arrival order, and
  reads return ``WRITETIME`` as ``Job.state_at_us``. A batch is reduced to one write per key first (the last
  definition, the state fields merged per decision time, the last run record), since concurrent writes of one
  key would otherwise race. CQL updates are upserts, so a state
  update of an unknown job leaves a row without a definition; reads ignore such rows, which is what
  "ignored" means here.
- ``list_jobs`` pages ``jobs_by_user`` (newest first), reads the jobs, and applies the status and project
  filters client-side, continuing until ``limit + 1`` jobs matched (the extra one decides whether there is a
  next page) or the user's index ends. A filter that matches few of a user's many jobs therefore costs reads
  proportional to the jobs skipped.
- ``due_entries`` returns the partition's clustering order (due time, then job id); within one due
  millisecond the page is re-sorted by priority, which the embedded store does in SQL.
- ``stats`` never scans: ``due`` counts each shard's buckets from its checkpoint (or, with none,
  ``bucket_grace_s`` back) up to "now" with partition-keyed ``COUNT``s, at most ``STATS_MAX_BUCKETS`` per
  shard, so a picker further behind than that is under-counted. Job status counts and ``dead`` are
  estimated from a random token-range sample of ``STATS_SAMPLE`` partitions of ``jobs`` /
  ``dead_letters_by_id``, scaled by the fraction of the token ring the sample covered; partitions are
  spread uniformly over the ring by Murmur3, so the estimate is unbiased, and exact while a table has fewer
  partitions than the sample size. Counter tables were rejected: counter updates are not idempotent, so
  every replay or retry would skew them for good.
"""

from __future__ import annotations

import asyncio
import base64
import random
import re
from collections import Counter
from collections.abc import Container, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final
from urllib.parse import parse_qs, unquote, urlsplit

import orjson
from cassandra import ConsistencyLevel, InvalidRequest
from cassandra.auth import PlainTextAuthProvider
from cassandra.cluster import EXEC_PROFILE_DEFAULT, Cluster, ExecutionProfile
from cassandra.policies import DCAwareRoundRobinPolicy, TokenAwarePolicy
from cassandra.query import UNSET_VALUE, BatchStatement, BatchType, dict_factory

from dsched.libs.apikeys import ApiKey
from dsched.libs.clock import now_ms
from dsched.libs.errors import BackendConfigError
from dsched.libs.models import BucketEntry, DeadLetter, Job, JobState, JobStatus, Run
from dsched.libs.settings import Settings
from dsched.libs.sharding import bucket_for, initial_checkpoint
from dsched.libs.store.base import NO_LOWER_BOUND, InvalidCursor, JobStore, LayoutMismatch, RunClaim

SCHEMA_VERSION: Final = "0002"  # the newest db/migrations version this code needs
MAX_IN_FLIGHT = 64
# Rows of one partition sent as one UNLOGGED BATCH (one request, one mutation) instead of one statement each; small
# enough that a batch of the batched statements' rows (~100-200 bytes) stays under Cassandra's 5 KiB
# batch_size_warn_threshold.
PARTITION_BATCH_ROWS = 20
REQUEST_TIMEOUT_S = 10.0
STATS_SAMPLE = 2000
STATS_MAX_BUCKETS = 60
MIN_TOKEN, MAX_TOKEN = -(2**63), 2**63 - 1  # Murmur3Partitioner
RING = 2**64

_STATE_FIELDS = frozenset({"state", "last_run", "dispatched_through_ms", "state_at_us"})
_STATS_STATUSES = (
    JobStatus.SCHEDULED,
    JobStatus.QUEUED,
    JobStatus.RUNNING,
    JobStatus.SUCCEEDED,
    JobStatus.FAILED,
)
_IDENTIFIER = re.compile(r"^[A-Za-z][A-Za-z0-9_]{0,47}$")
_DC_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")


class ScyllaUrlError(BackendConfigError):
    """A ``scylla://`` URL that cannot be used."""


class SchemaNotMigrated(RuntimeError):
    """The keyspace is missing or behind this code's schema version."""


# -- configuration -------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ScyllaConfig:
    contact_points: tuple[tuple[str, int], ...]
    keyspace: str
    local_dc: str | None = None
    consistency: int = ConsistencyLevel.LOCAL_QUORUM
    serial_consistency: int = ConsistencyLevel.SERIAL
    replication: str = "{'class': 'SimpleStrategy', 'replication_factor': 1}"
    username: str | None = None
    password: str | None = None


def replication_literal(spec: str) -> str:
    """``SimpleStrategy:3`` / ``NetworkTopologyStrategy:dc1=3,dc2=2`` as the CQL replication map."""
    strategy, _, args = spec.partition(":")
    if strategy == "SimpleStrategy":
        if not args.isdigit() or int(args) < 1:
            raise ScyllaUrlError(f"replication {spec!r}: SimpleStrategy needs a factor, e.g. SimpleStrategy:3")
        return f"{{'class': 'SimpleStrategy', 'replication_factor': {int(args)}}}"
    if strategy == "NetworkTopologyStrategy":
        factors: list[str] = []
        for item in args.split(","):
            dc, _, factor = item.partition("=")
            if not _DC_NAME.match(dc) or not factor.isdigit() or int(factor) < 1:
                raise ScyllaUrlError(f"replication {spec!r}: expected NetworkTopologyStrategy:dc1=3,dc2=3")
            factors.append(f"'{dc}': {int(factor)}")
        return f"{{'class': 'NetworkTopologyStrategy', {', '.join(factors)}}}"
    raise ScyllaUrlError(f"replication {spec!r}: use SimpleStrategy:N or NetworkTopologyStrategy:dc=N,…")


def _consistency(name: str, what: str) -> int:
    value = ConsistencyLevel.name_to_value.get(name.upper())
    if value is None:
        raise ScyllaUrlError(f"{what} {name!r}: not a consistency level")
    return int(value)


def parse_url(url: str) -> ScyllaConfig:
    parts = urlsplit(url)
    if parts.scheme != "scylla":
        raise ScyllaUrlError(f"expected scylla://, got {url!r}")
    hosts_part = parts.netloc.rpartition("@")[2]
    points: list[tuple[str, int]] = []
    for item in filter(None, (h.strip() for h in hosts_part.split(","))):
        host, sep, port = item.rpartition(":") if not item.endswith("]") else (item, "", "")
        if not sep:
            host, port = item, "9042"
        if not port.isdigit() or not 0 < int(port) < 65536:
            raise ScyllaUrlError(f"bad port in {item!r}")
        points.append((host.strip("[]"), int(port)))
    if not points:
        raise ScyllaUrlError(f"no hosts in {url!r}")
    keyspace = parts.path.strip("/")
    if not _IDENTIFIER.match(keyspace):
        raise ScyllaUrlError(f"keyspace {keyspace!r}: letters, digits and _ (max 48), starting with a letter")
    query = {k: v[-1] for k, v in parse_qs(parts.query).items()}
    unknown = set(query) - {"dc", "consistency", "serial_consistency", "replication"}
    if unknown:
        raise ScyllaUrlError(f"unknown scylla URL parameter(s): {', '.join(sorted(unknown))}")
    return ScyllaConfig(
        contact_points=tuple(points),
        keyspace=keyspace,
        local_dc=query.get("dc") or None,
        consistency=_consistency(query.get("consistency", "LOCAL_QUORUM"), "consistency"),
        serial_consistency=_consistency(query.get("serial_consistency", "SERIAL"), "serial_consistency"),
        replication=replication_literal(query.get("replication", "SimpleStrategy:1")),
        username=unquote(parts.username) if parts.username else None,
        password=unquote(parts.password) if parts.password else None,
    )


CONNECT_TIMEOUT_S = 15.0


def build_cluster(config: ScyllaConfig) -> Cluster:
    """A driver ``Cluster`` for ``config`` (blocking: resolves the contact points; call from a thread)."""
    profile = ExecutionProfile(
        load_balancing_policy=TokenAwarePolicy(DCAwareRoundRobinPolicy(local_dc=config.local_dc or "")),
        consistency_level=config.consistency,
        serial_consistency_level=config.serial_consistency,
        request_timeout=REQUEST_TIMEOUT_S,
        row_factory=dict_factory,
    )
    auth = PlainTextAuthProvider(username=config.username, password=config.password or "") if config.username else None
    return Cluster(
        contact_points=list(config.contact_points),
        execution_profiles={EXEC_PROFILE_DEFAULT: profile},
        protocol_version=4,  # Scylla's newest; pinning it skips the driver's v5 probe and downgrade warning
        auth_provider=auth,
        # The control connection reads the whole schema when it connects: on a busy node with many keyspaces
        # the driver's 2 s default times out (seen on Cassandra 5 under load) and the start fails.
        connect_timeout=CONNECT_TIMEOUT_S,
        control_connection_timeout=CONNECT_TIMEOUT_S,
    )


# -- asyncio bridge ------------------------------------------------------------------------------------------


def bridge(response_future: Any, loop: asyncio.AbstractEventLoop) -> asyncio.Future[list[Any]]:
    """An asyncio future of every row of a driver ``ResponseFuture`` (all pages; ``[]`` for writes).

    The driver calls back on its reactor thread, once per page; the result is handed to ``loop`` with
    ``call_soon_threadsafe``. Cancelling the asyncio future does not cancel the request (CQL cannot).
    """
    future: asyncio.Future[list[Any]] = loop.create_future()
    rows: list[Any] = []

    def resolve(value: list[Any] | BaseException) -> None:
        if future.done():  # cancelled meanwhile
            return
        if isinstance(value, BaseException):
            future.set_exception(value)
        else:
            future.set_result(value)

    def on_page(page: Any) -> None:
        try:
            if page:
                rows.extend(page)
            if response_future.has_more_pages:
                response_future.start_fetching_next_page()  # calls on_page again
                return
        except BaseException as exc:  # the driver swallows callback errors: hand them over
            loop.call_soon_threadsafe(resolve, exc)
            return
        loop.call_soon_threadsafe(resolve, rows)

    def on_error(exc: BaseException) -> None:
        loop.call_soon_threadsafe(resolve, exc)

    response_future.add_callbacks(on_page, on_error)
    return future


# -- statements ----------------------------------------------------------------------------------------------

#: Idempotent writes whose rows of one partition ``ScyllaStore._write`` sends together (``_each_partition``): how many
#: leading bind parameters are the partition key, and how many the primary key.
GROUPED_BY_PARTITION: Final[dict[str, tuple[int, int]]] = {
    "put_job_by_user": (1, 3),
    "put_entry": (2, 6),
    "delete_entry": (2, 6),
}

#: Partition key columns of every table the store touches (the unit tests check every WHERE clause).
PARTITION_KEYS: Final[dict[str, tuple[str, ...]]] = {
    "schema_migrations": ("version",),
    "cluster_metadata": ("name",),
    "jobs": ("job_id",),
    "jobs_by_user": ("user_id",),
    "job_queue": ("shard_id", "bucket"),
    "picker_checkpoints": ("shard_id",),
    "job_runs": ("job_id",),
    "runs_by_id": ("run_id",),
    "run_claims": ("run_id",),
    "dead_letters": ("user_id",),
    "dead_letters_by_id": ("user_id", "dead_letter_id"),
    "idempotency_keys": ("user_id", "idempotency_key"),
    "api_keys": ("key_id",),
    "rate_limits": ("name",),
    "signing_secrets": ("tenant",),
}

#: Statements that read a bounded token range instead of one partition (the ``stats`` sample).
TOKEN_RANGE_STATEMENTS: Final = frozenset(
    {"sample_jobs", "sample_jobs_wrap", "sample_dead", "sample_dead_wrap", "list_api_keys"}
)

#: Statements whose retry cannot change the outcome (the driver may retry or speculate them).
NON_IDEMPOTENT: Final = frozenset(
    {
        "init_layout",
        "init_checkpoint",
        "advance_checkpoint",
        "claim_run",
        "claim_idempotency_key",
        "init_rate_limit",
        "advance_rate_limit",
    }
)

_ENTRY_COLUMNS = "due_ms, job_id, scheduled_ms, attempt, kind, version, priority"


_TABLE_REF = re.compile(r"\b(FROM|INTO|UPDATE) ([a-z_]+)\b")


def statements(keyspace: str | None = None) -> dict[str, str]:
    """The CQL of every prepared statement, by name; table names qualified with ``keyspace`` when given.

    The store prepares them qualified and never switches the session's keyspace: Cassandra 5 warns about
    every statement prepared under ``USE <keyspace>`` (ambiguous for prepared-statement caching).
    """
    texts = _statements()
    if keyspace is None:
        return texts
    return {name: _TABLE_REF.sub(rf"\1 {keyspace}.\2", cql) for name, cql in texts.items()}


def _statements() -> dict[str, str]:
    return {
        "schema_version": "SELECT version FROM schema_migrations WHERE version = ?",
        "init_layout": (
            "INSERT INTO cluster_metadata (name, shard_count, bucket_ms, created_ms) VALUES (?, ?, ?, ?) IF NOT EXISTS"
        ),
        # Jobs
        "put_job": "INSERT INTO jobs (job_id, user_id, definition) VALUES (?, ?, ?)",
        "put_job_by_user": ("INSERT INTO jobs_by_user (user_id, created_ms, job_id, project_id) VALUES (?, ?, ?, ?)"),
        "update_job_state": (
            "UPDATE jobs USING TIMESTAMP ? SET state = ?, last_run = ?, dispatched_through_ms = ? WHERE job_id = ?"
        ),
        "get_job": (
            "SELECT definition, state, last_run, dispatched_through_ms, WRITETIME(state) AS state_at, "
            "WRITETIME(last_run) AS last_run_at, WRITETIME(dispatched_through_ms) AS dispatched_at "
            "FROM jobs WHERE job_id = ?"
        ),
        "get_job_owner": "SELECT user_id FROM jobs WHERE job_id = ?",  # null on a row with state but no definition
        "list_jobs": "SELECT created_ms, job_id, project_id FROM jobs_by_user WHERE user_id = ? LIMIT ?",
        "list_jobs_after": (
            "SELECT created_ms, job_id, project_id FROM jobs_by_user "
            "WHERE user_id = ? AND (created_ms, job_id) < (?, ?) LIMIT ?"
        ),
        # Queue entries
        "put_entry": (f"INSERT INTO job_queue (shard_id, bucket, {_ENTRY_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)"),
        "due_entries": (
            f"SELECT {_ENTRY_COLUMNS} FROM job_queue "
            "WHERE shard_id = ? AND bucket = ? AND due_ms >= ? AND due_ms <= ? LIMIT ?"
        ),
        "delete_entry": (
            "DELETE FROM job_queue WHERE shard_id = ? AND bucket = ? "
            "AND due_ms = ? AND job_id = ? AND scheduled_ms = ? AND attempt = ?"
        ),
        "count_due": ("SELECT COUNT(*) AS n FROM job_queue WHERE shard_id = ? AND bucket = ? AND due_ms <= ?"),
        # Checkpoints
        "get_checkpoint": "SELECT bucket_ms FROM picker_checkpoints WHERE shard_id = ?",
        "init_checkpoint": ("INSERT INTO picker_checkpoints (shard_id, bucket_ms) VALUES (?, ?) IF NOT EXISTS"),
        "advance_checkpoint": ("UPDATE picker_checkpoints SET bucket_ms = ? WHERE shard_id = ? IF bucket_ms = ?"),
        # Runs
        "put_run": ("INSERT INTO job_runs (job_id, scheduled_ms, attempt, run_id, run) VALUES (?, ?, ?, ?, ?)"),
        "put_run_by_id": "INSERT INTO runs_by_id (run_id, job_id, run) VALUES (?, ?, ?)",
        "get_run": "SELECT run FROM runs_by_id WHERE run_id = ?",
        "list_runs": "SELECT scheduled_ms, attempt, run FROM job_runs WHERE job_id = ? LIMIT ?",
        "list_runs_after": (
            "SELECT scheduled_ms, attempt, run FROM job_runs "
            "WHERE job_id = ? AND (scheduled_ms, attempt) < (?, ?) LIMIT ?"
        ),
        "claim_run": ("INSERT INTO run_claims (run_id, worker_id, claimed_ms) VALUES (?, ?, ?) IF NOT EXISTS"),
        "get_run_claimer": "SELECT worker_id, claimed_ms FROM run_claims WHERE run_id = ?",
        # Dead letters
        "put_dead_letter": ("INSERT INTO dead_letters (user_id, dead_ms, dead_letter_id, letter) VALUES (?, ?, ?, ?)"),
        "put_dead_letter_by_id": ("INSERT INTO dead_letters_by_id (user_id, dead_letter_id, letter) VALUES (?, ?, ?)"),
        "list_dead_letters": ("SELECT dead_ms, dead_letter_id, letter FROM dead_letters WHERE user_id = ? LIMIT ?"),
        "list_dead_letters_after": (
            "SELECT dead_ms, dead_letter_id, letter FROM dead_letters "
            "WHERE user_id = ? AND (dead_ms, dead_letter_id) < (?, ?) LIMIT ?"
        ),
        "get_dead_letter": ("SELECT letter FROM dead_letters_by_id WHERE user_id = ? AND dead_letter_id = ?"),
        # Idempotency keys
        "claim_idempotency_key": (
            "INSERT INTO idempotency_keys (user_id, idempotency_key, job_id) VALUES (?, ?, ?) IF NOT EXISTS USING TTL ?"
        ),
        # Stats samples: bounded token-range reads (see the module docstring)
        "sample_jobs": ("SELECT token(job_id) AS t, definition, state FROM jobs WHERE token(job_id) >= ? LIMIT ?"),
        "sample_jobs_wrap": ("SELECT token(job_id) AS t, definition, state FROM jobs WHERE token(job_id) < ? LIMIT ?"),
        "sample_dead": (
            "SELECT token(user_id, dead_letter_id) AS t FROM dead_letters_by_id "
            "WHERE token(user_id, dead_letter_id) >= ? LIMIT ?"
        ),
        "sample_dead_wrap": (
            "SELECT token(user_id, dead_letter_id) AS t FROM dead_letters_by_id "
            "WHERE token(user_id, dead_letter_id) < ? LIMIT ?"
        ),
        # Tenants (migration 0002): API keys, shared rate limits, usage, signing secrets
        "put_api_key": "INSERT INTO api_keys (key_id, tenant, body, last_used_ms, revoked_ms) VALUES (?, ?, ?, ?, ?)",
        "get_api_key": "SELECT body, last_used_ms, revoked_ms FROM api_keys WHERE key_id = ?",
        "list_api_keys": (
            "SELECT token(key_id) AS t, body, last_used_ms, revoked_ms FROM api_keys WHERE token(key_id) >= ? LIMIT ?"
        ),
        "revoke_api_key": "UPDATE api_keys SET revoked_ms = ? WHERE key_id = ?",
        "touch_api_key": "UPDATE api_keys SET last_used_ms = ? WHERE key_id = ?",
        "get_rate_limit": "SELECT tat_ms FROM rate_limits WHERE name = ?",
        "init_rate_limit": "INSERT INTO rate_limits (name, tat_ms) VALUES (?, ?) IF NOT EXISTS",
        "advance_rate_limit": "UPDATE rate_limits SET tat_ms = ? WHERE name = ? IF tat_ms = ?",
        "count_user_jobs": "SELECT COUNT(*) AS n FROM jobs_by_user WHERE user_id = ?",
        "put_signing_secrets": "INSERT INTO signing_secrets (tenant, secrets) VALUES (?, ?)",
        "get_signing_secrets": "SELECT secrets FROM signing_secrets WHERE tenant = ?",
    }


# -- row codecs ----------------------------------------------------------------------------------------------


def encode_cursor(*key: Any) -> str:
    return base64.urlsafe_b64encode(orjson.dumps(key)).decode()


def decode_cursor(cursor: str, arity: int) -> list[Any]:
    try:
        key = orjson.loads(base64.urlsafe_b64decode(cursor.encode()))
    except (ValueError, orjson.JSONDecodeError) as exc:
        raise InvalidCursor("invalid cursor") from exc
    if not isinstance(key, list) or len(key) != arity:
        raise InvalidCursor("invalid cursor")
    return key


def job_definition(job: Job) -> str:
    """The definition columns' JSON: the job without its runtime state."""
    return job.model_dump_json(exclude=set(_STATE_FIELDS))


def job_from_row(row: dict[str, Any]) -> Job | None:
    """A ``jobs`` row as a Job; None for a row that has state but no definition."""
    if row.get("definition") is None:
        return None
    data = orjson.loads(row["definition"])
    data["state"] = row.get("state")
    data["last_run"] = None if row.get("last_run") is None else orjson.loads(row["last_run"])
    dispatched = row.get("dispatched_through_ms")
    data["dispatched_through_ms"] = -1 if dispatched is None else dispatched
    data["state_at_us"] = max(row.get("state_at") or 0, row.get("last_run_at") or 0, row.get("dispatched_at") or 0)
    return Job.model_validate(data)


def state_params(update: JobState) -> tuple[Any, ...] | None:
    """Bind values of ``update_job_state``: unset fields stay ``UNSET`` (untouched, no tombstone)."""
    if update.state is None and update.last_run is None and update.dispatched_through_ms is None:
        return None
    return (
        update.at_us,
        UNSET_VALUE if update.state is None else update.state.value,
        UNSET_VALUE if update.last_run is None else update.last_run.model_dump_json(),
        UNSET_VALUE if update.dispatched_through_ms is None else update.dispatched_through_ms,
        update.job_id,
    )


def merge_states(updates: Sequence[JobState]) -> list[JobState]:
    """One update per job and decision time: later fields win, as if the updates were applied in order (updates
    decided at different times stay apart; their cell timestamps order them)."""
    merged: dict[tuple[str, int], JobState] = {}
    for update in updates:
        key = (update.job_id, update.at_us)
        before = merged.get(key)
        if before is None:
            merged[key] = update
            continue
        merged[key] = JobState(
            job_id=update.job_id,
            at_us=update.at_us,
            state=update.state if update.state is not None else before.state,
            last_run=update.last_run if update.last_run is not None else before.last_run,
            dispatched_through_ms=(
                update.dispatched_through_ms
                if update.dispatched_through_ms is not None
                else before.dispatched_through_ms
            ),
        )
    return list(merged.values())


def entry_params(entry: BucketEntry) -> tuple[Any, ...]:
    return (*entry.key, entry.kind, entry.version, entry.priority)


def entry_from_row(shard: int, bucket_ms: int, row: dict[str, Any]) -> BucketEntry:
    return BucketEntry(shard=shard, bucket_ms=bucket_ms, **row)


def sample_coverage(
    start: int, first: Sequence[dict[str, Any]], wrapped: Sequence[dict[str, Any]], limit: int
) -> float:
    """The fraction of the token ring read by a sample of ``limit`` rows starting at token ``start``.

    ``first`` holds the rows with token >= start, ``wrapped`` the rows read after wrapping around (token <
    start). Fewer than ``limit`` rows in all means the whole ring was read: 1.0.
    """
    if len(first) + len(wrapped) < limit:
        return 1.0
    if not wrapped:
        return (int(first[-1]["t"]) - start + 1) / RING
    return ((MAX_TOKEN - start + 1) + (int(wrapped[-1]["t"]) - MIN_TOKEN + 1)) / RING


# -- the store -----------------------------------------------------------------------------------------------


class ScyllaStore(JobStore):
    def __init__(self, config: ScyllaConfig, settings: Settings) -> None:
        self.config = config
        self.settings = settings
        self._cluster: Any = None
        self._session: Any = None
        self._prepared: dict[str, Any] = {}
        self._inflight = asyncio.Semaphore(MAX_IN_FLIGHT)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._layout: tuple[int, int] | None = None

    @classmethod
    def from_url(cls, url: str, settings: Settings) -> ScyllaStore:
        return cls(parse_url(url), settings)

    # Lifecycle --------------------------------------------------------------------------------------------
    async def startup(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._cluster, self._session = await asyncio.to_thread(self._connect)
        try:
            await self._check_schema()
            texts = statements(self.config.keyspace)
            names = [name for name in texts if name != "schema_version"]
            prepared = await asyncio.gather(*(asyncio.to_thread(self._session.prepare, texts[n]) for n in names))
            for name, statement in zip(names, prepared, strict=True):
                statement.is_idempotent = name not in NON_IDEMPOTENT
                self._prepared[name] = statement
        except BaseException:
            await self.shutdown()
            raise

    def _connect(self) -> tuple[Any, Any]:
        """Blocking: build the cluster, connect, check the keyspace exists (run in a thread)."""
        cluster = build_cluster(self.config)
        try:
            session = cluster.connect()
            if self.config.keyspace not in cluster.metadata.keyspaces:
                raise SchemaNotMigrated(f"keyspace {self.config.keyspace!r} does not exist: run `dsched db migrate`")
            return cluster, session
        except BaseException:
            cluster.shutdown()
            raise

    async def _check_schema(self) -> None:
        try:
            statement = await asyncio.to_thread(
                self._session.prepare, statements(self.config.keyspace)["schema_version"]
            )
        except InvalidRequest as exc:  # no schema_migrations table
            raise SchemaNotMigrated(
                f"keyspace {self.config.keyspace!r} has no dsched schema: run `dsched db migrate`"
            ) from exc
        statement.is_idempotent = True
        self._prepared["schema_version"] = statement
        if not await self._rows("schema_version", (SCHEMA_VERSION,)):
            raise SchemaNotMigrated(
                f"keyspace {self.config.keyspace!r} lacks schema version {SCHEMA_VERSION}: run `dsched db migrate`"
            )

    async def shutdown(self) -> None:
        cluster, self._cluster, self._session = self._cluster, None, None
        self._prepared = {}
        if cluster is not None:
            await asyncio.to_thread(cluster.shutdown)

    # Execution --------------------------------------------------------------------------------------------
    async def _rows(self, name: str, params: Sequence[Any]) -> list[dict[str, Any]]:
        """Run prepared statement ``name``; every row of the result."""
        return await self._request(self._prepared[name], params)

    async def _each(self, name: str, params: Iterable[Sequence[Any]]) -> list[list[dict[str, Any]]]:
        """Run ``name`` once per parameter tuple, concurrently (bounded by ``MAX_IN_FLIGHT``).

        Every statement is awaited; the first failure is raised after all settled.
        """
        results = await asyncio.gather(*(self._rows(name, p) for p in params), return_exceptions=True)
        rows: list[list[dict[str, Any]]] = []
        for result in results:
            if isinstance(result, BaseException):
                raise result
            rows.append(result)
        return rows

    async def _each_partition(self, name: str, params: Iterable[Sequence[Any]]) -> None:
        """Write statement ``name`` once per parameter tuple, rows of one partition together as single-partition
        ``UNLOGGED BATCH``es (see ``GROUPED_BY_PARTITION``); every request is awaited, the first failure raised
        after all settled. Only for idempotent writes.

        Of several rows with one primary key only the last is written: the statements of a batch share one write
        timestamp, so Cassandra would settle such a tie cell by cell (by value), not by order."""
        partition_width, key_width = GROUPED_BY_PARTITION[name]
        last = {tuple(p[:key_width]): p for p in params}  # dict order: first occurrence, value: last
        groups: dict[tuple[Any, ...], list[Sequence[Any]]] = {}
        for key, p in last.items():
            groups.setdefault(key[:partition_width], []).append(p)
        statement = self._prepared[name]
        requests: list[Any] = []
        for rows in groups.values():
            for start in range(0, len(rows), PARTITION_BATCH_ROWS):
                chunk = rows[start : start + PARTITION_BATCH_ROWS]
                if len(chunk) == 1:
                    requests.append((statement, chunk[0]))
                    continue
                batch = BatchStatement(batch_type=BatchType.UNLOGGED)
                for row in chunk:
                    batch.add(statement, row)
                batch.is_idempotent = True
                requests.append((batch, None))
        results = await asyncio.gather(*(self._request(r, p) for r, p in requests), return_exceptions=True)
        for result in results:
            if isinstance(result, BaseException):
                raise result

    async def _request(self, request: Any, params: Sequence[Any] | None) -> list[dict[str, Any]]:
        """One statement or batch (prepared, bound by ``params``), within ``MAX_IN_FLIGHT``; every row of the
        result."""
        if self._session is None or self._loop is None:
            raise RuntimeError("ScyllaStore is not started")
        async with self._inflight:
            return await bridge(self._session.execute_async(request, params), self._loop)

    async def _write(self, *batches: tuple[str, Iterable[Sequence[Any]]]) -> None:
        """Several statements' rows at once (e.g. a table and its index), all awaited."""
        results = await asyncio.gather(
            *(
                self._each_partition(name, params) if name in GROUPED_BY_PARTITION else self._each(name, params)
                for name, params in batches
            ),
            return_exceptions=True,
        )
        for result in results:
            if isinstance(result, BaseException):
                raise result

    @staticmethod
    def _applied(rows: list[dict[str, Any]]) -> bool:
        return bool(rows and rows[0].get("[applied]"))

    # Layout -----------------------------------------------------------------------------------------------
    async def check_layout(self, shard_count: int, bucket_ms: int) -> None:
        rows = await self._rows("init_layout", ("layout", shard_count, bucket_ms, now_ms()))
        if not self._applied(rows):
            stored = (rows[0].get("shard_count"), rows[0].get("bucket_ms"))
            if stored != (shard_count, bucket_ms):
                raise LayoutMismatch(
                    f"keyspace {self.config.keyspace} was created with shard_count={stored[0]} "
                    f"bucket_ms={stored[1]}; this process has shard_count={shard_count} bucket_ms={bucket_ms}"
                )
        self._layout = (shard_count, bucket_ms)

    # Jobs -------------------------------------------------------------------------------------------------
    async def put_jobs(self, jobs: Sequence[Job]) -> None:
        if not jobs:
            return
        # Concurrent writes of one key would race: keep each job's last definition in the batch (log order).
        jobs = list({j.job_id: j for j in jobs}.values())
        await self._write(
            ("put_job", [(j.job_id, j.user_id, job_definition(j)) for j in jobs]),
            ("put_job_by_user", [(j.user_id, j.created_ms, j.job_id, j.project_id) for j in jobs]),
        )

    async def update_job_states(self, updates: Sequence[JobState]) -> None:
        params = [p for p in map(state_params, merge_states(updates)) if p is not None]
        if params:
            await self._each("update_job_state", params)

    async def get_jobs(self, job_ids: Sequence[str]) -> dict[str, Job]:
        ids = list(dict.fromkeys(job_ids))
        found: dict[str, Job] = {}
        for job_id, rows in zip(ids, await self._each("get_job", [(i,) for i in ids]), strict=True):
            job = job_from_row(rows[0]) if rows else None
            if job is not None:
                found[job_id] = job
        return found

    async def get_job_owners(self, job_ids: Sequence[str]) -> dict[str, str]:
        """One read of ``user_id`` per job: no definition crosses the wire or is decoded."""
        ids = list(dict.fromkeys(job_ids))
        found = zip(ids, await self._each("get_job_owner", [(i,) for i in ids]), strict=True)
        return {job_id: rows[0]["user_id"] for job_id, rows in found if rows and rows[0]["user_id"] is not None}

    async def list_jobs(
        self,
        user_id: str,
        limit: int,
        cursor: str | None = None,
        status: str | None = None,
        project_id: str | None = None,
    ) -> tuple[list[Job], str | None]:
        if limit <= 0:
            return [], cursor
        wanted = JobStatus(status) if status is not None else None
        after = decode_cursor(cursor, 2) if cursor is not None else None
        matched: list[tuple[tuple[int, str], Job]] = []
        chunk = limit + 1
        while len(matched) <= limit:
            if after is None:
                index = await self._rows("list_jobs", (user_id, chunk))
            else:
                index = await self._rows("list_jobs_after", (user_id, after[0], after[1], chunk))
            candidates = [r for r in index if project_id is None or r["project_id"] == project_id]
            jobs = await self.get_jobs([r["job_id"] for r in candidates])
            for row in candidates:
                job = jobs.get(row["job_id"])
                if job is None or job.created_ms != row["created_ms"]:
                    continue  # not yet written, or a stale index row
                if (project_id is not None and job.project_id != project_id) or (
                    wanted is not None and job.status != wanted
                ):
                    continue
                matched.append(((row["created_ms"], row["job_id"]), job))
                if len(matched) > limit:
                    break
            if len(index) < chunk:
                break  # the user's index is exhausted
            after = [index[-1]["created_ms"], index[-1]["job_id"]]
            chunk = min(chunk * 2, 1000)  # filters are skipping rows: read further ahead
        page = [job for _, job in matched[:limit]]
        next_cursor = encode_cursor(*matched[limit - 1][0]) if len(matched) > limit else None
        return page, next_cursor

    # Queue entries ----------------------------------------------------------------------------------------
    async def put_entries(self, entries: Sequence[BucketEntry]) -> None:
        if entries:
            await self._write(("put_entry", [entry_params(e) for e in entries]))

    async def due_entries(
        self, shard: int, bucket_ms: int, until_ms: int, limit: int, *, since_ms: int = NO_LOWER_BOUND
    ) -> list[BucketEntry]:
        if limit <= 0:
            return []
        rows = await self._rows("due_entries", (shard, bucket_ms, since_ms, until_ms, limit))
        return _due_page(shard, bucket_ms, rows)

    async def due_entries_many(
        self,
        partitions: Sequence[tuple[int, int]],
        until_ms: int,
        limit: int,
        *,
        known: Container[tuple[int, int, int, str, int, int]] = (),
        since: Mapping[tuple[int, int], int] | None = None,
    ) -> dict[tuple[int, int], list[BucketEntry]]:
        """One query per partition, all in flight at once."""
        keys = list(dict.fromkeys(partitions))
        if limit <= 0:
            return {key: [] for key in keys}
        bounds = since or {}
        pages = await self._each(
            "due_entries", [(*key, bounds.get(key, NO_LOWER_BOUND), until_ms, limit) for key in keys]
        )
        return {key: _due_page(key[0], key[1], rows, known) for key, rows in zip(keys, pages, strict=True)}

    async def delete_entries(self, entries: Sequence[BucketEntry]) -> None:
        if entries:
            await self._write(("delete_entry", [e.key for e in entries]))

    # Picker checkpoints -----------------------------------------------------------------------------------
    async def get_checkpoint(self, shard: int) -> int | None:
        rows = await self._rows("get_checkpoint", (shard,))
        return int(rows[0]["bucket_ms"]) if rows and rows[0]["bucket_ms"] is not None else None

    async def advance_checkpoint(self, shard: int, expected: int | None, new: int) -> bool:
        if expected is None:
            return self._applied(await self._rows("init_checkpoint", (shard, new)))
        return self._applied(await self._rows("advance_checkpoint", (new, shard, expected)))

    # Runs -------------------------------------------------------------------------------------------------
    async def put_runs(self, runs: Sequence[Run]) -> None:
        if not runs:
            return
        runs = list({r.run_id: r for r in runs}.values())  # the last write of a run in the batch wins
        docs = [(r, r.model_dump_json()) for r in runs]
        await self._write(
            ("put_run", [(r.job_id, r.scheduled_ms, r.attempt, r.run_id, doc) for r, doc in docs]),
            ("put_run_by_id", [(r.run_id, r.job_id, doc) for r, doc in docs]),
        )

    async def get_runs(self, run_ids: Sequence[str]) -> dict[str, Run]:
        ids = list(dict.fromkeys(run_ids))
        results = await self._each("get_run", [(i,) for i in ids])
        return {i: Run.model_validate_json(rows[0]["run"]) for i, rows in zip(ids, results, strict=True) if rows}

    async def list_runs(self, job_id: str, limit: int, cursor: str | None = None) -> tuple[list[Run], str | None]:
        if limit <= 0:
            return [], cursor
        if cursor is None:
            rows = await self._rows("list_runs", (job_id, limit + 1))
        else:
            scheduled_ms, attempt = decode_cursor(cursor, 2)
            rows = await self._rows("list_runs_after", (job_id, scheduled_ms, attempt, limit + 1))
        runs = [Run.model_validate_json(row["run"]) for row in rows[:limit]]
        last = rows[limit - 1] if len(rows) > limit else None
        return runs, (encode_cursor(last["scheduled_ms"], last["attempt"]) if last else None)

    async def claim_runs(self, run_ids: Sequence[str], worker_id: str) -> set[str]:
        ids = list(dict.fromkeys(run_ids))
        now = now_ms()
        results = await self._each("claim_run", [(i, worker_id, now) for i in ids])
        return {i for i, rows in zip(ids, results, strict=True) if self._applied(rows)}

    async def run_claimers(self, run_ids: Sequence[str]) -> dict[str, RunClaim]:
        ids = list(dict.fromkeys(run_ids))
        results = await self._each("get_run_claimer", [(i,) for i in ids])
        return {
            i: RunClaim(rows[0]["worker_id"], rows[0]["claimed_ms"])
            for i, rows in zip(ids, results, strict=True)
            if rows
        }

    # Dead letters -----------------------------------------------------------------------------------------
    async def put_dead_letters(self, letters: Sequence[DeadLetter]) -> None:
        if not letters:
            return
        docs = [(d, d.model_dump_json()) for d in letters]
        await self._write(
            ("put_dead_letter", [(d.user_id, d.dead_ms, d.dead_letter_id, doc) for d, doc in docs]),
            ("put_dead_letter_by_id", [(d.user_id, d.dead_letter_id, doc) for d, doc in docs]),
        )

    async def list_dead_letters(
        self, user_id: str, limit: int, cursor: str | None = None
    ) -> tuple[list[DeadLetter], str | None]:
        if limit <= 0:
            return [], cursor
        if cursor is None:
            rows = await self._rows("list_dead_letters", (user_id, limit + 1))
        else:
            dead_ms, dead_letter_id = decode_cursor(cursor, 2)
            rows = await self._rows("list_dead_letters_after", (user_id, dead_ms, dead_letter_id, limit + 1))
        letters = [DeadLetter.model_validate_json(row["letter"]) for row in rows[:limit]]
        last = rows[limit - 1] if len(rows) > limit else None
        return letters, (encode_cursor(last["dead_ms"], last["dead_letter_id"]) if last else None)

    async def get_dead_letter(self, user_id: str, dead_letter_id: str) -> DeadLetter | None:
        rows = await self._rows("get_dead_letter", (user_id, dead_letter_id))
        return DeadLetter.model_validate_json(rows[0]["letter"]) if rows else None

    # Idempotent submit ------------------------------------------------------------------------------------
    async def claim_idempotency_key(self, user_id: str, key: str, job_id: str, ttl_s: int) -> str:
        rows = await self._rows("claim_idempotency_key", (user_id, key, job_id, max(1, int(ttl_s))))
        if self._applied(rows):
            return job_id
        return str(rows[0]["job_id"])

    # Stats ------------------------------------------------------------------------------------------------
    async def stats(self, now_ms: int) -> dict[str, int]:
        due, (job_rows, job_coverage), (dead_rows, dead_coverage) = await asyncio.gather(
            self._count_due(now_ms),
            self._sample("sample_jobs", "sample_jobs_wrap"),
            self._sample("sample_dead", "sample_dead_wrap"),
        )
        statuses: Counter[JobStatus] = Counter()
        for row in job_rows:
            job = job_from_row(row)
            if job is not None:
                statuses[job.status] += 1
        counts = {s.value: _scale(statuses[s], job_coverage) for s in _STATS_STATUSES}
        counts["due"] = due
        counts["dead"] = _scale(len(dead_rows), dead_coverage)
        return counts

    async def _count_due(self, now_ms: int) -> int:
        shard_count, bucket_ms = self._layout or (self.settings.shard_count, self.settings.bucket_ms)
        grace_ms = int(self.settings.bucket_grace_s * 1000)
        shards = range(shard_count)
        checkpoints = await self._each("get_checkpoint", [(s,) for s in shards])
        last = bucket_for(now_ms, bucket_ms)
        params: list[tuple[int, int, int]] = []
        for shard, rows in zip(shards, checkpoints, strict=True):
            start = rows[0]["bucket_ms"] if rows else initial_checkpoint(now_ms, bucket_ms, grace_ms)
            buckets = range(start, last + 1, bucket_ms)[:STATS_MAX_BUCKETS]
            params += [(shard, bucket, now_ms) for bucket in buckets]
        return sum(int(rows[0]["n"]) for rows in await self._each("count_due", params) if rows)

    async def _sample(self, first: str, wrap: str) -> tuple[list[dict[str, Any]], float]:
        """Up to ``STATS_SAMPLE`` rows from a random token on (wrapping around); the ring fraction read."""
        start = random.randint(MIN_TOKEN, MAX_TOKEN)
        rows = await self._rows(first, (start, STATS_SAMPLE))
        wrapped: list[dict[str, Any]] = []
        if len(rows) < STATS_SAMPLE:
            wrapped = await self._rows(wrap, (start, STATS_SAMPLE - len(rows)))
        return rows + wrapped, sample_coverage(start, rows, wrapped, STATS_SAMPLE)

    # Tenants: API keys, shared rate limits, usage, signing secrets (issue 12) ------------------------------
    @staticmethod
    def _api_key(row: dict[str, Any]) -> ApiKey:
        key = ApiKey.model_validate_json(row["body"])
        key.last_used_ms = row.get("last_used_ms")
        key.revoked_ms = row.get("revoked_ms")
        return key

    async def put_api_key(self, key: ApiKey) -> None:
        body = key.model_dump_json(exclude={"last_used_ms", "revoked_ms"})
        await self._rows(
            "put_api_key",
            (key.key_id, key.tenant, body, key.last_used_ms, key.revoked_ms),
        )

    async def get_api_key(self, key_id: str) -> ApiKey | None:
        rows = await self._rows("get_api_key", (key_id,))
        return self._api_key(rows[0]) if rows else None

    async def list_api_keys(self, tenant: str | None = None) -> list[ApiKey]:
        """A token-range walk of the whole (small) ``api_keys`` table, filtered here; an admin operation."""
        keys: list[ApiKey] = []
        start = MIN_TOKEN
        for _ in range(10_000):  # bounded: 10,000 pages of 500 keys
            rows = await self._rows("list_api_keys", (start, 500))
            keys.extend(self._api_key(r) for r in rows)
            if len(rows) < 500 or rows[-1]["t"] >= MAX_TOKEN:
                break
            start = rows[-1]["t"] + 1
        if tenant is not None:
            keys = [k for k in keys if k.tenant == tenant]
        return sorted(keys, key=lambda k: (-k.created_ms, k.key_id))

    async def revoke_api_key(self, key_id: str, at_ms: int) -> bool:
        current = await self.get_api_key(key_id)
        if current is None:
            return False
        if current.revoked_ms is None or current.revoked_ms > at_ms:
            await self._rows("revoke_api_key", (at_ms, key_id))
        return True

    async def touch_api_key(self, key_id: str, used_ms: int) -> None:
        await self._rows("touch_api_key", (used_ms, key_id))

    async def take_rate_token(self, name: str, interval_ms: int, burst: int, now_ms: int) -> int:
        """GCRA with LWT compare-and-set on ``rate_limits(name)``: a lost race retries with the value the LWT
        returned (at most 20 rounds; under heavier contention the caller is told to wait one interval)."""
        rows = await self._rows("get_rate_limit", (name,))
        stored: int | None = rows[0]["tat_ms"] if rows else None
        for _ in range(20):
            tat = max(stored if stored is not None else now_ms, now_ms)
            new_tat = tat + interval_ms
            allowed_at = new_tat - burst * interval_ms
            if allowed_at > now_ms:
                return allowed_at - now_ms
            if stored is None:
                result = await self._rows("init_rate_limit", (name, new_tat))
            else:
                result = await self._rows("advance_rate_limit", (new_tat, name, stored))
            if self._applied(result):
                return 0
            stored = result[0].get("tat_ms") if result else None
        return interval_ms

    async def tenant_usage(self, user_id: str) -> tuple[int, int]:
        """On Scylla: every job of the tenant still in ``jobs_by_user`` (finished ones included: the store has
        no per-tenant status index), and 0 bytes (not tracked)."""
        rows = await self._rows("count_user_jobs", (user_id,))
        return (int(rows[0]["n"]) if rows else 0), 0

    async def put_signing_secrets(self, tenant: str, secrets: Sequence[str]) -> None:
        await self._rows("put_signing_secrets", (tenant, orjson.dumps(list(secrets)).decode()))

    async def get_signing_secrets(self, tenant: str) -> list[str]:
        rows = await self._rows("get_signing_secrets", (tenant,))
        return [str(s) for s in orjson.loads(rows[0]["secrets"])] if rows and rows[0].get("secrets") else []


def _due_page(
    shard: int,
    bucket_ms: int,
    rows: list[dict[str, Any]],
    known: Container[tuple[int, int, int, str, int, int]] = (),
) -> list[BucketEntry]:
    """A ``due_entries`` page: clustering order, re-sorted by priority within one due millisecond."""
    entries = [
        entry_from_row(shard, bucket_ms, row)
        for row in rows
        if (shard, bucket_ms, row["due_ms"], row["job_id"], row["scheduled_ms"], row["attempt"]) not in known
    ]
    entries.sort(key=lambda e: (e.due_ms, -e.priority, e.job_id, e.scheduled_ms, e.attempt))
    return entries


def _scale(count: int, coverage: float) -> int:
    return round(count / coverage) if coverage > 0 else count


__all__ = [
    "SCHEMA_VERSION",
    "SchemaNotMigrated",
    "ScyllaConfig",
    "ScyllaStore",
    "ScyllaUrlError",
    "bridge",
    "build_cluster",
    "parse_url",
    "statements",
]
