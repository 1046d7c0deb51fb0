"""A picker that owns given shards, for tests that drive one directly (no coordinator needed)."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Iterable
from pathlib import Path

import orjson

from dsched.libs.coordination.keys import ASSIGNMENTS_PREFIX
from dsched.libs.coordination.sqlite import SqliteCoordination
from dsched.libs.queue.base import WorkQueue
from dsched.libs.settings import Settings
from dsched.libs.store.base import JobStore
from dsched.picker.service import Picker


@contextlib.asynccontextmanager
async def picker_owning(
    shards: Iterable[int], *, store: JobStore, queue: WorkQueue, settings: Settings, tmp_path: Path
) -> AsyncIterator[Picker]:
    """An opened picker registered in embedded coordination, assigned ``shards`` as a leader would assign them."""
    coordination = SqliteCoordination(tmp_path / "picker-coordination.db")
    await coordination.startup()
    try:
        picker = Picker(store=store, queue=queue, coordination=coordination, settings=settings, node_id="picker-1")
        await coordination.put(ASSIGNMENTS_PREFIX + "picker-1", orjson.dumps({"shards": sorted(shards)}))
        async with picker.open():
            yield picker
    finally:
        await coordination.shutdown()
