"""A picker follows the leader's assignment: a read of it answered after a newer watch event does not set it
back, and a change the watch misses is still read within a third of a lease TTL.

Found by chaos ``mixed`` (etcd restarted): a picker whose lease lapsed joined again and read its assignment while
the leader rewrote it; the watch delivered the new assignment first, the read's older answer (no shards) second.
The leader, seeing the picker alive, never moved its three shards: no run of theirs fired for the rest of the run.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from dsched.libs.coordination.base import WatchEvent
from dsched.libs.coordination.keys import ASSIGNMENTS_PREFIX
from dsched.libs.coordination.sqlite import SqliteCoordination
from dsched.picker.service import Picker
from tests.helpers.pickers import assign, picker_backends


class SlowAssignmentReads:
    """Coordination whose next read of an assignment answers with what it read only once ``release`` is set."""

    def __init__(self, inner: SqliteCoordination) -> None:
        self.inner = inner
        self.hold_next = False
        self.read = asyncio.Event()
        self.release = asyncio.Event()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    async def get(self, key: str) -> bytes | None:
        value = await self.inner.get(key)
        if self.hold_next and key.startswith(ASSIGNMENTS_PREFIX):
            self.hold_next = False
            self.read.set()
            await asyncio.wait_for(self.release.wait(), timeout=10)
        return value


class DeadWatch:
    """Coordination whose watches never report a change (a stream stuck after an outage)."""

    def __init__(self, inner: SqliteCoordination) -> None:
        self.inner = inner

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    async def watch_prefix(self, prefix: str) -> AsyncIterator[WatchEvent]:
        await asyncio.Event().wait()
        yield WatchEvent(key=prefix, value=None)  # never reached


@contextlib.asynccontextmanager
async def opened_picker(tmp_path: Path, wrap: Any, **settings: Any) -> AsyncIterator[tuple[Picker, Any]]:
    async with picker_backends(tmp_path, shard_count=4, **settings) as (config, store, queue):
        inner = SqliteCoordination(tmp_path / "coordination.db")
        await inner.startup()
        try:
            coordination = wrap(inner)
            picker = Picker(store=store, queue=queue, coordination=coordination, settings=config, node_id="p1")
            await assign(picker, [0])
            async with picker.open():
                yield picker, coordination
        finally:
            await inner.shutdown()


async def _until(condition: Any, timeout_s: float) -> bool:
    for _ in range(int(timeout_s / 0.02)):
        if condition():
            return True
        await asyncio.sleep(0.02)
    return bool(condition())


async def test_a_read_answered_after_a_newer_watch_event_does_not_set_the_assignment_back(tmp_path: Path) -> None:
    # A long TTL: the periodic re-read stays out of the way.
    async with opened_picker(tmp_path, SlowAssignmentReads, lease_ttl_s=60.0) as (picker, coordination):
        assert picker.owned_shards() == {0}
        coordination.hold_next = True
        reading = asyncio.create_task(picker._read_assignment())  # reads {0}, answers late
        await asyncio.wait_for(coordination.read.wait(), timeout=10)
        await assign(picker, [0, 1])  # the leader moves a shard here meanwhile
        assert await _until(lambda: picker.owned_shards() == {0, 1}, timeout_s=10)  # from the watch
        coordination.release.set()
        await reading
        assert picker.owned_shards() == {0, 1}


async def test_an_assignment_change_the_watch_misses_is_read_within_a_third_of_the_ttl(tmp_path: Path) -> None:
    async with opened_picker(tmp_path, DeadWatch, lease_ttl_s=0.6) as (picker, _):
        assert picker.owned_shards() == {0}
        await assign(picker, [0, 2, 3])
        assert await _until(lambda: picker.owned_shards() == {0, 2, 3}, timeout_s=3)
