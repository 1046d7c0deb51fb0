"""Scylla adapter pieces that need no server, and the whole store contract against an in-memory CQL double.

No ScyllaDB can run here, so :class:`FakeCql` stands in for the server *and* checks what a server would
refuse: it builds its tables from the real migration files (run through ``migrate``), prepares the real
statements (unknown tables or columns, a WHERE clause that does not pin the partition key, a slice on a
clustering column whose predecessors are not pinned: all rejected), and answers through ResponseFuture-like
objects that call back from another thread, a few rows per page. Its semantics are CQL's: INSERT and UPDATE
are upserts of the named columns only, ``UNSET`` leaves a column alone, LWTs return ``[applied]`` with the
existing row, TTLs expire rows, token-range reads go in token order. The contract suite then runs
unchanged on a ``ScyllaStore`` wired to it, which covers the store's own logic (parameter order, paging,
cursors, LWT handling, the definition/state column split) but not Scylla itself: that is the ``[scylla]``
contract run with ``DSCHED_TEST_SCYLLA``.
"""

from __future__ import annotations

import asyncio
import re
import threading
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from cassandra import InvalidRequest
from cassandra.murmur3 import murmur3
from cassandra.query import UNSET_VALUE

from dsched.libs.errors import BackendConfigError
from dsched.libs.models import Job, JobState, JobStatus, LastRun, Payload, RunStatus
from dsched.libs.settings import Settings
from dsched.libs.store import migrate as migrate_module
from dsched.libs.store import scylla
from dsched.libs.store.migrate import MigrationError, discover, migrate, render
from dsched.libs.store.scylla import (
    NON_IDEMPOTENT,
    PARTITION_KEYS,
    RING,
    SCHEMA_VERSION,
    TOKEN_RANGE_STATEMENTS,
    SchemaNotMigrated,
    ScyllaStore,
    ScyllaUrlError,
    bridge,
    decode_cursor,
    encode_cursor,
    job_definition,
    job_from_row,
    merge_states,
    parse_url,
    replication_literal,
    sample_coverage,
    state_params,
    statements,
)
from tests.helpers import store_contract
from tests.helpers.store_contract import T0, dead, entry

# URL parsing ----------------------------------------------------------------------------------------------


def test_url_defaults() -> None:
    config = parse_url("scylla://s1:9042,s2/dsched")
    assert config.contact_points == (("s1", 9042), ("s2", 9042))
    assert config.keyspace == "dsched"
    assert config.local_dc is None
    assert (config.consistency, config.serial_consistency) == (6, 8)  # LOCAL_QUORUM, SERIAL
    assert config.replication == "{'class': 'SimpleStrategy', 'replication_factor': 1}"
    assert config.username is None


def test_url_parameters_and_credentials() -> None:
    config = parse_url(
        "scylla://app:p%40ss@[::1]:19042,s2:9043/ks_1?dc=eu-west&consistency=quorum"
        "&serial_consistency=LOCAL_SERIAL&replication=NetworkTopologyStrategy:eu-west=3,us=2"
    )
    assert config.contact_points == (("::1", 19042), ("s2", 9043))
    assert (config.username, config.password) == ("app", "p@ss")
    assert config.local_dc == "eu-west"
    assert (config.consistency, config.serial_consistency) == (4, 9)  # QUORUM, LOCAL_SERIAL
    assert config.replication == "{'class': 'NetworkTopologyStrategy', 'eu-west': 3, 'us': 2}"


@pytest.mark.parametrize(
    ("spec", "literal"),
    [
        ("SimpleStrategy:3", "{'class': 'SimpleStrategy', 'replication_factor': 3}"),
        ("NetworkTopologyStrategy:dc1=3", "{'class': 'NetworkTopologyStrategy', 'dc1': 3}"),
    ],
)
def test_replication_literal(spec: str, literal: str) -> None:
    assert replication_literal(spec) == literal


@pytest.mark.parametrize(
    ("url", "fragment"),
    [
        ("cassandra://h/ks", "scylla://"),
        ("scylla:///ks", "no hosts"),
        ("scylla://h:x/ks", "bad port"),
        ("scylla://h:70000/ks", "bad port"),
        ("scylla://h", "keyspace"),
        ("scylla://h/my-keyspace", "keyspace"),
        ("scylla://h/ks?consistency=MOST", "consistency"),
        ("scylla://h/ks?replication=SimpleStrategy", "needs a factor"),
        ("scylla://h/ks?replication=NetworkTopologyStrategy:dc1", "NetworkTopologyStrategy"),
        ("scylla://h/ks?replication=LocalStrategy:1", "replication"),
        ("scylla://h/ks?dcc=x", "unknown"),
    ],
)
def test_bad_urls_are_one_clear_line(url: str, fragment: str) -> None:
    with pytest.raises(ScyllaUrlError) as info:
        parse_url(url)
    assert fragment in str(info.value)
    assert isinstance(info.value, BackendConfigError)


# Statements -----------------------------------------------------------------------------------------------
_TABLE = re.compile(r"\b(?:FROM|INTO|UPDATE)\s+(\w+)")


def _inserted_columns(cql: str) -> tuple[str, ...]:
    """The column list of an INSERT, in bind order."""
    columns = re.search(r"\(([^)]*)\) VALUES", cql)
    assert columns is not None, cql
    return tuple(c.strip() for c in columns.group(1).split(","))


def test_every_statement_addresses_one_partition() -> None:
    for name, cql in statements().items():
        table = _TABLE.search(cql)
        assert table is not None, name
        keys = PARTITION_KEYS[table.group(1)]
        if cql.startswith("INSERT"):
            assert set(keys) <= set(_inserted_columns(cql)), name
            continue
        where = cql.split(" WHERE ", 1)[1]
        if name in TOKEN_RANGE_STATEMENTS:
            assert re.match(rf"token\({', '.join(keys)}\) (>=|<) \? LIMIT \?$", where), name
            continue
        for key in keys:
            assert re.search(rf"\b{key} = \?", where), f"{name}: {key} not pinned"


