"""Group commit (libs/batching.py): what callers of every coalesced write path rely on."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from pathlib import Path

import pytest

from dsched.libs.batching import Batcher, Coalescer
from dsched.libs.sqlite import SqliteDB


class Recorder:
    """A flush that records each batch and can be held open, so tests decide what is in flight."""

    def __init__(self) -> None:
        self.batches: list[list[int]] = []
        self.gate = asyncio.Event()
        self.gate.set()

    async def flush(self, items: list[int]) -> Sequence[int | BaseException]:
        self.batches.append(list(items))
        await self.gate.wait()
        return [ValueError(f"odd {i}") if i % 2 else i * 10 for i in items]


async def test_items_submitted_during_a_flush_share_the_next_one_in_call_order() -> None:
    recorder = Recorder()
    coalescer: Coalescer[int, int] = Coalescer(recorder.flush)
    recorder.gate.clear()
    first = coalescer.submit(0)
    await asyncio.sleep(0.01)  # the first flush is now in flight, held by the gate
    rest = [coalescer.submit(i) for i in (2, 4, 6)]
    recorder.gate.set()
    assert await asyncio.gather(first, *rest) == [0, 20, 40, 60]
    assert recorder.batches == [[0], [2, 4, 6]]


async def test_one_failing_item_fails_alone() -> None:
    recorder = Recorder()
    coalescer: Coalescer[int, int] = Coalescer(recorder.flush)
    futures = [coalescer.submit(i) for i in (2, 3, 4)]
    results = await asyncio.gather(*futures, return_exceptions=True)
    assert results[0] == 20 and results[2] == 40
    assert isinstance(results[1], ValueError)
    assert recorder.batches == [[2, 3, 4]]


async def test_a_failing_flush_fails_its_whole_batch_and_the_next_batch_still_runs() -> None:
    calls: list[list[int]] = []

    async def flush(items: list[int]) -> list[int]:
        calls.append(items)
        if len(calls) == 1:
            raise OSError("disk full")
        return items

    coalescer: Coalescer[int, int] = Coalescer(flush)
    failed = [coalescer.submit(i) for i in (1, 2)]
    for future in failed:
        with pytest.raises(OSError, match="disk full"):
            await future
    assert await coalescer.submit(3) == 3


async def test_max_batch_by_weight_keeps_each_call_whole() -> None:
    seen: list[list[Sequence[int]]] = []

    async def flush(calls: list[Sequence[int]]) -> list[None]:
        seen.append(calls)
        return [None] * len(calls)

    coalescer: Coalescer[Sequence[int], None] = Coalescer(flush, max_batch=3, weight=len)
    await asyncio.gather(*(coalescer.submit(call) for call in ([1, 2], [3], [4, 5, 6, 7], [8])))
    assert seen == [[[1, 2], [3]], [[4, 5, 6, 7]], [[8]]]  # a call bigger than max_batch goes alone


async def test_an_abandoned_item_that_succeeded_is_handed_to_on_abandoned() -> None:
    recorder = Recorder()
    abandoned: list[tuple[int, int]] = []
    coalescer: Coalescer[int, int] = Coalescer(recorder.flush, on_abandoned=lambda i, v: abandoned.append((i, v)))
    recorder.gate.clear()
    given_up = coalescer.submit(4)
    await asyncio.sleep(0.01)
    given_up.cancel()
    recorder.gate.set()
    await coalescer.drain()
    assert abandoned == [(4, 40)]


async def test_drain_waits_for_everything_submitted() -> None:
    recorder = Recorder()
    coalescer: Coalescer[int, int] = Coalescer(recorder.flush, max_batch=2)
    futures = [coalescer.submit(i) for i in (0, 2, 4, 6, 8)]
    await coalescer.drain()
    assert all(future.done() for future in futures)
    assert recorder.batches == [[0, 2], [4, 6], [8]]


async def test_batcher_flushes_the_items_of_concurrent_calls_together() -> None:
    flushed: list[list[str]] = []

    async def write(items: Sequence[str]) -> None:
        flushed.append(list(items))

    batcher: Batcher[str] = Batcher(write)
    await asyncio.gather(batcher.enqueue(["a"]), batcher.submit("b"), batcher.submit_many(["c", "d"]))
    assert flushed == [["a", "b", "c", "d"]]


async def test_sqlite_group_commit_rolls_back_a_failing_write_alone(tmp_path: Path) -> None:
    db = SqliteDB(tmp_path / "t.db", schema="CREATE TABLE IF NOT EXISTS t (v INTEGER PRIMARY KEY)")
    await db.open()
    try:

        def insert(v: int) -> object:
            return lambda conn: conn.execute("INSERT INTO t (v) VALUES (?)", (v,)) and v

        results = await asyncio.gather(
            db.write(insert(1)), db.write(insert(1)), db.write(insert(2)), return_exceptions=True
        )
        assert results[0] == 1 and results[2] == 2
        assert "UNIQUE" in str(results[1])
        rows = await db.run(lambda conn: conn.execute("SELECT v FROM t ORDER BY v").fetchall())
        assert rows == [(1,), (2,)]
    finally:
        await db.close()


async def test_a_lingering_batcher_flushes_items_trickling_in_together() -> None:
    flushed: list[list[str]] = []

    async def write(items: Sequence[str]) -> None:
        flushed.append(list(items))

    async def trickle(batcher: Batcher[str]) -> None:
        waits = []
        for item in "abcd":  # one item per loop turn, as runs finishing one at a time
            waits.append(batcher.enqueue([item]))
            await asyncio.sleep(0)
        await asyncio.gather(*waits)

    await trickle(Batcher(write))
    assert len(flushed) > 1  # without a linger each item is flushed on its own
    flushed.clear()
    await trickle(Batcher(write, linger_s=0.05))
    assert flushed == [["a", "b", "c", "d"]]


async def test_a_coalescer_that_lingers_when_busy_flushes_a_lone_item_at_once() -> None:
    """Under load items wait ``linger_s`` for company; a lone item (a job due now, a quiet scheduler) does not."""
    flushed: list[list[int]] = []

    async def flush(items: list[int]) -> list[int]:
        flushed.append(list(items))
        return items

    coalescer: Coalescer[int, int] = Coalescer(flush, linger_s=0.2, linger_when_busy=True)
    loop = asyncio.get_running_loop()
    started = loop.time()
    assert await coalescer.submit(1) == 1
    assert loop.time() - started < 0.1  # quiet: not held for the linger
    for number in range(2, 12):  # ten arrivals within a few ms: busier than one per linger
        coalescer.submit(number)
    started = loop.time()
    await coalescer.submit(12)
    assert loop.time() - started >= 0.19  # busy: held for the linger...
    assert flushed == [[1], list(range(2, 13))]  # ...so everything that came meanwhile shares one flush
