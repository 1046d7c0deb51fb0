"""Picker._dispatch directly: the order of its writes (what makes a crash harmless), what it sends, and that it
stops at the step where it no longer owns the shards."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from dsched.libs.models import BucketEntry, Job, JobState, JobStatus, LastRun, Payload, RunStatus, run_id_for
from dsched.libs.queue.sqlite import SqliteQueue
from dsched.libs.settings import Settings
from dsched.libs.sharding import bucket_for, entry_for
from dsched.libs.store.sqlite import SqliteStore
from tests.helpers.pickers import picker_backends, picker_owning

NOW = 1_800_000_000_000


class Recording:
    """Wraps a backend and records the name of every write, in order."""

    WRITES = {"put_entries", "put_runs", "update_job_states", "send", "delete_entries"}

    def __init__(self, inner: Any, calls: list[str], on_call: Any = None) -> None:
        self.inner, self.calls, self.on_call = inner, calls, on_call

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self.inner, name)
        if name not in self.WRITES:
            return attr

        async def recorded(*args: Any, **kwargs: Any) -> Any:
            label = name
            if name == "update_job_states":
                label += ":" + ("dispatched" if args[0][0].dispatched_through_ms is not None else "state")
            self.calls.append(label)
            if self.on_call is not None:
                self.on_call(label)
            return await attr(*args, **kwargs)

        return recorded


@pytest.fixture
async def backends(tmp_path: Path) -> AsyncIterator[tuple[Settings, SqliteStore, SqliteQueue]]:
    async with picker_backends(tmp_path, shard_count=1) as backends:
        yield backends


def _job(job_id: str, **fields: Any) -> Job:
    base: dict[str, Any] = dict(
        job_id=job_id, user_id="u", project_id="p", payload=Payload(kind="echo", text="x"), next_fire_ms=NOW
    )
    return Job.model_validate({**base, "created_ms": NOW - 1000, **fields})


def _entry(job: Job, settings: Settings) -> BucketEntry:
    return entry_for(
        job, NOW, scheduled_ms=NOW, attempt=0, kind="schedule", shard_count=1, bucket_ms=settings.bucket_ms, now=NOW
    )


async def test_writes_run_in_crash_safe_order_and_send_each_due_run(
    backends: tuple[Settings, SqliteStore, SqliteQueue], tmp_path: Path
) -> None:
    settings, store, queue = backends
    recurring = _job("rec", cron_schedule="@every 10s")
    one_off = _job("once")
    await store.put_jobs([recurring, one_off])
    entries = [_entry(recurring, settings), _entry(one_off, settings)]
    await store.put_entries(entries)
    calls: list[str] = []
    async with picker_owning([0], store=store, queue=queue, settings=settings, tmp_path=tmp_path) as picker:
        picker.store, picker.queue = Recording(store, calls), Recording(queue, calls)  # type: ignore[assignment]
        assert await picker._dispatch(entries, NOW) == 2
    assert calls == [
        "put_entries",  # the recurring job's next occurrence, before anything is sent
        "send",
        "update_job_states:dispatched",  # "queued" and the occurrence dispatched, one write per job after the send
        "delete_entries",  # last: a crash before it re-dispatches (deduplicated by run id), never loses
    ]
    sent = await queue.receive(10, 0.0, 30.0)
    assert sorted(orjson.loads(m.body)["job"]["job_id"] for m in sent) == ["once", "rec"]
    jobs = await store.get_jobs(["rec", "once"])
    assert jobs["rec"].dispatched_through_ms == NOW and jobs["once"].status == JobStatus.QUEUED
    bucket = bucket_for(NOW + 10_000, settings.bucket_ms)
    remaining = await store.due_entries(0, bucket, NOW + 10_000, 10)
    assert [(e.job_id, e.scheduled_ms) for e in remaining] == [("rec", NOW + 10_000)]


async def test_a_picker_that_loses_its_shards_mid_dispatch_stops_before_the_send(
    backends: tuple[Settings, SqliteStore, SqliteQueue], tmp_path: Path
) -> None:
    settings, store, queue = backends
    job = _job("rec", cron_schedule="@every 10s")
    await store.put_jobs([job])
    entries = [_entry(job, settings)]
    await store.put_entries(entries)
    calls: list[str] = []
    async with picker_owning([0], store=store, queue=queue, settings=settings, tmp_path=tmp_path) as picker:

        def lose_shards(label: str) -> None:
            if label == "put_entries":
                picker._lease_valid_until = 0.0  # as if the lease lapsed while this write was in flight

        picker.store = Recording(store, calls, lose_shards)  # type: ignore[assignment]
        picker.queue = Recording(queue, calls)  # type: ignore[assignment]
        assert await picker._dispatch(entries, NOW) == 0
    assert calls == ["put_entries"]  # no send, no job state, no delete
    assert await queue.receive(10, 0.0, 30.0) == []
    assert (await store.get_jobs(["rec"]))["rec"].status == JobStatus.SCHEDULED  # not marked queued
    still_there = await store.due_entries(0, entries[0].bucket_ms, NOW, 10)
    assert [(e.job_id, e.scheduled_ms) for e in still_there] == [("rec", NOW)]  # left for the new owner


async def test_deleted_paused_and_superseded_entries_are_dropped_not_sent(
    backends: tuple[Settings, SqliteStore, SqliteQueue], tmp_path: Path
) -> None:
    settings, store, queue = backends
    # "old" was rescheduled (version 5, a minute later): the entry of version 4 fires an occurrence it no longer has
    jobs = [_job("del", deleted=True), _job("pau", paused=True), _job("old", version=5, next_fire_ms=NOW + 60_000)]
    await store.put_jobs(jobs)
    entries = [_entry(j, settings) for j in jobs]
    entries[2] = entries[2].model_copy(update={"version": 4})  # written for an older definition
    await store.put_entries(entries)
    async with picker_owning([0], store=store, queue=queue, settings=settings, tmp_path=tmp_path) as picker:
        assert await picker._dispatch(entries, NOW) == 0
    assert await queue.receive(10, 0.0, 30.0) == []
    assert await store.due_entries(0, entries[0].bucket_ms, NOW, 10) == []  # handled: deleted from the table


async def test_an_older_definitions_entry_for_the_current_occurrence_is_sent_with_the_new_definition(
    backends: tuple[Settings, SqliteStore, SqliteQueue], tmp_path: Path
) -> None:
    """Found by tests/integration/test_fuzz_pipeline.py: a PATCH right after a submit (same first fire) left the
    job "scheduled" forever. The picker had loaded the submit's entry; the writer then stored the PATCH's entry
    under the same key (the version is not part of it); the picker dropped its copy as superseded and deleted
    the row, which was now the PATCH's entry."""
    settings, store, queue = backends
    patched = _job("patched", version=7, timeout_s=5.0)
    await store.put_jobs([patched])
    loaded = _entry(patched, settings).model_copy(update={"version": 6})  # what the picker read before the PATCH
    await store.put_entries([_entry(patched, settings)])  # the row now: the PATCH's entry, same key
    async with picker_owning([0], store=store, queue=queue, settings=settings, tmp_path=tmp_path) as picker:
        assert await picker._dispatch([loaded], NOW) == 1
    [message] = await queue.receive(10, 0.0, 30.0)
    body = orjson.loads(message.body)
    assert (body["job"]["job_id"], body["job"]["version"], body["job"]["timeout_s"]) == ("patched", 7, 5.0)
    assert await store.due_entries(0, loaded.bucket_ms, NOW, 10) == []  # handled once
    jobs = await store.get_jobs(["patched"])
    assert jobs["patched"].dispatched_through_ms == NOW


