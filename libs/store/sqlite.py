"""Embedded job store: the CQL tables of :mod:`libs.store.base` on one SQLite file.

Tables mirror the Scylla ones: ``jobs`` (definition JSON + separate state columns, with an index that plays
``jobs_by_user``), ``job_queue`` (primary key = the entry's CQL key), ``picker_checkpoints``, ``runs`` (by
run_id, indexed by job newest first), ``run_claims``, ``dead_letters``, ``idempotency_keys`` and ``meta`` (the
layout). Every write method is one transaction whose rows go through ``executemany``.

Writes use a dedicated connection with ``synchronous=FULL``: the writer commits log offsets right after a
store write, so the store must be at least as durable as the log, or a power cut could lose an accepted job.
Reads use a second connection, so a picker's scan never waits behind a large write batch (WAL readers never
block).
"""

from __future__ import annotations

import base64
from collections.abc import Container, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import orjson

from dsched.libs import clock
from dsched.libs.apikeys import ApiKey
from dsched.libs.models import ACCEPTED_VERSION, BucketEntry, DeadLetter, Job, JobState, JobStatus, Run
from dsched.libs.sqlite import Connection, SqliteDB
from dsched.libs.store.base import NO_LOWER_BOUND, InvalidCursor, JobStore, LayoutMismatch, RunClaim

T = TypeVar("T")

