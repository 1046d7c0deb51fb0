"""Embedded coordination: etcd's key-value-with-leases shape on one SQLite file.

Tables: ``leases`` (id, ttl, expiry), ``kv`` (key, value, lease, mod_revision) and ``changes`` (one row per
key change, with a global revision; value NULL = deleted) that watches read. Every operation is one
``BEGIN IMMEDIATE`` transaction that first purges expired leases with their keys (logging the deletions), so
expiry is observed by every process sharing the file without a background reaper. Lease ids come from an
AUTOINCREMENT column and are never reused, so a stale holder can never keep a newer lease alive.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path
from typing import TypeVar

from dsched.libs import clock
from dsched.libs.coordination.base import Coordination, LeaseNotFound, WatchCompacted, WatchEvent
from dsched.libs.sqlite import Connection, SqliteDB

T = TypeVar("T")

# How often a watch looks for changes (one transaction each): assignments and cancel requests reach watchers
# within this. At 50 ms the watches of an idle `run all` cost ~2 % of a core.
WATCH_POLL_S = 0.2
# A watcher stalled for longer than this fails (WatchCompacted) rather than silently missing events.
CHANGES_RETENTION_MS = 10 * 60 * 1000
_PRUNE_EVERY_S = 30.0

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
INSERT OR IGNORE INTO meta (name, value) VALUES ('revision', 0);
CREATE TABLE IF NOT EXISTS leases (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    ttl_ms INTEGER NOT NULL,
    expires_at_ms INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS leases_by_expiry ON leases (expires_at_ms);
CREATE TABLE IF NOT EXISTS kv (
    key TEXT PRIMARY KEY,
    value BLOB NOT NULL,
    lease_id INTEGER,
    mod_revision INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS kv_by_lease ON kv (lease_id) WHERE lease_id IS NOT NULL;
CREATE TABLE IF NOT EXISTS changes (
    revision INTEGER PRIMARY KEY,
    key TEXT NOT NULL,
    value BLOB,
    at_ms INTEGER NOT NULL
)
"""


def _prefix_end(prefix: str) -> str | None:
    """The smallest string greater than every string starting with ``prefix`` (None: no upper bound).

    SQLite compares TEXT as UTF-8 bytes, which orders like code points, so incrementing the last code point
    below the maximum gives the exclusive upper bound (etcd's ``prefix_end`` on characters).
    """
    chars = list(prefix)
    while chars:
        last = ord(chars[-1])
        if last < 0x10FFFF:
            nxt = last + 1
            if 0xD800 <= nxt <= 0xDFFF:  # skip surrogates: not encodable in UTF-8
                nxt = 0xE000
            chars[-1] = chr(nxt)
            return "".join(chars)
        chars.pop()
    return None


class SqliteCoordination(Coordination):
    def __init__(self, path: Path) -> None:
        self.path = path
        self._db = SqliteDB(path, synchronous="NORMAL", schema=_SCHEMA)
        self._revision = 0  # latest revision this instance has seen: where new watches start
        self._open = False
        self._last_prune = 0.0

    async def startup(self) -> None:
        await self._db.open()
        self._open = True
        await self._tx(lambda conn, now: None)  # learns the current revision: where watches start

    async def shutdown(self) -> None:
        self._open = False
        await self._db.close()

    # Transactions ---------------------------------------------------------------------------------------
    async def _tx(self, fn: Callable[[Connection, int], T]) -> T:
        """Run ``fn(conn, now_ms)`` in one write transaction after purging expired leases."""
        prune = time.monotonic() - self._last_prune > _PRUNE_EVERY_S
        if prune:
            self._last_prune = time.monotonic()

        def run(conn: Connection) -> tuple[T, int]:
            now = clock.now_ms()
            _purge_expired(conn, now)
            result = fn(conn, now)
            if prune:
                conn.execute("DELETE FROM changes WHERE at_ms < ?", (now - CHANGES_RETENTION_MS,))
            return result, _revision(conn)

        result, revision = await self._db.write(run)
        self._revision = max(self._revision, revision)
        return result

    # Leases ---------------------------------------------------------------------------------------------
    async def grant_lease(self, ttl_s: float) -> int:
        ttl_ms = max(1, int(ttl_s * 1000))

        def grant(conn: Connection, now: int) -> int:
            conn.execute("INSERT INTO leases (ttl_ms, expires_at_ms) VALUES (?, ?)", (ttl_ms, now + ttl_ms))
            return conn.last_insert_rowid()

        return await self._tx(grant)

    async def keepalive(self, lease_id: int) -> bool:
        def keepalive(conn: Connection, now: int) -> bool:
            conn.execute("UPDATE leases SET expires_at_ms = ? + ttl_ms WHERE id = ?", (now, lease_id))
            return conn.changes() == 1

        return await self._tx(keepalive)

    async def revoke(self, lease_id: int) -> None:
        await self._tx(lambda conn, now: _drop_leases(conn, [lease_id], now))

    # Keys -----------------------------------------------------------------------------------------------
    async def create(self, key: str, value: bytes, lease_id: int | None = None) -> bool:
        def create(conn: Connection, now: int) -> bool:
            if conn.execute("SELECT 1 FROM kv WHERE key = ?", (key,)).fetchone() is not None:
                return False
            _put(conn, key, value, lease_id, now)
            return True

        return await self._tx(create)

    async def put(self, key: str, value: bytes, lease_id: int | None = None) -> None:
        await self._tx(lambda conn, now: _put(conn, key, value, lease_id, now))

    async def put_if(self, guard_key: str, guard_value: bytes, key: str, value: bytes) -> bool:
        def put_if(conn: Connection, now: int) -> bool:
            row = conn.execute("SELECT value FROM kv WHERE key = ?", (guard_key,)).fetchone()
            if row is None or bytes(row[0]) != guard_value:
                return False
            _put(conn, key, value, None, now)
            return True

        return await self._tx(put_if)

    async def get(self, key: str) -> bytes | None:
        def get(conn: Connection, now: int) -> bytes | None:
            row = conn.execute("SELECT value FROM kv WHERE key = ?", (key,)).fetchone()
            return None if row is None else bytes(row[0])

        return await self._tx(get)

    async def get_prefix(self, prefix: str) -> dict[str, bytes]:
        def get_prefix(conn: Connection, now: int) -> dict[str, bytes]:
            sql, params = _prefix_where(prefix)
            rows = conn.execute(f"SELECT key, value FROM kv WHERE {sql} ORDER BY key", params).fetchall()
            return {key: bytes(value) for key, value in rows}

        return await self._tx(get_prefix)

    async def delete(self, key: str) -> None:
        await self._tx(lambda conn, now: _delete_keys(conn, [key], now))

    # Watches --------------------------------------------------------------------------------------------
    def watch_prefix(self, prefix: str) -> AsyncIterator[WatchEvent]:
        """Changes under ``prefix`` after the latest revision this instance has seen when called.

        Never misses a change made after the call; it may also report changes other processes made just before
        it (between this instance's last transaction and the call). Ends quietly when the store shuts down.
        """
        return self._watch(prefix, self._revision)

    async def _watch(self, prefix: str, after: int) -> AsyncIterator[WatchEvent]:
        where, params = _prefix_where(prefix)

        def changes(conn: Connection, now: int) -> tuple[list[tuple[int, str, bytes | None]], int]:
            oldest = conn.execute("SELECT MIN(revision) FROM changes").fetchone()[0]
            if oldest is not None and oldest > after + 1 and _revision(conn) > after:
                # Revisions after ``after`` were pruned before we read them: we cannot tell what changed.
                raise WatchCompacted(f"watch on {prefix!r} fell behind past revision {after}")
            rows = conn.execute(
                f"SELECT revision, key, value FROM changes WHERE revision > ? AND {where} ORDER BY revision",
                (after, *params),
            ).fetchall()
            events = [(rev, key, None if value is None else bytes(value)) for rev, key, value in rows]
            return events, _revision(conn)

        while self._open:
            try:
                rows, head = await self._tx(changes)
            except RuntimeError:
                if not self._open:  # shut down while we were polling
                    return
                raise
            for revision, key, value in rows:
                after = revision
                yield WatchEvent(key=key, value=value)
            after = max(after, head)
            await asyncio.sleep(WATCH_POLL_S)