async def test_an_entry_whose_run_already_ran_is_dropped_and_leaves_the_jobs_state_alone(
    backends: tuple[Settings, SqliteStore, SqliteQueue], tmp_path: Path
) -> None:
    """Found by chaos `frozen-picker` on the production backends (advisory `job_states_settled`): a picker frozen
    after its send, before recording the dispatch and deleting the entry. The new owner sent the entry again, wrote
    "queued", and the worker only deduplicated the second message: the one-off job stayed "queued" for good although
    its run had succeeded."""
    settings, store, queue = backends
    ran, failed = _job("ran"), _job("failed", max_retries=1)
    await store.put_jobs([ran, failed])
    succeeded = LastRun(
        run_id=run_id_for("ran", NOW, 0), status=RunStatus.SUCCEEDED, attempt=0, scheduled_ms=NOW, finished_ms=NOW + 5
    )
    first_attempt = LastRun(
        run_id=run_id_for("failed", NOW, 0), status=RunStatus.FAILED, attempt=0, scheduled_ms=NOW, finished_ms=NOW + 5
    )
    await store.update_job_states(
        [
            JobState(job_id="ran", state=JobStatus.SUCCEEDED, last_run=succeeded),
            JobState(job_id="failed", state=JobStatus.SCHEDULED, last_run=first_attempt),
        ]
    )
    left_over = _entry(ran, settings)  # sent and run, never deleted
    retry = entry_for(
        failed,
        NOW + 10,
        scheduled_ms=NOW,
        attempt=1,
        kind="retry",
        shard_count=1,
        bucket_ms=settings.bucket_ms,
        now=NOW,
    )
    await store.put_entries([left_over, retry])
    async with picker_owning([0], store=store, queue=queue, settings=settings, tmp_path=tmp_path) as picker:
        assert await picker._dispatch([left_over, retry], NOW + 10) == 1
    [message] = await queue.receive(10, 0.0, 30.0)
    assert orjson.loads(message.body)["run_id"] == run_id_for("failed", NOW, 1)  # the retry's own run still goes
    jobs = await store.get_jobs(["ran", "failed"])
    assert jobs["ran"].status == JobStatus.SUCCEEDED and jobs["ran"].last_run == succeeded
    assert jobs["failed"].status == JobStatus.QUEUED
    assert await store.due_entries(0, left_over.bucket_ms, NOW + 10, 10) == []  # both handled
