"""Worker: receives runs from the work queue, executes them, records them, retries or dead-letters.

Per received batch (up to 10 messages), in this order:

1. Runs already finished (a redelivery after a lost ack) are acked without running again.
2. ``at_most_once`` runs are claimed in the store (one conditional write each); a run claimed before is never
   executed again: the delivery is counted, and if the run never finished it is recorded as failed.
3. Each run executes concurrently (bounded by ``worker_concurrency``) while a heartbeat extends the visibility
   of every in-flight message.
4. The result is recorded; a failure either stores a retry entry (due after the backoff, fired by a picker) or,
   with retries used up, a dead letter. Only after those writes are durable is the message acked.
5. A run whose execution or recording raises, an undecodable message, and anything the queue's own redrive
   parks in its dead-letter store become a failed run with the reason and a dead letter (:mod:`worker.failures`).

Store writes and acks of concurrent runs are coalesced (:class:`libs.batching.Batcher`): one round trip per
burst, not per run.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import traceback
import uuid
from collections.abc import AsyncIterator, Awaitable, Coroutine

import aiohttp
from pydantic import ValidationError

from dsched.libs import job_states, logs, tracing
from dsched.libs.batching import Batcher
from dsched.libs.blobs.base import BlobStore
from dsched.libs.clock import now_ms
from dsched.libs.coordination.base import Coordination
from dsched.libs.coordination.keys import CANCEL_PREFIX, WORKERS_PREFIX
from dsched.libs.metrics import (
    DEAD_LETTERS,
    DUPLICATE_DELIVERIES,
    RETRIES,
    WORKER_INFLIGHT,
    WORKER_SLOTS,
    export,
    export_run_outcomes,
    observe_run_finished,
    observe_run_start,
    sample_queue_depth,
)
from dsched.libs.models import (
    FINISHED_RUN_STATUSES,
    BucketEntry,
    DeadLetter,
    LastRun,
    Payload,
    Run,
    RunOrder,
    RunStatus,
    uuid5_text,
)
from dsched.libs.queue.base import ReceivedMessage, WorkQueue
from dsched.libs.retry import backoff_s, http_status_retryable, parse_retry_after, should_retry
from dsched.libs.settings import Settings
from dsched.libs.sharding import entry_for
from dsched.libs.signing import SigningSecrets
from dsched.libs.store.base import JobStore
from dsched.libs.supervisor import Supervisor
from dsched.worker import executors, failures, http1, presence
from dsched.worker.store_gate import StoreGate

RUNNING_REPORT_S = 0.2
RECORD_RETRY_PAUSE_S = 0.2  # before recording a run's outcome a second time, on its own
# A batch the store could not deduplicate (the store is down) is handed back this long; meanwhile this worker
# receives nothing until the store answers (worker/store_gate.py): each receive counts toward max_receives.
STORE_DOWN_PAUSE_S = 2.0
# A finished run whose record fails because the store does not answer waits this long for it (hidden, not run again),
# at most this many outages, then is left to reappear.
STORE_OUTAGE_WAIT_S = 600.0
STORE_OUTAGES_PER_RECORD = 10
GATE_CHECK_S = 0.5  # how often a receive loop held by the store gate looks at its stop event
# Finished runs' records, job states and acks wait this long for company before their write: runs finishing one at
# a time (a steady rate) then share one commit instead of paying one each. After the run, so no fire lag.
RECORD_LINGER_S = 0.005
HEARTBEATS_PER_VISIBILITY = 6  # heartbeat checks per visibility timeout (each extends what is due, see _heartbeat)
CLAIM_LOST = "at_most_once: delivery lost after the run was claimed; not run again"
IDEMPOTENCY_NAMESPACE = uuid.UUID("0f6f3f1c-9a8e-4a51-8c0b-6f7b2f4f9d11")
logger = logs.get("worker")


def _trace(exc: BaseException) -> str:
    """The end of ``exc``'s traceback as plain text: cheap, unlike a rendered ``exc_info`` (a console renderer can
    block the event loop for seconds, longer than the heartbeat may wait)."""
    return "".join(traceback.format_exception(exc))[-2000:]


class Worker:
    def __init__(
        self,
        *,
        queue: WorkQueue,
        store: JobStore,
        blobs: BlobStore,
        settings: Settings,
        coordination: Coordination | None = None,
        node_id: str | None = None,
        supervisor: Supervisor | None = None,
    ) -> None:
        self.queue = queue
        self.store = store
        self.signing = SigningSecrets(store, settings)  # per-tenant secrets rotated via /admin (issue 12)
        self.blobs = blobs
        self.supervisor = supervisor or Supervisor()
        self.settings = settings
        self.coordination = coordination
        self.node_id = node_id or settings.node_id
        # This incarnation's start (its presence's ``started_at``): every run it starts begins later, so a claim's
        # holder whose presence started after the run did was restarted under the same node id (_claimer_alive).
        self.started_ms = now_ms()
        self._slots = asyncio.Semaphore(settings.worker_concurrency)  # runs executing
        self._recording = asyncio.Semaphore(4 * settings.worker_concurrency)  # finished runs not yet acked
        self._inflight: dict[str, executors.Cancellation] = {}  # receipt -> its run's cancellation
        self._receipts_by_run: dict[str, str] = {}
        self._receiving: set[str] = set()  # receipts of batches being decoded and deduplicated (see _start)
        self._watching: set[str] = set()  # redelivered at-most-once runs whose claimer lives (see _watch_claimed)
        self._fresh_until: dict[str, float] = {}  # receipt -> (monotonic) when it next needs an extend (_heartbeat)
        self._held = 0  # runs received ahead of their due time, waiting for it (see _hold)
        self._started: dict[str, tuple[RunOrder, int]] = {}  # runs whose "running" record is not written yet
        self._tasks: set[asyncio.Task[None]] = set()
        self._session: aiohttp.ClientSession | None = None
        self._lean: http1.Http1Client | None = None  # plain http:// calls (worker/http1.py)
        self._runs = Batcher(store.put_runs, linger_s=RECORD_LINGER_S)
        self._states = Batcher(store.update_job_states, linger_s=RECORD_LINGER_S)
        self._acks = Batcher(queue.ack, max_batch=100, linger_s=RECORD_LINGER_S)
        self._background: list[asyncio.Task[None]] = []
        self._receivers_failing = 0  # receive loops whose last receive raised (the service is down meanwhile)
        self._store_gate = StoreGate(store, self.supervisor)

    @contextlib.asynccontextmanager
    async def open(self) -> AsyncIterator[Worker]:
        # One guarded DNS answer per connection: the SSRF check and the connect see the same addresses.
        connector = executors.http_connector(self.settings.allow_private_http, ttl_dns_cache=60)
        self._session = aiohttp.ClientSession(connector=connector)
        self._lean = http1.Http1Client(executors.GuardedResolver(self.settings.allow_private_http))
        supervise = self.supervisor.start
        self._background = [
            supervise("worker", "heartbeat", self._heartbeat),
            supervise("worker", "report_running", self._report_running),
            supervise("worker", "queue_dead_letters", lambda: failures.sweep_forever(self)),
            supervise("worker", "store", self._store_gate.watch),
        ]
        if (coordination := self.coordination) is not None:
            self._background.append(supervise("worker", "watch_cancels", lambda: self._watch_cancels(coordination)))
            self._background.append(supervise("worker", "presence", lambda: presence.announce(self, coordination)))
        # This process exports the depth of the queue it consumes (dsched_queue_depth), in every deployment mode.
        self._background.append(supervise("worker", "queue_depth", lambda: sample_queue_depth(self.queue)))
        export(WORKER_INFLIGHT, WORKER_SLOTS)
        export_run_outcomes()
        WORKER_SLOTS.set(self.settings.worker_concurrency)
        try:
            yield self
        finally:
            await self._hand_back(grace_s=self.settings.shutdown_grace_s)
            for task in self._background:
                task.cancel()
            for task in self._background:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
            await self._session.close()
            self._session = None
            await self._lean.close()
            self._lean = None

    # Main loops -------------------------------------------------------------------------------------------
    async def run(self, stop: asyncio.Event) -> None:
        receivers = max(1, min(4, self.settings.worker_concurrency // 10))
        await asyncio.gather(*(self._receive_loop(stop) for _ in range(receivers)))

    async def _receive_loop(self, stop: asyncio.Event) -> None:
        """Receive while slots are free until ``stop``. A failed receive (queue unreachable) is logged and tried
        again after a pause; from the first failure until every receive loop received again (or ended) the worker
        is ``retrying`` (down in /health, one restart counted per streak)."""
        failing = False
        try:
            while not stop.is_set():
                if not await self._store_gate.wait_up(GATE_CHECK_S):
                    continue  # the store does not answer: receive nothing (a receive it cannot dedupe is burnt)
                await self._slots.acquire()
                free = 1
                while free < 10 and not self._slots.locked():
                    await self._slots.acquire()
                    free += 1
                try:
                    messages = await self.queue.receive(free, 1.0, self.settings.visibility_timeout_s)
                    if failing:
                        failing = self._receiver_failing(False)
                except Exception as exc:
                    logger.warning("receive_failed", error=f"{type(exc).__name__}: {exc}")
                    if not failing:
                        failing = self._receiver_failing(True)
                    self.supervisor.retrying("worker", "receive", exc)
                    messages = []
                    await asyncio.sleep(0.5)
                for _ in range(free - len(messages)):
                    self._slots.release()
                if messages:
                    await self._start(messages)
        finally:
            if failing:
                self._receiver_failing(False)

    def _receiver_failing(self, failing: bool) -> bool:
        """Count a receive loop into (or out of) the failing ones; the last one out reports the worker up."""
        self._receivers_failing += 1 if failing else -1
        if self._receivers_failing == 0:
            self.supervisor.recovered("worker", "receive")
        return failing

    async def drain(self, max_rounds: int = 1000) -> int:
        """Burst mode: run everything currently visible in the queue, wait for it, return how many ran."""
        handled = 0
        for _ in range(max_rounds):
            messages = await self.queue.receive(10, 0.05, self.settings.visibility_timeout_s)
            if not messages:
                break
            for _ in messages:
                await self._slots.acquire()
            await self._start(messages)
            handled += len(messages)
        await self.wait_idle()
        return handled

    async def wait_idle(self) -> None:
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)

    async def _start(self, messages: list[ReceivedMessage]) -> None:
        """Decode and deduplicate one received batch, then start its runs (each holds one slot). The heartbeat
        keeps the whole batch hidden from here on, through the deduplication's store round trips. If the store
        cannot deduplicate it, the batch is handed back for :data:`STORE_DOWN_PAUSE_S` and the store gate closes."""
        self._receiving.update(m.receipt for m in messages)
        try:
            await self._start_batch(messages)
        finally:
            self._receiving.difference_update(m.receipt for m in messages)

    async def _start_batch(self, messages: list[ReceivedMessage]) -> None:
        decoded: list[tuple[ReceivedMessage, RunOrder]] = []
        to_ack: list[str] = []
        for message in messages:
            try:
                decoded.append((message, RunOrder.model_validate_json(message.body)))
            except ValidationError as exc:
                logger.error("undecodable_message", message_id=message.message_id, error=str(exc).splitlines()[0])
                try:  # a failed run + dead letter for its owner if the job can be identified, else counted
                    await failures.settle_undecodable(self, message, exc, "queue")
                except Exception as settle_exc:  # store down: it reappears (or reaches the dead-letter sweep)
                    logger.warning("record_failed", message_id=message.message_id, error=f"{settle_exc!r}"[:300])
                    continue
                to_ack.append(message.receipt)
        runnable: list[tuple[ReceivedMessage, RunOrder]] = []
        # A first delivery of an at-least-once run needs no lookup: only a redelivery can find it finished.
        # (A picker re-dispatching after a crash may still run it twice, which at-least-once allows.)
        to_check = [m.run_id for msg, m in decoded if msg.receive_count > 1 or m.job.execution == "at_most_once"]
        try:
            existing = await self.store.get_runs(to_check) if to_check else {}
            at_most_once = [
                m.run_id for _, m in decoded if m.job.execution == "at_most_once" and m.run_id not in existing
            ]
            claimed = await self.store.claim_runs(at_most_once, self.node_id) if at_most_once else set()
        except Exception as exc:  # store unavailable: hand the batch back untouched, for a while
            logger.warning("dedupe_failed", error=f"{type(exc).__name__}: {exc}")
            self._store_gate.close(exc)
            await self._nack_quietly([m.receipt for m, _ in decoded], STORE_DOWN_PAUSE_S)
            for _ in messages:
                self._slots.release()
            return
        watching: list[tuple[ReceivedMessage, RunOrder]] = []
        for message, order in decoded:
            previous = existing.get(order.run_id)
            if previous is not None and previous.status in FINISHED_RUN_STATUSES:
                DUPLICATE_DELIVERIES.inc()
                to_ack.append(message.receipt)
            elif order.job.execution == "at_most_once" and order.run_id not in claimed:
                DUPLICATE_DELIVERIES.inc()
                logger.warning("at_most_once_redelivery", job_id=order.job.job_id, run_id=order.run_id)
                if message.receive_count > 1 and (previous is None or previous.status == RunStatus.RUNNING):
                    if await self._claimer_alive(order.run_id, previous):
                        # Its worker lives (its extends failed, e.g. the queue was briefly unreachable): keep the
                        # message hidden here until that run finishes or its worker dies, then settle it.
                        logger.info(
                            "at_most_once_claimer_alive", run_id=order.run_id, claimer=previous and previous.worker_id
                        )
                        watching.append((message, order))
                        continue
                    # This message's earlier holder claimed the run and stopped extending it (crashed or stalled):
                    # it may or may not have run, and never runs again, so it failed for good (dead letter, job
                    # state). A first delivery is another message for the same run (a re-dispatch), settled by its
                    # own redelivery: writing here could overwrite the outcome of the run still executing elsewhere.
                    try:
                        lost = executors.Outcome(RunStatus.FAILED, error=CLAIM_LOST, retryable=False)
                        await self._record(order, lost, previous.started_ms if previous else None, now_ms())
                    except Exception as exc:  # not acked: the next delivery records it
                        logger.warning("record_failed", run_id=order.run_id, error=f"{type(exc).__name__}: {exc}")
                        continue
                to_ack.append(message.receipt)
            elif order.job.execution == "at_most_once" and any(r.run_id == order.run_id for _, r in runnable):
                # Two messages for one run in one batch (a picker re-dispatched it): the claim above was won once,
                # for both of them; only the first may run.
                DUPLICATE_DELIVERIES.inc()
                logger.warning("at_most_once_duplicate_in_batch", job_id=order.job.job_id, run_id=order.run_id)
                to_ack.append(message.receipt)
            else:
                runnable.append((message, order))
        for _ in range(len(messages) - len(runnable)):
            self._slots.release()
        if to_ack:
            try:
                await self._acks.submit_many(to_ack)
            except Exception as exc:  # queue unreachable: they reappear and are settled again; the batch goes on
                # (raising here would drop the runnable messages with their execution slots: a leak that stops
                # the worker's receive loop for good once every slot is gone)
                logger.warning("ack_failed", messages=len(to_ack), error=f"{type(exc).__name__}: {exc}")
        for message, order in watching:
            self._watching.add(message.receipt)
            task = asyncio.create_task(self._watch_claimed(message, order))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        now = now_ms()
        for message, order in runnable:
            # In flight from here on (the heartbeat extends it), before its task first runs.
            self._inflight[message.receipt] = executors.Cancellation()
            self._receipts_by_run[order.run_id] = message.receipt
            start = self._hold(message, order) if order.due_ms > now else self._execute(message, order)
            task = asyncio.create_task(start)
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _hold(self, message: ReceivedMessage, order: RunOrder) -> None:
        """A run the picker sent ahead of its due time (``dispatch_ahead_ms``): wait for the due time, then run it.

        While held the run gives its execution slot back, so held runs never keep due ones from running; past
        ``4 * worker_concurrency`` held runs (a burst sent ahead) further runs wait holding their slot, which
        bounds what is held. The message stays in flight: the heartbeat extends it, a shutdown hands it back.
        """
        cancellation = self._inflight.setdefault(message.receipt, executors.Cancellation())
        self._receipts_by_run[order.run_id] = message.receipt
        keep_slot = self._held >= 4 * self.settings.worker_concurrency
        has_slot = True
        try:
            if not keep_slot:
                self._slots.release()
                has_slot = False
            self._held += 1
            try:
                for _ in range(100):  # the loop's timer may wake a little before the wall clock reaches due
                    wait_ms = order.due_ms - now_ms()
                    if wait_ms <= 0:
                        break
                    await asyncio.sleep(wait_ms / 1000)
            finally:
                self._held -= 1
            if not has_slot:
                await self._slots.acquire()
                has_slot = True
        except BaseException:
            self._inflight.pop(message.receipt, None)
            self._receipts_by_run.pop(order.run_id, None)
            if has_slot:
                self._slots.release()
            raise
        await self._execute(message, order, cancellation)

    async def _claimer_alive(self, run_id: str, previous: Run | None) -> bool:
        """Whether the worker that claimed this at-most-once run still lives: it runs here, or the claim's holder
        (named by the run's ``running`` record, else by the claim itself: a run held for its due time or shorter
        than a running report has no record yet) is another worker whose presence key (``workers/<node>``, under
        its lease) still exists and started before it took the run (else that node id was restarted since, and the
        run died with the old process). Without coordination, or with no claim found, it counts as dead; a failed
        lookup counts as alive (wait rather than declare a live run lost).

        A message can be delivered twice at once (a standard SQS queue may; moto's server does under concurrent
        receives): the second delivery then finds the run claimed by a live worker that has not started it yet."""
        if run_id in self._receipts_by_run:
            return True
        if self.coordination is None:
            return False  # no presence keys to ask
        try:
            # Who holds the run, and since when: its ``running`` record, else the claim.
            claimer, since = (previous.worker_id, previous.started_ms) if previous is not None else (None, None)
            if not claimer:
                claim = (await self.store.run_claimers([run_id])).get(run_id)
                claimer, since = (claim.worker_id, claim.claimed_ms) if claim is not None else (None, None)
            if not claimer or claimer == self.node_id:
                return False  # our own id but not running here: this process restarted, the run died with the old one
            record = await self.coordination.get(WORKERS_PREFIX + claimer)
            if record is None:
                return False
            started = presence.started_ms(record)
            if started is not None and since is not None:
                # A worker restarted under the same node id since it took this run: the run died with the process
                # that held it (the key now belongs to the new one).
                return started <= since
            return True
        except Exception as exc:
            logger.warning("presence_lookup_failed", error=f"{type(exc).__name__}: {exc}")
            return True

    async def _watch_claimed(self, message: ReceivedMessage, order: RunOrder) -> None:
        """A redelivered at-most-once message whose run still executes on a live worker (that worker can no longer
        extend this delivery): keep it hidden (the heartbeat extends ``_watching``) and look again every half
        visibility timeout; ack it once the run finished, record the run lost if its worker died (or once the run
        outlived its timeout by far). If the store fails, the message is left to reappear."""
        interval = self.settings.visibility_timeout_s / 2
        rounds = int((order.job.timeout_s + 60) / interval) + 1
        try:
            for number in range(rounds + 1):
                await asyncio.sleep(interval)
                previous = (await self.store.get_runs([order.run_id])).get(order.run_id)
                if previous is not None and previous.status in FINISHED_RUN_STATUSES:
                    break
                if number == rounds or not await self._claimer_alive(order.run_id, previous):
                    lost = executors.Outcome(RunStatus.FAILED, error=CLAIM_LOST, retryable=False)
                    await self._record(order, lost, previous.started_ms if previous else None, now_ms())
                    break
            await self._acks.enqueue([message.receipt])
        except Exception as exc:
            logger.warning("claim_watch_failed", run_id=order.run_id, error=f"{type(exc).__name__}: {exc}")
        finally:
            self._watching.discard(message.receipt)

    # One run ----------------------------------------------------------------------------------------------
    async def _execute(
        self, message: ReceivedMessage, order: RunOrder, cancellation: executors.Cancellation | None = None
    ) -> None:
        """Run one attempt holding an execution slot, then record and ack it holding only a recording slot:
        store round trips never keep a slot from the next run (the batched writes are shared anyway)."""
        cancellation = cancellation or self._inflight.get(message.receipt) or executors.Cancellation()
        self._inflight[message.receipt] = cancellation
        self._receipts_by_run[order.run_id] = message.receipt
        WORKER_INFLIGHT.inc()
        executing = True
        job = order.job
        # The run's span: child of the picker's dispatch span, current (log lines, the HTTP call's traceparent)
        # until the attempt is recorded. None while tracing is off (libs/tracing.py).
        span = (
            tracing.start("worker", "dsched.run", order.traceparent, {"dsched.run_id": order.run_id})
            if tracing.ENABLED
            else None
        )
        trace_token = tracing.attach(span)
        try:
            started = now_ms()
            # A job submitted with its due time already past is late by the client's doing: not in the SLO.
            late_submission = order.kind == "schedule" and order.attempt == 0 and order.scheduled_ms < job.created_ms
            observe_run_start(job.user_id, max(0, started - order.due_ms) / 1000, late_submission=late_submission)
            self._started[order.run_id] = (order, started)
            try:
                outcome = await self._perform(order, cancellation)
            except Exception as exc:  # a bug, an unreadable payload blob: a failed attempt that says why
                logger.error(
                    "run_raised", job_id=job.job_id, run_id=order.run_id, error=repr(exc)[:500], trace=_trace(exc)
                )
                error = f"the worker could not run this job: {type(exc).__name__}: {exc}"[:1000]
                outcome = executors.Outcome(RunStatus.FAILED, error=error, retryable=True)
            self._started.pop(order.run_id, None)  # before the final record: no "running" may follow it
            tracing.end(span, None if outcome.status == RunStatus.SUCCEEDED else outcome.status.value)
            finished = now_ms()
            observe_run_finished(job.user_id, outcome.status.value, (finished - started) / 1000)
            async with self._recording:  # back-pressure: a slow store holds execution slots here
                executing = False
                WORKER_INFLIGHT.dec()
                self._slots.release()
                await self._record_or_fail(order, outcome, started, finished)
                logger.info(
                    "run_finished",
                    job_id=job.job_id,
                    run_id=order.run_id,
                    status=outcome.status.value,
                    attempt=order.attempt,
                    lag_ms=started - order.due_ms,
                    duration_ms=finished - started,
                )
                await self._acks.enqueue([message.receipt])
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # not even a failure could be recorded (store down): the message reappears
            logger.error(
                "run_failed_to_record", job_id=job.job_id, run_id=order.run_id, error=f"{type(exc).__name__}: {exc}"
            )
        finally:
            tracing.detach(trace_token)
            self._inflight.pop(message.receipt, None)
            self._receipts_by_run.pop(order.run_id, None)
            self._started.pop(order.run_id, None)
            if executing:
                WORKER_INFLIGHT.dec()
                self._slots.release()

    async def _perform(self, order: RunOrder, cancellation: executors.Cancellation) -> executors.Outcome:
        job = order.job
        payload = job.payload
        if payload.blob_key:
            payload = Payload.model_validate_json(await self.blobs.get(payload.blob_key))
        cap = self.settings.output_cap_bytes
        inline = self.settings.output_inline_bytes
        if payload.kind == "echo":
            return executors.echo(payload, cap)
        if payload.kind == "cmd":
            if not self.settings.allow_cmd:
                return executors.Outcome(
                    RunStatus.FAILED, error="cmd: jobs are disabled here (DSCHED_ALLOW_CMD)", retryable=False
                )
            return await executors.run_command(
                payload.text or "", job.timeout_s, cap, cancellation, inline_bytes=inline
            )
        http, session = payload.http, self._session
        if http is None:
            raise ValueError(f"a {payload.kind} payload without its HTTP call")
        if session is None:
            raise RuntimeError("use `async with worker.open()`")
        idempotency_key = uuid5_text(IDEMPOTENCY_NAMESPACE, f"{job.job_id}/{order.scheduled_ms}")
        headers = {
            "X-Dsched-Job-Id": job.job_id,
            "X-Dsched-Run-Id": order.run_id,
            "Idempotency-Key": idempotency_key,
            "X-Dsched-Attempt": str(order.attempt),
        }
        if (traceparent := tracing.current_traceparent()) is not None:  # the target joins the job's trace
            headers["traceparent"] = traceparent
        return await executors.call_http(
            session,
            http,
            headers=headers,
            timeout_s=http.timeout_s or job.timeout_s,
            output_cap=cap,
            allow_private=self.settings.allow_private_http,
            signing_secrets=await self.signing.for_job(job.user_id, job.project_id),
            cancellation=cancellation,
            inline_bytes=inline,
            lean=self._lean,
        )

    async def _record_or_fail(
        self, order: RunOrder, outcome: executors.Outcome, started: int | None, finished: int
    ) -> None:
        """Record the outcome.

        If that raises while the store does not answer (an outage), wait for the store (up to
        :data:`STORE_OUTAGE_WAIT_S`, the message hidden meanwhile, the run not repeated) and record again. If it
        raises while the store answers, try once more on its own (unbatched: a poison record in a shared batch
        fails its batch-mates too), then record the attempt as failed for good with the reason and a dead letter
        (:func:`worker.failures.record_failure`). Raises only if the store stays down (the message reappears)."""
        direct = False
        outages = 0
        while True:
            try:
                await self._record(order, outcome, started, finished, direct=direct)
                return
            except Exception as exc:
                failure = exc
            if not await self._store_gate.answers():
                outages += 1
                logger.warning("record_waits_for_store", job_id=order.job.job_id, run_id=order.run_id)
                if outages > STORE_OUTAGES_PER_RECORD or not await self._store_gate.wait_up(STORE_OUTAGE_WAIT_S):
                    raise failure
                continue
            if direct:
                break
            logger.warning("record_failed", job_id=order.job.job_id, run_id=order.run_id, error=repr(failure)[:300])
            await asyncio.sleep(RECORD_RETRY_PAUSE_S)
            direct = True
        logger.error(
            "record_failed",
            job_id=order.job.job_id,
            run_id=order.run_id,
            error=repr(failure)[:300],
            trace=_trace(failure),
        )
        reason = f"recording the outcome ({outcome.status.value}) failed: {type(failure).__name__}: {failure}"[:1000]
        await failures.record_failure(self, order, reason, started, finished)

    async def _record(
        self, order: RunOrder, outcome: executors.Outcome, started: int | None, finished: int, *, direct: bool = False
    ) -> None:
        """Store the run, its retry entry or dead letter, and the job's state (through the shared batchers, or
        with ``direct`` straight to the store)."""
        put_runs = self.store.put_runs if direct else self._runs.enqueue
        put_states = self.store.update_job_states if direct else self._states.enqueue
        job = order.job
        output, output_ref = await executors.store_output(
            self.blobs, f"outputs/{order.run_id}", outcome, self.settings.output_inline_bytes
        )
        record = self._run_record(
            order,
            outcome.status,
            started=started,
            finished=finished,
            error=outcome.error,
            exit_code=outcome.exit_code,
            http_status=outcome.http_status,
            output=output,
            output_ref=output_ref,
            output_capped=outcome.output_capped,
        )
        writes: list[Awaitable[object]] = [put_runs([record])]
        last_run = LastRun(
            run_id=order.run_id,
            status=outcome.status,
            attempt=order.attempt,
            scheduled_ms=order.scheduled_ms,
            finished_ms=finished,
        )
        retry_coming = False
        if outcome.status not in (RunStatus.SUCCEEDED, RunStatus.CANCELLED):
            retry_due = self._retry_due(order, outcome, finished)
            if retry_due is not None:
                RETRIES.inc()
                writes.append(self.store.put_entries([self._retry_entry(order, retry_due, finished)]))
                retry_coming = True
            else:
                DEAD_LETTERS.inc()
                writes.append(
                    self.store.put_dead_letters(
                        [
                            DeadLetter(
                                dead_letter_id=order.run_id,
                                job_id=job.job_id,
                                user_id=job.user_id,
                                project_id=job.project_id,
                                scheduled_ms=order.scheduled_ms,
                                attempts=order.attempt + 1,
                                error=outcome.error,
                                dead_ms=finished,
                            )
                        ]
                    )
                )
        state = job_states.finished(recurring=job.recurring, outcome=outcome.status, retry_coming=retry_coming)
        writes.append(put_states([job_states.of_run(order, state, last_run)]))
        try:
            for write in writes:  # futures of shared batches, not tasks: awaiting them in turn costs nothing extra
                await write
        finally:
            for write in writes:  # a direct write not started because an earlier one failed (no-op once awaited)
                if isinstance(write, Coroutine):
                    write.close()

    def _retry_due(self, order: RunOrder, outcome: executors.Outcome, now: int) -> int | None:
        job = order.job
        if not outcome.retryable:
            return None
        if outcome.http_status is not None and not http_status_retryable(outcome.http_status, job.retry):
            return None
        delay = backoff_s(job.retry, order.attempt + 1, seed=order.run_id)
        retry_after = parse_retry_after(outcome.retry_after, now)
        if retry_after is not None:
            delay = max(delay, min(retry_after, job.retry.max_s))
        due = now + int(delay * 1000)
        if not should_retry(job.retry, job.max_retries, order.attempt, order.scheduled_ms, due):
            return None
        return due

    def _retry_entry(self, order: RunOrder, due: int, now: int) -> BucketEntry:
        settings = self.settings
        return entry_for(
            order.job,
            due,
            scheduled_ms=order.scheduled_ms,
            attempt=order.attempt + 1,
            kind="retry",
            shard_count=settings.shard_count,
            bucket_ms=settings.bucket_ms,
            now=now,
        )

    def _run_record(
        self,
        order: RunOrder,
        status: RunStatus,
        *,
        started: int | None = None,
        finished: int | None = None,
        error: str | None = None,
        exit_code: int | None = None,
        http_status: int | None = None,
        output: str | None = None,
        output_ref: str | None = None,
        output_capped: bool = False,
    ) -> Run:
        return Run(
            run_id=order.run_id,
            job_id=order.job.job_id,
            user_id=order.job.user_id,
            scheduled_ms=order.scheduled_ms,
            attempt=order.attempt,
            status=status,
            due_ms=order.due_ms,
            started_ms=started,
            finished_ms=finished,
            worker_id=self.node_id,
            exit_code=exit_code,
            http_status=http_status,
            output=output,
            output_ref=output_ref,
            output_capped=output_capped,
            error=error,
        )

    async def _report_running(self) -> None:
        """Record runs as ``running`` once they have run for ``RUNNING_REPORT_S``: most runs finish sooner,
        and writing their progress would double the store writes for nothing the user could see."""
        while True:
            await asyncio.sleep(RUNNING_REPORT_S)
            cutoff = now_ms() - int(RUNNING_REPORT_S * 1000)
            due = [(order, started) for order, started in self._started.values() if started <= cutoff]
            if not due:
                continue
            for order, _ in due:
                self._started.pop(order.run_id, None)
            # Enqueued synchronously, before any final record of these runs can be (they left _started).
            runs = self._runs.enqueue(
                [self._run_record(order, RunStatus.RUNNING, started=started) for order, started in due]
            )
            states = self._states.enqueue(
                [
                    job_states.of_run(
                        order,
                        job_states.running(),
                        LastRun(
                            run_id=order.run_id,
                            status=RunStatus.RUNNING,
                            attempt=order.attempt,
                            scheduled_ms=order.scheduled_ms,
                        ),
                    )
                    for order, _ in due
                ]
            )
            try:
                await asyncio.gather(runs, states)
            except Exception as exc:  # informational only: the final record is what counts
                logger.warning("progress_write_failed", error=f"{type(exc).__name__}: {exc}")

    # Heartbeat, cancel, shutdown --------------------------------------------------------------------------
    async def _heartbeat(self) -> None:
        """Keep every message this worker holds invisible to others: from its receipt through deduplication, the
        wait for its due time (dispatch ahead), the run and its recording, until the ack.

        Every ``visibility_timeout_s / HEARTBEATS_PER_VISIBILITY`` it extends, to a full visibility timeout from
        now, each message with less than half a timeout left (counted from its receipt or its last extend, at the
        start of the call): a run shorter than that is never extended, a longer one about every half timeout, and
        each extend leaves at least half a timeout minus a beat for the call to land. A dead worker's messages
        reappear within one visibility timeout. A beat whose call is still waiting for a slow queue is not
        cancelled (it may still land); the next beats are skipped until it returns, so calls never pile up on an
        overloaded queue."""
        visibility = self.settings.visibility_timeout_s
        interval = visibility / HEARTBEATS_PER_VISIBILITY
        beat: asyncio.Task[None] | None = None
        skipped = 0  # beats skipped in a row while one call waits (logged once per streak)
        try:
            while True:
                await asyncio.sleep(interval)
                if beat is not None and not beat.done():
                    skipped += 1
                    if skipped == 1:
                        logger.warning("extend_slow", waiting_s=interval)
                    continue
                if skipped:
                    logger.info("extend_caught_up", skipped_beats=skipped)
                    skipped = 0
                now = time.monotonic()
                held = [*self._inflight, *self._receiving, *self._watching]
                # First seen now: received within the last beat, so hidden until at least now - interval + visibility.
                fresh = self._fresh_until
                self._fresh_until = {r: fresh.get(r, now - interval + visibility / 2) for r in held}
                due = [r for r, until in self._fresh_until.items() if until <= now]
                if due:
                    for receipt in due:  # a failed extend makes them due again (see _extend)
                        self._fresh_until[receipt] = now + visibility / 2
                    beat = asyncio.create_task(self._extend(due, visibility))
        finally:
            if beat is not None:
                beat.cancel()

    async def _extend(self, receipts: list[str], visibility: float) -> None:
        try:
            await self.queue.extend(receipts, visibility)
        except Exception as exc:
            logger.warning("extend_failed", error=f"{type(exc).__name__}: {exc}", messages=len(receipts))
            for receipt in receipts:
                if receipt in self._fresh_until:
                    self._fresh_until[receipt] = 0.0  # due again at the next beat

    async def _watch_cancels(self, coordination: Coordination) -> None:
        while True:
            try:
                async for event in coordination.watch_prefix(CANCEL_PREFIX):
                    if event.value is not None:
                        self.cancel(event.key[len(CANCEL_PREFIX) :])
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                logger.warning("cancel_watch_failed", error=f"{type(exc).__name__}: {exc}")
                await asyncio.sleep(1.0)

    def cancel(self, run_id: str) -> bool:
        """Abort a run executing here (kills a command's process group, aborts an HTTP call)."""
        receipt = self._receipts_by_run.get(run_id)
        if receipt is None or receipt not in self._inflight:
            return False
        self._inflight[receipt].request()
        return True

    async def _hand_back(self, grace_s: float) -> None:
        """On shutdown: let in-flight runs finish for ``grace_s``, then stop them and make their messages
        visible again at once, so another worker picks them up without waiting for the visibility timeout."""
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=grace_s)
        receipts = list(self._inflight)
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)
        await self._nack_quietly(receipts)

    async def _nack_quietly(self, receipts: list[str], delay_s: float = 0.0) -> None:
        if receipts:
            try:
                await self.queue.nack(receipts, delay_s)
            except Exception as exc:
                logger.warning("nack_failed", error=f"{type(exc).__name__}: {exc}")