def test_conditional_statements_are_exactly_the_non_idempotent_ones() -> None:
    lwt = {name for name, cql in statements().items() if " IF " in cql}
    assert lwt == NON_IDEMPOTENT
    assert "IF NOT EXISTS USING TTL ?" in statements()["claim_idempotency_key"]


def test_partition_keys_match_the_migrations() -> None:
    engine = FakeCql()
    for migration in discover():
        for statement in migration.statements("ks", "{'class': 'SimpleStrategy', 'replication_factor': 1}"):
            engine.execute(statement, ())
    assert {name: table.partition for name, table in engine.tables.items()} == PARTITION_KEYS


def test_statements_grouped_by_partition_name_their_keys_first() -> None:
    """The store groups these statements' rows by their leading bind values and keeps one row per primary key: a
    width that no longer matches the schema would batch across partitions or drop distinct rows."""
    engine = migrated_engine()
    assert scylla.GROUPED_BY_PARTITION
    for name, (partition_width, key_width) in scylla.GROUPED_BY_PARTITION.items():
        cql = statements()[name]
        table = _TABLE.search(cql)
        assert table is not None, name
        if cql.startswith("INSERT"):
            bound = _inserted_columns(cql)
        else:
            bound = tuple(re.findall(r"(\w+) = \?", cql.split(" WHERE ", 1)[1]))
        schema = engine.tables[table.group(1)]
        assert bound[:partition_width] == tuple(schema.partition), name
        assert bound[:key_width] == tuple(schema.partition) + tuple(schema.clustering), name


def test_every_statement_prepares_against_the_migrated_schema() -> None:
    engine = migrated_engine()
    for cql in statements().values():
        engine.prepare(cql)  # raises InvalidRequest like a server would


# Migrations -----------------------------------------------------------------------------------------------
def test_migrations_are_found_in_version_order_and_the_code_needs_the_newest() -> None:
    migrations = discover()
    assert [m.version for m in migrations] == sorted(m.version for m in migrations)
    assert migrations[0].name == "initial"
    assert migrations[-1].version == SCHEMA_VERSION
    assert all(m.path.parent.name == "migrations" and m.path.parent.parent.name == "db" for m in migrations)


def test_migrations_are_read_from_the_package() -> None:
    assert migrate_module.migrations_dir().parent.name == "db"
    assert (migrate_module.migrations_dir() / "0001_initial.cql").is_file()


def test_discover_orders_by_version_and_rejects_bad_names(tmp_path: Path) -> None:
    (tmp_path / "0002_more.cql").write_text("CREATE TABLE IF NOT EXISTS {keyspace}.b (k int PRIMARY KEY);")
    (tmp_path / "0001_first.cql").write_text("CREATE TABLE IF NOT EXISTS {keyspace}.a (k int PRIMARY KEY);")
    (tmp_path / "README.md").write_text("ignored")
    assert [(m.version, m.name) for m in discover(tmp_path)] == [("0001", "first"), ("0002", "more")]
    (tmp_path / "0002_again.cql").write_text("")
    with pytest.raises(MigrationError, match="version 0002"):
        discover(tmp_path)
    (tmp_path / "0002_again.cql").unlink()
    (tmp_path / "3_Bad.cql").write_text("")
    with pytest.raises(MigrationError, match="NNNN_"):
        discover(tmp_path)
    with pytest.raises(MigrationError, match="no migrations"):
        discover(tmp_path / "empty-does-not-exist")


def test_render_substitutes_placeholders_and_splits_statements() -> None:
    text = """-- a comment; with a semicolon
CREATE KEYSPACE IF NOT EXISTS {keyspace}
    WITH replication = {replication}{keyspace_options};

CREATE TABLE IF NOT EXISTS {keyspace}.t (
    k int PRIMARY KEY
) WITH compaction = {'class': 'SizeTieredCompactionStrategy'};
"""
    assert render(text, keyspace="ks", replication="{'class': 'X'}", keyspace_options=" AND tablets = {}") == [
        "CREATE KEYSPACE IF NOT EXISTS ks WITH replication = {'class': 'X'} AND tablets = {}",
        "CREATE TABLE IF NOT EXISTS ks.t ( k int PRIMARY KEY ) "
        "WITH compaction = {'class': 'SizeTieredCompactionStrategy'}",
    ]
    with pytest.raises(MigrationError, match=r"\{tablename\}"):
        render("CREATE TABLE {keyspace}.{tablename} (k int PRIMARY KEY);", keyspace="ks", replication="")


def test_every_migration_statement_is_idempotent() -> None:
    for migration in discover():
        for statement in migration.statements("ks", "{}"):
            assert "IF NOT EXISTS" in statement, statement


# Row codecs -----------------------------------------------------------------------------------------------
def make_job(**fields: Any) -> Job:
    base: dict[str, Any] = {
        "job_id": "j1",
        "user_id": "u",
        "project_id": "p",
        "payload": Payload(kind="echo", text="hi"),
        "next_fire_ms": 2000,
        "created_ms": 1000,
    }
    return Job.model_validate({**base, **fields})


def test_job_definition_excludes_runtime_state_and_round_trips() -> None:
    last = LastRun(run_id="r", status=RunStatus.FAILED, attempt=1, scheduled_ms=5)
    job = make_job(state=JobStatus.RUNNING, last_run=last, dispatched_through_ms=9)
    definition = job_definition(job)
    assert "dispatched_through_ms" not in definition and '"state"' not in definition
    row = {
        "definition": definition,
        "state": "running",
        "last_run": last.model_dump_json(),
        "dispatched_through_ms": 9,
    }
    assert job_from_row(row) == job
    assert job_from_row({**row, "state": None, "last_run": None, "dispatched_through_ms": None}) == make_job()
    assert job_from_row({"definition": None, "state": "running"}) is None  # a state-only (unknown) job


