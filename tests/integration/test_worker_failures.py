"""Issue 9, worker half of item 2 and item 10: nothing the worker receives ends parked invisibly.

A run whose execution or recording raises, an undecodable message and a message the queue's redrive parked all
become a failed run with the reason and a dead letter the job's owner sees (or, for a message naming no known
job, a counted and logged drop); the heartbeat keeps a held or running message from reappearing elsewhere while
the worker lives. Embedded backends (SQLite queue and store, file blobs), one worker in this process.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import orjson
import pytest

from dsched.app.backends import Backends
from dsched.libs.clock import now_ms, to_rfc3339
from dsched.libs.coordination.keys import WORKERS_PREFIX
from dsched.libs.metrics import REGISTRY
from dsched.libs.models import Job, JobStatus, Payload, Run, RunOrder, RunStatus, run_id_for
from dsched.libs.queue.base import OutgoingMessage, WorkQueue
from dsched.libs.settings import Settings
from dsched.libs.store.base import JobStore
from dsched.worker import failures
from dsched.worker.executors import Cancellation, Outcome
from dsched.worker.service import Worker

VISIBILITY_S = 2.0  # short, so that a lapse of the heartbeat would show within the tests


@pytest.fixture
async def backends(tmp_path: Path) -> AsyncIterator[Backends]:
    settings = Settings.from_env(data_dir=tmp_path, max_receives=2, visibility_timeout_s=VISIBILITY_S, allow_cmd=True)
    async with Backends.open(settings, {"store", "queue", "blobs"}) as b:
        yield b


@pytest.fixture
async def worker(backends: Backends, tmp_path: Path) -> AsyncIterator[Worker]:
    settings = Settings.from_env(data_dir=tmp_path, max_receives=2, visibility_timeout_s=VISIBILITY_S, allow_cmd=True)
    async with Worker(queue=backends.queue, store=backends.store, blobs=backends.blobs, settings=settings).open() as w:
        yield w


async def new_job(store: JobStore, payload: Payload | None = None, **fields: Any) -> Job:
    now = now_ms()
    job = Job.model_validate(
        {
            "job_id": str(uuid.uuid4()),
            "user_id": "owner",
            "project_id": "p",
            "payload": payload or Payload(kind="echo", text="hi"),
            "next_fire_ms": now,
            "created_ms": now,
            "max_retries": 0,
            **fields,
        }
    )
    await store.put_jobs([job])
    return job


def message_for(job: Job, due_ms: int | None = None) -> RunOrder:
    scheduled = job.next_fire_ms
    return RunOrder(
        run_id=run_id_for(job.job_id, scheduled, 0),
        job=job,
        scheduled_ms=scheduled,
        attempt=0,
        due_ms=due_ms or scheduled,
    )


def record_of(order: RunOrder, status: RunStatus, **fields: Any) -> Run:
    """The store's record of the run ``order`` asks for, in ``status``."""
    return Run(
        run_id=order.run_id,
        job_id=order.job.job_id,
        user_id=order.job.user_id,
        scheduled_ms=order.scheduled_ms,
        attempt=order.attempt,
        status=status,
        **fields,
    )


async def send(queue: WorkQueue, *bodies: bytes) -> None:
    await queue.send([OutgoingMessage(body) for body in bodies])


async def outcome(store: JobStore, job: Job) -> tuple[Run | None, Job, list[str]]:
    run = (await store.get_runs([run_id_for(job.job_id, job.next_fire_ms, 0)])).get(
        run_id_for(job.job_id, job.next_fire_ms, 0)
    )
    current = (await store.get_jobs([job.job_id]))[job.job_id]
    letters, _ = await store.list_dead_letters(job.user_id, 100)
    return run, current, [d.dead_letter_id for d in letters if d.job_id == job.job_id]


async def assert_succeeded_once(store: JobStore, job: Job, marker: Path) -> None:
    """The job's first run succeeded, its command ran once (one line in ``marker``), and no dead letter exists."""
    run, current, letters = await outcome(store, job)
    assert run is not None and run.status == RunStatus.SUCCEEDED, run
    assert current.status == JobStatus.SUCCEEDED and letters == []
    assert (await asyncio.to_thread(marker.read_text)).count("x") == 1


