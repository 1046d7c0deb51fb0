"""Coordinator: elects one leader and hands the shards out to the live pickers.

Keys (under the coordination backend's namespace):

- ``leader`` — the leader's node id, attached to its lease. Whoever creates it leads until its lease ends.
- ``pickers/<node>`` — one per live picker, attached to the picker's lease (it vanishes when the picker dies).
- ``cancel/<run_id>`` — written by the API (run cancel) or a picker (``overlap: replace``); watched by workers.
- ``assignments/<node>`` — JSON ``{"shards": [...], "leader": ..., "epoch": ...}``, written by the leader only
  while it still holds ``leader`` (``put_if``), so a deposed leader cannot overwrite a newer assignment.

Rebalancing is sticky: a live picker keeps the shards it has, up to its fair share, and only the shards of
departed or overloaded pickers move. A shard moves to a new picker only after the old owner's lease is gone
(departure), so two pickers never both own it for longer than the watch delay of a voluntary move.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import orjson

from dsched.libs import logs
from dsched.libs.clock import now_ms
from dsched.libs.coordination.base import Coordination
from dsched.libs.coordination.keys import ASSIGNMENTS_PREFIX, LEADER_KEY, PICKERS_PREFIX
from dsched.libs.metrics import COORDINATOR_LEADER, SHARD_COUNT, export
from dsched.libs.settings import Settings
from dsched.libs.supervisor import Supervisor

logger = logs.get("coordinator")


def assign_shards(shard_count: int, members: list[str], current: dict[str, list[int]]) -> dict[str, list[int]]:
    """Sticky, balanced assignment: every shard to exactly one member, loads differing by at most one."""
    if not members:
        return {}
    members = sorted(members)
    base, extra = divmod(shard_count, len(members))
    quota = {m: base + (1 if i < extra else 0) for i, m in enumerate(members)}
    result: dict[str, list[int]] = {m: [] for m in members}
    taken: set[int] = set()
    for member in members:
        for shard in sorted(current.get(member, [])):
            if 0 <= shard < shard_count and shard not in taken and len(result[member]) < quota[member]:
                result[member].append(shard)
                taken.add(shard)
    free = [s for s in range(shard_count) if s not in taken]
    for member in members:
        while len(result[member]) < quota[member] and free:
            result[member].append(free.pop(0))
    return {m: sorted(s) for m, s in result.items()}


class Coordinator:
    def __init__(
        self,
        *,
        coordination: Coordination,
        settings: Settings,
        node_id: str | None = None,
        supervisor: Supervisor | None = None,
    ) -> None:
        self.supervisor = supervisor or Supervisor()
        self.coordination = coordination
        self.settings = settings
        self.node_id = node_id or settings.node_id
        self.is_leader = False
        self._lease: int | None = None
        export(COORDINATOR_LEADER, SHARD_COUNT)
        SHARD_COUNT.set(settings.shard_count)  # what the pickers' dsched_picker_owned_shards must add up to

    @contextlib.asynccontextmanager
    async def open(self) -> AsyncIterator[Coordinator]:
        try:
            yield self
        finally:
            await self._step_down()

    async def run(self, stop: asyncio.Event) -> None:
        """Campaign until elected, lead until the lease is lost or ``stop`` is set, campaign again."""
        ttl = self.settings.lease_ttl_s
        leader_gone = asyncio.Event()
        watcher = asyncio.create_task(self._watch_leader(leader_gone))
        try:
            while not stop.is_set():
                leader_gone.clear()
                try:
                    lease = await self._campaign()
                    self.supervisor.recovered("coordinator", "lead")
                    if lease is not None:
                        await self._lead(stop, lease)
                        continue
                except Exception as exc:  # backend hiccup: retry after a short pause, never crash the service
                    logger.warning("coordinator_error", error=f"{type(exc).__name__}: {exc}")
                    self.supervisor.retrying("coordinator", "lead", exc)  # down in /health until a campaign works
                    await self._step_down()
                # Campaign again as soon as the leader key goes (its lease expired), or after a while regardless.
                waits = [asyncio.ensure_future(stop.wait()), asyncio.ensure_future(leader_gone.wait())]
                await asyncio.wait(waits, timeout=ttl / 3, return_when=asyncio.FIRST_COMPLETED)
                for waiter in waits:
                    waiter.cancel()
        finally:
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await watcher

    async def _watch_leader(self, leader_gone: asyncio.Event) -> None:
        while True:
            try:
                async for event in self.coordination.watch_prefix(LEADER_KEY):
                    if event.key == LEADER_KEY and event.value is None:
                        leader_gone.set()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the periodic campaign still runs; re-watch after a pause
                logger.warning("leader_watch_failed", error=f"{type(exc).__name__}: {exc}")
                await asyncio.sleep(1.0)

    async def _campaign(self) -> int | None:
        """Try to become the leader; the lease it leads under if it won, else None."""
        lease = self._lease
        if lease is None or not await self.coordination.keepalive(lease):
            lease = self._lease = await self.coordination.grant_lease(self.settings.lease_ttl_s)
        if not await self.coordination.create(LEADER_KEY, self.node_id.encode(), lease):
            return None
        self.is_leader = True
        COORDINATOR_LEADER.set(1)
        logger.info("leader_elected", node=self.node_id)
        return lease

    async def _lead(self, stop: asyncio.Event, lease: int) -> None:
        ttl = self.settings.lease_ttl_s
        changed = asyncio.Event()
        watcher = asyncio.create_task(self._watch_members(changed))
        try:
            while not stop.is_set():
                if not await self.coordination.keepalive(lease) or not await self.rebalance():
                    logger.warning("leadership_lost", node=self.node_id)
                    return
                # Woken by a membership change, or re-check periodically: a missed event must not strand shards.
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(changed.wait(), timeout=min(ttl / 3, 1.0))
                changed.clear()
        finally:
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await watcher
            self.is_leader = False
            COORDINATOR_LEADER.set(0)

    async def _watch_members(self, changed: asyncio.Event) -> None:
        """Wake the leader on every membership change, for as long as it leads: a failed or ended watch is logged
        and watched again after a pause (meanwhile the leader re-checks every second), never a silent stop."""
        while True:
            try:
                async for _event in self.coordination.watch_prefix(PICKERS_PREFIX):
                    changed.set()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                logger.warning("members_watch_failed", error=f"{type(exc).__name__}: {exc}")
            changed.set()  # whatever changed while nobody watched is seen by the next rebalance
            await asyncio.sleep(1.0)

    async def rebalance(self) -> bool:
        """Write the assignment for the current members; False if this node is no longer the leader."""
        members_raw = await self.coordination.get_prefix(PICKERS_PREFIX)
        members = [k[len(PICKERS_PREFIX) :] for k in members_raw]
        current_raw = await self.coordination.get_prefix(ASSIGNMENTS_PREFIX)
        current: dict[str, list[int]] = {}
        for key, value in current_raw.items():
            with contextlib.suppress(ValueError, KeyError, TypeError):
                current[key[len(ASSIGNMENTS_PREFIX) :]] = list(orjson.loads(value)["shards"])
        target = assign_shards(self.settings.shard_count, members, current)
        guard = self.node_id.encode()
        epoch = now_ms()
        for member in set(current) | set(target):
            shards = target.get(member, [])
            if current.get(member) == shards:
                continue
            value = orjson.dumps({"shards": shards, "leader": self.node_id, "epoch": epoch})
            if not await self.coordination.put_if(LEADER_KEY, guard, ASSIGNMENTS_PREFIX + member, value):
                return False
        if any(current.get(m) != s for m, s in target.items()):
            logger.info("rebalanced", members=len(members), assignment={m: len(s) for m, s in target.items()})
        return True

    async def _step_down(self) -> None:
        lease, self._lease = self._lease, None
        self.is_leader = False
        COORDINATOR_LEADER.set(0)
        if lease is not None:
            with contextlib.suppress(Exception):
                await self.coordination.revoke(lease)