def test_state_params_leave_unset_fields_untouched_and_carry_the_decision_time() -> None:
    assert state_params(JobState(job_id="j")) is None
    params = state_params(JobState(job_id="j", dispatched_through_ms=0, at_us=7))
    assert params == (7, UNSET_VALUE, UNSET_VALUE, 0, "j")


def test_merge_states_merges_what_was_decided_together_in_order() -> None:
    last = LastRun(run_id="r", status=RunStatus.SUCCEEDED, attempt=0, scheduled_ms=5)
    merged = merge_states(
        [
            JobState(job_id="a", state=JobStatus.QUEUED, dispatched_through_ms=5, at_us=10),
            JobState(job_id="b", state=JobStatus.RUNNING, at_us=10),
            JobState(job_id="a", state=JobStatus.SUCCEEDED, last_run=last, at_us=10),
            JobState(job_id="a", state=JobStatus.QUEUED, at_us=4),  # decided earlier: its own write, which loses
        ]
    )
    assert merged == [
        JobState(job_id="a", state=JobStatus.SUCCEEDED, last_run=last, dispatched_through_ms=5, at_us=10),
        JobState(job_id="b", state=JobStatus.RUNNING, at_us=10),
        JobState(job_id="a", state=JobStatus.QUEUED, at_us=4),
    ]


def test_cursors_round_trip_and_reject_garbage() -> None:
    assert decode_cursor(encode_cursor(5, "job"), 2) == [5, "job"]
    for bad in ("!!", encode_cursor(1), "bm90IGpzb24="):
        with pytest.raises(ValueError, match="invalid cursor"):
            decode_cursor(bad, 2)


def test_sample_coverage() -> None:
    start = 0
    assert sample_coverage(start, [{"t": 1}], [{"t": -5}], limit=3) == 1.0  # short: the whole ring
    half = sample_coverage(start, [{"t": 10}, {"t": 2**62 - 1}], [], limit=2)
    assert half == pytest.approx(2**62 / RING)
    wrapped = sample_coverage(2**62, [{"t": 2**62 + 1}], [{"t": -(2**63) + 2**62 - 1}], limit=2)
    assert wrapped == pytest.approx(0.5)


# The asyncio bridge ---------------------------------------------------------------------------------------
class FakeResponseFuture:
    """Like the driver's ResponseFuture: callbacks run on another thread, once per page."""

    reactor = ThreadPoolExecutor(4, thread_name_prefix="fake-reactor")

    def __init__(
        self,
        rows: list[Any] | None,
        *,
        page_size: int = 3,
        error: BaseException | None = None,
        delay_s: float = 0.0,
        on_done: Callable[[], None] | None = None,
    ) -> None:
        self._on_done = on_done
        self._pages = [rows[i : i + page_size] for i in range(0, len(rows), page_size)] if rows else [rows]
        self._error = error
        self._delay_s = delay_s
        self._page = 0
        self.threads: set[str] = set()
        self._callbacks: list[tuple[Callable[[Any], None], Callable[[BaseException], None]]] = []

    @property
    def has_more_pages(self) -> bool:
        return self._page < len(self._pages) - 1

    def add_callbacks(self, callback: Callable[[Any], None], errback: Callable[[BaseException], None]) -> None:
        self._callbacks.append((callback, errback))
        self.reactor.submit(self._deliver)

    def start_fetching_next_page(self) -> None:
        self._page += 1
        self.reactor.submit(self._deliver)

    def _deliver(self) -> None:
        time.sleep(self._delay_s)
        self.threads.add(threading.current_thread().name)
        last = self._error is not None or not self.has_more_pages
        if last and self._on_done is not None:
            self._on_done()
        for callback, errback in self._callbacks:
            if self._error is not None:
                errback(self._error)
            else:
                callback(self._pages[self._page])


async def test_bridge_collects_every_page_from_the_reactor_thread() -> None:
    response = FakeResponseFuture([{"i": i} for i in range(10)], page_size=3)
    rows = await bridge(response, asyncio.get_running_loop())
    assert rows == [{"i": i} for i in range(10)]
    assert response.threads and threading.current_thread().name not in response.threads


async def test_bridge_resolves_writes_to_no_rows() -> None:
    assert await bridge(FakeResponseFuture(None), asyncio.get_running_loop()) == []


async def test_bridge_raises_the_drivers_error() -> None:
    with pytest.raises(InvalidRequest, match="unconfigured table"):
        await bridge(FakeResponseFuture([], error=InvalidRequest("unconfigured table x")), asyncio.get_running_loop())


async def test_bridge_hands_over_errors_raised_while_paging() -> None:
    class Exhausted(FakeResponseFuture):
        def start_fetching_next_page(self) -> None:
            raise RuntimeError("connection lost")

    with pytest.raises(RuntimeError, match="connection lost"):
        await bridge(Exhausted([1, 2, 3, 4], page_size=2), asyncio.get_running_loop())


async def test_bridge_tolerates_a_cancelled_waiter() -> None:
    response = FakeResponseFuture([1], delay_s=0.05)
    future = bridge(response, asyncio.get_running_loop())
    future.cancel()
    await asyncio.sleep(0.1)  # the late callback finds the future done and does nothing
    assert future.cancelled()


async def test_bridges_run_concurrently() -> None:
    loop = asyncio.get_running_loop()
    started = time.monotonic()
    results = await asyncio.gather(*(bridge(FakeResponseFuture([i], delay_s=0.1), loop) for i in range(4)))
    assert results == [[0], [1], [2], [3]]
    assert time.monotonic() - started < 0.35


