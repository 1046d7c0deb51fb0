"""Shared plumbing of the embedded SQLite backends.

Each process opens its own connection per database file, in WAL mode with a busy timeout, so several
processes can share one data directory. All calls run on one dedicated thread per connection: the event loop
never blocks on SQLite, and the connection is only ever used from the thread that created it.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")


class SqliteDB:
    def __init__(self, path: Path, *, synchronous: str = "NORMAL", schema: str = "") -> None:
        self.path = path
        self._synchronous = synchronous
        self._schema = schema
        self._executor: ThreadPoolExecutor | None = None
        self._conn: sqlite3.Connection | None = None

    async def open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"sqlite-{self.path.stem}")
        await asyncio.get_running_loop().run_in_executor(self._executor, self._connect)

    def _connect(self) -> None:
        conn = sqlite3.connect(self.path, timeout=30.0, isolation_level=None, check_same_thread=True)
        conn.execute("PRAGMA busy_timeout=30000")
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute(f"PRAGMA synchronous={self._synchronous}")
        if self._schema:
            with _immediate(conn):
                _run_script(conn, self._schema)
        self._conn = conn

    async def close(self) -> None:
        if self._executor is None:
            return
        conn, self._conn = self._conn, None
        if conn is not None:
            await asyncio.get_running_loop().run_in_executor(self._executor, conn.close)
        self._executor.shutdown(wait=True)
        self._executor = None

    async def run(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Run ``fn(conn)`` on the connection's thread (no transaction opened for you)."""
        if self._executor is None:
            raise RuntimeError(f"{self.path} is not open")
        return await asyncio.get_running_loop().run_in_executor(self._executor, self._call, fn)

    async def write(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Run ``fn(conn)`` inside ``BEGIN IMMEDIATE`` … ``COMMIT`` (rolled back if it raises)."""

        def tx(conn: sqlite3.Connection) -> T:
            with _immediate(conn):
                return fn(conn)

        return await self.run(tx)

    def _call(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        if self._conn is None:
            raise RuntimeError(f"{self.path} is closed")
        result = fn(self._conn)
        if isinstance(result, sqlite3.Cursor):
            # A cursor must never leave this thread: finalizing it elsewhere resets a cached statement this
            # thread may be running at that moment ("bad parameter or other API misuse").
            result.close()
            return None  # type: ignore[return-value]
        return result


class _immediate:
    """``BEGIN IMMEDIATE`` takes the write lock up front, so two writers never deadlock on an upgrade."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn

    def __enter__(self) -> None:
        self.conn.execute("BEGIN IMMEDIATE")

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        self.conn.execute("COMMIT" if exc_type is None else "ROLLBACK")


def _run_script(conn: sqlite3.Connection, script: str) -> None:
    # executescript() would COMMIT our open transaction; run statement by statement instead.
    for statement in script.split(";"):
        if statement.strip():
            conn.execute(statement)
