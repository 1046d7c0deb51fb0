"""Shared plumbing of the embedded SQLite backends, and the one module that imports the SQLite driver.

Each process opens its own connection per database file, in WAL mode with a busy timeout, so several
processes can share one data directory. All calls run on one dedicated thread per connection: the event loop
never blocks on SQLite, and the connection is only ever used from the thread that created it.

The driver is apsw, whose wheel carries its own SQLite: Python's ``sqlite3`` uses the system's library, and every
SQLite before 3.51.3 has the WAL-reset bug: a checkpoint racing a commit of another process can leave the WAL index
claiming frames were copied into the database file when they were not, and the rows they hold are then lost.
dsched's processes share each file and checkpoint it often, which is the pattern the bug needs (the likely cause
of two committed run records lost in a chaos run; ``bench.sqlite_wal_reset`` reproduces such losses).
:func:`connect` refuses a library older than :data:`MIN_SQLITE_VERSION`.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import random
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Protocol, TypeVar, cast

import apsw

from dsched.libs import logs
from dsched.libs.batching import Coalescer

T = TypeVar("T")
logger = logs.get("sqlite")
Error = apsw.Error  # what every SQLite failure raises
MIN_SQLITE_VERSION = (3, 51, 3)  # the first release without the WAL-reset bug (see the module docstring)
MAX_GROUP = 256  # writes per group commit
# While writes arrive at least this often, a group commit waits this long for company: under a steady load a commit
# holds several writes instead of 1-3 (CPU per job at 1,000/s -7 % against 2 ms, at 300/s -20 %; fire lag p99
# unchanged, docs/benchmarks.md); a lone write (a job due now on a quiet scheduler) commits at once (see Coalescer's
# linger_when_busy).
GROUP_LINGER_S = 0.005
CHECKPOINT_INTERVAL_S = 0.2
LOCK_WAIT_S = 30.0  # how long a statement waits for another connection's lock before it fails
LOCK_POLL_MIN_S = 0.0002  # first pause of a writer waiting for another process's write transaction...
LOCK_POLL_MAX_S = 0.001  # ...doubling up to this (see begin_immediate)


class Cursor(Protocol):
    """A statement's rows (apsw's cursor, typed as the backends read it: column types are the schema's)."""

    def fetchone(self) -> Any: ...
    def fetchall(self) -> list[Any]: ...
    def close(self, force: bool = False) -> None: ...
    def __iter__(self) -> Iterator[Any]: ...


class Connection(Protocol):
    """The connection API the embedded backends use (apsw's, in autocommit mode)."""

    def execute(self, statements: str, bindings: Any = None) -> Cursor: ...
    def executemany(self, statements: str, sequenceofbindings: Iterable[Any]) -> Cursor: ...
    def set_busy_timeout(self, milliseconds: int) -> None: ...
    def changes(self) -> int: ...
    def last_insert_rowid(self) -> int: ...
    def close(self, force: bool = False) -> None: ...