# An in-memory CQL double ----------------------------------------------------------------------------------
@dataclass
class Table:
    name: str
    columns: list[str]
    partition: tuple[str, ...]
    clustering: tuple[str, ...]
    descending: frozenset[str]
    default_ttl: int = 0
    # partition key -> clustering key -> (row, expiry or None)
    data: dict[tuple[Any, ...], dict[tuple[Any, ...], tuple[dict[str, Any], float | None]]] = field(
        default_factory=dict
    )
    # (partition key, clustering key) -> column -> its cell's write timestamp (µs), as WRITETIME returns it
    written: dict[tuple[tuple[Any, ...], tuple[Any, ...]], dict[str, int]] = field(default_factory=dict)

    def live_rows(self, pk: tuple[Any, ...]) -> list[dict[str, Any]]:
        now = time.monotonic()
        partition = self.data.get(pk, {})
        keys = sorted(partition, key=self.order_key)
        return [dict(row) for k in keys for row, expiry in [partition[k]] if expiry is None or expiry > now]

    def order_key(self, ck: tuple[Any, ...]) -> tuple[Any, ...]:
        return tuple(_Desc(v) if c in self.descending else v for c, v in zip(self.clustering, ck, strict=True))


class _Desc:
    def __init__(self, value: Any) -> None:
        self.value = value

    def __lt__(self, other: _Desc) -> bool:
        return bool(self.value > other.value)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _Desc) and self.value == other.value


@dataclass
class Prepared:
    query_string: str
    kind: str
    table: Table
    parts: dict[str, Any]
    markers: int
    is_idempotent: bool = False


_OPS: dict[str, Callable[[Any, Any], bool]] = {
    "=": lambda a, b: a == b,
    "<": lambda a, b: a < b,
    "<=": lambda a, b: a <= b,
    ">": lambda a, b: a > b,
    ">=": lambda a, b: a >= b,
}


_SHAPES = {
    "insert": r"INSERT INTO (\w+) \(([^)]*)\) VALUES \(([^)]*)\)"
    r"(?P<ine> IF NOT EXISTS)?(?P<ttl> USING TTL \?)?$",
    "update": r"UPDATE (\w+)(?P<ts> USING TIMESTAMP \?)? SET (.*?) WHERE (.*?)(?: IF (?P<cond>.*))?$",
    "delete": r"DELETE FROM (\w+) WHERE (.*)$",
    "select": r"SELECT (.*?) FROM (\w+) WHERE (.*?)(?P<limit> LIMIT \?)?$",
}


def _split_top(text: str) -> list[str]:
    parts, depth, current = [], 0, ""
    for char in text:
        depth += char == "("
        depth -= char == ")"
        if char == "," and depth == 0:
            parts.append(current.strip())
            current = ""
        else:
            current += char
    return [*parts, current.strip()] if current.strip() else parts


def _names(text: str) -> tuple[str, ...]:
    return tuple(n.strip() for n in text.strip("() ").split(",") if n.strip())