async def queue_is_empty(queue: WorkQueue) -> bool:
    counts = await queue.counts()
    return counts.visible == 0 and counts.in_flight == 0 and counts.dead == 0


def poison_count(source: str, outcome_: str) -> float:
    value = REGISTRY.get_sample_value("dsched_worker_poison_messages_total", {"source": source, "outcome": outcome_})
    return value or 0.0


# Execution and recording raise ------------------------------------------------------------------------------
async def test_a_run_whose_execution_raises_is_a_failed_run_with_the_reason(
    worker: Worker, backends: Backends, monkeypatch: pytest.MonkeyPatch
) -> None:
    job = await new_job(backends.store)

    async def perform(order: RunOrder, cancellation: Cancellation) -> Outcome:
        raise RuntimeError("executor bug")

    monkeypatch.setattr(worker, "_perform", perform)
    await send(backends.queue, message_for(job).model_dump_json().encode())
    assert await worker.drain() == 1
    run, current, letters = await outcome(backends.store, job)
    assert run is not None and run.status == RunStatus.FAILED
    assert "executor bug" in (run.error or "")
    assert current.status == JobStatus.FAILED
    assert letters == [run.run_id]
    assert await queue_is_empty(backends.queue)


async def test_a_run_whose_execution_raises_is_retried_by_its_policy(
    worker: Worker, backends: Backends, monkeypatch: pytest.MonkeyPatch
) -> None:
    job = await new_job(backends.store, max_retries=2)

    async def perform(order: RunOrder, cancellation: Cancellation) -> Outcome:
        raise OSError("blob store unreachable")

    monkeypatch.setattr(worker, "_perform", perform)
    await send(backends.queue, message_for(job).model_dump_json().encode())
    await worker.drain()
    run, current, letters = await outcome(backends.store, job)
    assert run is not None and run.status == RunStatus.FAILED and "blob store unreachable" in (run.error or "")
    assert current.status == JobStatus.SCHEDULED  # a retry entry follows, no dead letter yet
    assert letters == []


async def test_a_run_whose_recording_raises_is_recorded_as_failed(
    worker: Worker, backends: Backends, monkeypatch: pytest.MonkeyPatch
) -> None:
    job = await new_job(backends.store)
    calls: list[bool] = []

    async def record(
        order: RunOrder, outcome: Outcome, started: int | None, finished: int, *, direct: bool = False
    ) -> None:
        calls.append(direct)
        raise OverflowError("Python int too large to convert to SQLite INTEGER")

    monkeypatch.setattr(worker, "_record", record)
    await send(backends.queue, message_for(job).model_dump_json().encode())
    await worker.drain()
    assert calls == [False, True]  # batched, then once on its own
    run, current, letters = await outcome(backends.store, job)
    assert run is not None and run.status == RunStatus.FAILED
    assert "recording the outcome (succeeded) failed: OverflowError" in (run.error or "")
    assert current.status == JobStatus.FAILED
    assert letters == [run.run_id]
    assert await queue_is_empty(backends.queue)  # acked: never redelivered, never parked


