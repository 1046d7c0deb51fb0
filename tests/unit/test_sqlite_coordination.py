"""Embedded coordination specifics: several processes on one file, prefix bounds, watch lifecycle."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from dsched.libs.coordination.base import WatchEvent
from dsched.libs.coordination.sqlite import LeaseNotFound, SqliteCoordination, _prefix_end


@pytest.fixture
async def pair(tmp_path: Path) -> AsyncIterator[tuple[SqliteCoordination, SqliteCoordination]]:
    # Two instances on one file behave like two processes sharing a data directory.
    a, b = SqliteCoordination(tmp_path / "c.db"), SqliteCoordination(tmp_path / "c.db")
    await a.startup()
    await b.startup()
    try:
        yield a, b
    finally:
        await a.shutdown()
        await b.shutdown()


def test_prefix_end() -> None:
    assert _prefix_end("a/") == "a0"
    assert _prefix_end("") is None
    assert _prefix_end("a\U0010ffff") == "b"
    assert _prefix_end("\ud7ff") == "\ue000"


async def test_only_one_process_wins_create_and_sees_the_other_expire(
    pair: tuple[SqliteCoordination, SqliteCoordination],
) -> None:
    a, b = pair
    la, lb = await a.grant_lease(0.5), await b.grant_lease(30)
    results = await asyncio.gather(a.create("leader", b"a", la), b.create("leader", b"b", lb))
    assert sorted(results) == [False, True]
    if results[1]:  # make "a" the leader for the rest of the test
        await b.delete("leader")
        assert await a.create("leader", b"a", la)
    await asyncio.sleep(0.7)
    # "a" never kept its lease alive: "b" observes the expiry without any reaper running.
    assert await b.get("leader") is None
    assert await b.create("leader", b"b", lb) is True
    assert await a.keepalive(la) is False


async def test_a_watch_sees_changes_from_another_process(
    pair: tuple[SqliteCoordination, SqliteCoordination],
) -> None:
    a, b = pair
    events = b.watch_prefix("shards/")
    try:
        await a.put("shards/1", b"node-a")
        lease = await a.grant_lease(0.3)
        await a.put("shards/2", b"node-a", lease)
        got: list[WatchEvent] = []
        async with asyncio.timeout(5):
            while len(got) < 3:
                got.append(await anext(events))
        assert got == [
            WatchEvent("shards/1", b"node-a"),
            WatchEvent("shards/2", b"node-a"),
            WatchEvent("shards/2", None),  # expired: purged by the watcher's own poll
        ]
    finally:
        await events.aclose()  # type: ignore[attr-defined]


async def test_a_watch_starts_at_the_call_not_at_the_first_iteration(tmp_path: Path) -> None:
    c = SqliteCoordination(tmp_path / "c.db")
    await c.startup()
    try:
        await c.put("k/old", b"before")
        events = c.watch_prefix("k/")
        await c.put("k/new", b"after")
        async with asyncio.timeout(2):
            assert await anext(events) == WatchEvent("k/new", b"after")
        await events.aclose()  # type: ignore[attr-defined]
    finally:
        await c.shutdown()


async def test_a_watch_ends_when_the_store_shuts_down(tmp_path: Path) -> None:
    c = SqliteCoordination(tmp_path / "c.db")
    await c.startup()
    events = c.watch_prefix("k/")

    async def drain() -> list[WatchEvent]:
        return [event async for event in events]

    task = asyncio.create_task(drain())
    await asyncio.sleep(0.1)
    await c.shutdown()
    async with asyncio.timeout(2):
        assert await task == []


async def test_writing_with_an_expired_lease_is_refused(tmp_path: Path) -> None:
    c = SqliteCoordination(tmp_path / "c.db")
    await c.startup()
    try:
        lease = await c.grant_lease(10)
        await c.revoke(lease)
        with pytest.raises(LeaseNotFound):
            await c.put("k", b"v", lease)
        with pytest.raises(LeaseNotFound):
            await c.create("k", b"v", lease)
        assert await c.get("k") is None
    finally:
        await c.shutdown()


async def test_lease_ids_are_never_reused(tmp_path: Path) -> None:
    c = SqliteCoordination(tmp_path / "c.db")
    await c.startup()
    try:
        first = await c.grant_lease(10)
        await c.revoke(first)
        second = await c.grant_lease(10)
        assert second != first
        assert await c.keepalive(first) is False
    finally:
        await c.shutdown()