class FakeCql:
    """Tables, DDL, and the DML/SELECT shapes the store uses, validated as a CQL server would."""

    def __init__(self) -> None:
        self.tables: dict[str, Table] = {}
        self.keyspaces: set[str] = set()
        self.lock = threading.Lock()
        self.clusters: list[FakeCluster] = []  # every Cluster the code under test built

    # DDL and simple statements (migrate's session.execute)
    def execute(self, cql: str, params: tuple[Any, ...]) -> list[dict[str, Any]]:
        cql = " ".join(cql.replace("%s", "?").split()).rstrip(";")
        if cql.startswith("CREATE KEYSPACE IF NOT EXISTS "):
            self.keyspaces.add(cql.split()[5])
            return []
        if cql.startswith("DROP KEYSPACE IF EXISTS "):
            self.keyspaces.discard(cql.split()[4])
            self.tables.clear()
            return []
        if cql.startswith("CREATE TABLE IF NOT EXISTS "):
            self._create_table(cql)
            return []
        if "system_schema.columns" in cql:
            return []  # a server without tablets
        return self.run(self.prepare(re.sub(r"\b\w+\.(\w+)", r"\1", cql, count=1)), params)

    def _create_table(self, cql: str) -> None:
        match = re.match(r"CREATE TABLE IF NOT EXISTS (\w+)\.(\w+) \( (.*) \)(?: WITH (.*))?$", cql)
        assert match, cql
        keyspace, name, body, options = match.groups()
        if keyspace not in self.keyspaces:
            raise InvalidRequest(f"Keyspace {keyspace} does not exist")
        columns: list[str] = []
        primary: list[str] = []
        for item in _split_top(body):
            if item.startswith("PRIMARY KEY"):
                primary = _split_top(item[len("PRIMARY KEY") :].strip()[1:-1])
            else:
                columns.append(item.split()[0])
                if item.endswith("PRIMARY KEY"):
                    primary = [item.split()[0]]
        partition, clustering = _names(primary[0]), tuple(primary[1:])
        order = re.search(r"CLUSTERING ORDER BY \(([^)]*)\)", options or "")
        descending = {c.split()[0] for c in order.group(1).split(",") if c.split()[1] == "DESC"} if order else set()
        assert set(partition) | set(clustering) <= set(columns), name
        if order:
            assert tuple(c.split()[0] for c in order.group(1).split(",")) == clustering, name
        ttl = re.search(r"default_time_to_live = (\d+)", options or "")
        self.tables.setdefault(
            name,
            Table(name, columns, partition, clustering, frozenset(descending), int(ttl.group(1)) if ttl else 0),
        )

    # Prepared statements
    def prepare(self, cql: str) -> Prepared:
        qualified = re.search(r"\b(?:FROM|INTO|UPDATE) (\w+)\.\w+", cql)
        if qualified and qualified.group(1) not in self.keyspaces:
            raise InvalidRequest(f"Keyspace {qualified.group(1)} does not exist")
        shape = re.sub(r"\b(FROM|INTO|UPDATE) \w+\.(\w+)", r"\1 \2", cql)  # the store qualifies its tables
        found = [(kind, m) for kind, pattern in _SHAPES.items() if (m := re.match(pattern, shape))]
        if not found:
            raise InvalidRequest(f"unsupported statement {cql}")
        kind, match = found[0]
        table_name = match.group(2) if kind == "select" else match.group(1)
        table = self.tables.get(table_name)
        if table is None:
            raise InvalidRequest(f"unconfigured table {table_name}")
        parts: dict[str, Any] = {}
        if kind == "insert":
            parts["columns"] = _names(match.group(2))
            self._check_columns(table, parts["columns"])
            if not set(table.partition + table.clustering) <= set(parts["columns"]):
                raise InvalidRequest("Missing mandatory PRIMARY KEY part")
            parts["if_not_exists"], parts["ttl"] = bool(match["ine"]), bool(match["ttl"])
        elif kind == "update":
            parts["set"] = tuple(a.split("=")[0].strip() for a in match.group(3).split(","))
            self._check_columns(table, parts["set"])
            parts["where"] = self._where(table, match.group(4), full_key=True)
            parts["cond"] = match["cond"].split()[0] if match["cond"] else None
            parts["timestamp"] = bool(match["ts"])
            if parts["cond"] and parts["timestamp"]:
                raise InvalidRequest("Cannot provide custom timestamp for conditional updates")
        elif kind == "delete":
            parts["where"] = self._where(table, match.group(2), full_key=True)
        else:
            parts["selectors"] = self._selectors(table, match.group(1))
            parts["where"] = self._where(table, match.group(3), full_key=False)
            parts["limit"] = bool(match["limit"])
        return Prepared(cql, kind, table, parts, cql.count("?"))

    @staticmethod
    def _check_columns(table: Table, columns: tuple[str, ...]) -> None:
        unknown = set(columns) - set(table.columns)
        if unknown:
            raise InvalidRequest(f"Undefined column name {sorted(unknown)} in {table.name}")

    def _selectors(self, table: Table, text: str) -> list[tuple[str, Any]]:
        selectors: list[tuple[str, Any]] = []
        for item in _split_top(text):
            writetime = re.match(r"WRITETIME\((\w+)\) AS (\w+)$", item)
            if item == "COUNT(*) AS n":
                selectors.append(("count", "n"))
            elif writetime:
                self._check_columns(table, (writetime.group(1),))
                if writetime.group(1) in table.partition + table.clustering:
                    raise InvalidRequest("Cannot use selection function writeTime on PRIMARY KEY part")
                selectors.append(("writetime", (writetime.group(1), writetime.group(2))))
            elif item.startswith("token("):
                match = re.match(r"token\(([^)]*)\) AS (\w+)$", item)
                assert match and _names(match.group(1)) == table.partition, item
                selectors.append(("token", match.group(2)))
            else:
                self._check_columns(table, (item,))
                selectors.append(("column", item))
        return selectors

    def _where(self, table: Table, text: str, *, full_key: bool) -> list[tuple[str, tuple[str, ...], str]]:
        relations: list[tuple[str, tuple[str, ...], str]] = []
        for rel in text.split(" AND "):
            token = re.match(r"token\(([^)]*)\) (>=|<) \?$", rel)
            multi = re.match(r"\(([^)]*)\) (<|<=|>|>=) \(([^)]*)\)$", rel)
            single = re.match(r"(\w+) (=|<|<=|>|>=) \?$", rel)
            if token:
                if _names(token.group(1)) != table.partition:
                    raise InvalidRequest("token() must name the whole partition key")
                relations.append(("token", table.partition, token.group(2)))
            elif multi:
                relations.append(("multi", _names(multi.group(1)), multi.group(2)))
            elif single:
                relations.append(("single", (single.group(1),), single.group(2)))
            else:
                raise InvalidRequest(f"unsupported relation {rel}")
        if relations[0][0] == "token":
            if len(relations) != 1:
                raise InvalidRequest("token ranges are not combined with other relations here")
            return relations
        pinned = [r[1][0] for r in relations if r[0] == "single" and r[2] == "="]
        if not set(table.partition) <= set(pinned):
            raise InvalidRequest(f"{table.name}: the partition key {table.partition} must be pinned with =")
        clustering_relations = [r for r in relations if r[1][0] not in table.partition]
        last = clustering_relations[-1] if clustering_relations else None
        if (
            len(clustering_relations) >= 2
            and last is not None
            and clustering_relations[-2][1] == last[1]
            and {clustering_relations[-2][2][0], last[2][0]} == {"<", ">"}
        ):
            clustering_relations = clustering_relations[:-1]  # the other bound of one slice: ``c >= ? AND c <= ?``
        position = 0
        for i, (_, columns, op) in enumerate(clustering_relations):
            expected = table.clustering[position : position + len(columns)]
            if columns != expected:
                raise InvalidRequest(f"{table.name}: clustering restriction {columns} skips a preceding column")
            position += len(columns)
            if op != "=" and i != len(clustering_relations) - 1:
                raise InvalidRequest(f"{table.name}: a slice must restrict the last clustering column used")
        if full_key and (position != len(table.clustering) or any(r[2] != "=" for r in clustering_relations)):
            raise InvalidRequest(f"{table.name}: writes need the full primary key")
        return relations

    # Execution
    def run(self, prepared: Prepared, params: Any) -> list[dict[str, Any]]:
        params = list(params)
        if len(params) != prepared.markers:
            raise InvalidRequest(f"expected {prepared.markers} values, got {len(params)}")
        run: Callable[[Table, dict[str, Any], list[Any]], list[dict[str, Any]]] = getattr(self, f"_run_{prepared.kind}")
        with self.lock:
            return run(prepared.table, prepared.parts, params)

    def _bind_where(self, table: Table, where: list[Any], params: list[Any]) -> tuple[dict[str, Any], list[Any]]:
        eq: dict[str, Any] = {}
        filters: list[Any] = []
        for kind, columns, op in where:
            if kind == "multi":
                values = tuple(params.pop(0) for _ in columns)
                filters.append((columns, op, values))
            elif kind == "token":
                filters.append(("token", op, params.pop(0)))
            elif op == "=":
                eq[columns[0]] = params.pop(0)
            else:
                filters.append((columns, op, (params.pop(0),)))
        return eq, filters

    @staticmethod
    def _token(pk: tuple[Any, ...]) -> int:
        return int(murmur3(repr(pk).encode()))

    def _row(self, table: Table, pk: tuple[Any, ...], ck: tuple[Any, ...]) -> dict[str, Any] | None:
        entry = table.data.get(pk, {}).get(ck)
        if entry is None or (entry[1] is not None and entry[1] <= time.monotonic()):
            return None
        return entry[0]

    def _upsert(self, table: Table, values: dict[str, Any], ttl: int | None, timestamp: int | None = None) -> None:
        """Write ``values``; a cell keeps whichever value has the later write timestamp (the client's clock
        unless ``USING TIMESTAMP`` gives one), as in Cassandra, whatever order the writes arrive in."""
        pk = tuple(values[c] for c in table.partition)
        ck = tuple(values[c] for c in table.clustering)
        existing = self._row(table, pk, ck)
        row = dict(existing or {})
        written = table.written.setdefault((pk, ck), {}) if existing is not None else {}
        table.written[(pk, ck)] = written
        timestamp = time.time_ns() // 1000 if timestamp is None else timestamp
        for column, value in values.items():
            if value is UNSET_VALUE or written.get(column, -1) > timestamp:
                continue
            row[column] = value
            written[column] = timestamp
        ttl = ttl if ttl is not None else table.default_ttl
        expiry = time.monotonic() + ttl if ttl else None
        table.data.setdefault(pk, {})[ck] = (row, expiry)

    def _run_insert(self, table: Table, parts: dict[str, Any], params: list[Any]) -> list[dict[str, Any]]:
        values = dict(zip(parts["columns"], params, strict=False))
        ttl = params[-1] if parts["ttl"] else None
        if parts["if_not_exists"]:
            pk = tuple(values[c] for c in table.partition)
            existing = self._row(table, pk, tuple(values[c] for c in table.clustering))
            if existing is not None:
                return [{"[applied]": False, **existing}]
            self._upsert(table, values, ttl)
            return [{"[applied]": True}]
        self._upsert(table, values, ttl)
        return []

    def _run_update(self, table: Table, parts: dict[str, Any], params: list[Any]) -> list[dict[str, Any]]:
        timestamp = params.pop(0) if parts["timestamp"] else None
        sets = dict(zip(parts["set"], params[: len(parts["set"])], strict=True))
        rest = params[len(parts["set"]) :]
        cond_value = rest.pop() if parts["cond"] else None
        eq, _ = self._bind_where(table, parts["where"], rest)
        if parts["cond"]:
            pk = tuple(eq[c] for c in table.partition)
            existing = self._row(table, pk, tuple(eq[c] for c in table.clustering))
            current = None if existing is None else existing.get(parts["cond"])
            if existing is None or current != cond_value:
                return [{"[applied]": False, parts["cond"]: current}]
            self._upsert(table, {**eq, **sets}, None)
            return [{"[applied]": True, parts["cond"]: current}]
        self._upsert(table, {**eq, **sets}, None, timestamp)
        return []

    def _run_delete(self, table: Table, parts: dict[str, Any], params: list[Any]) -> list[dict[str, Any]]:
        eq, _ = self._bind_where(table, parts["where"], params)
        table.data.get(tuple(eq[c] for c in table.partition), {}).pop(tuple(eq[c] for c in table.clustering), None)
        return []

    def _run_select(self, table: Table, parts: dict[str, Any], params: list[Any]) -> list[dict[str, Any]]:
        limit = params.pop() if parts["limit"] else None
        eq, filters = self._bind_where(table, parts["where"], params)
        if filters and filters[0][0] == "token":
            _, op, bound = filters[0]
            pks = sorted((pk for pk in table.data if _OPS[op](self._token(pk), bound)), key=self._token)
            rows = [(pk, row) for pk in pks for row in table.live_rows(pk)]
        else:
            pk = tuple(eq[c] for c in table.partition)
            rows = [(pk, row) for row in table.live_rows(pk)]
            rows = [(p, r) for p, r in rows if all(r.get(c) == v for c, v in eq.items())]
            for columns, op, values in filters:
                rows = [(p, r) for p, r in rows if _OPS[op](tuple(r[c] for c in columns), values)]
        if parts["selectors"][0][0] == "count":
            return [{"n": len(rows)}]
        rows = rows[:limit] if limit is not None else rows
        return [
            dict(self._selected(table, pk, row, kind, name) for kind, name in parts["selectors"]) for pk, row in rows
        ]

    def _selected(
        self, table: Table, pk: tuple[Any, ...], row: dict[str, Any], kind: str, name: Any
    ) -> tuple[str, Any]:
        if kind == "token":
            return name, self._token(pk)
        if kind == "writetime":  # null for a null cell
            column, alias = name
            ck = tuple(row[c] for c in table.clustering)
            return alias, None if row.get(column) is None else table.written.get((pk, ck), {}).get(column)
        return name, row.get(name)


