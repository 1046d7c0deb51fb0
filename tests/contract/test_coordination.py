"""Coordination contract (etcd's shape): leases, create-if-absent, guarded writes, prefixes, watches.

Lease TTLs are 1 s; real servers may round a TTL up (etcd enforces a minimum of about 2 s) and expire leases
on their own clock, so every wait for an expiry is a bounded poll rather than a fixed sleep.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable

from dsched.libs.coordination.base import Coordination, WatchEvent

TTL_S = 1.0
EXPIRY_DEADLINE_S = 10.0  # generous bound for a 1 s lease to be gone on any backend
EVENT_TIMEOUT_S = 5.0


def prefix() -> str:
    return f"/test/{uuid.uuid4().hex[:10]}/"


async def eventually(check: Callable[[], Awaitable[bool]], deadline_s: float = EXPIRY_DEADLINE_S) -> None:
    end = time.monotonic() + deadline_s
    while not await check():
        assert time.monotonic() < end, "condition not reached in time"
        await asyncio.sleep(0.1)


async def next_event(events: AsyncIterator[WatchEvent], timeout_s: float = EVENT_TIMEOUT_S) -> WatchEvent:
    async with asyncio.timeout(timeout_s):
        return await anext(events)


async def started_watch(coordination: Coordination, p: str) -> AsyncIterator[WatchEvent]:
    """A watch on ``p`` that is known to be established: it has already delivered a sentinel write.

    Backends may establish a watch lazily (on first iteration), so we write a sentinel under the prefix until
    the watch reports it; every event after that is a change made after the watch started. The pending read
    is kept across attempts, never cancelled: cancelling an async generator's ``anext`` ends the generator.
    """
    events = coordination.watch_prefix(p)
    sentinel = p + "~ready"
    pending: asyncio.Future[WatchEvent] = asyncio.ensure_future(anext(events))
    for attempt in range(20):
        await coordination.put(sentinel, str(attempt).encode())
        end = time.monotonic() + 0.5
        while (left := end - time.monotonic()) > 0:
            done, _ = await asyncio.wait({pending}, timeout=left)
            if not done:
                break
            event = pending.result()
            if event.key == sentinel:
                await coordination.delete(sentinel)
                while (await next_event(events)).key != sentinel:  # the sentinel's delete
                    pass
                return events
            pending = asyncio.ensure_future(anext(events))
    pending.cancel()
    raise AssertionError("watch never delivered the sentinel write")


async def close(events: AsyncIterator[WatchEvent]) -> None:
    aclose = getattr(events, "aclose", None)
    if aclose is not None:
        with contextlib.suppress(Exception):
            await aclose()


# Leases ---------------------------------------------------------------------------------------------------
async def test_lease_expiry_deletes_its_keys_and_keepalive_then_fails(coordination: Coordination) -> None:
    p = prefix()
    lease = await coordination.grant_lease(TTL_S)
    await coordination.put(p + "leased", b"v", lease_id=lease)
    await coordination.put(p + "plain", b"w")
    assert await coordination.get(p + "leased") == b"v"

    async def gone() -> bool:
        return await coordination.get(p + "leased") is None

    await eventually(gone)
    assert await coordination.keepalive(lease) is False
    assert await coordination.get(p + "plain") == b"w"  # keys without a lease are untouched


async def test_keepalive_keeps_the_lease_and_its_keys(coordination: Coordination) -> None:
    p = prefix()
    lease = await coordination.grant_lease(TTL_S)
    await coordination.put(p + "k", b"v", lease_id=lease)
    end = time.monotonic() + 3 * TTL_S
    while time.monotonic() < end:
        assert await coordination.keepalive(lease) is True
        assert await coordination.get(p + "k") == b"v"
        await asyncio.sleep(TTL_S / 4)
    await coordination.revoke(lease)


async def test_revoke_deletes_keys_now_and_is_idempotent(coordination: Coordination) -> None:
    p = prefix()
    lease = await coordination.grant_lease(60)
    await coordination.put(p + "a", b"1", lease_id=lease)
    await coordination.put(p + "b", b"2", lease_id=lease)
    await coordination.revoke(lease)
    assert await coordination.get_prefix(p) == {}
    assert await coordination.keepalive(lease) is False
    await coordination.revoke(lease)  # unknown lease: no error


# Keys -----------------------------------------------------------------------------------------------------
async def test_put_get_delete(coordination: Coordination) -> None:
    p = prefix()
    assert await coordination.get(p + "k") is None
    await coordination.put(p + "k", b"1")
    await coordination.put(p + "k", b"2")
    assert await coordination.get(p + "k") == b"2"
    await coordination.delete(p + "k")
    assert await coordination.get(p + "k") is None
    await coordination.delete(p + "k")  # deleting a missing key is fine


async def test_create_writes_only_if_absent(coordination: Coordination) -> None:
    p = prefix()
    assert await coordination.create(p + "k", b"first") is True
    assert await coordination.create(p + "k", b"second") is False
    assert await coordination.get(p + "k") == b"first"


async def test_create_between_two_contenders_has_exactly_one_winner(coordination: Coordination) -> None:
    p = prefix()
    leases = [await coordination.grant_lease(60) for _ in range(2)]
    results = await asyncio.gather(
        *(coordination.create(p + "leader", f"node-{i}".encode(), lease_id=le) for i, le in enumerate(leases))
    )
    assert sorted(results) == [False, True]
    winner = results.index(True)
    assert await coordination.get(p + "leader") == f"node-{winner}".encode()
    for lease in leases:
        await coordination.revoke(lease)


async def test_after_the_leader_lease_expires_another_takes_over(coordination: Coordination) -> None:
    p = prefix()
    old = await coordination.grant_lease(TTL_S)
    new = await coordination.grant_lease(60)
    assert await coordination.create(p + "leader", b"old", lease_id=old) is True
    assert await coordination.create(p + "leader", b"new", lease_id=new) is False

    async def took_over() -> bool:
        return await coordination.create(p + "leader", b"new", lease_id=new)

    await eventually(took_over)
    assert await coordination.get(p + "leader") == b"new"
    assert await coordination.keepalive(old) is False
    assert await coordination.keepalive(new) is True
    await coordination.revoke(new)


async def test_put_if_writes_only_while_the_guard_holds(coordination: Coordination) -> None:
    p = prefix()
    await coordination.put(p + "leader", b"me")
    assert await coordination.put_if(p + "leader", b"me", p + "assignment", b"v1") is True
    assert await coordination.get(p + "assignment") == b"v1"

    await coordination.put(p + "leader", b"someone-else")
    assert await coordination.put_if(p + "leader", b"me", p + "assignment", b"v2") is False
    assert await coordination.get(p + "assignment") == b"v1"

    await coordination.delete(p + "leader")
    assert await coordination.put_if(p + "leader", b"me", p + "assignment", b"v3") is False
    assert await coordination.get(p + "assignment") == b"v1"


async def test_get_prefix_returns_exactly_the_keys_under_the_prefix(coordination: Coordination) -> None:
    p = prefix()
    await coordination.put(p + "a/1", b"1")
    await coordination.put(p + "a/2", b"2")
    await coordination.put(p + "ab", b"not under a/")
    await coordination.put(p + "b/1", b"3")
    assert await coordination.get_prefix(p + "a/") == {p + "a/1": b"1", p + "a/2": b"2"}
    assert await coordination.get_prefix(p + "zzz/") == {}
    assert len(await coordination.get_prefix(p)) == 4


# Watches --------------------------------------------------------------------------------------------------
async def test_watch_delivers_puts_and_deletes_in_order(coordination: Coordination) -> None:
    p = prefix()
    events = await started_watch(coordination, p + "w/")
    try:
        await coordination.put(p + "w/k", b"1")
        await coordination.put(p + "other", b"outside the prefix")
        await coordination.put(p + "w/k", b"2")
        await coordination.create(p + "w/j", b"3")
        await coordination.delete(p + "w/k")
        got = [await next_event(events) for _ in range(4)]
        assert got == [
            WatchEvent(p + "w/k", b"1"),
            WatchEvent(p + "w/k", b"2"),
            WatchEvent(p + "w/j", b"3"),
            WatchEvent(p + "w/k", None),
        ]
        # After an event, reads show at least that change.
        assert await coordination.get_prefix(p + "w/") == {p + "w/j": b"3"}
    finally:
        await close(events)


async def test_watch_reports_keys_deleted_by_lease_expiry(coordination: Coordination) -> None:
    p = prefix()
    events = await started_watch(coordination, p)
    try:
        lease = await coordination.grant_lease(TTL_S)
        await coordination.put(p + "member", b"alive", lease_id=lease)
        assert await next_event(events) == WatchEvent(p + "member", b"alive")
        assert await next_event(events, EXPIRY_DEADLINE_S) == WatchEvent(p + "member", None)
    finally:
        await close(events)
