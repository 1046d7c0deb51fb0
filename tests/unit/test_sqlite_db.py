"""The shared SQLite plumbing: several connections creating one data directory at the same moment."""

from __future__ import annotations

import asyncio
from pathlib import Path

from libs.sqlite import SqliteDB

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