class FakeSession:
    def __init__(self, engine: FakeCql, cluster: FakeCluster) -> None:
        self.engine = engine
        self.cluster = cluster
        self.keyspace: str | None = None

    def set_keyspace(self, keyspace: str) -> None:
        if keyspace not in self.engine.keyspaces:
            raise InvalidRequest(f"Keyspace '{keyspace}' does not exist")
        self.keyspace = keyspace

    def prepare(self, cql: str) -> Prepared:
        return self.engine.prepare(cql)

    def execute(self, cql: str, params: tuple[Any, ...] = ()) -> Any:
        rows = self.engine.execute(cql, params)
        return type("ResultSet", (), {"all": lambda self: rows})()

    def execute_async(self, prepared: Prepared | FakeBatch, params: Any) -> FakeResponseFuture:
        cluster = self.cluster
        batch = isinstance(prepared, FakeBatch)
        parts = prepared.parts if isinstance(prepared, FakeBatch) else [(prepared, params)]
        with cluster.lock:
            cluster.in_flight += 1
            cluster.max_in_flight = max(cluster.max_in_flight, cluster.in_flight)
            cluster.executed.extend(statement.query_string for statement, _ in parts)
            if batch:
                cluster.batches.append(len(parts))
        rows: list[dict[str, Any]] = []
        error: BaseException | None = None
        try:
            for statement, values in parts:
                rows = self.engine.run(statement, values)
        except InvalidRequest as exc:
            rows, error = [], exc

        def done() -> None:
            with cluster.lock:
                cluster.in_flight -= 1

        # The driver passes None for writes (a batch holds only writes).
        result = rows if not batch and (parts[0][0].kind == "select" or rows) else None
        return FakeResponseFuture(result, page_size=2, error=error, delay_s=cluster.latency_s, on_done=done)


