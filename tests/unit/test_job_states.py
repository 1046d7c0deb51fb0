"""One test per transition of the job state machine (libs/job_states.py)."""

from __future__ import annotations

import pytest

from dsched.libs import job_states
from dsched.libs.models import ACCEPTED_VERSION, Job, JobStatus, Payload, RunStatus


def _job(**fields: object) -> Job:
    base: dict[str, object] = dict(
        job_id="j", user_id="u", project_id="p", payload=Payload(kind="echo", text="x"), next_fire_ms=0, created_ms=0
    )
    return Job.model_validate({**base, **fields})


def test_an_accepted_job_not_yet_stored_is_submitted() -> None:
    assert _job(version=ACCEPTED_VERSION).status == JobStatus.SUBMITTED


def test_a_stored_job_without_runtime_status_is_scheduled() -> None:
    assert _job(version=12).status == JobStatus.SCHEDULED


def test_runtime_status_wins_once_written_even_before_the_writer_stored_it() -> None:
    assert _job(version=ACCEPTED_VERSION, state=job_states.rejected()).status == JobStatus.FAILED


def test_dispatch_queues_and_a_run_is_running() -> None:
    assert _job(state=job_states.dispatched()).status == JobStatus.QUEUED
    assert _job(state=job_states.running()).status == JobStatus.RUNNING


@pytest.mark.parametrize(
    ("recurring", "outcome", "retry_coming", "expected"),
    [
        (False, RunStatus.SUCCEEDED, False, JobStatus.SUCCEEDED),
        (False, RunStatus.FAILED, False, JobStatus.FAILED),
        (False, RunStatus.TIMED_OUT, False, JobStatus.FAILED),
        (False, RunStatus.CANCELLED, False, JobStatus.FAILED),
        (False, RunStatus.FAILED, True, JobStatus.SCHEDULED),
        (True, RunStatus.SUCCEEDED, False, JobStatus.SCHEDULED),
        (True, RunStatus.FAILED, False, JobStatus.SCHEDULED),
    ],
)
def test_a_finished_run(recurring: bool, outcome: RunStatus, retry_coming: bool, expected: JobStatus) -> None:
    assert job_states.finished(recurring=recurring, outcome=outcome, retry_coming=retry_coming) == expected


def test_paused_and_deleted_show_over_any_runtime_status() -> None:
    assert _job(paused=True, state=JobStatus.RUNNING).status == JobStatus.PAUSED
    assert _job(deleted=True, paused=True, state=JobStatus.RUNNING).status == JobStatus.DELETED
    assert _job(deleted=True, version=ACCEPTED_VERSION).status == JobStatus.DELETED
