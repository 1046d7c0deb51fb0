"""A picker that owns given shards, for tests that drive one directly (no coordinator needed)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Iterable, Sequence
from pathlib import Path
from typing import Any

import orjson

from dsched.libs.coordination.keys import ASSIGNMENTS_PREFIX
from dsched.libs.coordination.sqlite import SqliteCoordination
from dsched.libs.queue.base import OutgoingMessage, WorkQueue
from dsched.libs.queue.sqlite import SqliteQueue
from dsched.libs.settings import Settings
from dsched.libs.store.base import JobStore
from dsched.libs.store.sqlite import SqliteStore
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
        await assign(picker, shards)
        async with picker.open():
            yield picker
    finally:
        await coordination.shutdown()


async def assign(picker: Picker, shards: Iterable[int]) -> None:
    """Assign ``shards`` to ``picker`` in its coordination, as a leader would."""
    await picker.coordination.put(ASSIGNMENTS_PREFIX + picker.node_id, orjson.dumps({"shards": sorted(shards)}))


@contextlib.asynccontextmanager
async def picker_backends(tmp_path: Path, **settings: Any) -> AsyncIterator[tuple[Settings, SqliteStore, SqliteQueue]]:
    """Settings (``settings`` over the defaults), an embedded store and work queue, started, for a picker test."""
    config = Settings.from_env(data_dir=tmp_path, bucket_s=60, **settings)
    store, queue = SqliteStore(tmp_path / "store.db"), SqliteQueue(tmp_path / "queue.db", max_receives=5)
    await store.startup()
    await queue.startup()
    try:
        yield config, store, queue
    finally:
        await queue.shutdown()
        await store.shutdown()


@contextlib.asynccontextmanager
async def running(picker: Picker) -> AsyncIterator[None]:
    """``picker.run`` in a task for the block's duration (its loop, with ticks, nudges and keepalives)."""
    stop = asyncio.Event()
    task = asyncio.create_task(picker.run(stop))
    try:
        yield
    finally:
        stop.set()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


class QueueFailingFirstSend:
    """A work queue whose first ``send`` fails (an ElasticMQ timeout, say); later sends go through."""

    def __init__(self, inner: WorkQueue) -> None:
        self.inner, self.failed = inner, False

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    async def send(self, messages: Sequence[OutgoingMessage]) -> None:
        if not self.failed:
            self.failed = True
            raise ConnectionError("queue unreachable")
        await self.inner.send(messages)