class FakeBatch:
    """Stands in for the driver's ``BatchStatement`` (whose ``add`` binds real prepared statements only)."""

    def __init__(self, batch_type: Any = None) -> None:
        self.batch_type = batch_type
        self.parts: list[tuple[Prepared, Any]] = []
        self.is_idempotent = False

    def add(self, statement: Prepared, parameters: Any) -> None:
        assert statement.kind != "select", "a batch holds writes only"
        self.parts.append((statement, parameters))


class FakeCluster:
    def __init__(self, engine: FakeCql) -> None:
        self.engine = engine
        self.lock = threading.Lock()
        self.latency_s = 0.0
        self.in_flight = 0
        self.max_in_flight = 0
        self.executed: list[str] = []
        self.batches: list[int] = []  # the statements in each batch executed
        self.shut_down = False
        self.metadata = type("Metadata", (), {"keyspaces": engine.keyspaces})()

    def connect(self) -> FakeSession:
        return FakeSession(self.engine, self)

    def shutdown(self) -> None:
        self.shut_down = True


def migrated_engine() -> FakeCql:
    engine = FakeCql()
    for migration in discover():
        for statement in migration.statements("ks", "{}"):
            engine.execute(statement, ())
    return engine


@pytest.fixture
def engine(monkeypatch: pytest.MonkeyPatch) -> FakeCql:
    engine = FakeCql()

    def build(config: Any) -> FakeCluster:
        engine.clusters.append(FakeCluster(engine))
        return engine.clusters[-1]

    monkeypatch.setattr(scylla, "build_cluster", build)
    monkeypatch.setattr(migrate_module, "build_cluster", build)
    monkeypatch.setattr(scylla, "BatchStatement", FakeBatch)
    return engine


URL = "scylla://127.0.0.1:9042/dsched_test"


@pytest.fixture
async def store(engine: FakeCql, tmp_path: Path) -> AsyncIterator[ScyllaStore]:
    settings = Settings.from_env(data_dir=tmp_path, shard_count=4, bucket_s=60)
    assert await migrate(URL, settings) == ["0001", "0002"]
    impl = ScyllaStore.from_url(URL, settings)
    await impl.startup()
    try:
        yield impl
    finally:
        await impl.shutdown()


# Migrate and startup --------------------------------------------------------------------------------------
async def test_migrate_applies_once_and_records_the_version(engine: FakeCql, tmp_path: Path) -> None:
    settings = Settings.from_env(data_dir=tmp_path)
    assert await migrate(URL, settings) == ["0001", "0002"]
    assert await migrate(URL, settings) == []
    [row] = engine.execute("SELECT version, checksum FROM schema_migrations WHERE version = ?", ("0001",))
    assert row["checksum"] == discover()[0].checksum