async def test_a_poison_record_does_not_fail_the_runs_batched_with_it(
    backends: Backends, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The worker coalesces run records of concurrent runs into one store write; a record the store refuses
    must fail only its own run."""
    store = backends.store
    poison = await new_job(store, payload=Payload(kind="echo", text="poison"))
    good = [await new_job(store) for _ in range(5)]
    real_put_runs = store.put_runs
    batches: list[int] = []

    async def put_runs(runs: Sequence[Run]) -> None:
        batches.append(len(runs))
        if any(r.job_id == poison.job_id and r.status == RunStatus.SUCCEEDED for r in runs):
            raise OverflowError("refused record")
        await real_put_runs(runs)

    monkeypatch.setattr(store, "put_runs", put_runs)  # before the worker binds it to its batcher
    await send(backends.queue, *(message_for(j).model_dump_json().encode() for j in [poison, *good]))
    settings = Settings.from_env(data_dir=tmp_path, max_receives=2, visibility_timeout_s=VISIBILITY_S)
    async with Worker(queue=backends.queue, store=store, blobs=backends.blobs, settings=settings).open() as worker:
        assert await worker.drain() == 6
    assert max(batches) > 1  # the poison record did share a batch
    for job in good:
        run, current, letters = await outcome(store, job)
        assert run is not None and run.status == RunStatus.SUCCEEDED, run
        assert current.status == JobStatus.SUCCEEDED and letters == []
    run, current, letters = await outcome(store, poison)
    assert run is not None and run.status == RunStatus.FAILED and "refused record" in (run.error or "")
    assert current.status == JobStatus.FAILED and letters == [run.run_id]
    assert await queue_is_empty(backends.queue)


async def test_when_not_even_a_failure_can_be_recorded_the_message_stays(
    backends: Backends, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    job = await new_job(backends.store)

    async def put_runs(runs: Sequence[Run]) -> None:
        raise ConnectionError("store down")

    monkeypatch.setattr(backends.store, "put_runs", put_runs)
    await send(backends.queue, message_for(job).model_dump_json().encode())
    settings = Settings.from_env(data_dir=tmp_path, max_receives=2, visibility_timeout_s=VISIBILITY_S)
    async with Worker(queue=backends.queue, store=backends.store, blobs=backends.blobs, settings=settings).open() as w:
        assert await w.drain() == 1
        counts = await backends.queue.counts()
    assert counts.visible + counts.in_flight == 1  # it reappears (and, if it never can be recorded, the sweep)


# Undecodable messages ----------------------------------------------------------------------------------------
async def test_an_undecodable_message_of_a_known_job_is_a_failed_run_and_a_dead_letter(
    worker: Worker, backends: Backends
) -> None:
    job = await new_job(backends.store)
    run_id = run_id_for(job.job_id, job.next_fire_ms, 0)
    body = orjson.dumps(
        {"run_id": run_id, "job": {"job_id": job.job_id, "payload": 7}, "scheduled_ms": job.next_fire_ms}
    )
    before = poison_count("queue", "recorded")
    await send(backends.queue, body)
    await worker.drain()
    run, current, letters = await outcome(backends.store, job)
    assert run is not None and run.run_id == run_id and run.status == RunStatus.FAILED
    assert (run.error or "").startswith("undecodable work-queue message")
    assert current.status == JobStatus.FAILED
    assert letters == [run_id]
    assert poison_count("queue", "recorded") == before + 1
    assert await queue_is_empty(backends.queue)


async def test_an_undecodable_message_of_no_known_job_is_counted_and_dropped(
    worker: Worker, backends: Backends, caplog: pytest.LogCaptureFixture
) -> None:
    before = poison_count("queue", "unidentified")
    await send(backends.queue, b"\xff not json", orjson.dumps({"job": {"job_id": "no-such-job"}}))
    await worker.drain()
    assert poison_count("queue", "unidentified") == before + 2
    assert await queue_is_empty(backends.queue)


# What the queue's redrive parks ---------------------------------------------------------------------------------
async def park(queue: WorkQueue, body: bytes) -> None:
    """Deliver ``body`` until the redrive (max_receives = 2) moves it to the dead-letter store."""
    await send(queue, body)
    end = time.monotonic() + 10
    while (await queue.counts()).dead == 0:
        assert time.monotonic() < end
        for message in await queue.receive(10, 0.1, 30):
            await queue.nack([message.receipt])


async def test_a_run_parked_by_the_redrive_becomes_a_failed_run_and_a_dead_letter(
    worker: Worker, backends: Backends
) -> None:
    job = await new_job(backends.store)
    await park(backends.queue, message_for(job).model_dump_json().encode())
    assert await failures.sweep_queue_dead_letters(worker) == 1
    run, current, letters = await outcome(backends.store, job)
    assert run is not None and run.status == RunStatus.FAILED
    assert "the work queue gave up on this run after" in (run.error or "")
    assert current.status == JobStatus.FAILED
    assert letters == [run.run_id]
    assert await queue_is_empty(backends.queue)


async def test_a_parked_run_that_did_finish_is_only_removed(worker: Worker, backends: Backends) -> None:
    job = await new_job(backends.store)
    message = message_for(job)
    await backends.store.put_runs([record_of(message, RunStatus.SUCCEEDED, finished_ms=now_ms())])
    await park(backends.queue, message.model_dump_json().encode())
    assert await failures.sweep_queue_dead_letters(worker) == 1
    run, _, letters = await outcome(backends.store, job)
    assert run is not None and run.status == RunStatus.SUCCEEDED and letters == []
    assert await queue_is_empty(backends.queue)


async def test_the_worker_sweeps_parked_messages_in_the_background(
    backends: Backends, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(failures, "SWEEP_INTERVAL_S", 0.1)
    job = await new_job(backends.store)
    await park(backends.queue, message_for(job).model_dump_json().encode())
    settings = Settings.from_env(data_dir=tmp_path, max_receives=2, visibility_timeout_s=VISIBILITY_S)
    async with Worker(queue=backends.queue, store=backends.store, blobs=backends.blobs, settings=settings).open():
        end = time.monotonic() + 10
        while not (await outcome(backends.store, job))[2]:
            assert time.monotonic() < end, "the parked run never became a dead letter"
            await asyncio.sleep(0.05)
    assert await queue_is_empty(backends.queue)


# Heartbeat: held and running messages never reappear while the worker lives ------------------------------------
async def test_held_and_running_messages_stay_hidden_while_the_worker_lives(worker: Worker, backends: Backends) -> None:
    """Visibility timeout 2 s; one run held 4 s for its due time, one running 4.5 s: another consumer polling
    all along never sees either, and each runs exactly once."""
    held = await new_job(backends.store)
    slow = await new_job(backends.store, payload=Payload(kind="cmd", text="sleep 4.5"))
    await send(
        backends.queue,
        message_for(held, due_ms=now_ms() + 4000).model_dump_json().encode(),
        message_for(slow).model_dump_json().encode(),
    )
    messages = await backends.queue.receive(10, 1.0, VISIBILITY_S)
    assert len(messages) == 2
    start = worker._start(messages)
    for _ in messages:
        await worker._slots.acquire()
    await start
    end = time.monotonic() + 5.5
    while time.monotonic() < end:
        stolen = await backends.queue.receive(10, 0.2, 30)
        assert stolen == [], "a message reappeared while its worker was alive"
    await worker.wait_idle()
    for job in (held, slow):
        run, _, _ = await outcome(backends.store, job)
        assert run is not None and run.status == RunStatus.SUCCEEDED, run
    assert await queue_is_empty(backends.queue)


# Two messages for one at-most-once run in one batch ----------------------------------------------------------------
async def test_two_messages_of_one_at_most_once_run_in_one_batch_run_it_once(
    worker: Worker, backends: Backends, tmp_path: Path
) -> None:
    """A picker that re-dispatches (it woke after its shard moved) can put a second message for the same run in
    the queue; when one receive returns both, the run's claim is won once and must let only one of them run."""
    marker = tmp_path / "ran.log"
    job = await new_job(
        backends.store, payload=Payload(kind="cmd", text=f"echo x >> {marker}"), execution="at_most_once"
    )
    body = message_for(job).model_dump_json().encode()
    await send(backends.queue, body, body)
    messages = await backends.queue.receive(10, 1.0, 30.0)
    assert len(messages) == 2
    start = worker._start(messages)
    for _ in messages:
        await worker._slots.acquire()
    await start
    await worker.wait_idle()
    assert marker.read_text().count("x") == 1
    run, current, _ = await outcome(backends.store, job)
    assert run is not None and run.status == RunStatus.SUCCEEDED and current.status == JobStatus.SUCCEEDED
    assert await queue_is_empty(backends.queue)


async def test_a_batch_stays_hidden_while_its_deduplication_waits_for_a_slow_store(
    worker: Worker, backends: Backends, monkeypatch: pytest.MonkeyPatch
) -> None:
    """At-most-once runs are looked up and claimed before they start; a store slower than the visibility timeout
    must not let the message reappear elsewhere meanwhile."""
    job = await new_job(backends.store, execution="at_most_once")
    real_get_runs = backends.store.get_runs

    async def slow_get_runs(run_ids: Sequence[str]) -> dict[str, Run]:
        await asyncio.sleep(2.5 * VISIBILITY_S)
        return await real_get_runs(run_ids)

    monkeypatch.setattr(backends.store, "get_runs", slow_get_runs)
    await send(backends.queue, message_for(job).model_dump_json().encode())
    messages = await backends.queue.receive(10, 1.0, VISIBILITY_S)
    assert len(messages) == 1
    await worker._slots.acquire()
    start = asyncio.create_task(worker._start(messages))
    end = time.monotonic() + 2.5 * VISIBILITY_S
    while time.monotonic() < end:
        assert await backends.queue.receive(10, 0.2, 30) == [], "a message reappeared during its deduplication"
    await start
    await worker.wait_idle()
    run, _, _ = await outcome(backends.store, job)
    assert run is not None and run.status == RunStatus.SUCCEEDED


def store_down_for(store: JobStore, monkeypatch: pytest.MonkeyPatch, seconds: float) -> None:
    """Every call of the worker's store paths raises for ``seconds`` from now (an outage), then works again."""
    down_until = time.monotonic() + seconds
    for name in (
        "get_jobs",
        "get_runs",
        "claim_runs",
        "put_runs",
        "update_job_states",
        "put_entries",
        "put_dead_letters",
    ):
        real = getattr(store, name)

        async def down(*args: Any, _real: Any = real) -> Any:
            if time.monotonic() < down_until:
                raise ConnectionError("store down")
            return await _real(*args)

        monkeypatch.setattr(store, name, down)


async def run_until_recorded(backends: Backends, tmp_path: Path, job: Job, *, timeout_s: float) -> list[str]:
    """A worker (made now: it binds the store's methods, outage included) runs its receive loops until the job's
    first run is recorded; returns the worker's /health states seen meanwhile."""
    settings = Settings.from_env(data_dir=tmp_path, max_receives=2, visibility_timeout_s=VISIBILITY_S, allow_cmd=True)
    store = backends.store
    run_id = run_id_for(job.job_id, job.next_fire_ms, 0)
    states: list[str] = []
    async with Worker(queue=backends.queue, store=store, blobs=backends.blobs, settings=settings).open() as worker:
        stop = asyncio.Event()
        loop = asyncio.create_task(worker.run(stop))
        try:
            for _ in range(int(timeout_s * 10)):
                states.append(str(worker.supervisor.health()["worker"]["state"]))
                with contextlib.suppress(ConnectionError):
                    if run_id in await store.get_runs([run_id]):
                        break
                await asyncio.sleep(0.1)
        finally:
            stop.set()
            await asyncio.wait_for(loop, 10.0)
        await worker.wait_idle()
    return states


async def test_a_store_outage_during_deduplication_does_not_burn_the_messages_deliveries(
    backends: Backends, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """A batch whose deduplication fails (store down) is handed back, and the worker receives nothing more until
    the store answers: an outage, however long, must not use up the queue's max_receives (2 here) and park a run
    that could still run. The worker is down in /health meanwhile."""
    job = await new_job(backends.store, execution="at_most_once")  # looked up before its first run
    store_down_for(backends.store, monkeypatch, 5.0)
    await send(backends.queue, message_for(job).model_dump_json().encode())
    states = await run_until_recorded(backends, tmp_path, job, timeout_s=20.0)
    run, _, letters = await outcome(backends.store, job)
    assert run is not None and run.status == RunStatus.SUCCEEDED, run
    assert letters == []
    assert "retrying" in states and states[-1] == "up"


async def test_a_run_whose_record_meets_a_store_outage_is_recorded_once_the_store_is_back(
    backends: Backends, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """An at-least-once run executes on its first delivery without a lookup; if the store is down when its outcome
    is written, the worker keeps the message hidden and writes the outcome when the store answers again: the run
    succeeded once, not failed, not run twice, no dead letter."""
    marker = tmp_path / "ran.log"
    job = await new_job(backends.store, payload=Payload(kind="cmd", text=f"echo x >> {marker}"))
    store_down_for(backends.store, monkeypatch, 5.0)
    await send(backends.queue, message_for(job).model_dump_json().encode())
    await run_until_recorded(backends, tmp_path, job, timeout_s=20.0)
    await assert_succeeded_once(backends.store, job, marker)
    assert await queue_is_empty(backends.queue)


async def test_heartbeat_calls_never_pile_up_on_a_slow_queue(
    backends: Backends, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An extend slower than the beat is neither cancelled nor joined by more calls; when it lands the message is
    still hidden."""
    queue = backends.queue
    real_extend = queue.extend
    calls: list[int] = []
    in_flight = 0

    async def slow_extend(receipts: Sequence[str], visibility_s: float) -> None:
        nonlocal in_flight
        in_flight += 1
        calls.append(in_flight)
        try:
            await asyncio.sleep(0.25 * VISIBILITY_S)  # longer than a beat (a sixth of the timeout)
            await real_extend(receipts, visibility_s)
        finally:
            in_flight -= 1

    monkeypatch.setattr(queue, "extend", slow_extend)
    job = await new_job(backends.store, payload=Payload(kind="cmd", text="sleep 3"))
    await send(queue, message_for(job).model_dump_json().encode())
    settings = Settings.from_env(data_dir=tmp_path, visibility_timeout_s=VISIBILITY_S, allow_cmd=True)
    async with Worker(queue=queue, store=backends.store, blobs=backends.blobs, settings=settings).open() as w:
        messages = await queue.receive(10, 1.0, VISIBILITY_S)
        await w._slots.acquire()
        await w._start(messages)
        end = time.monotonic() + 3.0
        while time.monotonic() < end:
            assert await queue.receive(10, 0.2, 30) == [], "the message reappeared while its run was alive"
        await w.wait_idle()
    # A 3 s run under a 2 s timeout needs at least two extends to stay hidden (more when the loop is not busy).
    assert len(calls) >= 2
    assert max(calls) == 1  # never two extends at once
    run, _, _ = await outcome(backends.store, job)
    assert run is not None and run.status == RunStatus.SUCCEEDED


# A redelivered at-most-once run whose worker still lives ---------------------------------------------------------
@pytest.fixture
async def cluster_backends(tmp_path: Path) -> AsyncIterator[Backends]:
    settings = Settings.from_env(data_dir=tmp_path, visibility_timeout_s=VISIBILITY_S, lease_ttl_s=2.0)
    async with Backends.open(settings, {"store", "queue", "blobs", "coordination"}) as b:
        yield b


def two_workers(b: Backends, tmp_path: Path) -> tuple[Worker, Worker]:
    assert b.queue and b.store and b.blobs and b.coordination
    settings = Settings.from_env(data_dir=tmp_path, visibility_timeout_s=VISIBILITY_S, lease_ttl_s=2.0, allow_cmd=True)
    return tuple(  # type: ignore[return-value]
        Worker(queue=b.queue, store=b.store, blobs=b.blobs, coordination=b.coordination, settings=settings, node_id=n)
        for n in ("w1", "w2")
    )


async def test_a_redelivered_at_most_once_run_whose_worker_lives_is_not_declared_lost(
    cluster_backends: Backends, tmp_path: Path
) -> None:
    """Worker 1 runs an at-most-once job; its delivery lapses (as when the queue was unreachable for its extends)
    and worker 2 receives the message again. Worker 2 sees worker 1 alive, keeps the message hidden and, once the
    run finished, acks it: the run succeeds once, with no dead letter."""
    b = cluster_backends
    assert b.queue and b.store
    marker = tmp_path / "ran.log"
    job = await new_job(
        b.store, payload=Payload(kind="cmd", text=f"sleep 3; echo x >> {marker}"), execution="at_most_once"
    )
    await send(b.queue, message_for(job).model_dump_json().encode())
    w1, w2 = two_workers(b, tmp_path)
    async with w1.open(), w2.open():
        first = await b.queue.receive(10, 1.0, VISIBILITY_S)
        await w1._slots.acquire()
        await w1._start(first)
        run_id = message_for(job).run_id
        end = time.monotonic() + 5
        while (run := (await b.store.get_runs([run_id])).get(run_id)) is None:
            assert time.monotonic() < end, "the run was never reported running"
            await asyncio.sleep(0.05)
        assert run.status == RunStatus.RUNNING and run.worker_id == "w1"
        await b.queue.nack([first[0].receipt], 0)  # the lapse: visible again while worker 1 still runs it
        again = await b.queue.receive(10, 1.0, VISIBILITY_S)
        assert len(again) == 1 and again[0].receive_count == 2
        await w2._slots.acquire()
        await w2._start(again)
        end = time.monotonic() + 2.5
        while time.monotonic() < end:
            assert await b.queue.receive(10, 0.2, 30) == [], "the watched message reappeared"
        await w1.wait_idle()
        await w2.wait_idle()
    await assert_succeeded_once(b.store, job, marker)
    assert await queue_is_empty(b.queue)


async def test_a_second_delivery_of_a_claimed_run_held_for_its_due_time_is_not_declared_lost(
    cluster_backends: Backends, tmp_path: Path
) -> None:
    """Worker 1 received an at-most-once run ahead of its due time and claimed it; no run record exists yet. The
    same message is delivered again meanwhile (a standard SQS queue may deliver twice; moto's server does under
    concurrent receives). Worker 2 finds the claim's holder alive and watches instead of recording the run lost:
    the run succeeds once, with no dead letter (before: "succeeded" and a dead letter "not run again")."""
    b = cluster_backends
    assert b.queue and b.store
    marker = tmp_path / "ran.log"
    job = await new_job(b.store, payload=Payload(kind="cmd", text=f"echo x >> {marker}"), execution="at_most_once")
    await send(b.queue, message_for(job, due_ms=now_ms() + 1500).model_dump_json().encode())
    w1, w2 = two_workers(b, tmp_path)
    async with w1.open(), w2.open():
        first = await b.queue.receive(10, 1.0, VISIBILITY_S)
        await w1._slots.acquire()
        await w1._start(first)  # claimed, held for its due time
        claims = await b.store.run_claimers([message_for(job).run_id])
        assert [claim.worker_id for claim in claims.values()] == ["w1"]
        await b.queue.nack([first[0].receipt], 0)  # the second delivery
        again = await b.queue.receive(10, 1.0, VISIBILITY_S)
        assert len(again) == 1 and again[0].receive_count == 2
        await w2._slots.acquire()
        await w2._start(again)
        await w1.wait_idle()
        await w2.wait_idle()
    await assert_succeeded_once(b.store, job, marker)


async def test_a_redelivered_at_most_once_run_whose_worker_died_is_a_failed_run(
    cluster_backends: Backends, tmp_path: Path
) -> None:
    job = await redelivered_after_ghost_claimed(cluster_backends, started_ms=now_ms())
    await assert_settled_as_lost(cluster_backends, job, tmp_path)


@pytest.mark.parametrize("reported", [True, False], ids=["running-record", "claim-only"])
async def test_a_redelivered_at_most_once_run_whose_worker_restarted_under_its_name_is_a_failed_run(
    cluster_backends: Backends, tmp_path: Path, reported: bool
) -> None:
    """Found by a clean clone (chaos ``worker-crash-mid-run``): a worker killed under an at-most-once run came back
    under the same node id. Its presence key was alive again, so the redelivery was watched as if the run still
    ran, until the job's timeout + 60 s: the job showed ``running`` all that time. A presence ``started_at`` after
    the run's start (its ``running`` record) or, without a record yet, after the claim tells the new process from
    the one that held the run."""
    b = cluster_backends
    assert b.coordination
    taken = now_ms()  # the claim is made now; the running record, if any, says it started now too
    lease = await b.coordination.grant_lease(30)
    restarted = {"node_id": "ghost", "started_at": to_rfc3339(taken + 1000)}
    await b.coordination.put(WORKERS_PREFIX + "ghost", orjson.dumps(restarted), lease)
    job = await redelivered_after_ghost_claimed(b, started_ms=taken if reported else None)
    await assert_settled_as_lost(b, job, tmp_path)


async def redelivered_after_ghost_claimed(b: Backends, started_ms: int | None) -> Job:
    """An at-most-once job whose run worker "ghost" claimed and (unless ``started_ms`` is None) reported running
    since ``started_ms``; its message delivered once (to ghost) and visible again."""
    assert b.queue and b.store
    job = await new_job(b.store, execution="at_most_once")
    message = message_for(job)
    assert await b.store.claim_runs([message.run_id], "ghost") == {message.run_id}
    if started_ms is not None:
        await b.store.put_runs([record_of(message, RunStatus.RUNNING, started_ms=started_ms, worker_id="ghost")])
    await send(b.queue, message.model_dump_json().encode())
    first = await b.queue.receive(10, 1.0, 30)
    await b.queue.nack([first[0].receipt], 0)
    return job


async def assert_settled_as_lost(b: Backends, job: Job, tmp_path: Path) -> None:
    """Another worker takes the redelivery and records the run failed for good, at once (not after a watch)."""
    _, w2 = two_workers(b, tmp_path)
    async with w2.open():
        assert await asyncio.wait_for(w2.drain(), 10) == 1
    run, current, letters = await outcome(b.store, job)
    assert run is not None and run.status == RunStatus.FAILED and (run.error or "").startswith("at_most_once")
    assert current.status == JobStatus.FAILED and letters == [run.run_id]


async def test_a_failing_ack_of_duplicates_neither_drops_the_batch_nor_leaks_slots(
    backends: Backends, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A batch holds a duplicate of a finished run (acked, not run) and a new run; the queue refuses the ack. The
    new run still runs, and every execution slot comes back (a leak would stop the receive loop for good)."""
    queue = backends.queue
    done, fresh = await new_job(backends.store), await new_job(backends.store)
    finished = message_for(done)
    await backends.store.put_runs([record_of(finished, RunStatus.SUCCEEDED, finished_ms=now_ms())])
    await send(queue, finished.model_dump_json().encode())
    first = await queue.receive(10, 1.0, 30)
    await queue.nack([first[0].receipt], 0)  # a redelivery: receive_count 2, so it is looked up and found done
    await send(queue, message_for(fresh).model_dump_json().encode())
    real_ack = queue.ack
    refused = 0

    async def ack(receipts: Sequence[str]) -> None:
        nonlocal refused
        if refused == 0:
            refused += 1
            raise ConnectionError("queue unreachable")
        await real_ack(receipts)

    monkeypatch.setattr(queue, "ack", ack)  # before the worker binds it to its batcher
    settings = Settings.from_env(data_dir=tmp_path, visibility_timeout_s=VISIBILITY_S, worker_concurrency=4)
    async with Worker(queue=queue, store=backends.store, blobs=backends.blobs, settings=settings).open() as w:
        messages: list[Any] = []
        end = time.monotonic() + 5
        while len(messages) < 2:
            assert time.monotonic() < end
            messages += await queue.receive(10, 0.5, VISIBILITY_S)
        for _ in messages:
            await w._slots.acquire()
        await w._start(messages)
        await w.wait_idle()
        assert refused == 1
        assert w._slots._value == 4  # every slot returned
    run, _, _ = await outcome(backends.store, fresh)
    assert run is not None and run.status == RunStatus.SUCCEEDED


async def test_runs_shorter_than_half_the_visibility_timeout_cost_no_extend(
    backends: Backends, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The heartbeat extends only messages with less than half a timeout left: a burst of quick runs makes no
    extend call at all (every call is load on the queue)."""
    calls: list[int] = []
    real_extend = backends.queue.extend

    async def extend(receipts: Sequence[str], visibility_s: float) -> None:
        calls.append(len(receipts))
        await real_extend(receipts, visibility_s)

    monkeypatch.setattr(backends.queue, "extend", extend)
    jobs = [await new_job(backends.store) for _ in range(20)]
    due = now_ms() + int(0.2 * VISIBILITY_S * 1000)  # held a fifth of the timeout: longer than a beat
    await send(backends.queue, *(message_for(j, due_ms=due).model_dump_json().encode() for j in jobs))
    settings = Settings.from_env(data_dir=tmp_path, visibility_timeout_s=VISIBILITY_S)
    async with Worker(queue=backends.queue, store=backends.store, blobs=backends.blobs, settings=settings).open() as w:
        assert await w.drain() == 20
        await asyncio.sleep(VISIBILITY_S)  # beats go on; nothing is held any more
    assert calls == []
