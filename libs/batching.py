"""Coalesce many concurrent small writes into one backend call (group commit).

Callers ``await batcher.submit(item)`` (or await the future of :meth:`Batcher.enqueue`); a single flusher takes
everything pending (up to ``max_batch``) and calls ``flush(items)`` once. Each caller's await returns after the
flush holding its item succeeded, and raises if it failed, so durability is never weakened: only round trips are
shared. Order of items is preserved. All items of one flush share one future (no per-item task or future).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from typing import Generic, TypeVar

T = TypeVar("T")


class Batcher(Generic[T]):
    def __init__(self, flush: Callable[[Sequence[T]], Awaitable[None]], *, max_batch: int = 500) -> None:
        self._flush = flush
        self._max_batch = max_batch
        self._batches: list[tuple[list[T], asyncio.Future[None]]] = []
        self._task: asyncio.Task[None] | None = None

    async def submit(self, item: T) -> None:
        await self.enqueue([item])

    async def submit_many(self, items: Sequence[T]) -> None:
        await self.enqueue(items)

    def enqueue(self, items: Sequence[T]) -> asyncio.Future[None]:
        """Queue ``items`` now (synchronously, so the order between batchers is the caller's order) and return
        a future that completes when they are flushed."""
        loop = asyncio.get_running_loop()
        if not self._batches or len(self._batches[-1][0]) + len(items) > self._max_batch:
            self._batches.append(([], loop.create_future()))
        batch, future = self._batches[-1]
        batch.extend(items)
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._run())
        return future

    async def _run(self) -> None:
        # Yield once so that callers scheduled in the same loop iteration join this batch.
        await asyncio.sleep(0)
        while self._batches:
            batch, future = self._batches.pop(0)
            try:
                if batch:
                    await self._flush(batch)
            except BaseException as exc:
                if not future.done():
                    future.set_exception(exc)
                    future.exception()  # retrieved here: awaiting callers still see it
                if isinstance(exc, asyncio.CancelledError):
                    raise
            else:
                if not future.done():
                    future.set_result(None)