_STATE_FIELDS = frozenset({"state", "last_run", "dispatched_through_ms", "state_at_us"})
_CHUNK = 500  # ids per IN (...) query: well under SQLite's bound-variable limit

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS jobs (
    job_id TEXT PRIMARY KEY,
    user_id TEXT NOT NULL,
    project_id TEXT NOT NULL,
    created_ms INTEGER NOT NULL,
    paused INTEGER NOT NULL,
    deleted INTEGER NOT NULL,
    definition BLOB NOT NULL,
    accepted INTEGER NOT NULL DEFAULT 0
) WITHOUT ROWID;
-- Runtime state apart from the (large) definition: a state write rewrites a small row, not the job.
CREATE TABLE IF NOT EXISTS job_states (
    job_id TEXT PRIMARY KEY,
    state TEXT,
    last_run BLOB,
    dispatched_through_ms INTEGER,
    -- Each column's decision time (JobState.at_us), as Scylla's cell timestamps: the latest decision wins.
    state_at INTEGER,
    last_run_at INTEGER,
    dispatched_at INTEGER
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS jobs_by_user ON jobs (user_id, created_ms DESC, job_id DESC);
CREATE TABLE IF NOT EXISTS job_queue (
    shard INTEGER NOT NULL,
    bucket_ms INTEGER NOT NULL,
    due_ms INTEGER NOT NULL,
    job_id TEXT NOT NULL,
    scheduled_ms INTEGER NOT NULL,
    attempt INTEGER NOT NULL,
    kind TEXT NOT NULL,
    version INTEGER NOT NULL,
    priority INTEGER NOT NULL,
    PRIMARY KEY (shard, bucket_ms, due_ms, job_id, scheduled_ms, attempt)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS picker_checkpoints (shard INTEGER PRIMARY KEY, bucket_ms INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS runs (
    run_id TEXT PRIMARY KEY,
    job_id TEXT NOT NULL,
    scheduled_ms INTEGER NOT NULL,
    attempt INTEGER NOT NULL,
    body BLOB NOT NULL
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS runs_by_job ON runs (job_id, scheduled_ms DESC, attempt DESC, run_id DESC);
CREATE TABLE IF NOT EXISTS run_claims (
    run_id TEXT PRIMARY KEY,
    worker_id TEXT NOT NULL,
    claimed_ms INTEGER NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS dead_letters (
    user_id TEXT NOT NULL,
    dead_letter_id TEXT NOT NULL,
    dead_ms INTEGER NOT NULL,
    body BLOB NOT NULL,
    PRIMARY KEY (user_id, dead_letter_id)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS dead_letters_by_time ON dead_letters (user_id, dead_ms DESC, dead_letter_id DESC);
CREATE TABLE IF NOT EXISTS idempotency_keys (
    user_id TEXT NOT NULL,
    key TEXT NOT NULL,
    job_id TEXT NOT NULL,
    expires_ms INTEGER NOT NULL,
    PRIMARY KEY (user_id, key)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS idempotency_keys_by_expiry ON idempotency_keys (expires_ms);
CREATE TABLE IF NOT EXISTS api_keys (
    key_id TEXT PRIMARY KEY,
    tenant TEXT NOT NULL,
    created_ms INTEGER NOT NULL,
    body BLOB NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS rate_limits (name TEXT PRIMARY KEY, tat_ms INTEGER NOT NULL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS signing_secrets (tenant TEXT PRIMARY KEY, body BLOB NOT NULL) WITHOUT ROWID
"""

# Job.status as SQL (libs/job_states.status_of): deleted, then paused, then submitted (ingestion's accepted row,
# not stored by the writer yet), then the runtime state (scheduled when unset).
_STATUS_SQL = (
    "CASE WHEN j.deleted THEN 'deleted' WHEN j.paused THEN 'paused' "
    "WHEN s.state IS NULL AND j.accepted THEN 'submitted' ELSE COALESCE(s.state, 'scheduled') END"
)
_JOB_COLUMNS = (
    "j.definition, s.state, s.last_run, COALESCE(s.dispatched_through_ms, -1), "
    "MAX(COALESCE(s.state_at, 0), COALESCE(s.last_run_at, 0), COALESCE(s.dispatched_at, 0))"
)
_JOBS_FROM = "jobs AS j LEFT JOIN job_states AS s ON s.job_id = j.job_id"


def _chunks(items: Sequence[T]) -> Iterator[Sequence[T]]:
    for start in range(0, len(items), _CHUNK):
        yield items[start : start + _CHUNK]


def _encode_cursor(*key: Any) -> str:
    return base64.urlsafe_b64encode(orjson.dumps(key)).decode()


def _decode_cursor(cursor: str, arity: int) -> list[Any]:
    try:
        key = orjson.loads(base64.urlsafe_b64decode(cursor.encode()))
    except (ValueError, orjson.JSONDecodeError) as exc:
        raise InvalidCursor("invalid cursor") from exc
    if not isinstance(key, list) or len(key) != arity:
        raise InvalidCursor("invalid cursor")
    return key


def _add_missing_columns(conn: Connection) -> None:
    """Bring a store file created by an earlier release up to this schema (columns added since)."""
    columns = {row[1] for row in conn.execute("PRAGMA table_info(jobs)")}
    if "accepted" not in columns:
        conn.execute("ALTER TABLE jobs ADD COLUMN accepted INTEGER NOT NULL DEFAULT 0")
    state_columns = {row[1] for row in conn.execute("PRAGMA table_info(job_states)")}
    for name in ("state_at", "last_run_at", "dispatched_at"):
        if name not in state_columns:
            conn.execute(f"ALTER TABLE job_states ADD COLUMN {name} INTEGER")


_PUT_JOB = (
    "INSERT INTO jobs (job_id, user_id, project_id, created_ms, paused, deleted, definition, accepted) "
    "VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (job_id) DO UPDATE SET "
    "user_id = excluded.user_id, project_id = excluded.project_id, "
    "created_ms = excluded.created_ms, paused = excluded.paused, deleted = excluded.deleted, "
    "definition = excluded.definition, accepted = excluded.accepted"
)
_PUT_ENTRY = (
    "INSERT OR REPLACE INTO job_queue "
    "(shard, bucket_ms, due_ms, job_id, scheduled_ms, attempt, kind, version, priority) "
    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)"
)


def _latest(column: str, at: str) -> str:
    """``column = <the given value if decided at least as late as the stored one, else the stored one>``."""
    newer = f"excluded.{column} IS NOT NULL AND excluded.{at} >= COALESCE({at}, 0)"
    return (
        f"{column} = CASE WHEN {newer} THEN excluded.{column} ELSE {column} END, "
        f"{at} = CASE WHEN {newer} THEN excluded.{at} ELSE {at} END"
    )


# ?1-?3 the state fields (NULL = not set by this write), ?4 the job id, ?5 the decision time. SQLite evaluates every
# SET expression on the row as it was, so each column's guard compares with its own stored decision time. An unknown
# job's row is written like Scylla's and never read: every read starts from ``jobs`` (a lookup of the job here
# cost a quarter of the write).
_UPDATE_STATE = (
    "INSERT INTO job_states (job_id, state, last_run, dispatched_through_ms, state_at, last_run_at, dispatched_at) "
    "VALUES (?4, ?1, ?2, ?3, IIF(?1 IS NULL, NULL, ?5), IIF(?2 IS NULL, NULL, ?5), IIF(?3 IS NULL, NULL, ?5)) "
    "ON CONFLICT (job_id) DO UPDATE SET "
    + ", ".join(
        _latest(column, at)
        for column, at in (
            ("state", "state_at"),
            ("last_run", "last_run_at"),
            ("dispatched_through_ms", "dispatched_at"),
        )
    )
)


def _job_row(job: Job) -> tuple[Any, ...]:
    definition = job.model_dump_json(exclude=set(_STATE_FIELDS)).encode()
    accepted = job.version == ACCEPTED_VERSION
    return (job.job_id, job.user_id, job.project_id, job.created_ms, job.paused, job.deleted, definition, accepted)


def _job_from_row(
    definition: bytes, state: str | None, last_run: bytes | None, dispatched: int, state_at_us: int
) -> Job:
    data = orjson.loads(definition)
    data["state"] = state
    data["last_run"] = None if last_run is None else orjson.loads(last_run)
    data["dispatched_through_ms"] = dispatched
    data["state_at_us"] = state_at_us
    return Job.model_validate(data)


def _entry_row(entry: BucketEntry) -> tuple[Any, ...]:
    return (*entry.key, entry.kind, entry.version, entry.priority)


class SqliteStore(JobStore):
    def __init__(self, path: Path) -> None:
        self.path = path
        self._writer = SqliteDB(path, synchronous="FULL", schema=_SCHEMA)
        self._reader = SqliteDB(path, synchronous="FULL", checkpoint=False)

    async def startup(self) -> None:
        await self._writer.open()  # creates the schema before the reader looks at it
        await self._writer.write(_add_missing_columns)
        await self._reader.open()

    async def shutdown(self) -> None:
        await self._reader.close()
        await self._writer.close()

    async def check_layout(self, shard_count: int, bucket_ms: int) -> None:
        wanted = {"shard_count": shard_count, "bucket_ms": bucket_ms}

        def check(conn: Connection) -> None:
            stored = dict(conn.execute("SELECT name, value FROM meta WHERE name IN ('shard_count', 'bucket_ms')"))
            if not stored:
                conn.executemany("INSERT INTO meta (name, value) VALUES (?, ?)", list(wanted.items()))
                return
            if stored != wanted:
                raise LayoutMismatch(
                    f"store {self.path} was created with shard_count={stored.get('shard_count')} "
                    f"bucket_ms={stored.get('bucket_ms')}; this process has shard_count={shard_count} "
                    f"bucket_ms={bucket_ms}"
                )

        await self._writer.write(check)

    # Jobs -------------------------------------------------------------------------------------------------
    async def put_jobs(self, jobs: Sequence[Job]) -> None:
        if not jobs:
            return
        rows = [_job_row(job) for job in jobs]
        await self._writer.write(lambda conn: conn.executemany(_PUT_JOB, rows))

    async def update_job_states(self, updates: Sequence[JobState]) -> None:
        rows = [
            (
                None if u.state is None else u.state.value,
                None if u.last_run is None else u.last_run.model_dump_json().encode(),
                u.dispatched_through_ms,
                u.job_id,
                u.at_us,
            )
            for u in updates
            if u.state is not None or u.last_run is not None or u.dispatched_through_ms is not None
        ]
        if rows:
            await self._writer.write(lambda conn: conn.executemany(_UPDATE_STATE, rows))

    async def get_jobs(self, job_ids: Sequence[str]) -> dict[str, Job]:
        ids = list(dict.fromkeys(job_ids))
        if not ids:
            return {}

        def get(conn: Connection) -> dict[str, Job]:
            found: dict[str, Job] = {}
            for chunk in _chunks(ids):
                marks = ",".join("?" * len(chunk))
                sql = f"SELECT j.job_id, {_JOB_COLUMNS} FROM {_JOBS_FROM} WHERE j.job_id IN ({marks})"
                for job_id, *columns in conn.execute(sql, chunk).fetchall():
                    found[job_id] = _job_from_row(*columns)
            return found

        return await self._reader.run(get)

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
        where = ["j.user_id = ?"]
        params: list[Any] = [user_id]
        rows, next_cursor = await self._page_jobs(where, params, limit, cursor, status, project_id)
        return [_job_from_row(*row) for row in rows], next_cursor

    async def _page_jobs(
        self,
        where: list[str],
        params: list[Any],
        limit: int,
        cursor: str | None,
        status: str | None,
        project_id: str | None,
    ) -> tuple[list[tuple[Any, ...]], str | None]:
        """One page of job rows matching ``where`` plus the optional status and project filters, newest first."""
        if status is not None:
            where.append(f"{_STATUS_SQL} = ?")
            params.append(JobStatus(status).value)
        if project_id is not None:
            where.append("j.project_id = ?")
            params.append(project_id)
        return await self._page(
            select=_JOB_COLUMNS,
            source=_JOBS_FROM,
            keys=("j.created_ms", "j.job_id"),
            where=where,
            params=params,
            limit=limit,
            cursor=cursor,
        )

    async def search_jobs(
        self,
        user_id: str,
        text: str,
        limit: int,
        cursor: str | None = None,
        status: str | None = None,
        project_id: str | None = None,
        scan: int = 5000,
    ) -> tuple[list[Job], str | None]:
        """The match runs in SQL (``instr`` over id, name, project, payload text and URL) over a window of the
        user's next ``scan`` jobs in index order (reading a job costs a primary-key lookup, so a window keeps a
        miss from reading all of them): fewer than ``limit`` matches with a cursor means "continue from there"."""
        if limit <= 0:
            return [], cursor
        needle = text.lower()
        where = ["j.user_id = ?"]
        params: list[Any] = [user_id]
        window_sql = "SELECT created_ms, job_id FROM jobs WHERE user_id = ?"
        window_args: list[Any] = [user_id]
        if cursor is not None:
            window_sql += " AND (created_ms, job_id) < (?, ?)"
            window_args += _decode_cursor(cursor, 2)
        window_sql += " ORDER BY created_ms DESC, job_id DESC LIMIT 1 OFFSET ?"
        window_args.append(max(1, scan) - 1)

        def window_end(conn: Connection) -> tuple[Any, ...] | None:
            row = conn.execute(window_sql, window_args).fetchone()
            return tuple(row) if row is not None else None

        boundary = await self._reader.run(window_end)  # the last job of the window (index only, cheap)
        if boundary is not None:
            where.append("(j.created_ms, j.job_id) >= (?, ?)")
            params += list(boundary)
        if not any(c in needle for c in '"\\') and needle.isprintable():
            # cheap prefilter on the raw JSON (the needle appears there verbatim), before parsing any of it
            where.append("instr(lower(CAST(j.definition AS TEXT)), ?) > 0")
            params.append(needle)
        where += [
            "instr(lower(j.job_id || ' ' || j.project_id || ' ' || "
            "coalesce(json_extract(CAST(j.definition AS TEXT), '$.name'), '') || ' ' || "
            "coalesce(json_extract(CAST(j.definition AS TEXT), '$.payload.text'), '') || ' ' || "
            "coalesce(json_extract(CAST(j.definition AS TEXT), '$.payload.http.url'), '')), ?) > 0",
        ]
        params.append(needle)
        rows, next_cursor = await self._page_jobs(where, params, limit, cursor, status, project_id)
        if next_cursor is None and boundary is not None:
            next_cursor = _encode_cursor(*boundary)  # window searched; more jobs follow it
        return [_job_from_row(*row) for row in rows], next_cursor

    async def _page(
        self,
        *,
        select: str,
        source: str,
        keys: tuple[str, ...],
        where: list[str],
        params: list[Any],
        limit: int,
        cursor: str | None,
    ) -> tuple[list[tuple[Any, ...]], str | None]:
        """Keyset pagination, newest first by ``keys``: the rows' ``select`` columns and the next cursor."""
        if cursor is not None:
            where = [*where, f"({', '.join(keys)}) < ({', '.join('?' * len(keys))})"]
            params = [*params, *_decode_cursor(cursor, len(keys))]
        order = ", ".join(f"{key} DESC" for key in keys)
        sql = f"SELECT {', '.join(keys)}, {select} FROM {source} WHERE {' AND '.join(where)} ORDER BY {order} LIMIT ?"
        args = [*params, limit + 1]  # one more tells whether there is a next page

        def page(conn: Connection) -> list[tuple[Any, ...]]:
            return conn.execute(sql, args).fetchall()

        rows = await self._reader.run(page)
        next_cursor = _encode_cursor(*rows[limit - 1][: len(keys)]) if len(rows) > limit else None
        return [row[len(keys) :] for row in rows[:limit]], next_cursor

    # Queue entries ----------------------------------------------------------------------------------------
    async def put_entries(self, entries: Sequence[BucketEntry]) -> None:
        if not entries:
            return
        rows = [_entry_row(e) for e in entries]
        await self._writer.write(lambda conn: conn.executemany(_PUT_ENTRY, rows))

    async def put_jobs_and_entries(self, jobs: Sequence[Job], entries: Sequence[BucketEntry]) -> None:
        job_rows = [_job_row(job) for job in jobs]
        entry_rows = [_entry_row(e) for e in entries]

        def put(conn: Connection) -> None:
            conn.executemany(_PUT_JOB, job_rows).close()
            conn.executemany(_PUT_ENTRY, entry_rows).close()

        if job_rows or entry_rows:
            await self._writer.write(put)

    async def due_entries(
        self, shard: int, bucket_ms: int, until_ms: int, limit: int, *, since_ms: int = NO_LOWER_BOUND
    ) -> list[BucketEntry]:
        partition = (shard, bucket_ms)
        return (await self.due_entries_many([partition], until_ms, limit, since={partition: since_ms}))[partition]

    async def due_entries_many(
        self,
        partitions: Sequence[tuple[int, int]],
        until_ms: int,
        limit: int,
        *,
        known: Container[tuple[int, int, int, str, int, int]] = (),
        since: Mapping[tuple[int, int], int] | None = None,
    ) -> dict[tuple[int, int], list[BucketEntry]]:
        if limit <= 0:
            return {p: [] for p in partitions}
        bounds = since or {}

        def due(conn: Connection) -> dict[tuple[int, int], list[tuple[Any, ...]]]:
            # One thread hop for every partition: the picker reads all its shards each tick.
            return {
                (shard, bucket_ms): conn.execute(
                    "SELECT due_ms, job_id, scheduled_ms, attempt, kind, version, priority FROM job_queue "
                    "WHERE shard = ? AND bucket_ms = ? AND due_ms >= ? AND due_ms <= ? "
                    "ORDER BY due_ms, priority DESC, job_id, scheduled_ms, attempt LIMIT ?",
                    (shard, bucket_ms, bounds.get((shard, bucket_ms), NO_LOWER_BOUND), until_ms, limit),
                ).fetchall()
                for shard, bucket_ms in partitions
            }

        rows_by_partition = await self._reader.run(due)
        return {
            (shard, bucket_ms): [
                # Rows this store wrote from validated entries: construct without re-validating (hot path).
                BucketEntry.model_construct(
                    shard=shard,
                    bucket_ms=bucket_ms,
                    due_ms=due_ms,
                    job_id=job_id,
                    scheduled_ms=scheduled_ms,
                    attempt=attempt,
                    kind=kind,
                    version=version,
                    priority=priority,
                )
                for due_ms, job_id, scheduled_ms, attempt, kind, version, priority in rows
                if (shard, bucket_ms, due_ms, job_id, scheduled_ms, attempt) not in known
            ]
            for (shard, bucket_ms), rows in rows_by_partition.items()
        }

    async def delete_entries(self, entries: Sequence[BucketEntry]) -> None:
        if not entries:
            return
        keys = [e.key for e in entries]
        await self._writer.write(
            lambda conn: conn.executemany(
                "DELETE FROM job_queue WHERE shard = ? AND bucket_ms = ? AND due_ms = ? AND job_id = ? "
                "AND scheduled_ms = ? AND attempt = ?",
                keys,
            )
        )

    # Picker checkpoints -----------------------------------------------------------------------------------
    async def get_checkpoint(self, shard: int) -> int | None:
        def get(conn: Connection) -> int | None:
            row = conn.execute("SELECT bucket_ms FROM picker_checkpoints WHERE shard = ?", (shard,)).fetchone()
            return None if row is None else int(row[0])

        return await self._reader.run(get)

    async def advance_checkpoint(self, shard: int, expected: int | None, new: int) -> bool:
        def cas(conn: Connection) -> bool:
            if expected is None:
                conn.execute("INSERT OR IGNORE INTO picker_checkpoints (shard, bucket_ms) VALUES (?, ?)", (shard, new))
            else:
                conn.execute(
                    "UPDATE picker_checkpoints SET bucket_ms = ? WHERE shard = ? AND bucket_ms = ?",
                    (new, shard, expected),
                )
            return conn.changes() == 1

        return await self._writer.write(cas)

    # Runs -------------------------------------------------------------------------------------------------
    async def put_runs(self, runs: Sequence[Run]) -> None:
        if not runs:
            return
        rows = [(r.run_id, r.job_id, r.scheduled_ms, r.attempt, r.model_dump_json().encode()) for r in runs]
        await self._writer.write(
            lambda conn: conn.executemany(
                "INSERT OR REPLACE INTO runs (run_id, job_id, scheduled_ms, attempt, body) VALUES (?, ?, ?, ?, ?)",
                rows,
            )
        )

    async def get_runs(self, run_ids: Sequence[str]) -> dict[str, Run]:
        ids = list(dict.fromkeys(run_ids))
        if not ids:
            return {}

        def get(conn: Connection) -> list[bytes]:
            bodies: list[bytes] = []
            for chunk in _chunks(ids):
                marks = ",".join("?" * len(chunk))
                sql = f"SELECT body FROM runs WHERE run_id IN ({marks})"
                bodies += [row[0] for row in conn.execute(sql, chunk).fetchall()]
            return bodies

        runs = [Run.model_validate_json(body) for body in await self._reader.run(get)]
        return {run.run_id: run for run in runs}

    async def list_runs(self, job_id: str, limit: int, cursor: str | None = None) -> tuple[list[Run], str | None]:
        if limit <= 0:
            return [], cursor
        rows, next_cursor = await self._page(
            select="body",
            source="runs",
            keys=("scheduled_ms", "attempt", "run_id"),
            where=["job_id = ?"],
            params=[job_id],
            limit=limit,
            cursor=cursor,
        )
        return [Run.model_validate_json(row[0]) for row in rows], next_cursor

    async def claim_runs(self, run_ids: Sequence[str], worker_id: str) -> set[str]:
        ids = list(dict.fromkeys(run_ids))
        if not ids:
            return set()

        def claim(conn: Connection) -> set[str]:
            now = clock.now_ms()
            won = set()
            # One statement per id inside the one transaction: changes() tells which inserts this call made.
            for run_id in ids:
                conn.execute(
                    "INSERT OR IGNORE INTO run_claims (run_id, worker_id, claimed_ms) VALUES (?, ?, ?)",
                    (run_id, worker_id, now),
                )
                if conn.changes() == 1:
                    won.add(run_id)
            return won

        return await self._writer.write(claim)

    async def run_claimers(self, run_ids: Sequence[str]) -> dict[str, RunClaim]:
        ids = list(dict.fromkeys(run_ids))

        def get(conn: Connection) -> dict[str, RunClaim]:
            found: dict[str, RunClaim] = {}
            for chunk in _chunks(ids):
                marks = ",".join("?" * len(chunk))
                sql = f"SELECT run_id, worker_id, claimed_ms FROM run_claims WHERE run_id IN ({marks})"
                found.update((run_id, RunClaim(worker, at)) for run_id, worker, at in conn.execute(sql, chunk))
            return found

        return await self._reader.run(get) if ids else {}

    # Dead letters -----------------------------------------------------------------------------------------
    async def put_dead_letters(self, letters: Sequence[DeadLetter]) -> None:
        if not letters:
            return
        rows = [(d.user_id, d.dead_letter_id, d.dead_ms, d.model_dump_json().encode()) for d in letters]
        await self._writer.write(
            lambda conn: conn.executemany(
                "INSERT OR REPLACE INTO dead_letters (user_id, dead_letter_id, dead_ms, body) VALUES (?, ?, ?, ?)",
                rows,
            )
        )

    async def list_dead_letters(
        self, user_id: str, limit: int, cursor: str | None = None
    ) -> tuple[list[DeadLetter], str | None]:
        if limit <= 0:
            return [], cursor
        rows, next_cursor = await self._page(
            select="body",
            source="dead_letters",
            keys=("dead_ms", "dead_letter_id"),
            where=["user_id = ?"],
            params=[user_id],
            limit=limit,
            cursor=cursor,
        )
        return [DeadLetter.model_validate_json(row[0]) for row in rows], next_cursor

    async def get_dead_letter(self, user_id: str, dead_letter_id: str) -> DeadLetter | None:
        def get(conn: Connection) -> bytes | None:
            row = conn.execute(
                "SELECT body FROM dead_letters WHERE user_id = ? AND dead_letter_id = ?",
                (user_id, dead_letter_id),
            ).fetchone()
            return None if row is None else bytes(row[0])

        body = await self._reader.run(get)
        return None if body is None else DeadLetter.model_validate_json(body)

    # Idempotent submit ------------------------------------------------------------------------------------
    async def claim_idempotency_key(self, user_id: str, key: str, job_id: str, ttl_s: int) -> str:
        def claim(conn: Connection) -> str:
            now = clock.now_ms()
            row = conn.execute(
                "SELECT job_id, expires_ms FROM idempotency_keys WHERE user_id = ? AND key = ?",
                (user_id, key),
            ).fetchone()
            if row is not None and row[1] > now:
                return str(row[0])
            conn.execute(
                "INSERT OR REPLACE INTO idempotency_keys (user_id, key, job_id, expires_ms) VALUES (?, ?, ?, ?)",
                (user_id, key, job_id, now + ttl_s * 1000),
            )
            # Lazy expiry (CQL's TTL does it for Scylla); bounded so one claim never pays for a backlog.
            conn.execute(
                "DELETE FROM idempotency_keys WHERE (user_id, key) IN "
                "(SELECT user_id, key FROM idempotency_keys WHERE expires_ms <= ? LIMIT 100)",
                (now,),
            )
            return job_id

        return await self._writer.write(claim)

    # Stats ------------------------------------------------------------------------------------------------
    async def stats(self, now_ms: int) -> dict[str, int]:
        def stats(conn: Connection) -> dict[str, int]:
            conn.execute("BEGIN")  # one snapshot for all three counts
            try:
                by_status = dict(
                    conn.execute(
                        f"SELECT {_STATUS_SQL} AS status, COUNT(*) FROM {_JOBS_FROM} GROUP BY status"
                    ).fetchall()
                )
                (due,) = conn.execute("SELECT COUNT(*) FROM job_queue WHERE due_ms <= ?", (now_ms,)).fetchone()
                (dead,) = conn.execute("SELECT COUNT(*) FROM dead_letters").fetchone()
            finally:
                conn.execute("COMMIT")
            counts = {s.value: int(by_status.get(s.value, 0)) for s in _STATS_STATUSES}
            counts["due"] = int(due)
            counts["dead"] = int(dead)
            return counts

        return await self._reader.run(stats)

    # Tenants: API keys, rate limits, usage, signing secrets ------------------------------------------------
    async def put_api_key(self, key: ApiKey) -> None:
        row = (key.key_id, key.tenant, key.created_ms, key.model_dump_json().encode())
        await self._writer.write(
            lambda conn: conn.execute(
                "INSERT OR REPLACE INTO api_keys (key_id, tenant, created_ms, body) VALUES (?, ?, ?, ?)", row
            )
        )

    async def get_api_key(self, key_id: str) -> ApiKey | None:
        def get(conn: Connection) -> bytes | None:
            row = conn.execute("SELECT body FROM api_keys WHERE key_id = ?", (key_id,)).fetchone()
            return None if row is None else bytes(row[0])

        body = await self._reader.run(get)
        return None if body is None else ApiKey.model_validate_json(body)

    async def list_api_keys(self, tenant: str | None = None) -> list[ApiKey]:
        def rows(conn: Connection) -> list[bytes]:
            if tenant is None:
                found = conn.execute("SELECT body FROM api_keys ORDER BY created_ms DESC, key_id").fetchall()
            else:
                found = conn.execute(
                    "SELECT body FROM api_keys WHERE tenant = ? ORDER BY created_ms DESC, key_id", (tenant,)
                ).fetchall()
            return [bytes(r[0]) for r in found]

        return [ApiKey.model_validate_json(b) for b in await self._reader.run(rows)]

    async def _update_api_key(self, key_id: str, change: str, at_ms: int) -> bool:
        def update(conn: Connection) -> bool:
            row = conn.execute("SELECT body FROM api_keys WHERE key_id = ?", (key_id,)).fetchone()
            if row is None:
                return False
            key = ApiKey.model_validate_json(bytes(row[0]))
            if change == "revoke":
                key.revoked_ms = at_ms if key.revoked_ms is None else min(key.revoked_ms, at_ms)
            else:
                key.last_used_ms = max(key.last_used_ms or 0, at_ms)
            conn.execute("UPDATE api_keys SET body = ? WHERE key_id = ?", (key.model_dump_json().encode(), key_id))
            return True

        return await self._writer.write(update)

    async def revoke_api_key(self, key_id: str, at_ms: int) -> bool:
        return await self._update_api_key(key_id, "revoke", at_ms)

    async def touch_api_key(self, key_id: str, used_ms: int) -> None:
        await self._update_api_key(key_id, "touch", used_ms)

    async def take_rate_token(self, name: str, interval_ms: int, burst: int, now_ms: int) -> int:
        def take(conn: Connection) -> int:
            row = conn.execute("SELECT tat_ms FROM rate_limits WHERE name = ?", (name,)).fetchone()
            tat = max(int(row[0]) if row else now_ms, now_ms)
            new_tat = tat + interval_ms
            allowed_at = new_tat - burst * interval_ms
            if allowed_at > now_ms:
                return allowed_at - now_ms
            conn.execute("INSERT OR REPLACE INTO rate_limits (name, tat_ms) VALUES (?, ?)", (name, new_tat))
            return 0

        return await self._writer.write(take)

    async def tenant_usage(self, user_id: str) -> tuple[int, int]:
        def usage(conn: Connection) -> tuple[int, int]:
            row = conn.execute(
                # an offloaded payload's bytes are in the blob store: its definition names their count
                "SELECT COUNT(*), COALESCE(SUM(LENGTH(j.definition)"
                " + COALESCE(json_extract(CAST(j.definition AS TEXT), '$.payload.size'), 0)), 0) "
                f"FROM {_JOBS_FROM} "
                f"WHERE j.user_id = ? AND {_STATUS_SQL} IN ('submitted', 'scheduled', 'queued', 'running', 'paused')",
                (user_id,),
            ).fetchone()
            return int(row[0]), int(row[1])

        return await self._reader.run(usage)

    async def put_signing_secrets(self, tenant: str, secrets: Sequence[str]) -> None:
        body = orjson.dumps(list(secrets))
        await self._writer.write(
            lambda conn: conn.execute(
                "INSERT OR REPLACE INTO signing_secrets (tenant, body) VALUES (?, ?)", (tenant, body)
            )
        )

    async def get_job_owners(self, job_ids: Sequence[str]) -> dict[str, str]:
        ids = list(dict.fromkeys(job_ids))

        def owners(conn: Connection) -> dict[str, str]:
            found: dict[str, str] = {}
            for chunk in _chunks(ids):
                marks = ",".join("?" * len(chunk))
                found.update(conn.execute(f"SELECT job_id, user_id FROM jobs WHERE job_id IN ({marks})", chunk))
            return found

        return await self._reader.run(owners) if ids else {}

    async def get_signing_secrets(self, tenant: str) -> list[str]:
        def get(conn: Connection) -> bytes | None:
            row = conn.execute("SELECT body FROM signing_secrets WHERE tenant = ?", (tenant,)).fetchone()
            return None if row is None else bytes(row[0])

        body = await self._reader.run(get)
        return [] if body is None else [str(s) for s in orjson.loads(body)]


_STATS_STATUSES = (
    JobStatus.SCHEDULED,
    JobStatus.QUEUED,
    JobStatus.RUNNING,
    JobStatus.SUCCEEDED,
    JobStatus.FAILED,
)