async def test_migrate_refuses_an_applied_migration_that_changed(
    engine: FakeCql, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = Settings.from_env(data_dir=tmp_path)
    await migrate(URL, settings)
    edited = tmp_path / "migrations"
    edited.mkdir()
    original = discover()[0]
    (edited / original.path.name).write_text(original.text + "\n-- edited\n")
    with pytest.raises(MigrationError, match="changed after it was applied"):
        await migrate(URL, settings, edited)


async def test_startup_without_migrations_says_what_to_run(engine: FakeCql, tmp_path: Path) -> None:
    store = ScyllaStore.from_url(URL, Settings.from_env(data_dir=tmp_path))
    with pytest.raises(SchemaNotMigrated, match="run `dsched db migrate`"):
        await store.startup()
    assert all(c.shut_down for c in engine.clusters)


async def test_startup_prepares_every_statement_once(store: ScyllaStore) -> None:
    assert set(store._prepared) == set(statements())
    assert {n for n, s in store._prepared.items() if not s.is_idempotent} == NON_IDEMPOTENT


async def test_writes_are_concurrent_but_bounded(store: ScyllaStore, engine: FakeCql) -> None:
    cluster = engine.clusters[-1]
    cluster.latency_s = 0.002
    jobs = [make_job(job_id=f"j{i}", created_ms=i) for i in range(300)]
    await store.put_jobs(jobs)
    assert len(await store.get_jobs([j.job_id for j in jobs])) == 300
    assert 1 < cluster.max_in_flight <= scylla.MAX_IN_FLIGHT


async def test_put_jobs_writes_definition_columns_only(store: ScyllaStore, engine: FakeCql) -> None:
    cluster = engine.clusters[-1]
    cluster.executed.clear()
    await store.put_jobs([make_job()])
    qualified = statements("dsched_test")
    assert sorted(cluster.executed) == sorted([qualified["put_job"], qualified["put_job_by_user"]])
    assert "state" not in statements()["put_job"]


async def test_a_batch_writes_each_key_once_with_its_last_value(store: ScyllaStore, engine: FakeCql) -> None:
    cluster = engine.clusters[-1]
    cluster.executed.clear()
    first, second = make_job(name="v1", version=1), make_job(name="v2", version=2)
    await store.put_jobs([first, second])
    assert cluster.executed.count(statements("dsched_test")["put_job"]) == 1
    assert (await store.get_jobs(["j1"]))["j1"].name == "v2"


async def test_rows_of_one_partition_go_as_batches_of_a_bounded_size(store: ScyllaStore, engine: FakeCql) -> None:
    cluster = engine.clusters[-1]
    jobs = [make_job(job_id=f"j{i}", created_ms=i) for i in range(45)]  # one user: one index partition
    await store.put_jobs(jobs)
    now = 1_900_000_020_000
    entries = [entry(1, now + i, job_id=f"j{i}") for i in range(30)] + [entry(2, now, job_id="alone")]
    await store.put_entries(entries)
    # The user's 45 index rows in batches of at most 20, the jobs one by one (45 partitions); the bucket's 30
    # entries in two batches, the other bucket's one entry alone.
    assert sorted(cluster.batches) == [5, 10, 20, 20, 20]
    assert max(cluster.batches) == scylla.PARTITION_BATCH_ROWS
    assert cluster.executed.count(statements("dsched_test")["put_job"]) == 45
    assert len(await store.due_entries(1, now - now % 60_000, now + 60_000, 100)) == 30
    cluster.batches.clear()
    await store.delete_entries(entries)
    assert sorted(cluster.batches) == [10, 20]
    assert await store.due_entries(1, now - now % 60_000, now + 60_000, 100) == []


async def test_stats_are_exact_on_small_tables(store: ScyllaStore) -> None:
    await store.check_layout(4, 60_000)
    now = 1_900_000_020_000
    jobs = [make_job(job_id=f"j{i}", created_ms=i) for i in range(5)]
    await store.put_jobs(jobs)
    await store.update_job_states(
        [JobState(job_id="j0", state=JobStatus.RUNNING), JobState(job_id="j1", state=JobStatus.FAILED)]
    )
    # Shard 1's picker is two buckets behind: its window starts there. Shard 2 has no checkpoint: its window
    # starts bucket_grace_s back. Shard 3's entry is not due yet; shard 0's lies before its window.
    await store.advance_checkpoint(1, None, now - 120_000)
    await store.put_entries([entry(1, now - 70_000), entry(1, now - 5), entry(2, now), entry(3, now + 1)])
    await store.put_entries([entry(0, now - 70_000)])
    await store.put_dead_letters([dead("u", 1), dead("u", 2)])
    stats = await store.stats(now)
    assert stats == {
        "scheduled": 3,
        "queued": 0,
        "running": 1,
        "succeeded": 0,
        "failed": 1,
        "due": 3,
        "dead": 2,
    }


async def test_due_entries_many_reads_every_partition_at_once(store: ScyllaStore, engine: FakeCql) -> None:
    entries = [
        entry(1, T0 + 5, job_id="a"),
        entry(1, T0 + 1, job_id="b", priority=10),
        entry(1, T0 + 1, job_id="c", priority=90),
        entry(2, T0 + 7),
        entry(2, T0 + 60_001),
    ]
    await store.put_entries(entries)
    partitions = [(1, T0), (2, T0), (3, T0), (1, T0)]
    found = await store.due_entries_many(partitions, T0 + 10, limit=10)
    assert set(found) == {(1, T0), (2, T0), (3, T0)}
    for shard, bucket in found:
        assert found[(shard, bucket)] == await store.due_entries(shard, bucket, T0 + 10, 10)
    assert [e.job_id for e in found[(1, T0)]] == ["c", "b", "a"]  # within one due ms, higher priority first
    assert found[(3, T0)] == []
    assert await store.due_entries_many([(1, T0)], T0 + 10, limit=0) == {(1, T0): []}


# The store contract, unchanged, on the double -------------------------------------------------------------
@pytest.mark.parametrize("case", sorted(store_contract.CASES))
async def test_store_contract_on_the_cql_double(case: str, store: ScyllaStore) -> None:
    await store_contract.CASES[case](store)


# Tenants (issue 12) -------------------------------------------------------------------------------------------
async def test_api_keys_rate_limits_and_signing_secrets(store: ScyllaStore) -> None:
    from dsched.libs.apikeys import Role, create_key

    first, _ = await create_key(store, b"p", tenant="t", role=Role.MEMBER)
    second, _ = await create_key(store, b"p", tenant="u", role=Role.ADMIN)
    assert (await store.get_api_key(first.key_id)) == first
    assert {k.key_id for k in await store.list_api_keys()} == {first.key_id, second.key_id}
    assert [k.key_id for k in await store.list_api_keys("u")] == [second.key_id]
    await store.touch_api_key(first.key_id, 123)
    assert await store.revoke_api_key(first.key_id, 1000)
    assert await store.revoke_api_key(first.key_id, 2000)  # the earlier revocation is kept
    got = await store.get_api_key(first.key_id)
    assert got is not None and got.revoked_ms == 1000 and got.last_used_ms == 123
    assert not await store.revoke_api_key("000000000000", 1)
    # GCRA: 100 ms per token, burst 3
    assert [await store.take_rate_token("r", 100, 3, 10_000) for _ in range(4)] == [0, 0, 0, 100]
    assert await store.take_rate_token("r", 100, 3, 10_100) == 0
    await store.put_signing_secrets("t", ["a", "b"])
    assert await store.get_signing_secrets("t") == ["a", "b"] and await store.get_signing_secrets("x") == []
    assert await store.tenant_usage("t") == (0, 0)
