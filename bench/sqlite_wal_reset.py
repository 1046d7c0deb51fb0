"""Committed rows lost by SQLite's WAL-reset bug, with dsched's write pattern, on the system's SQLite and on ours.

    python -m dsched.bench.sqlite_wal_reset --driver system|dsched [--procs 12 --seconds 200 --checkpoint-ms 2]

Several processes share one WAL file, as dsched's services do. Each process commits small ``INSERT OR REPLACE``
transactions (``BEGIN IMMEDIATE``, a few ``runs``-like rows) in bursts with idle gaps between them, checkpoints
(``PASSIVE``) from a second connection every ``--checkpoint-ms`` and reads committed keys back from a third.
Every key whose ``COMMIT`` returned is logged; at the end a fresh connection counts the logged keys missing from
the table and runs ``PRAGMA integrity_check``.

``--driver system`` is Python's ``sqlite3`` (the system's library: 3.40.1 on Debian 12, which has the bug);
``--driver dsched`` is :func:`dsched.libs.sqlite.connect` (apsw's bundled SQLite, 3.51.3 or later). The race is
rare: a run can pass on a buggy library. dsched checkpoints every 200 ms per process; a 1-2 ms interval and many
processes make the race frequent enough to see within minutes.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import random
import sqlite3
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

SCHEMA = (
    "CREATE TABLE IF NOT EXISTS runs (run_id TEXT PRIMARY KEY, job_id TEXT NOT NULL, body BLOB NOT NULL) WITHOUT ROWID"
)
MAX_STEPS = 10_000_000  # bound on every loop besides its deadline


def _open(driver: str, path: Path, synchronous: str) -> Any:
    if driver == "dsched":
        from dsched.libs import sqlite

        conn: Any = sqlite.connect(path)
    else:
        conn = sqlite3.connect(path, timeout=30, isolation_level=None, check_same_thread=False)
        conn.execute("PRAGMA busy_timeout=30000")
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute(f"PRAGMA synchronous={synchronous}")
    conn.execute("PRAGMA wal_autocheckpoint=0")  # as dsched: checkpoints come from their own connection
    return conn


def _version(driver: str) -> str:
    if driver == "dsched":
        from dsched.libs import sqlite

        return ".".join(map(str, sqlite.sqlite_version()))
    return sqlite3.sqlite_version


def _process(index: int, args: argparse.Namespace, path: Path, deadline: float, log: Path) -> None:
    synchronous = "FULL" if index % 2 == 0 else "NORMAL"
    writer = _open(args.driver, path, synchronous)
    stop = threading.Event()
    recent: list[str] = []

    def checkpoints() -> None:
        conn = _open(args.driver, path, synchronous)
        for _ in range(MAX_STEPS):
            if stop.is_set() or time.time() > deadline:
                break
            try:
                conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
            except Exception:  # busy: try again next time, as dsched does
                pass
            time.sleep(args.checkpoint_ms / 1000)
        conn.close()

    def reads() -> None:
        conn = _open(args.driver, path, synchronous)
        for _ in range(MAX_STEPS):
            if stop.is_set() or time.time() > deadline:
                break
            if recent:
                conn.execute("SELECT length(body) FROM runs WHERE run_id = ?", (random.choice(recent),)).fetchall()
            time.sleep(0.002)
        conn.close()

    threads = [threading.Thread(target=checkpoints), threading.Thread(target=reads)]
    for thread in threads:
        thread.start()
    seq = 0
    with log.open("w") as out:
        for _ in range(MAX_STEPS):
            if time.time() >= deadline:
                break
            for _ in range(random.randint(1, args.burst)):
                rows = []
                for _ in range(random.randint(1, 4)):
                    seq += 1
                    job = f"job{random.randint(0, 40):03d}"
                    key = f"{job}-{index:02d}-{seq:08d}" if random.random() < 0.7 else f"{random.getrandbits(64):016x}"
                    rows.append((key, job, os.urandom(random.randint(300, 600))))
                for _ in range(200_000):  # BEGIN IMMEDIATE, waiting in short steps as libs/sqlite.begin_immediate
                    try:
                        writer.execute("BEGIN IMMEDIATE")
                        break
                    except Exception:
                        time.sleep(random.uniform(0.0002, 0.001))
                writer.executemany("INSERT OR REPLACE INTO runs (run_id, job_id, body) VALUES (?, ?, ?)", rows)
                writer.execute("COMMIT")
                out.write("".join(key + "\n" for key, _, _ in rows))
                recent[:] = [*recent[-2000:], *(key for key, _, _ in rows)]
            time.sleep(random.uniform(0, args.idle_ms) / 1000)
    stop.set()
    for thread in threads:
        thread.join(timeout=60)
    writer.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--driver", choices=["system", "dsched"], required=True)
    parser.add_argument("--procs", type=int, default=12)
    parser.add_argument("--seconds", type=float, default=200.0)
    parser.add_argument("--checkpoint-ms", type=float, default=2.0)
    parser.add_argument("--idle-ms", type=float, default=100.0, help="longest idle gap between bursts")
    parser.add_argument("--burst", type=int, default=2, help="most transactions in a burst")
    args = parser.parse_args()
    args.seconds = min(args.seconds, 900.0)
    with tempfile.TemporaryDirectory(prefix="dsched-wal-reset-") as tmp:
        path = Path(tmp) / "runs.db"
        setup = _open(args.driver, path, "FULL")
        setup.execute(SCHEMA)
        setup.close()
        deadline = time.time() + args.seconds
        context = multiprocessing.get_context("spawn")
        logs = [Path(tmp) / f"committed-{i}.txt" for i in range(args.procs)]
        procs = [context.Process(target=_process, args=(i, args, path, deadline, logs[i])) for i in range(args.procs)]
        for proc in procs:
            proc.start()
        for proc in procs:
            proc.join(timeout=args.seconds + 120)
            if proc.is_alive():
                proc.kill()
                proc.join()
        committed = {line for log in logs for line in log.read_text().split()}
        check = _open(args.driver, path, "FULL")
        present = {row[0] for row in check.execute("SELECT run_id FROM runs").fetchall()}
        integrity = [row[0] for row in check.execute("PRAGMA integrity_check").fetchall()]
        check.close()
    print(
        f"driver={args.driver} sqlite={_version(args.driver)} procs={args.procs} seconds={args.seconds:.0f} "
        f"checkpoint_ms={args.checkpoint_ms:g}: committed {len(committed)} rows, "
        f"missing {len(committed - present)}, integrity {'ok' if integrity == ['ok'] else '; '.join(integrity[:3])}"
    )


if __name__ == "__main__":
    main()
