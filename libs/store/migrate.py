"""``dsched db migrate``: apply the versioned CQL migrations of ``db/migrations`` to a Scylla keyspace.

Migration files are named ``NNNN_name.cql`` and applied in version order. Each is a template with the
placeholders ``{keyspace}`` (from the store URL's path), ``{replication}`` (from its ``replication``
parameter, see :mod:`libs.store.scylla`) and ``{keyspace_options}`` (`` AND tablets = {'enabled': false}``
on a Scylla that has tablets, whose keyspaces do not support the LWTs the store relies on; else empty);
statements are separated by ``;`` at the end of a line and ``--``
starts a comment line. Every statement is ``IF NOT EXISTS``, so applying a migration again after a partial
failure is harmless; once all its statements succeeded, the version is recorded in ``schema_migrations``
with the file's checksum. An applied migration whose file changed since is an error: add a new migration
instead of editing one.

Run one ``migrate`` at a time (the deploy stack's init job): concurrent schema changes of the same table from
two clients can leave a cluster in schema disagreement.

The files are found without making ``db`` a Python package: next to the source tree this module lives in
(a checkout, or an editable install, whose modules stay in the checkout), else under the working directory
(the Docker image copies ``db/`` into its workdir).
"""

from __future__ import annotations

import asyncio
import hashlib
import importlib.resources
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dsched.libs import logs
from dsched.libs.clock import now_ms
from dsched.libs.errors import BackendConfigError
from dsched.libs.settings import Settings
from dsched.libs.store.scylla import ScyllaConfig, build_cluster, parse_url

logger = logs.get("db.migrate")

_FILE_NAME = re.compile(r"^(?P<version>\d{4})_(?P<name>[a-z0-9_]+)\.cql$")
_PLACEHOLDER = re.compile(r"\{[a-z_]+\}")


class MigrationError(BackendConfigError):
    """The migrations cannot be found, parsed or applied; the message is one line for the operator."""


@dataclass(frozen=True, slots=True)
class Migration:
    version: str
    name: str
    path: Path
    text: str

    @property
    def checksum(self) -> str:
        return hashlib.sha256(self.text.encode()).hexdigest()

    def statements(self, keyspace: str, replication: str, keyspace_options: str = "") -> list[str]:
        return render(self.text, keyspace=keyspace, replication=replication, keyspace_options=keyspace_options)


def migrations_dir() -> Path:
    """The migrations shipped in the package ``dsched.db`` (the repository's ``db/migrations``)."""
    directory = Path(str(importlib.resources.files("dsched.db").joinpath("migrations")))
    if not directory.is_dir():
        raise MigrationError(f"the packaged migrations are missing ({directory})")
    return directory


def discover(directory: Path | None = None) -> list[Migration]:
    """The migration files of ``directory`` (default: :func:`migrations_dir`), in version order."""
    directory = directory or migrations_dir()
    found: dict[str, Migration] = {}
    for path in sorted(directory.glob("*.cql")):
        match = _FILE_NAME.match(path.name)
        if match is None:
            raise MigrationError(f"{path}: migration files are named NNNN_lowercase_name.cql")
        version = match["version"]
        if version in found:
            raise MigrationError(f"{path}: version {version} also in {found[version].path.name}")
        found[version] = Migration(version, match["name"], path, path.read_text(encoding="utf-8"))
    if not found:
        raise MigrationError(f"no migrations in {directory}")
    return [found[v] for v in sorted(found)]


def render(text: str, *, keyspace: str, replication: str, keyspace_options: str = "") -> list[str]:
    """The statements of a migration template, placeholders substituted, comment lines dropped."""
    lines = [line for line in text.splitlines() if not line.strip().startswith("--")]
    body = "\n".join(lines)
    for name, value in (
        ("keyspace", keyspace),
        ("replication", replication),
        ("keyspace_options", keyspace_options),
    ):
        body = body.replace(f"{{{name}}}", value)
    leftover = _PLACEHOLDER.search(body)
    if leftover:
        raise MigrationError(f"unknown placeholder {leftover.group()} in a migration")
    statements = [" ".join(part.split()) for part in re.split(r";\s*$", body, flags=re.M)]
    return [s for s in statements if s]


