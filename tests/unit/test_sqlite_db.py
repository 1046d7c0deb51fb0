"""The shared SQLite plumbing: several connections creating one data directory at the same moment."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import pytest

from dsched.libs import sqlite as sqlite_module
from dsched.libs.sqlite import CHECKPOINT_INTERVAL_S, Connection, SqliteDB, begin_immediate, connect

SCHEMA = "CREATE TABLE IF NOT EXISTS t (k TEXT PRIMARY KEY, v INTEGER NOT NULL);"


async def test_connections_opening_one_fresh_file_at_once_all_start(tmp_path: Path) -> None:
    # Switching a fresh file to WAL needs an exclusive lock that SQLite refuses at once, without waiting, when
    # the openers collide; processes started together (make run, the chaos cluster) must all come up.
    for attempt in range(20):
        dbs = [SqliteDB(tmp_path / f"fresh-{attempt}.db", schema=SCHEMA) for _ in range(6)]
        await asyncio.gather(*(db.open() for db in dbs))
        try:
            await asyncio.gather(
                *(
                    db.write(lambda conn, i=i: conn.execute("INSERT INTO t VALUES (?, ?)", (f"k{i}", i)))
                    for i, db in enumerate(dbs)
                )
            )
            rows = await dbs[0].run(lambda conn: conn.execute("SELECT count(*) FROM t").fetchone()[0])
            mode = await dbs[-1].run(lambda conn: conn.execute("PRAGMA journal_mode").fetchone()[0])
        finally:
            await asyncio.gather(*(db.close() for db in dbs))
        assert rows == len(dbs)
        assert mode == "wal"


async def test_the_wal_is_checkpointed_in_the_background_so_it_does_not_grow(tmp_path: Path) -> None:
    # Commits never checkpoint (that stalled every write grouped with them); the background loop must, or the
    # write-ahead log would grow without bound.
    path = tmp_path / "grow.db"
    db = SqliteDB(path, schema="CREATE TABLE IF NOT EXISTS blobs (k INTEGER PRIMARY KEY, v BLOB NOT NULL);")
    await db.open()
    try:
        chunk = b"x" * 100_000

        async def write_megabytes(first: int, count: int) -> None:
            for i in range(first, first + count):
                await db.write(lambda conn, i=i: conn.execute("INSERT INTO blobs VALUES (?, ?)", (i, chunk)))

        await write_megabytes(0, 30)
        wal = path.with_name(path.name + "-wal")
        first_size = wal.stat().st_size
        assert first_size >= 3_000_000  # 3 MB written, no checkpoint inside the commits
        await asyncio.sleep(CHECKPOINT_INTERVAL_S * 2)
        await write_megabytes(30, 30)
        # Checkpointed in between: the log restarted from its beginning instead of growing to 6 MB.
        assert wal.stat().st_size < first_size * 1.5
    finally:
        await db.close()


def test_begin_immediate_waits_for_another_connections_write_transaction(tmp_path: Path) -> None:
    path = tmp_path / "lock.db"
    holder = connect(path)
    holder.execute("PRAGMA journal_mode=WAL")
    holder.execute("CREATE TABLE t (v INTEGER)")
    waiter = connect(path)
    holder.execute("BEGIN IMMEDIATE")
    holder.execute("INSERT INTO t VALUES (1)")
    releaser = threading.Timer(0.05, lambda: holder.execute("COMMIT"))
    releaser.start()
    try:
        begin_immediate(waiter)  # raises "database is locked" if it does not wait
        waiter.execute("INSERT INTO t VALUES (2)")
        waiter.execute("COMMIT")
    finally:
        releaser.join()
    assert waiter.execute("SELECT v FROM t ORDER BY v").fetchall() == [(1,), (2,)]
    assert waiter.execute("PRAGMA busy_timeout").fetchone() == (30000,)  # other statements keep the handler
    holder.close()
    waiter.close()


async def test_a_checkpoint_that_raises_is_logged_once_and_checkpoints_go_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Anything but an SQLite error (busy, locked) used to end the background checkpoints without a word, and the
    # write-ahead log would then grow for the rest of the process's life.
    calls: list[int] = []
    warnings: list[dict[str, object]] = []

    def checkpoint(conn: Connection) -> None:
        calls.append(1)
        if len(calls) <= 3:
            raise RuntimeError("disk went away")

    monkeypatch.setattr(sqlite_module, "_passive_checkpoint", checkpoint)
    monkeypatch.setattr(sqlite_module.logger, "warning", lambda event, **fields: warnings.append({"event": event}))
    db = SqliteDB(tmp_path / "ckpt.db", schema=SCHEMA)
    await db.open()
    try:
        for _ in range(200):  # bounded: ~5 checkpoints a second
            if len(calls) >= 5:
                break
            await asyncio.sleep(CHECKPOINT_INTERVAL_S / 2)
    finally:
        await db.close()
    assert len(calls) >= 5  # it went on after the failures
    assert warnings == [{"event": "checkpoint_failed"}]  # one line for the streak of three


async def test_a_write_that_fails_half_way_is_undone_alone_and_its_group_commits(tmp_path: Path) -> None:
    # A group first runs without savepoints; a write that raises after changing rows must still leave nothing,
    # while the writes grouped with it (before and after) commit.
    db = SqliteDB(tmp_path / "group.db", schema=SCHEMA)
    await db.open()
    try:

        def half_then_fail(conn: Connection) -> None:
            conn.execute("INSERT INTO t VALUES ('half', 1)")
            raise ValueError("the second half failed")

        results = await asyncio.gather(
            db.write(lambda conn: conn.execute("INSERT INTO t VALUES ('a', 1)")),
            db.write(half_then_fail),
            db.write(lambda conn: conn.execute("INSERT INTO t VALUES ('b', 2)")),
            return_exceptions=True,
        )
        alone = await asyncio.gather(db.write(half_then_fail), return_exceptions=True)
        rows = await db.run(lambda conn: conn.execute("SELECT k FROM t ORDER BY k").fetchall())
    finally:
        await db.close()
    assert results[0] is None and results[2] is None
    assert isinstance(results[1], ValueError) and isinstance(alone[0], ValueError)
    assert rows == [("a",), ("b",)]


def test_connections_run_a_sqlite_without_the_wal_reset_bug(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # SQLite before 3.51.3 can lose committed rows when processes checkpoint and commit at once, which dsched's
    # processes do all the time; a chaos run on the system's 3.40.1 lost two run records that way.
    assert sqlite_module.sqlite_version() >= (3, 51, 3)
    connect(tmp_path / "ok.db").close()
    monkeypatch.setattr(sqlite_module.apsw, "sqlite_lib_version", lambda: "3.51.2")
    with pytest.raises(RuntimeError, match="WAL-reset bug"):
        connect(tmp_path / "old.db")
