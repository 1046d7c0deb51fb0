"""``dsched db migrate`` against a real CQL server (the session's Cassandra): it creates the schema, and
running it again changes nothing."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from cassandra.cluster import Cluster

from dsched.libs.servers import CassandraServer
from dsched.libs.store.migrate import discover
from tests.helpers import backends


def _migrate_cli(store_url: str, tmp_path: Path) -> str:
    env = {**os.environ, "DSCHED_STORE_URL": store_url, "DSCHED_DATA_DIR": str(tmp_path)}
    done = subprocess.run(
        [sys.executable, "-m", "dsched.app.cli", "db", "migrate"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def _tables_and_versions(server: CassandraServer, keyspace: str) -> tuple[set[str], list[str]]:
    cluster = Cluster(["127.0.0.1"], port=server.port, protocol_version=4)
    try:
        session = cluster.connect()
        tables = {
            row.table_name
            for row in session.execute(
                "SELECT table_name FROM system_schema.tables WHERE keyspace_name = %s", (keyspace,)
            )
        }
        versions = sorted(row.version for row in session.execute(f"SELECT version FROM {keyspace}.schema_migrations"))
        return tables, versions
    finally:
        cluster.shutdown()


def test_db_migrate_creates_the_schema_once_and_is_idempotent(
    cassandra_server: CassandraServer, tmp_path: Path
) -> None:
    keyspace = backends.unique("dsched_migrate").replace("-", "_")
    url = cassandra_server.url(keyspace)
    every = [m.version for m in discover()]

    first = _migrate_cli(url, tmp_path)
    assert f"applied {len(every)} migration(s)" in first
    tables, versions = _tables_and_versions(cassandra_server, keyspace)
    assert versions == every
    assert {"jobs", "job_queue", "job_runs", "run_claims", "schema_migrations"} <= tables

    second = _migrate_cli(url, tmp_path)
    assert "applied 0 migration(s): none needed" in second
    assert _tables_and_versions(cassandra_server, keyspace) == (tables, versions)
