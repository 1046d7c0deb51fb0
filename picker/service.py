"""Picker: dispatches the due entries of its shards to the work queue at their due time.

Loop (one task, so loading and dispatching never race):

1. Every ``picker_tick_s``, for each owned shard, read the partitions from the shard's checkpoint bucket up to
   the bucket of ``now + lookahead`` for entries due by ``now + lookahead``: the cost is what is (nearly) due,
   never the number of future jobs. A partition is read from :data:`LATE_WINDOW_MS` before its last complete read
   on, not from its start (what was dispatched before that is tombstones on Scylla); every
   :data:`FULL_LOAD_INTERVAL_MS` a load reads every partition from its start, for entries stored later than the
   window after their due time. Loaded entries wait in an in-memory heap.
2. Sleep until the earliest loaded due time (not until the next tick) and dispatch every entry then due, as one
   batch: read the jobs, drop stale entries, store the next occurrence of recurring jobs, send to the queue,
   record ``dispatched_through_ms``, delete the entries.
3. Move a shard's checkpoint past a bucket once the bucket is empty (no entry left in the store, read from its
   start; none held loaded) and older than ``bucket_grace_s``.

Ownership comes from the coordinator's assignment and is only believed while this picker's own lease is
known to be alive (last successful keepalive + TTL, measured from when the keepalive was sent). The lease is
renewed only while the loop makes progress (each backend call of a load that returns, each dispatch batch): a step
stuck in one backend call for half a TTL (:data:`STALLED_STEP_TTL_SHARE`) lets the lease expire, so the coordinator
moves the shards to a live picker.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field

import orjson

from dsched.libs import clock, job_states, logs, tracing
from dsched.libs.clock import now_ms
from dsched.libs.coordination.base import Coordination
from dsched.libs.coordination.keys import ASSIGNMENTS_PREFIX, CANCEL_PREFIX, PICKERS_PREFIX
from dsched.libs.metrics import (
    DISPATCH_LAG,
    PICKER_DISPATCHED,
    PICKER_DROPPED,
    PICKER_SHARDS,
    SHARD_COUNT,
    child,
    export,
)
from dsched.libs.models import (
    FINISHED_RUN_STATUSES,
    BucketEntry,
    Job,
    JobState,
    Run,
    RunOrder,
    RunStatus,
    run_id_for,
)
from dsched.libs.queue.base import OutgoingMessage, WorkQueue
from dsched.libs.retrying import until_up
from dsched.libs.schedule import ScheduleError, first_undispatched, parse_schedule, plan_misfire
from dsched.libs.settings import Settings
from dsched.libs.sharding import bucket_for, entry_for, initial_checkpoint
from dsched.libs.store.base import JobStore
from dsched.libs.supervisor import Supervisor
from dsched.picker.fair import fair_order

FAIR_FIRST_BATCH = 100  # first batch of a fair burst; each next one doubles (up to the dispatch batch size)
# Dispatch batches start this small and double while each takes under DISPATCH_STEP_TTL_SHARE of the lease TTL (up to
# DSCHED_PICKER_BATCH); one over DISPATCH_STEP_MAX_TTL_SHARE shrinks the next to fit between the two. On SQLite a
# batch of 2,000 takes ~50 ms; on ElasticMQ (~240 sends/s here) it took 8 s, which the stall check below read as a
# stuck picker: its lease lapsed mid-burst and the next owner sent again what was sent and not yet deleted (2,100
# duplicates in a 20,000-job burst). Between the two shares the size stays: a batch's time is mostly its five
# sequential round trips when the backends are slow (cold JVMs), and shrinking it then only cut the rate (to 10 per
# round trip time, with jobs 60 s late after a cold start of the production stack).
FIRST_DISPATCH_BATCH = 100
MIN_DISPATCH_BATCH = 10
DISPATCH_STEP_TTL_SHARE = 0.1
DISPATCH_STEP_MAX_TTL_SHARE = 0.25  # well under STALLED_STEP_TTL_SHARE
OWNERS_SLACK = 10_000  # tenants of entries no longer loaded that may stay cached before a clean-up
# Job owners read ahead for fair dispatch per store call: each call that returns counts as progress, so a store
# slowed by write pressure (Cassandra: 20,000 owners took 2.4-3.7 s in one call) does not cost the lease.
OWNERS_READ_CHUNK = 500

logger = logs.get("picker")

# A recurring occurrence is "missed" (misfire policy applies) when dispatched later than this by default.
DEFAULT_MAX_LATENESS_MS = 60_000
# A run still marked running this long after its timeout is treated as abandoned by overlap checks.
OVERLAP_STALE_MS = 30_000
# A picker whose loop has made no progress inside a step (no load call or dispatch batch returned) for this share
# of the lease TTL stops renewing its lease: one stuck in a call that never answers gives its shards up as a frozen
# picker does.
STALLED_STEP_TTL_SHARE = 0.5
# A load reads a partition only from LATE_WINDOW_MS before its last complete read on (the first read, and every
# FULL_LOAD_INTERVAL_MS, from its start): on Scylla a read from the start steps over the tombstone of every entry
# deleted in that bucket so far, up to rate x bucket_s / shards each tick; one from there seeks past them. Every
# entry stored before its due time, or less than this after it, is read by the next load.
LATE_WINDOW_MS = 3_000
# An entry stored later than LATE_WINDOW_MS after its due time (a writer catching up after an outage) is read by the
# next full load, at most this much later; one stored by a writer in the same process brings it forward at once.
FULL_LOAD_INTERVAL_MS = 2_000
# Loads brought forward by a writer in the same process (entries due sooner than the next tick) are at least this far
# apart: jobs due at once arriving steadily cost one load per this interval, not one per write.
NUDGED_LOAD_GAP_MS = 10


@dataclass
class DispatchPlan:
    """What one dispatch round writes and sends, built by :meth:`Picker._plan`, carried out by
    :meth:`Picker._apply`."""

    done: list[BucketEntry]  # entries handled (sent, skipped or dropped): deleted last
    messages: list[OutgoingMessage] = field(default_factory=list)
    tenants: list[str] = field(default_factory=list)  # messages[i]'s tenant, for the fair order
    next_entries: list[BucketEntry] = field(default_factory=list)
    skipped_runs: list[Run] = field(default_factory=list)
    queued: dict[str, JobState] = field(default_factory=dict)
    dispatched: dict[str, int] = field(default_factory=dict)  # job id (one of queued's) -> latest occurrence sent
    cancels: list[str] = field(default_factory=list)  # run ids to stop (overlap: replace)

    def mark_dispatched(self, job_id: str, occurrence: int) -> None:
        self.dispatched[job_id] = max(self.dispatched.get(job_id, -1), occurrence)


class Picker:
    def __init__(
        self,
        *,
        store: JobStore,
        queue: WorkQueue,
        coordination: Coordination,
        settings: Settings,
        node_id: str | None = None,
        supervisor: Supervisor | None = None,
    ) -> None:
        """A picker joins ``coordination`` as a member and dispatches exactly the shards the leader assigns it,
        while its lease lives."""
        self.store = store
        self.supervisor = supervisor or Supervisor()
        self.queue = queue
        self.coordination = coordination
        self.settings = settings
        self.node_id = node_id or settings.node_id
        export(PICKER_SHARDS, SHARD_COUNT)
        SHARD_COUNT.set(settings.shard_count)  # with dsched_picker_owned_shards: are all shards owned?
        self._assigned: set[int] = set()
        self._assignment_events = 0  # assignment changes applied from the watch (see _read_assignment)
        self._lease: int | None = None
        self._lease_valid_until = 0.0  # monotonic
        self._checkpoints: dict[int, int] = {}
        self._heap: list[tuple[int, int, tuple[int, int, int, str, int, int], BucketEntry]] = []
        self._batch_size = min(FIRST_DISPATCH_BATCH, settings.picker_batch)  # see DISPATCH_STEP_TTL_SHARE
        self._loaded: set[tuple[int, int, int, str, int, int]] = set()
        self._owners: dict[str, str] = {}  # job id -> tenant of loaded entries, read ahead for fair dispatch
        self._wake = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        # Monotonic time the loop's step in flight started or last finished a batch; None between steps.
        self._progress_at: float | None = None
        # What the step in flight is doing, logged if it stalls: "dispatch", or "load" and the load's call in flight.
        self._step_name = ""
        self._next_load_ms = 0  # epoch ms of the next load (run loop); entries_stored may bring it forward
        self._last_load_ms = 0
        self._next_full_load_ms = 0  # loads before it read partitions from their window (LATE_WINDOW_MS)
        self._read_at: dict[tuple[int, int], int] = {}  # (shard, bucket) -> ``now`` of its last complete read

    # Lifecycle --------------------------------------------------------------------------------------------
    @contextlib.asynccontextmanager
    async def open(self) -> AsyncIterator[Picker]:
        # Started while etcd restarts: wait for it (bounded, logged) instead of exiting.
        await until_up("picker registration", self._register, budget_s=self.settings.startup_retry_s)
        self._tasks = [
            self.supervisor.start("picker", "keepalive", self._keepalive_loop),
            self.supervisor.start("picker", "watch_assignment", self._watch_assignment),
            self.supervisor.start("picker", "reread_assignment", self._reread_assignment),
        ]
        try:
            yield self
        finally:
            for task in self._tasks:
                task.cancel()
            for task in self._tasks:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
            self._tasks = []
            if self._lease is not None:
                with contextlib.suppress(Exception):
                    await self.coordination.revoke(self._lease)
            PICKER_SHARDS.set(0)

    async def _register(self) -> None:
        sent = time.monotonic()
        self._lease = await self.coordination.grant_lease(self.settings.lease_ttl_s)
        self._lease_valid_until = sent + self.settings.lease_ttl_s
        await self.coordination.put(PICKERS_PREFIX + self.node_id, b"1", self._lease)
        await self._read_assignment()

    async def _keepalive_loop(self) -> None:
        ttl = self.settings.lease_ttl_s
        while True:
            await asyncio.sleep(ttl / 3)
            if (stalled_s := self.stalled_s()) >= ttl * STALLED_STEP_TTL_SHARE:
                # Renewing would keep the shards with a loop that does not dispatch them.
                logger.warning(
                    "lease_not_renewed",
                    node=self.node_id,
                    reason="step_stalled",
                    step=self._step_name,
                    stalled_s=stalled_s,
                )
                continue
            try:
                sent = time.monotonic()
                if self._lease is not None and await self.coordination.keepalive(self._lease):
                    self._lease_valid_until = sent + ttl
                else:
                    # Lease gone (we were frozen or partitioned): drop everything and join again.
                    logger.warning("lease_lost", node=self.node_id)
                    self._assigned = set()
                    self._lease_valid_until = 0.0
                    await self._register()
            except Exception as exc:
                logger.warning("keepalive_failed", error=f"{type(exc).__name__}: {exc}")

    async def _watch_assignment(self) -> None:
        key = ASSIGNMENTS_PREFIX + self.node_id
        while True:
            try:
                async for event in self.coordination.watch_prefix(key):
                    if event.key == key:
                        self._assignment_events += 1
                        self._set_assignment(event.value)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                logger.warning("watch_failed", error=f"{type(exc).__name__}: {exc}")
                await asyncio.sleep(0.5)
                with contextlib.suppress(Exception):
                    await self._read_assignment()

    async def _reread_assignment(self) -> None:
        """A safety net under the watch: read the assignment every third of a lease TTL, so a change the watch
        missed costs at most that long (a picker believing it owns nothing would leave its shards undispatched
        while the leader, seeing it alive, never moves them)."""
        while True:
            await asyncio.sleep(self.settings.lease_ttl_s / 3)
            try:
                await self._read_assignment()
            except Exception as exc:
                logger.warning("assignment_read_failed", error=f"{type(exc).__name__}: {exc}")

    async def _read_assignment(self) -> None:
        """Read this picker's assignment and apply it, unless a watch event was applied while the read was in
        flight: the read's answer may then be older than that event (the two arrive on different streams), and
        the watch, which delivers every change in order, brings the assignment up to date anyway."""
        events = self._assignment_events
        value = await self.coordination.get(ASSIGNMENTS_PREFIX + self.node_id)
        if self._assignment_events == events:
            self._set_assignment(value)

    def _set_assignment(self, value: bytes | None) -> None:
        shards = set(orjson.loads(value)["shards"]) if value else set()
        if shards != self._assigned:
            logger.info("assignment", node=self.node_id, shards=sorted(shards))
        if shards - self._assigned:
            self._next_load_ms = 0  # shards taken over (a failover): what they owe is read now, not at the tick
        self._assigned = shards
        self._wake.set()

    def stalled_s(self) -> float:
        """Seconds the loop's step in flight has gone without progress (a finished load or dispatch batch); 0
        between steps."""
        since = self._progress_at
        return 0.0 if since is None else round(time.monotonic() - since, 3)

    @contextlib.contextmanager
    def _step(self, name: str) -> Iterator[None]:
        self._step_name = name
        self._progress_at = time.monotonic()
        try:
            yield
        finally:
            self._progress_at = None

    def _progressed(self) -> None:
        if self._progress_at is not None:
            self._progress_at = time.monotonic()

    def entries_stored(self, earliest_due_ms: int) -> None:
        """A writer in this process stored queue entries, the earliest due at ``earliest_due_ms``: if the next
        regular load would read it too late to dispatch it ahead, load sooner, but at most every
        :data:`NUDGED_LOAD_GAP_MS` (a load reads every owned shard). A job due now then fires without waiting for
        a tick."""
        if earliest_due_ms < now_ms() - LATE_WINDOW_MS:
            self._next_full_load_ms = 0  # stored too late for a window's read (FULL_LOAD_INTERVAL_MS): full next
        wanted = max(earliest_due_ms - self.settings.dispatch_ahead_ms, self._last_load_ms + NUDGED_LOAD_GAP_MS)
        if wanted < self._next_load_ms:
            self._next_load_ms = wanted
            self._wake.set()

    def owned_shards(self) -> set[int]:
        """Shards this picker may dispatch right now (empty once its lease may have expired)."""
        if time.monotonic() >= self._lease_valid_until:
            return set()
        return self._assigned

    # Main loop --------------------------------------------------------------------------------------------
    async def run(self, stop: asyncio.Event) -> None:
        tick_ms = int(self.settings.picker_tick_s * 1000)
        self._next_load_ms = 0
        while not stop.is_set():
            self._wake.clear()  # before the work: a nudge or an assignment during it ends the wait below at once
            try:
                now = now_ms()
                if now >= self._next_load_ms:
                    self._last_load_ms = now
                    self._next_load_ms = now + tick_ms  # before the load: entries_stored may bring it forward
                    with self._step("load"):
                        await self.load(now)
                now = now_ms()
                with self._step("dispatch"):
                    await self.dispatch_due(now, until=now + self.settings.dispatch_ahead_ms)
                self.supervisor.recovered("picker", "dispatch")
            except Exception as exc:  # a backend hiccup must not kill the picker; entries stay in the store
                logger.warning("picker_error", error=f"{type(exc).__name__}: {exc}", exc_info=True)
                self.supervisor.retrying("picker", "dispatch", exc)  # down in /health until a step succeeds
                await asyncio.sleep(self.settings.picker_tick_s)
            wake_at = self._next_load_ms
            if self._heap:
                # Sent ahead, a run waits at the worker for its due time anyway: wake at most every quarter of the
                # lead, so each wake-up sends a batch instead of one run per due millisecond.
                ahead = self.settings.dispatch_ahead_ms
                wake_at = min(wake_at, max(self._heap[0][0] - ahead, now + ahead // 4))
            delay = max(0.0, (wake_at - now_ms()) / 1000)
            if delay > 0:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), timeout=delay)

    async def drain(self, until_ms: int | None = None, max_rounds: int = 1000) -> int:
        """Burst mode: dispatch everything due by ``until_ms`` (default now) and return how many were sent."""
        sent = 0
        for _ in range(max_rounds):
            now = now_ms() if until_ms is None else until_ms
            with self._step("load"):
                await self.load(now, lookahead_ms=0, full=True)
            with self._step("dispatch"):
                count = await self.dispatch_due(now)
            sent += count
            if count == 0 and not any(e[0] <= now for e in self._heap):
                break
        return sent

    async def load(self, now: int, lookahead_ms: int | None = None, *, full: bool = False) -> None:
        """Read the owned shards' entries due by ``now + lookahead_ms`` into the heap; pass the checkpoints over
        empty old buckets. ``full``: read every partition from its start (otherwise only every
        :data:`FULL_LOAD_INTERVAL_MS`)."""
        owned = self.owned_shards()
        self._forget_unowned(owned)
        PICKER_SHARDS.set(len(owned))
        if sum(1 for item in self._heap[: self.settings.picker_batch] if item[0] <= now) >= self.settings.picker_batch:
            # A backlog already due (a burst): dispatch it first. Re-reading would only return the same rows.
            return
        if lookahead_ms is None:
            lookahead_ms = int(self.settings.picker_lookahead_s * 1000)
        until = now + lookahead_ms
        bucket_ms = self.settings.bucket_ms
        last_bucket = bucket_for(until, bucket_ms)
        grace_ms = int(self.settings.bucket_grace_s * 1000)
        # Each backend call that returns counts as progress (see _keepalive_loop): on a store slowed by write
        # pressure, a load of many shards is slow without being stuck.
        checkpoints: dict[int, int] = {}
        self._step_name = "load: checkpoints"
        for shard in sorted(owned):
            checkpoints[shard] = await self._checkpoint(shard, now)
            self._progressed()
        partitions = [
            (shard, bucket)
            for shard, checkpoint in checkpoints.items()
            for bucket in range(checkpoint, last_bucket + 1, bucket_ms)
        ]
        self._read_at = {p: self._read_at[p] for p in partitions if p in self._read_at}  # forget passed buckets
        since: dict[tuple[int, int], int] = {}  # partitions read from a due time on; the others from their start
        if full or now >= self._next_full_load_ms:
            self._next_full_load_ms = now + FULL_LOAD_INTERVAL_MS
        else:
            since = {p: read_at - LATE_WINDOW_MS for p, read_at in self._read_at.items()}
        # A bucket's entries are all due before its end (an entry goes into the bucket of max(due, now)).
        reads = [p for p in partitions if p not in since or since[p] < p[1] + bucket_ms]
        self._step_name = "load: due entries"
        limit = self.settings.picker_batch
        found = await self.store.due_entries_many(reads, until, limit, known=self._loaded, since=since)
        self._progressed()
        held: Counter[tuple[int, int]] | None = None  # loaded entries per partition, counted when first needed

        def held_in(partition: tuple[int, int]) -> int:
            """Entries of ``partition`` the picker held before this load added any (its read left them out as
            known). Counted once: asked after adds began, it is only asked of partitions this load added none to."""
            nonlocal held
            if held is None:
                held = Counter((key[0], key[1]) for key in self._loaded)
            return held[partition]

        for p in reads:
            rows = len(found.get(p, ()))
            # Known rows count toward the limit: was the page full?
            if rows + len(self._loaded) >= limit and rows + held_in(p) >= limit:
                continue  # not read through: the next read starts where this one did
            self._read_at[p] = now
        self._step_name = "load: advance checkpoints"
        for shard, checkpoint in checkpoints.items():
            advance_to = checkpoint
            for bucket in range(checkpoint, last_bucket + 1, bucket_ms):
                entries = found.get((shard, bucket), [])
                for entry in entries:
                    if entry.key not in self._loaded:
                        self._loaded.add(entry.key)
                        heapq.heappush(self._heap, (entry.due_ms, -entry.priority, entry.key, entry))
                # Only a contiguous run of empty, old buckets from the checkpoint can be passed for good. A bucket
                # whose entries this picker holds loaded reads as empty (they are left out as known) but is not:
                # passed, the entries would never be read again if their dispatch failed or the shard moved.
                if (
                    advance_to == bucket
                    and not entries
                    and (shard, bucket) not in since  # read from its start
                    and bucket + bucket_ms + grace_ms <= now
                    and not held_in((shard, bucket))
                ):
                    advance_to = bucket + bucket_ms
            if advance_to != checkpoint:
                await self._advance(shard, checkpoint, advance_to)  # a compare-and-set: an LWT on Scylla
                self._progressed()
        if self.settings.tenant_fair_dispatch and len(self._heap) > self._batch_size:
            try:  # read ahead, off the due instant's path (dispatch reads what is still missing)
                if len(self._owners) > 2 * len(self._heap) + OWNERS_SLACK:  # left by entries gone another way
                    loaded = {item[3].job_id for item in self._heap}
                    self._owners = {job: tenant for job, tenant in self._owners.items() if job in loaded}
                self._step_name = "load: owners"
                await self._read_owners([item[3] for item in self._heap])
            except Exception as exc:
                logger.warning("fair_owners_failed", error=f"{type(exc).__name__}: {exc}")

    async def _checkpoint(self, shard: int, now: int) -> int:
        if shard not in self._checkpoints:
            stored = await self.store.get_checkpoint(shard)
            if stored is None:
                # The writer sets every checkpoint before its first entry; None means nothing was ever written.
                stored = initial_checkpoint(now, self.settings.bucket_ms, int(self.settings.bucket_grace_s * 1000))
                if not await self.store.advance_checkpoint(shard, None, stored):
                    stored = await self.store.get_checkpoint(shard) or stored
            self._checkpoints[shard] = stored
        return self._checkpoints[shard]

    async def _advance(self, shard: int, expected: int, new: int) -> None:
        if await self.store.advance_checkpoint(shard, expected, new):
            self._checkpoints[shard] = new
        else:  # another picker moved it (handover): re-read next time
            self._checkpoints.pop(shard, None)

    def _forget_unowned(self, owned: set[int]) -> None:
        if any(item[3].shard not in owned for item in self._heap):
            kept = [item for item in self._heap if item[3].shard in owned]
            self._loaded = {item[2] for item in kept}
            heapq.heapify(kept)
            self._heap = kept
        for shard in list(self._checkpoints):
            if shard not in owned:
                del self._checkpoints[shard]

    async def dispatch_due(self, now: int, until: int | None = None) -> int:
        """Dispatch every loaded entry due by ``until`` (default ``now``; later: dispatch ahead, the worker holds
        the run until its due time) in batches; returns the number of runs sent."""
        until = now if until is None else until
        sent = 0
        if self.settings.tenant_fair_dispatch and len(self._heap) > self._batch_size:
            return await self._dispatch_fairly(now, until)  # more than one batch may be due: see picker/fair.py
        while self._heap and self._heap[0][0] <= until:
            batch: list[BucketEntry] = []
            while self._heap and self._heap[0][0] <= until and len(batch) < self._batch_size:
                item = heapq.heappop(self._heap)
                batch.append(item[3])
            try:
                sent += await self._timed_dispatch(batch, now)
            except BaseException:
                self._read_again(batch)
                raise
            finally:
                for entry in batch:
                    self._loaded.discard(entry.key)
        return sent

    async def _dispatch_fairly(self, now: int, until: int) -> int:
        """Every loaded entry due by ``until``, ordered round-robin across tenants (``picker.fair``), in batches."""
        due: list[BucketEntry] = []
        while self._heap and self._heap[0][0] <= until:
            due.append(heapq.heappop(self._heap)[3])
        sent = 0
        try:
            if len(due) > self.settings.picker_batch:
                try:
                    await self._read_owners(due)
                except Exception as exc:  # unfair beats late: dispatch in due order
                    logger.warning("fair_order_failed", error=f"{type(exc).__name__}: {exc}")
                else:
                    owners = self._owners
                    due = fair_order(due, lambda e: owners.get(e.job_id, ""), lambda e: e.priority, self._weights())
            # Small batches first, doubling up to the dispatch batch size: the head of the fair order (every tenant's
            # first runs) reaches the queue after a short batch instead of after a full one.
            start, size = 0, min(FAIR_FIRST_BATCH, self._batch_size)
            while start < len(due):
                sent += await self._timed_dispatch(due[start : start + size], now)
                start, size = start + size, min(2 * size, self._batch_size)
        except BaseException:
            self._read_again(due)
            raise
        finally:
            for entry in due:  # sent, or (after a failure) re-read from the store by the next load
                self._loaded.discard(entry.key)
                self._owners.pop(entry.job_id, None)
        return sent

    async def _read_owners(self, entries: list[BucketEntry]) -> None:
        missing = list({e.job_id for e in entries if e.job_id not in self._owners})
        for start in range(0, len(missing), OWNERS_READ_CHUNK):
            self._owners.update(await self.store.get_job_owners(missing[start : start + OWNERS_READ_CHUNK]))
            self._progressed()

    def _weights(self) -> dict[str, float]:
        return {t: float(v["weight"]) for t, v in self.settings.tenant_limits.items() if "weight" in v}

    async def _timed_dispatch(self, entries: list[BucketEntry], now: int) -> int:
        """:meth:`_dispatch` one batch, count it as progress, and size the next batch from how long it took."""
        started = time.monotonic()
        sent = await self._dispatch(entries, now)
        self._progressed()
        took = time.monotonic() - started
        grow_below = self.settings.lease_ttl_s * DISPATCH_STEP_TTL_SHARE
        shrink_above = self.settings.lease_ttl_s * DISPATCH_STEP_MAX_TTL_SHARE
        if took > shrink_above:
            fit = len(entries) * (grow_below + shrink_above) / 2 / took  # as if time grew with the entries
            self._batch_size = max(MIN_DISPATCH_BATCH, min(self._batch_size, int(fit)))
        elif took < grow_below and len(entries) >= self._batch_size:
            self._batch_size = min(self.settings.picker_batch, 2 * self._batch_size)
        return sent

    async def _dispatch(self, entries: list[BucketEntry], now: int) -> int:
        """Dispatch ``entries`` (due by now) of the shards this picker owns; returns the runs sent."""
        owned = self.owned_shards()
        unowned = [e for e in entries if e.shard not in owned]
        if unowned:
            self._read_again(unowned)
            entries = [e for e in entries if e.shard in owned]
        if not entries:
            return 0
        # Decided as of this read: a state write delayed past a later decision (this picker frozen with the write
        # in flight, or the run's outcome recorded after this read) cannot set the job back.
        read_us = clock.decision_us()
        jobs = await self.store.get_jobs(list({e.job_id for e in entries}))
        plan = self._plan(entries, jobs, now, read_us)
        if self.settings.tenant_fair_dispatch and len(set(plan.tenants)) > 1:
            pairs = fair_order(
                list(zip(plan.tenants, plan.messages, strict=True)),
                lambda p: p[0],
                lambda p: p[1].priority,
                self._weights(),
            )
            plan.messages = [message for _, message in pairs]
        sent = await self._apply(plan, {e.shard for e in entries})
        if sent:
            logger.debug("dispatched", count=sent)
        return sent

    def _plan(self, entries: list[BucketEntry], jobs: dict[str, Job], now: int, read_us: int) -> DispatchPlan:
        """What dispatching ``entries`` writes and sends (no I/O): runs to send, the next occurrences, skipped
        runs, job states, the previous runs to cancel (``overlap: replace``) and the entries done.

        ``read_us``: when ``jobs`` were read (:func:`libs.clock.decision_us`). A job's state writes are decided
        then, or just after the state it showed (``state_at_us``) if that was decided on a clock ahead of ours."""
        plan = DispatchPlan(done=list(entries))
        for entry in entries:
            job = jobs.get(entry.job_id)
            reason = self._drop_reason(entry, job)
            if job is None or reason is not None:
                PICKER_DROPPED.labels(reason or "unknown_job").inc()
                if reason == "already_dispatched" and job is not None and job.recurring:
                    # Keep the chain alive (a replayed or duplicate submission): the next entry after what was
                    # dispatched has the same key as the chain's own, so this write is idempotent.
                    chained = self._chain_entry(job, now)
                    if chained is not None:
                        plan.next_entries.append(chained)
                continue
            decided_us = max(read_us, job.state_at_us + 1)
            fire = [entry.scheduled_ms]
            if entry.kind == "schedule" and job.recurring:
                fire, skipped, next_entry = self._plan_recurring(job, entry, now)
                plan.skipped_runs.extend(skipped)
                if next_entry is not None:
                    plan.next_entries.append(next_entry)
                if fire and job.overlap != "allow" and job.last_run is not None and self._still_running(job, now):
                    if job.overlap == "skip":
                        reason = "overlap: previous run still running"
                        plan.skipped_runs.extend(self._skipped(job, occ, now, reason) for occ in fire)
                        plan.mark_dispatched(job.job_id, max(fire))
                        fire = []
                    else:
                        plan.cancels.append(job.last_run.run_id)
            for scheduled in fire:
                plan.messages.append(self._message(job, entry, scheduled, now, decided_us))
                plan.tenants.append(job.user_id)
                child(PICKER_DISPATCHED, entry.kind).inc()
            if entry.kind == "schedule" and fire:
                plan.mark_dispatched(job.job_id, max(fire))
            plan.queued[job.job_id] = JobState(job_id=job.job_id, state=job_states.dispatched(), at_us=decided_us)
        return plan

    @staticmethod
    def _message(job: Job, entry: BucketEntry, scheduled: int, now: int, decided_us: int) -> OutgoingMessage:
        run_id = run_id_for(job.job_id, scheduled, entry.attempt)
        order = RunOrder(
            run_id=run_id,
            job=job,
            scheduled_ms=scheduled,
            attempt=entry.attempt,
            due_ms=entry.due_ms if scheduled == entry.scheduled_ms else scheduled,
            kind=entry.kind,
            dispatched_ms=now,
            decided_us=decided_us,
            # The queue message carries the trace on to the worker (libs/tracing.py); None while off.
            traceparent=tracing.instant("picker", "dsched.dispatch", job.traceparent, {"dsched.run_id": run_id})
            if tracing.ENABLED
            else None,
        )
        DISPATCH_LAG.observe(max(0, now - order.due_ms) / 1000)
        return OutgoingMessage(body=order.model_dump_json().encode(), priority=job.priority)

    async def _apply(self, plan: DispatchPlan, shards: set[int]) -> int:
        """Carry out ``plan`` in the order that makes a crash harmless: the next occurrences and skipped runs before
        the send; the send before the jobs' states ("queued", and the occurrences marked dispatched); those before
        deleting the entries. A crash at any point re-dispatches at most (deduplicated by run id), never loses.
        "queued" needs no write of its own before the send: job states resolve by decision time, so the worker's
        later "running" or outcome wins whichever write arrives first (one write and one round trip per job less).

        Before each step the picker checks it still owns ``shards``: any await may stall past the lease (GC pause,
        SIGSTOP, slow backend) while the shards move to another picker, and finishing then would send runs twice
        and set job states back to "queued" after their runs finished. Stopping is a crash at that step: the
        entries stay in the store for the new owner. Returns the runs sent (0 if abandoned).
        """
        if plan.cancels:
            if not self._still_owns(shards, "cancels", plan):
                return 0
            await self._request_cancels(plan.cancels)
        if plan.next_entries:
            if not self._still_owns(shards, "next_entries", plan):
                return 0
            await self.store.put_entries(plan.next_entries)
        if plan.skipped_runs:
            if not self._still_owns(shards, "skipped_runs", plan):
                return 0
            await self.store.put_runs(plan.skipped_runs)
        if plan.messages:
            if not self._still_owns(shards, "send", plan):
                return 0
            await self.queue.send(plan.messages)
        if plan.queued:
            if not self._still_owns(shards, "states", plan):
                return 0
            states = [
                state.model_copy(update={"dispatched_through_ms": plan.dispatched[job_id]})
                if job_id in plan.dispatched
                else state
                for job_id, state in plan.queued.items()
            ]
            await self.store.update_job_states(states)
        if not self._still_owns(shards, "delete", plan):
            return 0
        await self.store.delete_entries(plan.done)
        return len(plan.messages)

    def _still_owns(self, shards: set[int], step: str, plan: DispatchPlan) -> bool:
        if shards <= self.owned_shards():
            return True
        PICKER_DROPPED.labels("ownership_lost").inc(len(plan.done))
        logger.warning("dispatch_abandoned", node=self.node_id, step=step, entries=len(plan.done))
        self._read_again(plan.done)
        return False

    def _read_again(self, entries: list[BucketEntry]) -> None:
        """``entries`` leave the heap still stored (a failed or abandoned dispatch): the next load reads their
        partitions from the start, as they may be older than its window."""
        for entry in entries:
            self._read_at.pop((entry.shard, entry.bucket_ms), None)

    @staticmethod
    def _skipped(job: Job, occurrence: int, now: int, reason: str) -> Run:
        return Run(
            run_id=run_id_for(job.job_id, occurrence, 0),
            job_id=job.job_id,
            user_id=job.user_id,
            scheduled_ms=occurrence,
            attempt=0,
            status=RunStatus.SKIPPED,
            finished_ms=now,
            error=reason,
        )

    @staticmethod
    def _still_running(job: Job, now: int) -> bool:
        """The job's last run is recorded as running and could still be (a dead worker's run stops counting
        once its timeout and a visibility period have passed)."""
        last = job.last_run
        if last is None or last.status != RunStatus.RUNNING:
            return False
        return now - last.scheduled_ms < int(job.timeout_s * 1000) + OVERLAP_STALE_MS

    async def _request_cancels(self, run_ids: list[str]) -> None:
        """``overlap: replace``: ask the worker running the previous run to stop it (see worker cancel watch)."""
        try:
            lease = await self.coordination.grant_lease(60)
            for run_id in run_ids:
                await self.coordination.put(CANCEL_PREFIX + run_id, b"replaced", lease)
        except Exception as exc:  # the new run still goes ahead; the old one ends at its timeout
            logger.warning("cancel_request_failed", error=f"{type(exc).__name__}: {exc}")

    @staticmethod
    def _drop_reason(entry: BucketEntry, job: Job | None) -> str | None:
        if job is None:
            return "unknown_job"
        if job.deleted:
            return "deleted"
        if job.paused and entry.kind != "trigger":
            return "paused"
        if entry.kind == "schedule":
            # An older definition's entry is superseded only if it fires another occurrence than the job's
            # current one: for the same occurrence the newer definition's entry has the same key (the version
            # is not part of it), i.e. it is this very row, overwritten by the writer after it was loaded.
            # Dropping it would delete that row and the job would never run (a PATCH right after a submit).
            if entry.version != job.version and entry.scheduled_ms != job.next_fire_ms:
                return "superseded"
            if entry.scheduled_ms <= job.dispatched_through_ms:
                return "already_dispatched"
        last = job.last_run
        if (
            not job.recurring
            and last is not None
            and last.status in FINISHED_RUN_STATUSES
            and last.run_id == run_id_for(job.job_id, entry.scheduled_ms, entry.attempt)
        ):
            # This entry's run already ran: a picker sent it, then stopped (frozen, killed) before recording
            # the dispatch and deleting the entry. Sent again it would only be deduplicated by the worker, after
            # its "queued" had overwritten the finished job's state for good. (A recurring job's next
            # occurrence rewrites its state anyway, and its chain relies on the entry: left as it was.)
            return "already_ran"
        return None

    def _plan_recurring(
        self, job: Job, entry: BucketEntry, now: int
    ) -> tuple[list[int], list[Run], BucketEntry | None]:
        try:
            schedule = parse_schedule(job.cron_schedule or "", job.timezone)
        except ScheduleError as exc:  # validated at submit; a bad row must not stall the shard
            logger.warning("bad_schedule", job_id=job.job_id, error=str(exc))
            return [entry.scheduled_ms], [], None
        max_lateness = int(job.max_lateness_s * 1000) if job.max_lateness_s is not None else DEFAULT_MAX_LATENESS_MS
        try:
            plan = plan_misfire(schedule, entry.scheduled_ms, now, job.misfire, max_lateness)
        except ScheduleError:  # no occurrence after this one before year 10000: the schedule ends here
            return [entry.scheduled_ms], [], None
        skipped = [self._skipped(job, occ, now, reason) for occ, reason in plan.skipped]
        return plan.fire, skipped, self._schedule_entry(job, plan.next_ms, now)

    def _schedule_entry(self, job: Job, next_ms: int, now: int) -> BucketEntry:
        settings = self.settings
        return entry_for(
            job,
            next_ms,
            scheduled_ms=next_ms,
            attempt=0,
            kind="schedule",
            shard_count=settings.shard_count,
            bucket_ms=settings.bucket_ms,
            now=now,
        )

    def _chain_entry(self, job: Job, now: int) -> BucketEntry | None:
        first = first_undispatched(job)
        return None if first is None else self._schedule_entry(job, first, now)
