"""A ``cmd:`` that can never run, if one reaches a worker anyway (the API refuses it first), is a failed run with
a clear reason and a dead letter — never an exception, never a message left in the queue."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from dsched.app.backends import Backends
from dsched.libs.clock import now_ms
from dsched.libs.limits import MAX_COMMAND_BYTES
from dsched.libs.models import Job, JobStatus, Payload, RunOrder, RunStatus, run_id_for
from dsched.libs.queue.base import OutgoingMessage
from dsched.libs.settings import Settings
from dsched.worker.service import Worker


@pytest.fixture
async def setup(tmp_path: Path) -> AsyncIterator[tuple[Backends, Worker]]:
    settings = Settings.from_env(data_dir=tmp_path, allow_cmd=True, max_receives=2)
    async with Backends.open(settings, {"store", "queue", "blobs"}) as backends:
        assert backends.queue and backends.store and backends.blobs
        worker = Worker(queue=backends.queue, store=backends.store, blobs=backends.blobs, settings=settings)
        async with worker.open() as running:
            yield backends, running


@pytest.mark.parametrize(
    ("command", "reason"),
    [("echo " + "x" * MAX_COMMAND_BYTES, "MAX_ARG_STRLEN"), ("echo a\x00b", "NUL")],
    ids=["too-long", "nul"],
)
async def test_an_unrunnable_command_is_a_failed_run_and_a_dead_letter(
    setup: tuple[Backends, Worker], command: str, reason: str
) -> None:
    backends, worker = setup
    assert backends.store and backends.queue
    now = now_ms()
    job = Job(
        job_id=str(uuid.uuid4()),
        user_id="owner",
        project_id="p",
        payload=Payload(kind="cmd", text=command),
        next_fire_ms=now,
        created_ms=now,
        max_retries=3,  # not retried all the same: retrying cannot fix it
    )
    await backends.store.put_jobs([job])
    run_id = run_id_for(job.job_id, now, 0)
    message = RunOrder(run_id=run_id, job=job, scheduled_ms=now, attempt=0, due_ms=now)
    await backends.queue.send([OutgoingMessage(message.model_dump_json().encode())])
    assert await worker.drain() == 1
    run = (await backends.store.get_runs([run_id]))[run_id]
    assert run.status == RunStatus.FAILED
    assert (run.error or "").startswith("command refused:") and reason in (run.error or "")
    letters, _ = await backends.store.list_dead_letters("owner", 10)
    assert [letter.dead_letter_id for letter in letters] == [run_id]
    assert (await backends.store.get_jobs([job.job_id]))[job.job_id].status == JobStatus.FAILED
    counts = await backends.queue.counts()
    assert (counts.visible, counts.in_flight, counts.dead) == (0, 0, 0)
