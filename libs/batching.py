"""Group commit: the one way dsched coalesces many small concurrent writes into one backend call.

:class:`Coalescer` is the mechanism every write path shares (the worker's store writes and acks through
:class:`Batcher`, the SQLite write transactions of :class:`dsched.libs.sqlite.SqliteDB`, the embedded log's appends
and the embedded queue's operations). Only round trips are shared, never durability: a caller's await returns after
the flush holding its item has succeeded, and raises if it failed.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Generic, TypeVar

T = TypeVar("T")
In = TypeVar("In")
Out = TypeVar("Out")

DEFAULT_MAX_BATCH = 500  # items per flush: bounds one round trip's size and the latency of the items behind it
ARRIVAL_WINDOW_S = 1.0  # what a linger_when_busy coalescer averages its arrival rate over


class Coalescer(Generic[In, Out]):
    """Items submitted while a flush is in flight go together into the next flush.

    - **Order**: :meth:`submit` queues synchronously, so flushes see items in call order, and one flush runs at a
      time (never two concurrently). A flush takes the oldest pending items up to ``max_batch`` by ``weight``
      (always at least one item).
    - **Outcomes**: ``flush(items)`` returns one outcome per item, in order: a value, or an exception that fails
      that item alone. If ``flush`` itself raises, every item of that batch fails with it (none is assumed done).
    - **Abandoned items**: a caller that cancels its future does not withdraw its item (it may already be in a
      flush). When such an item succeeds, ``on_abandoned(item, value)`` runs, so its effect can be undone or
      handed back (e.g. messages received for a caller that gave up).
    - **Latency**: the flusher yields to the event loop once before each batch, so callers woken in the same
      loop iteration share it; nothing waits on a timer unless ``linger_s`` is set: then the flusher waits that
      long before each batch, so items trickling in one at a time still share a flush (for writes off the
      latency path, where a few milliseconds cost nothing and every flush costs a commit). With
      ``linger_when_busy`` it waits only while items arrive at least one per ``linger_s`` (a rate averaged over
      :data:`ARRIVAL_WINDOW_S`), i.e. while a companion is expected: under load items share flushes, and a lone
      item (a job due now on a quiet scheduler) is flushed at once.
    """

    def __init__(
        self,
        flush: Callable[[list[In]], Awaitable[Sequence[Out | BaseException]]],
        *,
        max_batch: int = DEFAULT_MAX_BATCH,
        weight: Callable[[In], int] | None = None,
        on_abandoned: Callable[[In, Out], None] | None = None,
        linger_s: float = 0.0,
        linger_when_busy: bool = False,
    ) -> None:
        if max_batch <= 0:
            raise ValueError("max_batch must be > 0")
        self._flush = flush
        self._linger_s = linger_s
        # Arrivals, decayed over ARRIVAL_WINDOW_S (their rate times the window); None: linger always.
        self._arrivals: float | None = 0.0 if linger_when_busy and linger_s > 0 else None
        self._arrived_at = 0.0
        self._max_batch = max_batch
        self._weight = weight
        self._on_abandoned = on_abandoned
        self._pending: list[tuple[In, asyncio.Future[Out]]] = []
        self._task: asyncio.Task[None] | None = None

    def submit(self, item: In) -> asyncio.Future[Out]:
        """Queue ``item`` now and return the future of its outcome."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Out] = loop.create_future()
        self._pending.append((item, future))
        if self._arrivals is not None:
            now = loop.time()
            self._arrivals = self._arrivals * math.exp((self._arrived_at - now) / ARRIVAL_WINDOW_S) + 1.0
            self._arrived_at = now
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._run())
        return future

    @property
    def pending(self) -> int:
        """Items queued and not yet taken by a flush."""
        return len(self._pending)

    async def drain(self) -> None:
        """Return once everything submitted so far has been flushed (or failed)."""
        while self._task is not None and not self._task.done():
            with contextlib.suppress(Exception):
                await asyncio.shield(self._task)

    async def _run(self) -> None:
        try:
            while self._pending:
                await asyncio.sleep(self._linger_s if self._busy() else 0)
                batch = self._take()
                await self._flush_batch(batch)
        except BaseException as exc:  # cancelled: nobody will flush what is still queued
            batch, self._pending = self._pending, []
            _fail(batch, exc)
            raise

    def _busy(self) -> bool:
        """Whether to linger before the next flush (see the class docstring)."""
        if self._arrivals is None:
            return True
        return self._arrivals * self._linger_s >= ARRIVAL_WINDOW_S  # a rate of at least one per linger

    def _take(self) -> list[tuple[In, asyncio.Future[Out]]]:
        if self._weight is None:
            count = min(self._max_batch, len(self._pending))
        else:
            count, total = 0, 0
            for item, _ in self._pending:
                total += self._weight(item)
                if count and total > self._max_batch:
                    break
                count += 1
        batch, self._pending = self._pending[:count], self._pending[count:]
        return batch

    async def _flush_batch(self, batch: list[tuple[In, asyncio.Future[Out]]]) -> None:
        try:
            outcomes = await self._flush([item for item, _ in batch])
        except BaseException as exc:
            _fail(batch, exc)
            if not isinstance(exc, Exception):
                raise
            return
        if len(outcomes) != len(batch):
            _fail(batch, RuntimeError(f"flush returned {len(outcomes)} outcomes for {len(batch)} items"))
            return
        for (item, future), outcome in zip(batch, outcomes, strict=True):
            if isinstance(outcome, BaseException):
                _set_exception(future, outcome)
            elif not future.done():
                future.set_result(outcome)
            elif future.cancelled() and self._on_abandoned is not None:
                self._on_abandoned(item, outcome)


def _fail(batch: Sequence[tuple[Any, asyncio.Future[Any]]], exc: BaseException) -> None:
    failure = exc if isinstance(exc, Exception) else RuntimeError(f"flush interrupted: {type(exc).__name__}")
    for _, future in batch:
        _set_exception(future, failure)


def _set_exception(future: asyncio.Future[Any], exc: BaseException) -> None:
    if not future.done():
        future.set_exception(exc)
        future.exception()  # marked as retrieved: a caller that gave up must not cause an "unretrieved" warning


class Batcher(Generic[T]):
    """A :class:`Coalescer` for writes that take a list and return nothing (``store.put_runs``, ``queue.ack``).

    ``enqueue(items)`` keeps a call's items together in one flush; a flush holds at most ``max_batch`` items
    unless one call alone brings more. ``linger_s``: see :class:`Coalescer`.
    """

    def __init__(
        self,
        flush: Callable[[Sequence[T]], Awaitable[None]],
        *,
        max_batch: int = DEFAULT_MAX_BATCH,
        linger_s: float = 0.0,
    ) -> None:
        self._write = flush
        self._coalescer: Coalescer[Sequence[T], None] = Coalescer(
            self._flush, max_batch=max_batch, weight=len, linger_s=linger_s
        )

    async def submit(self, item: T) -> None:
        await self._coalescer.submit([item])

    async def submit_many(self, items: Sequence[T]) -> None:
        await self._coalescer.submit(items)

    def enqueue(self, items: Sequence[T]) -> asyncio.Future[None]:
        """Queue ``items`` now (synchronously, so the order between batchers is the caller's order) and return
        a future that completes when they are flushed."""
        return self._coalescer.submit(items)

    async def _flush(self, calls: list[Sequence[T]]) -> list[None]:
        items = [item for call in calls for item in call]
        if items:
            await self._write(items)
        return [None] * len(calls)