def _revision(conn: Connection) -> int:
    value: int = conn.execute("SELECT value FROM meta WHERE name = 'revision'").fetchone()[0]
    return value


def _log_changes(conn: Connection, changes: Sequence[tuple[str, bytes | None]], now: int) -> None:
    """Give each change the next revision and record it for watchers."""
    if not changes:
        return
    base = _revision(conn)
    conn.executemany(
        "INSERT INTO changes (revision, key, value, at_ms) VALUES (?, ?, ?, ?)",
        [(base + i + 1, key, value, now) for i, (key, value) in enumerate(changes)],
    )
    conn.execute("UPDATE meta SET value = ? WHERE name = 'revision'", (base + len(changes),))


def _put(conn: Connection, key: str, value: bytes, lease_id: int | None, now: int) -> None:
    if lease_id is not None and not conn.execute("SELECT 1 FROM leases WHERE id = ?", (lease_id,)).fetchone():
        raise LeaseNotFound(f"lease {lease_id} has expired or been revoked")
    _log_changes(conn, [(key, value)], now)
    conn.execute(
        "INSERT INTO kv (key, value, lease_id, mod_revision) VALUES (?, ?, ?, ?) "
        "ON CONFLICT (key) DO UPDATE SET value = excluded.value, lease_id = excluded.lease_id, "
        "mod_revision = excluded.mod_revision",
        (key, value, lease_id, _revision(conn)),
    )


def _delete_keys(conn: Connection, keys: Sequence[str], now: int) -> None:
    existing = [key for key in keys if conn.execute("SELECT 1 FROM kv WHERE key = ?", (key,)).fetchone() is not None]
    if existing:
        conn.executemany("DELETE FROM kv WHERE key = ?", [(key,) for key in existing])
        _log_changes(conn, [(key, None) for key in existing], now)


def _drop_leases(conn: Connection, lease_ids: Sequence[int], now: int) -> None:
    """Delete leases and every key attached to them, logging the deletions."""
    if not lease_ids:
        return
    marks = ",".join("?" * len(lease_ids))
    rows = conn.execute(f"SELECT key FROM kv WHERE lease_id IN ({marks}) ORDER BY key", lease_ids).fetchall()
    keys = [row[0] for row in rows]
    _delete_keys(conn, keys, now)
    conn.executemany("DELETE FROM leases WHERE id = ?", [(lease_id,) for lease_id in lease_ids])


def _purge_expired(conn: Connection, now: int) -> None:
    expired = [row[0] for row in conn.execute("SELECT id FROM leases WHERE expires_at_ms <= ?", (now,))]
    for start in range(0, len(expired), 500):
        _drop_leases(conn, expired[start : start + 500], now)


def _prefix_where(prefix: str) -> tuple[str, tuple[str, ...]]:
    end = _prefix_end(prefix)
    if end is None:
        return "key >= ?", (prefix,)
    return "key >= ? AND key < ?", (prefix, end)
