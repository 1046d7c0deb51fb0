"""Fault injection: planned faults (time + kind + parameters), executed against a live cluster.

Kinds:

==================  ==============================================================================================
``kill``            SIGKILL one service process (of ``role``, or any), restart it ``down_s`` later (optionally with a
                    new node id, like a replaced pod).
``kill-leader``     SIGKILL the coordinator holding the ``leader`` key, restart it ``down_s`` later.
``kill-busy-worker`` SIGKILL a worker that is running a long job (found from the target's in-flight requests + the
                    store's ``running`` records, and from ``cmd:`` marker lines), restart it ``down_s`` later.
``freeze``          SIGSTOP one process (of ``role``) for ``frozen_s`` (for a picker: longer than the lease TTL, so
                    its lease expires while it sleeps), then SIGCONT: it wakes up believing it still owns shards.
                    Never inside an SQLite write transaction (see :func:`_holds_sqlite_lock`).
``etcd-restart``    restart the etcd server (SIGKILL or SIGTERM), down ``down_s``; its data survives.
``moto-pause``      SIGSTOP the moto server (SQS + S3 hang instead of refusing) for ``paused_s``.
``moto-restart``    restart moto, down ``down_s``. moto keeps everything in memory: queued messages are wiped,
                    which no real SQS does; runs lost that way are reported separately (see docs/chaos.md).
==================  ==============================================================================================

Every executed fault becomes a :class:`FaultRecord` in the timeline, with the interval it disturbed the
cluster and, for picker faults, the shards the picker owned when it was hit.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dsched.chaos.cluster import LEASE_TTL_S, SHARD_COUNT, Cluster, ServiceProcess, now_ms
from dsched.chaos.target import Target
from dsched.libs import sqlite
from dsched.libs.coordination.keys import LEADER_KEY

KINDS = ("kill", "kill-leader", "kill-busy-worker", "freeze", "etcd-restart", "moto-pause", "moto-restart")
BACKEND_KINDS = frozenset({"etcd-restart", "moto-pause", "moto-restart"})
RESTART_WAIT_S = 30.0  # bound on waiting for a restarted process to log "started"


# A process stopped while it holds an SQLite file's write lock stalls every process writing that file until it is
# continued: SQLite's locking, not the failover the freeze tests. So a freeze that caught its process inside a write
# transaction is undone and tried again a moment later (at most FREEZE_ATTEMPTS times).
FREEZE_ATTEMPTS = 50
FREEZE_RETRY_S = 0.01


def _holds_sqlite_lock(data_dir: Path) -> bool:
    """Whether some process holds the write lock of one of the embedded backends' files in ``data_dir``."""
    for path in sorted(data_dir.glob("*.db")):
        try:
            conn = sqlite.connect(path)
            conn.execute("PRAGMA busy_timeout=0")
        except sqlite.Error:
            continue
        try:
            conn.execute("BEGIN IMMEDIATE")
            conn.execute("ROLLBACK")
        except sqlite.Error:
            return True
        finally:
            conn.close()
    return False


@dataclass(frozen=True)
class FaultSpec:
    at_s: float  # from the window start
    kind: str
    params: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {"at_s": round(self.at_s, 3), "kind": self.kind, "params": self.params}


@dataclass
class FaultRecord:
    index: int
    kind: str
    planned_at_s: float
    start_ms: int
    end_ms: int | None = None  # when the cluster was whole again (process restarted and up, server back)
    target: str | None = None  # slot or server
    node: str | None = None
    affected_shards: list[int] | None = None  # picker faults: shards the picker owned; backend faults: all
    details: dict[str, Any] = field(default_factory=dict)

    def as_dict(self, window_start_ms: int) -> dict[str, Any]:
        return {
            "index": self.index,
            "t_s": round((self.start_ms - window_start_ms) / 1000, 3),
            "fault": self.kind,
            "target": self.target,
            "node": self.node,
            "start_ms": self.start_ms,
            "end_ms": self.end_ms,
            "duration_s": None if self.end_ms is None else round((self.end_ms - self.start_ms) / 1000, 3),
            "affected_shards": self.affected_shards,
            "details": self.details,
        }


def read_markers(path: Path) -> list[tuple[str, str, int, int]]:
    """``(phase, token, pid, at_ms)`` per line of the ``cmd:`` marker file."""
    found: list[tuple[str, str, int, int]] = []
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return found
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 4 and parts[0] in ("start", "end"):
            with contextlib.suppress(ValueError):
                found.append((parts[0], parts[1], int(parts[2]), int(parts[3])))
    return found