async def migrate(url: str, settings: Settings, directory: Path | None = None) -> list[str]:
    """Apply the migrations missing from the keyspace of store URL ``url``; returns the versions applied.

    Idempotent: a second run applies nothing and returns ``[]``. Blocking driver work runs in a thread.
    """
    del settings  # the layout is recorded by the services (check_layout), not by the schema
    config = parse_url(url)
    migrations = discover(directory)
    try:
        return await asyncio.to_thread(_apply, config, migrations)
    except MigrationError:
        raise
    except Exception as exc:  # the driver's errors (unreachable, rejected DDL) as one line for the CLI
        message = " ".join(f"{type(exc).__name__}: {exc}".split())
        hosts = ",".join(f"{host}:{port}" for host, port in config.contact_points)  # no credentials
        raise MigrationError(f"migrating keyspace {config.keyspace} at {hosts}: {message}") from exc


async def drop_keyspace(url: str, settings: Settings) -> None:
    """Drop the keyspace of ``url`` and everything in it (tests and throwaway dev keyspaces)."""
    del settings
    config = parse_url(url)
    await asyncio.to_thread(_execute_one, config, f"DROP KEYSPACE IF EXISTS {config.keyspace}")


def _execute_one(config: ScyllaConfig, statement: str) -> None:
    cluster = build_cluster(config)
    try:
        cluster.connect().execute(statement)
    finally:
        cluster.shutdown()


def _applied_checksum(session: Any, keyspace: str, version: str) -> str | None:
    """The recorded checksum of ``version``; None if not applied (or no keyspace/table yet)."""
    from cassandra import InvalidRequest

    try:
        rows = session.execute(
            f"SELECT checksum FROM {keyspace}.schema_migrations WHERE version = %s", (version,)
        ).all()
    except InvalidRequest:  # keyspace or table does not exist: nothing applied
        return None
    return str(rows[0]["checksum"]) if rows else None


TABLETS_OFF = " AND tablets = {'enabled': false}"


def _keyspace_options(session: Any) -> str:
    """Tablets off where the server has them (Scylla >= 6 has ``scylla_keyspaces.initial_tablets``)."""
    rows = session.execute(
        "SELECT column_name FROM system_schema.columns WHERE keyspace_name = %s AND table_name = %s",
        ("system_schema", "scylla_keyspaces"),
    ).all()
    return TABLETS_OFF if any(row["column_name"] == "initial_tablets" for row in rows) else ""


def _apply(config: ScyllaConfig, migrations: list[Migration]) -> list[str]:
    cluster = build_cluster(config)
    applied: list[str] = []
    try:
        session = cluster.connect()
        options = _keyspace_options(session)
        for migration in migrations:
            recorded = _applied_checksum(session, config.keyspace, migration.version)
            if recorded is not None:
                if recorded != migration.checksum:
                    raise MigrationError(
                        f"migration {migration.path.name} changed after it was applied to {config.keyspace}; "
                        "add a new migration instead"
                    )
                continue
            for statement in migration.statements(config.keyspace, config.replication, options):
                session.execute(statement)  # DDL: the driver waits for schema agreement
            session.execute(
                f"INSERT INTO {config.keyspace}.schema_migrations (version, name, checksum, applied_ms) "
                "VALUES (%s, %s, %s, %s)",
                (migration.version, migration.name, migration.checksum, now_ms()),
            )
            applied.append(migration.version)
            logger.info("migration_applied", keyspace=config.keyspace, version=migration.version, name=migration.name)
    finally:
        cluster.shutdown()
    return applied