class SqliteDB:
    def __init__(
        self,
        path: Path,
        *,
        synchronous: str = "NORMAL",
        schema: str = "",
        checkpoint: bool = True,
        on_commit: Callable[[], None] | None = None,
    ) -> None:
        """``checkpoint``: this instance writes, so it also moves the WAL into the database file in the
        background (a read-only instance passes False). ``on_commit`` runs on the event loop after each group
        commit of :meth:`write` (before its callers resume), e.g. to wake readers of what was written."""
        self.path = path
        self._synchronous = synchronous
        self._schema = schema
        self._checkpoint = checkpoint
        self._on_commit = on_commit
        self._checkpointer: asyncio.Task[None] | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._conn: Connection | None = None
        self._writes: Coalescer[Callable[[Connection], Any], Any] = Coalescer(
            self._write_group, max_batch=MAX_GROUP, linger_s=GROUP_LINGER_S, linger_when_busy=True
        )

    async def open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"sqlite-{self.path.stem}")
        await asyncio.get_running_loop().run_in_executor(self._executor, self._connect)
        if self._checkpoint:
            self._checkpointer = asyncio.create_task(self._checkpoint_loop())

    def _connect(self) -> None:
        self._conn = _connect(self.path, self._synchronous)
        if self._schema:
            with _immediate(self._conn):
                _run_script(self._conn, self._schema)

    async def _checkpoint_loop(self) -> None:
        """Checkpoint on a connection and thread of its own, never inside a commit.

        SQLite's automatic checkpoint runs in whichever commit crosses the WAL threshold: that commit then copies
        and fsyncs the database file, stalling every write grouped with it (measured: 50-600 ms stalls under
        load). A PASSIVE checkpoint here blocks no reader or writer; several processes may each run one.
        """
        executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"sqlite-ckpt-{self.path.stem}")
        loop = asyncio.get_running_loop()
        conn = await loop.run_in_executor(executor, _connect, self.path, self._synchronous)
        failing = False
        try:
            while True:
                await asyncio.sleep(CHECKPOINT_INTERVAL_S)
                try:
                    await loop.run_in_executor(executor, _passive_checkpoint, conn)
                    failing = False
                except Error:  # busy or locked by another process's checkpoint: try again next time
                    continue
                except Exception as exc:  # never a silent end of checkpoints: logged once a streak, tried again
                    if not failing:
                        logger.warning("checkpoint_failed", path=str(self.path), error=f"{type(exc).__name__}: {exc}")
                    failing = True
        finally:
            # Queued behind any checkpoint still running on that thread: the connection is never used by two.
            executor.submit(conn.close)
            executor.shutdown(wait=False)

    async def close(self) -> None:
        if self._executor is None:
            return
        if self._checkpointer is not None:
            self._checkpointer.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._checkpointer
            self._checkpointer = None
        await self._writes.drain()
        conn, self._conn = self._conn, None
        if conn is not None:
            await asyncio.get_running_loop().run_in_executor(self._executor, conn.close)
        self._executor.shutdown(wait=True)
        self._executor = None

    async def run(self, fn: Callable[[Connection], T]) -> T:
        """Run ``fn(conn)`` on the connection's thread (no transaction opened for you)."""
        if self._executor is None:
            raise RuntimeError(f"{self.path} is not open")
        return await asyncio.get_running_loop().run_in_executor(self._executor, self._call, fn)

    async def write(self, fn: Callable[[Connection], T]) -> T:
        """Run ``fn(conn)`` in a write transaction and return its result once committed.

        Group commit: writes queued while a transaction is in flight run together in the next one (one thread
        hop, one ``BEGIN IMMEDIATE`` … ``COMMIT``), each inside its own savepoint, so a write that raises is
        rolled back alone and its caller gets the exception; the others still commit.
        """
        if self._executor is None:
            raise RuntimeError(f"{self.path} is not open")
        return cast(T, await self._writes.submit(fn))

    async def _write_group(self, fns: list[Callable[[Connection], Any]]) -> list[Any]:
        """One transaction for ``fns``; a failing COMMIT raises, failing every write of the group."""
        outcomes = await self.run(functools.partial(_run_group, fns=fns))
        if self._on_commit is not None:
            self._on_commit()
        return outcomes

    def _call(self, fn: Callable[[Connection], T]) -> T:
        if self._conn is None:
            raise RuntimeError(f"{self.path} is closed")
        result = fn(self._conn)
        if isinstance(result, apsw.Cursor):
            # A cursor never leaves this thread: its statement is finished here, not whenever another thread
            # drops the last reference.
            result.close()
            return None  # type: ignore[return-value]
        return result


def sqlite_version() -> tuple[int, ...]:
    """The version of the SQLite library the driver runs."""
    return tuple(int(part) for part in apsw.sqlite_lib_version().split("."))


def connect(path: Path | str, *, read_only: bool = False) -> Connection:
    """A connection in autocommit mode (transactions are explicit ``BEGIN`` … ``COMMIT``) that waits up to
    :data:`LOCK_WAIT_S` for another connection's lock. Raises RuntimeError on a SQLite older than
    :data:`MIN_SQLITE_VERSION`."""
    if sqlite_version() < MIN_SQLITE_VERSION:
        wanted = ".".join(map(str, MIN_SQLITE_VERSION))
        raise RuntimeError(f"SQLite {apsw.sqlite_lib_version()} has the WAL-reset bug; dsched needs {wanted} or later")
    flags = apsw.SQLITE_OPEN_READONLY if read_only else apsw.SQLITE_OPEN_READWRITE | apsw.SQLITE_OPEN_CREATE
    conn = apsw.Connection(str(path), flags=flags)
    conn.set_busy_timeout(int(LOCK_WAIT_S * 1000))
    return conn


