"""What the worker does with a message it cannot run or cannot record: the owner always sees a failed run.

Three ways a work-queue message can fail outside the job's own execution, and what each becomes:

- **Execution or recording raises** (a bug, a blob that cannot be read, a record the store refuses): the attempt
  is recorded as a ``failed`` run whose ``error`` says why, with a dead letter once no retry follows, and the
  message is acked (see ``Worker._execute``). Only when even that record cannot be written (the store is down)
  is the message left to reappear.
- **Undecodable body**: the job is identified from whatever JSON is there (``job.job_id`` or ``job_id``) and looked
  up in the store; if found, a failed run (the message's run id, or the one of its occurrence and attempt) and a
  dead letter are recorded. If not, the message is counted (``dsched_worker_poison_messages_total``) and logged
  with the start of its body; either way it is deleted, so it is never redelivered again.
- **Parked by the queue's redrive** (received more than ``max_receives`` times without being acked, e.g. it
  crashed every worker that took it): a background sweep (:func:`sweep_queue_dead_letters`) takes such messages
  from the queue's dead-letter store, records each as a failed run with a dead letter (unless the run already
  finished), and deletes it. Nothing stays parked invisibly.

Every record here is written straight to the store (not through the worker's batchers), so one poison record
cannot fail a shared batch of other runs. Writes are idempotent (deterministic run id = dead-letter id), so two
workers settling the same message write the same thing.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

import orjson
from prometheus_client import Counter

from dsched.libs import job_states, logs
from dsched.libs.clock import now_ms
from dsched.libs.metrics import DEAD_LETTERS, REGISTRY
from dsched.libs.models import (
    FINISHED_RUN_STATUSES,
    DeadLetter,
    LastRun,
    RunOrder,
    RunStatus,
    run_id_for,
)
from dsched.libs.queue.base import ReceivedMessage

if TYPE_CHECKING:
    from dsched.worker.service import Worker

POISON = Counter(
    "dsched_worker_poison_messages_total",
    "Work-queue messages the worker could not run or record normally, by outcome: recorded (a failed run and a "
    "dead letter the job's owner sees) or unidentified (no job found: logged and dropped)",
    ["source", "outcome"],
    registry=REGISTRY,
)

SWEEP_INTERVAL_S = 5.0
SWEEP_BATCH = 10
SWEEP_MAX_BATCHES = 20  # per sweep: bounded work, the next sweep continues
BODY_PREVIEW = 200
REDRIVEN = "the work queue gave up on this run after {count} deliveries without a recorded outcome"
UNDECODABLE = "undecodable work-queue message: {error}"

logger = logs.get("worker")


def _text(exc: BaseException) -> str:
    first = (str(exc).splitlines() or [""])[0]
    return f"{type(exc).__name__}: {first}"[:500]


async def record_failure(worker: Worker, order: RunOrder, reason: str, started: int | None, finished: int) -> None:
    """Record the attempt ``order`` asked for as failed for good with ``reason``: the run record, a dead letter, the
    job's state.

    Unbatched and without blobs, so it works when the normal record failed because of one of those."""
    job = order.job
    record = worker._run_record(order, RunStatus.FAILED, started=started, finished=finished, error=reason)
    await worker.store.put_runs([record])
    DEAD_LETTERS.inc()
    await worker.store.put_dead_letters(
        [
            DeadLetter(
                dead_letter_id=order.run_id,
                job_id=job.job_id,
                user_id=job.user_id,
                project_id=job.project_id,
                scheduled_ms=order.scheduled_ms,
                attempts=order.attempt + 1,
                error=reason,
                dead_ms=finished,
            )
        ]
    )
    last_run = LastRun(
        run_id=order.run_id,
        status=RunStatus.FAILED,
        attempt=order.attempt,
        scheduled_ms=order.scheduled_ms,
        finished_ms=finished,
    )
    state = job_states.finished(recurring=job.recurring, outcome=RunStatus.FAILED, retry_coming=False)
    await worker.store.update_job_states([job_states.of_run(order, state, last_run)])


async def _identify(worker: Worker, body: bytes) -> RunOrder | None:
    """The run order an undecodable body was meant to be, if its job can be found in the store."""
    try:
        data: Any = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(data, dict):
        return None
    job_part = data.get("job")
    job_id = job_part.get("job_id") if isinstance(job_part, dict) else data.get("job_id")
    if not isinstance(job_id, str) or not job_id:
        return None
    job = (await worker.store.get_jobs([job_id])).get(job_id)
    if job is None:
        return None

    def integer(name: str, default: int) -> int:
        value = data.get(name)
        return value if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 2**62 else default

    scheduled = integer("scheduled_ms", job.next_fire_ms)
    attempt = integer("attempt", 0)
    run_id = data.get("run_id")
    if not isinstance(run_id, str) or not run_id:
        run_id = run_id_for(job.job_id, scheduled, attempt)
    return RunOrder(
        run_id=run_id, job=job, scheduled_ms=scheduled, attempt=attempt, due_ms=integer("due_ms", scheduled)
    )


async def settle_undecodable(worker: Worker, message: ReceivedMessage, error: BaseException, source: str) -> None:
    """A message whose body is not a run: a failed run + dead letter if its job is identifiable, else counted and
    logged. Raises if the store cannot be read or written (the caller keeps the message for a later try)."""
    reason = UNDECODABLE.format(error=_text(error))
    order = await _identify(worker, message.body)
    if order is None:
        POISON.labels(source, "unidentified").inc()
        logger.error(
            "poison_message_dropped",
            source=source,
            message_id=message.message_id,
            receive_count=message.receive_count,
            error=reason,
            body=message.body[:BODY_PREVIEW].decode("utf-8", "replace"),
        )
        return
    await record_failure(worker, order, reason, None, now_ms())
    POISON.labels(source, "recorded").inc()
    logger.error("poison_message_recorded", source=source, job_id=order.job.job_id, run_id=order.run_id, error=reason)


async def settle_redriven(worker: Worker, message: ReceivedMessage) -> None:
    """One message from the queue's dead-letter store: recorded as a failed run unless its run already finished.
    Raises if the store cannot be read or written."""
    try:
        order = RunOrder.model_validate_json(message.body)
    except ValueError as exc:
        await settle_undecodable(worker, message, exc, "queue_dead_letters")
        return
    previous = (await worker.store.get_runs([order.run_id])).get(order.run_id)
    if previous is not None and previous.status in FINISHED_RUN_STATUSES:
        return  # it did finish (its ack was lost): nothing to tell the owner
    reason = REDRIVEN.format(count=message.receive_count)
    await record_failure(worker, order, reason, previous.started_ms if previous else None, now_ms())
    POISON.labels("queue_dead_letters", "recorded").inc()
    logger.error(
        "redriven_run_recorded", job_id=order.job.job_id, run_id=order.run_id, deliveries=message.receive_count
    )


async def sweep_queue_dead_letters(worker: Worker) -> int:
    """One sweep of the queue's dead-letter store: settle and delete up to ``SWEEP_MAX_BATCHES`` batches.

    Returns how many messages were settled. A message whose settling fails (store down) stays for the next sweep.
    """
    settled = 0
    for _ in range(SWEEP_MAX_BATCHES):
        messages = await worker.queue.take_dead_letters(SWEEP_BATCH, visibility_s=60.0)
        if not messages:
            break
        done: list[str] = []
        for message in messages:
            try:
                await settle_redriven(worker, message)
            except Exception as exc:
                logger.warning("dead_letter_sweep_failed", message_id=message.message_id, error=_text(exc))
                continue
            done.append(message.receipt)
        if done:
            await worker.queue.delete_dead_letters(done)
            settled += len(done)
        if len(done) < len(messages):
            break  # the store is failing: try again next sweep
    return settled


async def sweep_forever(worker: Worker, interval_s: float = SWEEP_INTERVAL_S) -> None:
    """Background task: sweep the queue's dead-letter store every ``interval_s``; failures are logged."""
    while True:
        try:
            await sweep_queue_dead_letters(worker)
        except Exception as exc:  # queue unreachable: next time
            logger.warning("dead_letter_sweep_failed", error=_text(exc))
        await asyncio.sleep(interval_s)
