"""Whether the job store answers, as one worker sees it: while it does not, the worker receives nothing new and
holds its finished runs' records until it does.

Why a gate: every receive counts toward the work queue's ``max_receives``. A worker that kept receiving through a
store outage (deduplication reads the store) handed the same messages back and forth until the queue parked them,
and a run that had executed was recorded as failed because only its record was late. Now the first store call
that fails for the store's sake closes the gate; while it is closed one probe (:meth:`JobStore.probe`, a read of
a job id that never exists) runs every :data:`PROBE_INTERVAL_S`, and the first answer opens it. Meanwhile the
worker is ``retrying`` in ``/health`` (loop ``worker/store``), so an operator sees why nothing runs.
"""

from __future__ import annotations

import asyncio

from dsched.libs import logs
from dsched.libs.store.base import JobStore
from dsched.libs.supervisor import Supervisor

PROBE_INTERVAL_S = 0.5  # between probes while the store does not answer
PROBE_TIMEOUT_S = 5.0  # a probe slower than this counts as no answer
LOOP = "store"  # the worker's loop in /health that reports the outage
logger = logs.get("worker")


class StoreGate:
    def __init__(self, store: JobStore, supervisor: Supervisor) -> None:
        self._store = store
        self._supervisor = supervisor
        self._up = asyncio.Event()
        self._up.set()
        self._down = asyncio.Event()
        self._probe: asyncio.Task[bool] | None = None  # one probe shared by everyone asking at once

    def close(self, exc: BaseException) -> None:
        """A store call failed for the store's sake (not for its own data): stop until a probe is answered."""
        if not self._up.is_set():
            return
        logger.warning("store_down", error=f"{type(exc).__name__}: {exc}"[:300])
        self._supervisor.retrying("worker", LOOP, exc)
        self._up.clear()
        self._down.set()

    async def answers(self) -> bool:
        """Whether the store answers now: False at once while the gate is closed; otherwise one probe (shared by
        concurrent callers), and a probe that fails closes the gate. Tells an outage from a write the store
        refuses on its own (a poison record): that one fails while the probe is answered."""
        if not self._up.is_set():
            return False
        if self._probe is None or self._probe.done():
            self._probe = asyncio.create_task(self._answered())
        return await asyncio.shield(self._probe)

    async def wait_up(self, timeout_s: float) -> bool:
        """Wait up to ``timeout_s`` for the store to answer again; whether it did."""
        if self._up.is_set():
            return True
        try:
            async with asyncio.timeout(timeout_s):
                await self._up.wait()
        except TimeoutError:
            return False
        return True

    async def watch(self) -> None:
        """The worker's supervised loop ``store``: while the gate is closed, probe every :data:`PROBE_INTERVAL_S`
        and open it at the first answer."""
        while True:
            await self._down.wait()
            await asyncio.sleep(PROBE_INTERVAL_S)
            if await self._answered():
                self._down.clear()
                self._up.set()
                logger.info("store_up")
                self._supervisor.recovered("worker", LOOP)

    async def _answered(self) -> bool:
        """One probe; a failure closes the gate (a no-op while it is closed already)."""
        try:
            async with asyncio.timeout(PROBE_TIMEOUT_S):
                await self._store.probe()
        except Exception as exc:
            self.close(exc)
            return False
        return True
