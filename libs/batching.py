"""Coalesce many concurrent small writes into one backend call (group commit).

Callers ``await batcher.submit(item)``; a single flusher takes everything pending (up to ``max_batch``) and calls
``flush(items)`` once. Each caller's await returns after the flush holding its item succeeded, and raises if it
failed, so durability is never weakened: only round trips are shared. Order of items is preserved.
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
        self._pending: list[tuple[T, asyncio.Future[None]]] = []
        self._task: asyncio.Task[None] | None = None

    async def submit(self, item: T) -> None:
        await self.submit_many([item])

    async def submit_many(self, items: Sequence[T]) -> None:
        await self.enqueue(items)

    def enqueue(self, items: Sequence[T]) -> asyncio.Future[list[None]]:
        """Queue ``items`` now (synchronously, so the order between batchers is the caller's order) and return
        a future that completes when they are flushed."""
        loop = asyncio.get_running_loop()
        futures = []
        for item in items:
            fut: asyncio.Future[None] = loop.create_future()
            self._pending.append((item, fut))
            futures.append(fut)
        if futures and (self._task is None or self._task.done()):
            self._task = asyncio.create_task(self._run())
        return asyncio.gather(*futures)

    async def _run(self) -> None:
        # Yield once so that callers scheduled in the same loop iteration join this batch.
        await asyncio.sleep(0)
        while self._pending:
            batch, self._pending = self._pending[: self._max_batch], self._pending[self._max_batch :]
            try:
                await self._flush([item for item, _ in batch])
            except BaseException as exc:
                for _, fut in batch:
                    if not fut.done():
                        fut.set_exception(exc)
                if isinstance(exc, asyncio.CancelledError):
                    raise
            else:
                for _, fut in batch:
                    if not fut.done():
                        fut.set_result(None)
