"""Writer: consumes the submissions log and persists jobs and their due entries.

Per batch of records: store every job definition, then its queue entry in the sharded time-bucket table, and
only then commit the log offsets. A crash anywhere replays the batch, which is harmless: job writes are
idempotent upserts of definition columns (runtime state is never touched) and an entry written twice is either
the same row or is dropped by the picker (``dispatched_through_ms`` / ``version`` checks).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter
from collections.abc import AsyncIterator, Callable

from pydantic import ValidationError

from dsched.libs import job_states, logs, tracing
from dsched.libs.clock import now_ms
from dsched.libs.log.base import WRITER_GROUP, ConsumedRecord, LogConsumer, SubmissionLog
from dsched.libs.metrics import WRITER_DEAD_LETTERS, WRITER_LAG_RECORDS, WRITER_LAG_SECONDS, WRITER_RECORDS, export
from dsched.libs.models import BucketEntry, DeadLetter, EntryKind, Job, JobState, Submission
from dsched.libs.settings import Settings
from dsched.libs.sharding import entry_for, initial_checkpoint
from dsched.libs.store.base import JobStore

LAG_SAMPLE_S = 1.0  # how often the writer measures its lag behind the log (dsched_writer_lag_*)
logger = logs.get("writer")


class Writer:
    def __init__(
        self,
        *,
        log: SubmissionLog,
        store: JobStore,
        settings: Settings,
        on_stored: Callable[[int], None] | None = None,
    ) -> None:
        """``on_stored(earliest_due_ms)``: called after each store write that added queue entries, with the
        earliest due time among them (a picker in the same process loads them at once instead of at its tick)."""
        self.log = log
        self.store = store
        self.settings = settings
        self.on_stored = on_stored
        self._consumer: LogConsumer | None = None
        self._batch_oldest_ms: int | None = None  # append time of the oldest record polled and not yet committed

    @contextlib.asynccontextmanager
    async def open(self) -> AsyncIterator[Writer]:
        # Pin every shard's scan start before writing any entry, so no entry can land behind a checkpoint.
        start = initial_checkpoint(now_ms(), self.settings.bucket_ms, int(self.settings.bucket_grace_s * 1000))
        for shard in range(self.settings.shard_count):
            await self.store.advance_checkpoint(shard, None, start)
        self._consumer = self.log.consumer(WRITER_GROUP)
        await self._consumer.startup()
        export(WRITER_LAG_RECORDS, WRITER_LAG_SECONDS)
        lag_sampler = asyncio.create_task(self._sample_lag())
        try:
            yield self
        finally:
            lag_sampler.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await lag_sampler
            await self._consumer.shutdown()
            self._consumer = None

    async def run(self, stop: asyncio.Event) -> None:
        """Consume until ``stop`` is set; a batch in progress is finished and committed first."""
        while not stop.is_set():
            await self.step(timeout_s=0.2)

    async def step(self, timeout_s: float) -> int:
        if self._consumer is None:
            raise RuntimeError("use `async with writer.open()`")
        records = await self._consumer.poll(self.settings.writer_batch, timeout_s)
        if records:
            self._batch_oldest_ms = min(record.timestamp_ms for record in records)
            try:
                await self.persist(records)
                await self._consumer.commit(records)
                self._batch_oldest_ms = None
            except BaseException:
                # The consumer's position is in memory and already past this batch: start over from the last
                # commit, or a restarted loop would skip the batch (and lose it until the process restarts).
                await self._rewind()
                raise
        return len(records)

    async def _sample_lag(self) -> None:
        """Every ``LAG_SAMPLE_S``: ``dsched_writer_lag_records`` from the log, ``dsched_writer_lag_seconds`` =
        now minus the append time of the oldest uncommitted record (from the log when it can tell, else from the
        batch in progress). Runs beside the consume loop, so a writer stuck on a batch still reports growing lag."""
        while True:
            with contextlib.suppress(Exception):
                consumer = self._consumer  # read each time: a rewind replaces it; None only outside open()
                lag = await consumer.lag() if consumer is not None else None
                if lag is not None:
                    WRITER_LAG_RECORDS.set(lag.records)
                    oldest = lag.oldest_ms if lag.records else None
                    if oldest is None and lag.records:
                        oldest = self._batch_oldest_ms
                    if oldest is not None or not lag.records:
                        WRITER_LAG_SECONDS.set(max(0, now_ms() - oldest) / 1000 if oldest is not None else 0)
            await asyncio.sleep(LAG_SAMPLE_S)

    async def _rewind(self) -> None:
        consumer, self._consumer = self._consumer, self.log.consumer(WRITER_GROUP)
        if consumer is not None:
            with contextlib.suppress(Exception):
                await consumer.shutdown()
        await self._consumer.startup()

    async def persist(self, records: list[ConsumedRecord]) -> None:
        """Store the jobs and time-bucket entries of ``records``; park each record that cannot be stored.

        A record that does not decode, or whose job or entry cannot be built, is dead-lettered at once. If the
        batch write fails, each record is written on its own: one that still fails while the store answers is
        poison and is dead-lettered; if the store does not answer, the error propagates (an outage: the batch
        is retried from the last commit, nothing is parked).
        """
        now = now_ms()
        staged: list[tuple[ConsumedRecord, list[Job], list[BucketEntry]]] = []
        ops: Counter[str] = Counter()
        for record in records:
            try:
                op, jobs, entries = self._stage(record, now)
            except (ValidationError, ValueError, OverflowError, TypeError, ArithmeticError) as exc:
                await self._dead_letter(record, "undecodable" if isinstance(exc, ValidationError) else "invalid", exc)
                continue
            staged.append((record, jobs, entries))
            ops[op] += 1
        for op, count in ops.items():  # one labelled increment per op and batch, not per record
            WRITER_RECORDS.labels(op).inc(count)
        jobs = [job for _, js, _ in staged for job in js]
        entries = [entry for _, _, es in staged for entry in es]
        try:
            await self._store(jobs, entries)
        except Exception as exc:
            if len(staged) == 1 and not await self._store_answers():
                raise
            logger.warning("batch_write_failed", records=len(staged), error=type(exc).__name__)
            for record, js, es in staged:
                try:
                    await self._store(js, es)
                except Exception as one:
                    if not await self._store_answers():
                        raise
                    await self._dead_letter(record, "unstorable", one)
        logger.debug("persisted", records=len(records), jobs=len(jobs), entries=len(entries))

    def _stage(self, record: ConsumedRecord, now: int) -> tuple[str, list[Job], list[BucketEntry]]:
        """The op, job definition and queue entry one record asks for (raises if it cannot be built)."""
        sub = Submission.model_validate_json(record.value)
        job = sub.job  # decoded for this batch alone: changed in place, not copied
        if sub.op in ("trigger", "replay"):
            # Out-of-schedule runs: the definition is unchanged, the occurrence is the acceptance time.
            entry = self._entry(job, sub.at_ms, scheduled_ms=sub.at_ms, attempt=sub.attempt, kind=sub.op, now=now)
            return sub.op, [], [entry]
        # The offset orders every change of one job (same key, same partition): it is the version.
        job.version = record.offset
        if tracing.ENABLED and job.traceparent:  # the stored definition names this hop (libs/tracing.py)
            attributes: tracing.Attributes = {"dsched.job_id": job.job_id, "dsched.offset": record.offset}
            job.traceparent = tracing.instant("writer", "dsched.store", job.traceparent, attributes)
        if job.paused or job.deleted:
            return sub.op, [job], []
        entry = self._entry(job, job.next_fire_ms, scheduled_ms=job.next_fire_ms, attempt=0, kind="schedule", now=now)
        return sub.op, [job], [entry]

    async def _store(self, jobs: list[Job], entries: list[BucketEntry]) -> None:
        await self.store.put_jobs_and_entries(jobs, entries)
        if entries and self.on_stored is not None:
            self.on_stored(min(entry.due_ms for entry in entries))

    async def _store_answers(self) -> bool:
        """Whether the store serves a read right now (tells a poison record from an outage)."""
        try:
            await self.store.probe()
        except Exception:
            return False
        return True

    async def _dead_letter(self, record: ConsumedRecord, reason: str, exc: BaseException) -> None:
        detail = (str(exc).splitlines() or [""])[0][:500]
        WRITER_RECORDS.labels("dead_letter").inc()
        WRITER_DEAD_LETTERS.labels(reason).inc()
        logger.error(
            "record_dead_lettered",
            partition=record.partition,
            offset=record.offset,
            key=record.key,
            reason=reason,
            error=f"{type(exc).__name__}: {detail}",
        )
        if self._consumer is None:
            raise RuntimeError("use `async with writer.open()`")
        await self._consumer.dead_letter(record, f"{reason}: {type(exc).__name__}: {detail}")
        await self._notify_owner(record, reason)

    async def _notify_owner(self, record: ConsumedRecord, reason: str) -> None:
        """A parked submission the owner was told was accepted: show it as a dead letter they can see."""
        try:
            sub = Submission.model_validate_json(record.value)
        except ValidationError:
            return  # no owner to tell; the log's dead-letter place and the metric keep it
        now = now_ms()
        letter = DeadLetter(
            dead_letter_id=f"rejected-{record.partition}-{record.offset}",
            job_id=sub.job.job_id,
            user_id=sub.job.user_id,
            project_id=sub.job.project_id,
            scheduled_ms=now,
            attempts=0,
            error=f"the submission could not be stored ({reason}); it will not run",
            dead_ms=now,
        )
        with contextlib.suppress(Exception):
            await self.store.put_dead_letters([letter])
            # The row ingestion wrote at acceptance would say "submitted" forever.
            await self.store.update_job_states([JobState(job_id=sub.job.job_id, state=job_states.rejected())])

    def _entry(
        self, job: Job, due_ms: int, *, scheduled_ms: int, attempt: int, kind: EntryKind, now: int
    ) -> BucketEntry:
        return entry_for(
            job,
            due_ms,
            scheduled_ms=scheduled_ms,
            attempt=attempt,
            kind=kind,
            bucket_ms=self.settings.bucket_ms,
            shard_count=self.settings.shard_count,
            now=now,
        )
