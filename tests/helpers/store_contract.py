"""The job store contract (ScyllaDB's shape): jobs, time-bucket queue entries, checkpoints, runs, claims, dead
letters, idempotency keys, layout and stats. Every backend must pass these; each case uses fresh ids.

Each case is a coroutine taking a started :class:`JobStore`, registered in :data:`CASES`: ``tests/contract/
test_store.py`` runs them on every real backend, ``tests/unit/test_scylla_adapter.py`` on its CQL double.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Awaitable, Callable

import pytest

from dsched.libs.models import (
    ACCEPTED_VERSION,
    BucketEntry,
    DeadLetter,
    Job,
    JobState,
    JobStatus,
    LastRun,
    Payload,
    Run,
    RunStatus,
    run_id_for,
)
from dsched.libs.store.base import JobStore, LayoutMismatch

BUCKET_MS = 60_000
T0 = 1_900_000_020_000  # a bucket start far from "now", so no other writer's data is near

Case = Callable[[JobStore], Awaitable[None]]
CASES: dict[str, Case] = {}


def case(fn: Case) -> Case:
    """Register ``fn`` as a contract case under its name."""
    CASES[fn.__name__] = fn
    return fn


def uid(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


def make_job(user_id: str, created_ms: int, project_id: str = "p1", **fields: object) -> Job:
    return Job.model_validate(
        {
            "job_id": uid("job"),
            "user_id": user_id,
            "project_id": project_id,
            "name": "nightly",
            "payload": Payload(kind="echo", text="hi"),
            "next_fire_ms": created_ms + 1000,
            "created_ms": created_ms,
            **fields,
        }
    )


def make_run(job_id: str, scheduled_ms: int, attempt: int = 0, **fields: object) -> Run:
    return Run.model_validate(
        {
            "run_id": run_id_for(job_id, scheduled_ms, attempt),
            "job_id": job_id,
            "user_id": "u",
            "scheduled_ms": scheduled_ms,
            "attempt": attempt,
            "status": RunStatus.RUNNING,
            **fields,
        }
    )


def entry(shard: int, due_ms: int, job_id: str = "j", attempt: int = 0, **fields: object) -> BucketEntry:
    return BucketEntry.model_validate(
        {
            "shard": shard,
            "bucket_ms": due_ms - due_ms % BUCKET_MS,
            "due_ms": due_ms,
            "job_id": job_id,
            "scheduled_ms": due_ms,
            "attempt": attempt,
            **fields,
        }
    )


async def all_pages(store: JobStore, user_id: str, limit: int, **filters: str) -> list[Job]:
    jobs: list[Job] = []
    cursor: str | None = None
    for _ in range(100):
        page, cursor = await store.list_jobs(user_id, limit, cursor, **filters)
        assert len(page) <= limit
        jobs += page
        if cursor is None:
            return jobs
    raise AssertionError("pagination never ended")


# Jobs -----------------------------------------------------------------------------------------------------
@case
async def put_jobs_then_get_jobs_returns_the_definitions(store: JobStore) -> None:
    a, b = make_job("u", 1000), make_job("u", 2000, cron_schedule="*/5 * * * *", priority=90)
    await store.put_jobs([a, b])
    got = await store.get_jobs([a.job_id, b.job_id, "missing"])
    assert got == {a.job_id: a, b.job_id: b}
    assert got[b.job_id].cron_schedule == "*/5 * * * *"
    assert got[a.job_id].state is None and got[a.job_id].status == JobStatus.SCHEDULED
    assert await store.get_jobs([]) == {}


@case
async def put_jobs_never_overwrites_runtime_state(store: JobStore) -> None:
    job = make_job("u", 1000)
    await store.put_jobs([job])
    last = LastRun(run_id="r1", status=RunStatus.SUCCEEDED, attempt=0, scheduled_ms=5000, finished_ms=5100)
    await store.update_job_states(
        [JobState(job_id=job.job_id, state=JobStatus.SUCCEEDED, last_run=last, dispatched_through_ms=5000)]
    )
    # Replaying the submission (with stale state fields) changes the definition only.
    replay = job.model_copy(update={"name": "renamed", "version": 7, "state": JobStatus.QUEUED})
    await store.put_jobs([replay])
    got = (await store.get_jobs([job.job_id]))[job.job_id]
    assert got.name == "renamed" and got.version == 7
    assert got.state == JobStatus.SUCCEEDED
    assert got.last_run == last
    assert got.dispatched_through_ms == 5000


@case
async def update_job_states_sets_only_the_given_fields(store: JobStore) -> None:
    job = make_job("u", 1000)
    await store.put_jobs([job])
    await store.update_job_states([JobState(job_id=job.job_id, dispatched_through_ms=42)])
    await store.update_job_states([JobState(job_id=job.job_id, state=JobStatus.RUNNING)])
    await store.update_job_states([JobState(job_id=job.job_id, state=JobStatus.RUNNING)])  # idempotent
    got = (await store.get_jobs([job.job_id]))[job.job_id]
    assert (got.state, got.dispatched_through_ms, got.last_run) == (JobStatus.RUNNING, 42, None)
    unknown = uid("unknown")
    await store.update_job_states([JobState(job_id=unknown, state=JobStatus.RUNNING)])
    assert await store.get_jobs([unknown]) == {}
    await store.update_job_states([])


@case
async def update_job_states_keep_each_fields_latest_decision(store: JobStore) -> None:
    """A state write delayed in flight (a frozen picker's "queued") lands after the run's outcome it preceded:
    each field keeps the value decided last, not the one that arrived last, and reads say when that was."""
    user = uid("user")
    job = make_job(user, 1000)
    await store.put_jobs([job])
    base = time.time_ns() // 1000
    last = LastRun(run_id="r1", status=RunStatus.SUCCEEDED, attempt=0, scheduled_ms=5000, finished_ms=5100)
    await store.update_job_states([JobState(job_id=job.job_id, state=JobStatus.SUCCEEDED, last_run=last, at_us=base)])
    late = [JobState(job_id=job.job_id, state=JobStatus.QUEUED, dispatched_through_ms=5000, at_us=base - 10)]
    await store.update_job_states(late)
    got = (await store.get_jobs([job.job_id]))[job.job_id]
    assert (got.state, got.last_run, got.dispatched_through_ms) == (JobStatus.SUCCEEDED, last, 5000)
    assert got.state_at_us == base
    # Later decisions win, field by field, and within one batch too.
    running = LastRun(run_id="r2", status=RunStatus.RUNNING, attempt=0, scheduled_ms=6000)
    await store.update_job_states(
        [
            JobState(job_id=job.job_id, state=JobStatus.RUNNING, last_run=running, at_us=base + 20),
            JobState(job_id=job.job_id, state=JobStatus.QUEUED, dispatched_through_ms=6000, at_us=base + 10),
        ]
    )
    got = (await store.get_jobs([job.job_id]))[job.job_id]
    assert (got.state, got.last_run, got.dispatched_through_ms) == (JobStatus.RUNNING, running, 6000)
    assert got.state_at_us == base + 20
    listed, _ = await store.list_jobs(user, 10)
    assert [j.state for j in listed if j.job_id == job.job_id] == [JobStatus.RUNNING]


@case
async def get_job_owners_gives_the_user_of_each_stored_job(store: JobStore) -> None:
    a, b = make_job(uid("u"), 1000), make_job(uid("u"), 2000)
    await store.put_jobs([a, b])
    state_only = uid("job")  # a state update of a job never stored leaves no job
    await store.update_job_states([JobState(job_id=state_only, state=JobStatus.RUNNING)])
    owners = await store.get_job_owners([a.job_id, b.job_id, a.job_id, state_only, "missing"])
    assert owners == {a.job_id: a.user_id, b.job_id: b.user_id}
    assert await store.get_job_owners([]) == {}


@case
async def list_jobs_is_newest_first_paginated_and_per_user(store: JobStore) -> None:
    user, other = uid("user"), uid("user")
    jobs = [make_job(user, 1000 + i * 10) for i in range(7)]
    await store.put_jobs([*jobs, make_job(other, 1005)])
    newest_first = sorted(jobs, key=lambda j: j.created_ms, reverse=True)

    page, cursor = await store.list_jobs(user, 3)
    assert [j.job_id for j in page] == [j.job_id for j in newest_first[:3]]
    assert cursor is not None
    listed = await all_pages(store, user, 3)
    assert [j.job_id for j in listed] == [j.job_id for j in newest_first]
    assert [j.job_id for j in await all_pages(store, user, 7)] == [j.job_id for j in newest_first]
    assert [j.job_id for j in await all_pages(store, other, 5)] != []
    assert await store.list_jobs(uid("nobody"), 5) == ([], None)


@case
async def list_jobs_pages_through_jobs_created_in_the_same_millisecond(store: JobStore) -> None:
    user = uid("user")
    jobs = [make_job(user, 5000) for _ in range(5)]
    await store.put_jobs(jobs)
    listed = await all_pages(store, user, 2)
    assert sorted(j.job_id for j in listed) == sorted(j.job_id for j in jobs)


@case
async def list_jobs_filters_by_status_and_project(store: JobStore) -> None:
    user = uid("user")
    scheduled = make_job(user, 1000)
    running = make_job(user, 2000)
    paused = make_job(user, 3000, paused=True)
    deleted = make_job(user, 4000, deleted=True, paused=True)
    other_project = make_job(user, 5000, project_id="p2")
    accepted = make_job(user, 6000, version=ACCEPTED_VERSION)  # ingestion's row before the writer stores it
    await store.put_jobs([scheduled, running, paused, deleted, other_project, accepted])
    await store.update_job_states(
        [
            JobState(job_id=running.job_id, state=JobStatus.RUNNING),
            JobState(job_id=paused.job_id, state=JobStatus.QUEUED),
        ]
    )

    async def ids(**filters: str) -> set[str]:
        return {j.job_id for j in await all_pages(store, user, 2, **filters)}

    assert await ids(status="running") == {running.job_id}
    assert await ids(status="paused") == {paused.job_id}  # paused wins over its runtime state
    assert await ids(status="deleted") == {deleted.job_id}  # deleted wins over paused
    assert await ids(status="scheduled") == {scheduled.job_id, other_project.job_id}
    assert await ids(status="queued") == set()
    assert await ids(status="submitted") == {accepted.job_id}
    await store.put_jobs([accepted.model_copy(update={"version": 7})])  # the writer stored it
    assert await ids(status="submitted") == set()
    assert accepted.job_id in await ids(status="scheduled")
    assert await ids(project_id="p2") == {other_project.job_id}
    assert await ids(project_id="p1", status="scheduled") == {scheduled.job_id, accepted.job_id}


# Queue entries --------------------------------------------------------------------------------------------
@case
async def due_entries_returns_one_partitions_due_entries_earliest_first(store: JobStore) -> None:
    bucket = T0
    mine = [entry(3, bucket + d, job_id=uid("j")) for d in (500, 100, 300, 59_000)]
    other_shard = entry(4, bucket + 100)
    other_bucket = entry(3, bucket + BUCKET_MS + 100)
    await store.put_entries([*mine, other_shard, other_bucket])

    due = await store.due_entries(3, bucket, bucket + 300, limit=100)
    assert [e.due_ms for e in due] == [bucket + 100, bucket + 300]
    assert {e.key for e in due} == {e.key for e in mine if e.due_ms <= bucket + 300}
    everything = await store.due_entries(3, bucket, bucket + BUCKET_MS, limit=100)
    assert [e.due_ms - bucket for e in everything] == [100, 300, 500, 59_000]
    assert len(await store.due_entries(3, bucket, bucket + BUCKET_MS, limit=2)) == 2
    assert await store.due_entries(3, bucket, bucket + 99, limit=100) == []


@case
async def due_entries_many_leaves_out_known_entries_but_counts_them_toward_the_limit(store: JobStore) -> None:
    first = [entry(6, T0 + d, job_id=uid("j")) for d in (100, 200, 300)]
    second = entry(7, T0 + 150, job_id=uid("j"))
    await store.put_entries([*first, second])
    partitions = [(6, T0), (7, T0)]

    found = await store.due_entries_many(partitions, T0 + BUCKET_MS, limit=10, known={first[0].key, second.key})
    assert [e.key for e in found[(6, T0)]] == [first[1].key, first[2].key]
    assert found[(7, T0)] == []
    # The limit applies to what the partition holds, known or not: the first two rows are known here.
    limited = await store.due_entries_many(partitions, T0 + BUCKET_MS, limit=2, known={first[0].key})
    assert [e.key for e in limited[(6, T0)]] == [first[1].key]
    assert [e.key for e in limited[(7, T0)]] == [second.key]


@case
async def due_entries_since_reads_a_partition_from_a_due_time_on(store: JobStore) -> None:
    # An entry stored late sits in the current bucket with its own, earlier due time (before the bucket's start).
    late = entry(8, T0 - 5_000, job_id=uid("j"), bucket_ms=T0)
    mine = [entry(8, T0 + d, job_id=uid("j")) for d in (100, 200, 300)]
    other = entry(9, T0 + 100, job_id=uid("j"))
    await store.put_entries([late, *mine, other])

    assert [e.key for e in await store.due_entries(8, T0, T0 + 300, limit=10, since_ms=T0 + 200)] == [
        mine[1].key,
        mine[2].key,
    ]
    assert [e.key for e in await store.due_entries(8, T0, T0 + 300, limit=1, since_ms=T0 + 150)] == [mine[1].key]
    everything = await store.due_entries(8, T0, T0 + 300, limit=10)  # no lower bound: from the start
    assert [e.key for e in everything] == [late.key, *(e.key for e in mine)]
    found = await store.due_entries_many([(8, T0), (9, T0)], T0 + 300, limit=10, since={(8, T0): T0 + 300})
    assert [e.key for e in found[(8, T0)]] == [mine[2].key]
    assert [e.key for e in found[(9, T0)]] == [other.key]  # not in ``since``: from its start


@case
async def entries_keep_all_fields_and_re_putting_is_idempotent(store: JobStore) -> None:
    e = entry(1, T0 + 10, job_id=uid("j"), attempt=2, kind="retry", version=9, priority=80)
    await store.put_entries([e])
    await store.put_entries([e, e])
    assert await store.due_entries(1, T0, T0 + 10, limit=10) == [e]


@case
async def put_jobs_and_entries_stores_both_and_either_may_be_empty(store: JobStore) -> None:
    job = make_job("u", 1000)
    e = entry(2, T0 + 20, job_id=job.job_id, version=3)
    await store.put_jobs_and_entries([job], [e])
    assert await store.get_jobs([job.job_id]) == {job.job_id: job}
    assert await store.due_entries(2, T0, T0 + 20, limit=10) == [e]
    renamed = job.model_copy(update={"name": "renamed"})
    await store.put_jobs_and_entries([renamed], [])
    assert (await store.get_jobs([job.job_id]))[job.job_id].name == "renamed"
    later = entry(2, T0 + 25, job_id=job.job_id, version=4)
    await store.put_jobs_and_entries([], [later])
    assert await store.due_entries(2, T0, T0 + 30, limit=10) == [e, later]
    await store.put_jobs_and_entries([], [])


@case
async def entries_of_one_job_differ_by_occurrence_and_attempt(store: JobStore) -> None:
    job_id = uid("j")
    base = entry(2, T0 + 10, job_id=job_id)
    retry = base.model_copy(update={"attempt": 1, "kind": "retry"})
    other = base.model_copy(update={"scheduled_ms": T0 - 50_000})
    await store.put_entries([base, retry, other])
    assert {e.key for e in await store.due_entries(2, T0, T0 + 10, limit=10)} == {
        base.key,
        retry.key,
        other.key,
    }


@case
async def delete_entries_by_key_and_deleting_missing_entries_is_fine(store: JobStore) -> None:
    keep, drop = entry(5, T0 + 1, job_id=uid("j")), entry(5, T0 + 2, job_id=uid("j"))
    await store.put_entries([keep, drop])
    await store.delete_entries([drop, entry(5, T0 + 3, job_id="never-written")])
    await store.delete_entries([drop])
    await store.delete_entries([])
    assert await store.due_entries(5, T0, T0 + BUCKET_MS, limit=10) == [keep]


@case
async def many_rows_of_one_partition_are_all_written_and_the_last_of_a_key_wins(store: JobStore) -> None:
    """A batch call's rows share partitions (a user's jobs, a bucket's entries); a backend may send them together
    (Scylla: single-partition batches), yet every row is stored, and of two rows with one key the later."""
    user = uid("u")
    jobs = [make_job(user, 1000 + i) for i in range(45)]
    await store.put_jobs(jobs)
    assert {j.job_id for j in await all_pages(store, user, 100)} == {j.job_id for j in jobs}

    bucket = T0 + 2 * BUCKET_MS
    entries = [entry(9, bucket + i, job_id=uid("j"), version=1, priority=10) for i in range(45)]
    again = entries[3].model_copy(update={"version": 2, "priority": 90, "kind": "retry"})
    await store.put_entries([*entries, again])
    stored = await store.due_entries(9, bucket, bucket + BUCKET_MS, limit=100)
    assert len(stored) == 45
    assert stored[3] == again and stored[4] == entries[4]

    await store.delete_entries([*entries[1:], entries[7]])
    assert await store.due_entries(9, bucket, bucket + BUCKET_MS, limit=100) == [entries[0]]


# Checkpoints ----------------------------------------------------------------------------------------------
@case
async def advance_checkpoint_is_a_compare_and_set(store: JobStore) -> None:
    assert await store.get_checkpoint(7) is None
    assert await store.advance_checkpoint(7, None, T0) is True
    assert await store.advance_checkpoint(7, None, T0 + BUCKET_MS) is False  # someone set it first
    assert await store.advance_checkpoint(7, T0, T0 + BUCKET_MS) is True
    assert await store.advance_checkpoint(7, T0, T0 + 2 * BUCKET_MS) is False  # stale expectation
    assert await store.get_checkpoint(7) == T0 + BUCKET_MS
    assert await store.get_checkpoint(8) is None


@case
async def concurrent_checkpoint_advances_have_one_winner(store: JobStore) -> None:
    await store.advance_checkpoint(9, None, T0)
    results = await asyncio.gather(*(store.advance_checkpoint(9, T0, T0 + i * BUCKET_MS) for i in (1, 2)))
    assert sorted(results) == [False, True]


# Runs -----------------------------------------------------------------------------------------------------
@case
async def put_runs_upserts_the_whole_record(store: JobStore) -> None:
    job_id = uid("job")
    run = make_run(job_id, 1000, started_ms=1001, worker_id="w1")
    await store.put_runs([run])
    done = run.model_copy(update={"status": RunStatus.SUCCEEDED, "finished_ms": 1500, "exit_code": 0})
    await store.put_runs([done])
    assert await store.get_runs([run.run_id, "missing"]) == {run.run_id: done}
    assert await store.get_runs([]) == {}


@case
async def list_runs_is_newest_occurrence_first_then_highest_attempt(store: JobStore) -> None:
    job_id = uid("job")
    runs = [make_run(job_id, s, a) for s in (1000, 3000, 2000) for a in (0, 1)]
    await store.put_runs([*runs, make_run(uid("other-job"), 5000)])
    expected = [(3000, 1), (3000, 0), (2000, 1), (2000, 0), (1000, 1), (1000, 0)]

    page, cursor = await store.list_runs(job_id, 4)
    assert [(r.scheduled_ms, r.attempt) for r in page] == expected[:4]
    assert cursor is not None
    rest, cursor = await store.list_runs(job_id, 4, cursor)
    assert [(r.scheduled_ms, r.attempt) for r in rest] == expected[4:]
    assert cursor is None
    whole, cursor = await store.list_runs(job_id, 6)
    assert len(whole) == 6 and cursor is None
    assert await store.list_runs(uid("no-runs"), 5) == ([], None)


@case
async def claim_runs_grants_each_run_exactly_once(store: JobStore) -> None:
    started = time.time() * 1000
    ids = [str(uuid.uuid4()) for _ in range(20)]
    first, second = await asyncio.gather(store.claim_runs(ids, "w1"), store.claim_runs(ids[::-1], "w2"))
    assert first | second == set(ids)
    assert first & second == set()
    assert await store.claim_runs(ids, "w1") == set()
    fresh = str(uuid.uuid4())
    assert await store.claim_runs([fresh, ids[0]], "w3") == {fresh}
    assert await store.claim_runs([], "w3") == set()
    holders = await store.run_claimers([*ids, fresh, uid("never-claimed")])
    assert {i: h.worker_id for i, h in holders.items()} == {
        **{i: "w1" for i in first},
        **{i: "w2" for i in second},
        fresh: "w3",
    }
    assert all(started - 1000 <= h.claimed_ms <= time.time() * 1000 + 1000 for h in holders.values())
    assert await store.run_claimers([]) == {}


# Dead letters ---------------------------------------------------------------------------------------------
def dead(user_id: str, dead_ms: int) -> DeadLetter:
    return DeadLetter(
        dead_letter_id=str(uuid.uuid4()),
        job_id=uid("job"),
        user_id=user_id,
        project_id="p1",
        scheduled_ms=dead_ms - 100,
        attempts=4,
        error="exit code 1",
        dead_ms=dead_ms,
    )


@case
async def dead_letters_are_listed_newest_first_per_user(store: JobStore) -> None:
    user, other = uid("user"), uid("user")
    letters = [dead(user, 1000 + i) for i in range(5)]
    await store.put_dead_letters([*letters, dead(other, 1002)])
    await store.put_dead_letters(letters[:2])  # idempotent
    expected = [d.dead_letter_id for d in sorted(letters, key=lambda d: d.dead_ms, reverse=True)]

    got: list[DeadLetter] = []
    cursor: str | None = None
    for _ in range(10):
        page, cursor = await store.list_dead_letters(user, 2, cursor)
        got += page
        if cursor is None:
            break
    assert [d.dead_letter_id for d in got] == expected
    assert got[0] == letters[-1]
    assert await store.get_dead_letter(user, letters[0].dead_letter_id) == letters[0]
    assert await store.get_dead_letter(other, letters[0].dead_letter_id) is None
    assert await store.list_dead_letters(uid("nobody"), 5) == ([], None)


# Idempotency keys -----------------------------------------------------------------------------------------
@case
async def an_idempotency_key_binds_to_the_first_job(store: JobStore) -> None:
    user, key = uid("user"), uid("key")
    assert await store.claim_idempotency_key(user, key, "job-1", ttl_s=3600) == "job-1"
    assert await store.claim_idempotency_key(user, key, "job-2", ttl_s=3600) == "job-1"
    assert await store.claim_idempotency_key(uid("user"), key, "job-3", ttl_s=3600) == "job-3"  # per user


@case
async def an_expired_idempotency_key_can_be_bound_again(store: JobStore) -> None:
    user, key = uid("user"), uid("key")
    assert await store.claim_idempotency_key(user, key, "job-1", ttl_s=1) == "job-1"
    end = time.monotonic() + 10
    while (bound := await store.claim_idempotency_key(user, key, "job-2", ttl_s=3600)) != "job-2":
        assert bound == "job-1"
        assert time.monotonic() < end, "binding never expired"
        await asyncio.sleep(0.2)
    assert await store.claim_idempotency_key(user, key, "job-3", ttl_s=3600) == "job-2"


# Layout and stats -----------------------------------------------------------------------------------------
@case
async def check_layout_records_the_first_layout_and_refuses_another(store: JobStore) -> None:
    await store.check_layout(16, 60_000)
    await store.check_layout(16, 60_000)
    with pytest.raises(LayoutMismatch):
        await store.check_layout(32, 60_000)
    with pytest.raises(LayoutMismatch):
        await store.check_layout(16, 30_000)


@case
async def stats_reports_every_count(store: JobStore) -> None:
    user = uid("user")
    job = make_job(user, 1000)
    await store.put_jobs([job])
    await store.update_job_states([JobState(job_id=job.job_id, state=JobStatus.RUNNING)])
    await store.put_entries([entry(0, T0, job_id=job.job_id)])
    await store.put_dead_letters([dead(user, 1000)])
    stats = await store.stats(T0 + 1)
    assert set(stats) >= {"scheduled", "due", "queued", "running", "succeeded", "failed", "dead"}
    assert all(isinstance(v, int) and v >= 0 for v in stats.values())