def integrity_problems(path: Path, limit: int = 10) -> list[str]:
    """What ``PRAGMA integrity_check`` finds wrong in the database at ``path`` (at most ``limit`` lines; empty:
    intact). Reads a consistent snapshot, so services may keep running; a file SQLite cannot even read as a
    database is one problem."""
    try:
        conn = connect(path, read_only=True)
        try:
            rows = conn.execute(f"PRAGMA integrity_check({int(limit)})").fetchall()
        finally:
            conn.close()
    except Error as exc:
        return [f"{type(exc).__name__}: {exc}"]
    return [] if rows == [("ok",)] else [str(row[0]) for row in rows]


def _connect(path: Path, synchronous: str) -> Connection:
    conn = connect(path)
    _enable_wal(conn, deadline=time.monotonic() + 30.0)
    conn.execute(f"PRAGMA synchronous={synchronous}")
    conn.execute("PRAGMA wal_autocheckpoint=0")  # see SqliteDB._checkpoint_loop
    return conn


def _passive_checkpoint(conn: Connection) -> None:
    conn.execute("PRAGMA wal_checkpoint(PASSIVE)").close()


def _enable_wal(conn: Connection, *, deadline: float) -> None:
    """Switch the file to WAL, retrying while another process holds the lock.

    Changing the journal mode of a fresh file needs an exclusive lock, and SQLite can answer "database is
    locked" for it without consulting the busy handler (several processes creating one data directory at once).
    """
    delay = 0.005
    while True:
        try:
            conn.execute("PRAGMA journal_mode=WAL")
            return
        except (apsw.BusyError, apsw.LockedError):
            if time.monotonic() + delay > deadline:
                raise
        time.sleep(delay + random.uniform(0, delay))
        delay = min(delay * 2, 0.1)


def begin_immediate(conn: Connection) -> None:
    """``BEGIN IMMEDIATE``: take the write lock up front (two writers never deadlock on an upgrade), waiting for
    another process's transaction in steps of at most :data:`LOCK_POLL_MAX_S`.

    SQLite's own busy handler sleeps 1, 2, 5, 10, 15, 20, 25 … 100 ms between tries, so a writer that meets
    another process's transaction waits 8-50 ms for a lock held 1-5 ms: with the queue shared by the picker and
    worker processes that was the fire-lag tail. The busy handler stays for every other statement.
    """
    conn.set_busy_timeout(0)
    try:
        delay = LOCK_POLL_MIN_S
        deadline = time.monotonic() + LOCK_WAIT_S
        while True:
            try:
                conn.execute("BEGIN IMMEDIATE")
                return
            except (apsw.BusyError, apsw.LockedError):
                if time.monotonic() > deadline:
                    raise
            time.sleep(delay)
            delay = min(delay * 2, LOCK_POLL_MAX_S)
    finally:
        conn.set_busy_timeout(int(LOCK_WAIT_S * 1000))


class _immediate:
    """A write transaction begun with :func:`begin_immediate`, committed on success, rolled back on error."""

    def __init__(self, conn: Connection) -> None:
        self.conn = conn

    def __enter__(self) -> None:
        begin_immediate(self.conn)

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        self.conn.execute("COMMIT" if exc_type is None else "ROLLBACK")


def _run_group(conn: Connection, fns: list[Callable[[Connection], Any]]) -> list[Any]:
    """Run each of ``fns`` in its own savepoint of one transaction: its result, or the exception it raised."""
    outcomes: list[Any] = []
    with _immediate(conn):
        for fn in fns:
            conn.execute("SAVEPOINT w")
            try:
                result = fn(conn)
                if isinstance(result, apsw.Cursor):  # never let a cursor leave this thread (see _call)
                    result.close()
                    result = None
            except Exception as exc:
                conn.execute("ROLLBACK TO w")
                conn.execute("RELEASE w")
                outcomes.append(exc)
            else:
                conn.execute("RELEASE w")
                outcomes.append(result)
    return outcomes


def _run_script(conn: Connection, script: str) -> None:
    # Statement by statement, inside the caller's transaction.
    for statement in script.split(";"):
        if statement.strip():
            conn.execute(statement)