class Injector:
    """Runs a fault plan against a cluster; each fault is its own task, so faults may overlap."""

    def __init__(self, cluster: Cluster, target: Target, markers: Path, seed: int) -> None:
        self.cluster = cluster
        self.target = target
        self.markers = markers
        self.seed = seed
        self.records: list[FaultRecord] = []
        self._tasks: list[asyncio.Task[None]] = []

    async def run(self, plan: list[FaultSpec], window_start_ms: int) -> None:
        for index, spec in enumerate(plan):
            delay = (window_start_ms + spec.at_s * 1000 - now_ms()) / 1000
            if delay > 0:
                await asyncio.sleep(delay)
            record = FaultRecord(index=index, kind=spec.kind, planned_at_s=spec.at_s, start_ms=now_ms())
            self.records.append(record)
            rng = random.Random(f"{self.seed}/fault/{index}")  # target choice independent of timing
            self._tasks.append(asyncio.create_task(self._guarded(spec, record, rng)))

    async def wait(self, timeout_s: float) -> None:
        """Wait for every fault to finish (processes restarted, servers back); bounded."""
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=timeout_s)
        for task in self._tasks:
            if not task.done():
                task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

    async def _guarded(self, spec: FaultSpec, record: FaultRecord, rng: random.Random) -> None:
        try:
            await self._execute(spec, record, rng)
        except Exception as exc:  # a fault that cannot be executed is reported, never fatal
            record.details["error"] = f"{type(exc).__name__}: {exc}"
        finally:
            if record.end_ms is None:
                record.end_ms = now_ms()

    async def _execute(self, spec: FaultSpec, record: FaultRecord, rng: random.Random) -> None:
        p = spec.params
        kind = spec.kind
        if kind == "kill":
            candidates = self._candidates(p.get("role"))
            process = rng.choice(candidates)
            await self._kill_restart(process, record, float(p.get("down_s", 1.0)), bool(p.get("new_identity")))
        elif kind == "kill-leader":
            leader = await self.cluster.leader()
            found = self.cluster.by_node(leader) if leader else None
            record.details["leader"] = leader
            if found is not None:
                process = found
            else:
                process = rng.choice(self._candidates("coordinator"))
                record.details["note"] = "no leader key readable: killed a random coordinator"
            watcher = asyncio.create_task(self._watch_new_leader(record, leader))
            try:
                await self._kill_restart(process, record, float(p.get("down_s", 1.0)), False)
                await asyncio.wait_for(asyncio.shield(watcher), 15.0)
            except TimeoutError:
                record.details["new_leader"] = None
            finally:
                watcher.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await watcher
        elif kind == "kill-busy-worker":
            busy = await self._busy_workers()
            if busy:
                slot = max(sorted(busy), key=lambda s: len(busy[s]))
                process = self.cluster.processes[slot]
                record.details["running"] = sorted(busy[slot])
            else:
                process = rng.choice(self._candidates("worker"))
                record.details["note"] = "no worker was running a long job: killed a random worker"
            await self._kill_restart(process, record, float(p.get("down_s", 1.0)), False)
        elif kind == "freeze":
            process = rng.choice(self._candidates(p.get("role", "picker")))
            await self._freeze(process, record, float(p.get("frozen_s", LEASE_TTL_S + 1.5)))
        elif kind == "etcd-restart":
            server = self.cluster.etcd
            record.target, record.affected_shards = "etcd", list(range(SHARD_COUNT))
            hard = bool(p.get("hard", True))
            record.details.update(hard=hard, down_s=p.get("down_s", 1.0))
            await server.arestart(kill=hard, downtime_s=float(p.get("down_s", 1.0)))
            record.end_ms = now_ms()
        elif kind == "moto-pause":
            server = self.cluster.moto
            record.target, record.affected_shards = "moto", list(range(SHARD_COUNT))
            paused = float(p.get("paused_s", 2.0))
            record.details["paused_s"] = paused
            server.pause()
            try:
                await asyncio.sleep(paused)
            finally:
                server.resume()
            record.end_ms = now_ms()
        elif kind == "moto-restart":
            server = self.cluster.moto
            record.target, record.affected_shards = "moto", list(range(SHARD_COUNT))
            record.details["down_s"] = p.get("down_s", 1.0)
            record.details["wipes"] = "queued messages and blobs (moto is in-memory)"
            await server.arestart(kill=True, downtime_s=float(p.get("down_s", 1.0)))
            record.end_ms = now_ms()
        else:
            raise ValueError(f"unknown fault kind {kind!r}")

    def _candidates(self, role: str | None) -> list[ServiceProcess]:
        procs = [
            p
            for p in self.cluster.processes.values()
            if (role is None or p.role == role) and p.alive and not p.frozen and not p.held_down
        ]
        if not procs:  # everything of that role is already down: take any (the fault is then a no-op)
            procs = [p for p in self.cluster.processes.values() if role is None or p.role == role]
        return sorted(procs, key=lambda p: p.slot)

    async def _note_shards(self, process: ServiceProcess, record: FaultRecord) -> None:
        if process.role == "picker":
            record.affected_shards = (await self.cluster.assignments()).get(process.node_id, [])

    async def _kill_restart(
        self, process: ServiceProcess, record: FaultRecord, down_s: float, new_identity: bool
    ) -> None:
        record.target, record.node = process.slot, process.node_id
        await self._note_shards(process, record)
        process.held_down = True
        try:
            pid = await process.kill()
            record.details.update(pid=pid, down_s=round(down_s, 3))
            if pid is None:
                record.details["note"] = "was not running"
            await asyncio.sleep(down_s)
            process.start(new_identity=new_identity)
        finally:
            process.held_down = False
        if new_identity:
            record.details["new_node"] = process.node_id
        up = await self._wait_started(process)
        record.end_ms = now_ms()
        record.details["up_after_restart_s"] = up

    async def _wait_started(self, process: ServiceProcess) -> float | None:
        started = time.monotonic()
        while time.monotonic() - started < RESTART_WAIT_S:
            if process.has_started():
                return round(time.monotonic() - started, 3)
            await asyncio.sleep(0.05)
        return None

    async def _freeze(self, process: ServiceProcess, record: FaultRecord, frozen_s: float) -> None:
        record.target, record.node = process.slot, process.node_id
        for attempt in range(FREEZE_ATTEMPTS):
            if not process.freeze():
                record.details["note"] = "was not running"
                return
            if not await asyncio.to_thread(_holds_sqlite_lock, self.cluster.data_dir):
                break
            process.thaw()  # stopped inside a write transaction: let it commit, then try again
            record.details["refrozen"] = attempt + 1
            await asyncio.sleep(FREEZE_RETRY_S)
        record.start_ms = now_ms()
        # Read after the SIGSTOP so the dispatch (if any) it was doing is not delayed by us.
        await self._note_shards(process, record)
        record.details["frozen_s"] = round(frozen_s, 3)
        try:
            await asyncio.sleep(frozen_s)
        finally:
            process.thaw()
        record.end_ms = now_ms()

    async def _watch_new_leader(self, record: FaultRecord, old: str | None) -> None:
        """Time until a coordinator holds ``leader`` again, from the key's change events (the old leader's
        restarted incarnation winning again counts: the key was deleted in between); polls if watching fails."""
        coordination = self.cluster.coordination_client()
        started = time.monotonic()
        vacated = False

        def found(leader: str) -> None:
            record.details["new_leader"] = leader
            record.details["leader_after_s"] = round(time.monotonic() - started, 3)

        events = coordination.watch_prefix(LEADER_KEY)  # starts now, before the kill
        try:
            async for event in events:
                if event.key != LEADER_KEY:
                    continue
                if event.value is None:
                    vacated = True
                elif event.value.decode() != old or vacated:
                    found(event.value.decode())
                    return
        except Exception as exc:
            record.details["leader_watch"] = f"{type(exc).__name__}: {exc}"
        finally:
            with contextlib.suppress(Exception):
                await events.aclose()  # type: ignore[attr-defined]
        while True:  # the watch failed or ended: poll instead
            await asyncio.sleep(0.05)
            leader = await self.cluster.leader()
            if leader is None:
                vacated = True
            elif leader != old or vacated:
                found(leader)
                return

    async def _busy_workers(self) -> dict[str, set[str]]:
        """Workers running a long job right now: slot -> descriptions of the runs."""
        busy: dict[str, set[str]] = {}
        # Long HTTP runs: the target knows they are in flight; the store's "running" record names the worker.
        run_ids = {h.run_id: h.key for h in list(self.target.in_flight.values()) if h.run_id}
        if run_ids:
            with contextlib.suppress(Exception):
                store = await self.cluster.store()
                for run in (await store.get_runs(list(run_ids))).values():
                    if run.status.value == "running" and run.worker_id:
                        process = self.cluster.by_node(run.worker_id)
                        if process is not None and process.alive:
                            busy.setdefault(process.slot, set()).add(f"http:{run_ids[run.run_id]}")
        # Long commands: a start line without its end line; the line carries the worker's pid.
        started: dict[str, int] = {}
        for phase, token, pid, _ in read_markers(self.markers):
            if phase == "start":
                started[token] = pid
            else:
                started.pop(token, None)
        for token, pid in started.items():
            process = self.cluster.by_pid(pid)
            if process is not None and process.role == "worker":
                busy.setdefault(process.slot, set()).add(f"cmd:{token}")
        return busy
