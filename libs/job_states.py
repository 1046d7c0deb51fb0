"""The job state machine: which status a job shows, and every transition of its runtime status, in one place.

A job's status combines its definition flags (written through the log) with its runtime status (written by the
picker and the worker straight to the store, never by the writer, so replaying the log cannot undo progress):

=============  ==========================  ==========================================================================
status         set by                      when
=============  ==========================  ==========================================================================
``submitted``  ingestion (accepted row)    accepted and durable in the log; the writer has not stored it yet
``scheduled``  writer (no runtime status)  stored, waiting for its next occurrence
``queued``     picker: :func:`dispatched`  an occurrence was handed to the work queue
``running``    worker: :func:`running`     a run has been running for a moment (short runs skip this)
``succeeded``  worker: :func:`finished`    a one-off job's run succeeded
``failed``     worker: :func:`finished`    a one-off job's last attempt failed, timed out or was cancelled
``failed``     writer: :func:`rejected`    its submission could not be stored (a poison record)
``scheduled``  worker: :func:`finished`    a recurring job's run ended (any outcome), or a retry is coming
``paused``     definition flag             paused through the API (shown over any runtime status)
``deleted``    definition flag             deleted through the API (shown over everything)
=============  ==========================  ==========================================================================

Transitions are idempotent column writes: applying one twice (a redelivered message, a replayed batch) leaves the
same status. Each carries when it was decided (``JobState.at_us``, :func:`libs.clock.decision_us`), and the store
keeps, per field, the value decided last rather than the one that arrived last: the picker's "queued" is decided
when it read the job, a worker's writes after the dispatch they answer. So a write held up in flight (a frozen
picker, a retried request) or based on a read from before the run's outcome cannot set a finished job back.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from dsched.libs.clock import decision_us
from dsched.libs.models import ACCEPTED_VERSION, JobState, JobStatus, RunStatus

if TYPE_CHECKING:
    from dsched.libs.models import Job, LastRun, RunOrder


def status_of(job: Job) -> JobStatus:
    """What the user sees: deleted, then paused, then submitted (not stored yet), then the runtime status."""
    if job.deleted:
        return JobStatus.DELETED
    if job.paused:
        return JobStatus.PAUSED
    if job.state is None and job.version == ACCEPTED_VERSION:
        return JobStatus.SUBMITTED
    return job.state or JobStatus.SCHEDULED


def dispatched() -> JobStatus:
    """An occurrence (or a retry, trigger or replay) went to the work queue."""
    return JobStatus.QUEUED


def running() -> JobStatus:
    """A run of the job is executing."""
    return JobStatus.RUNNING


def finished(*, recurring: bool, outcome: RunStatus, retry_coming: bool) -> JobStatus:
    """A run ended with ``outcome``; ``retry_coming``: another attempt of the same occurrence is scheduled."""
    if recurring or retry_coming:
        return JobStatus.SCHEDULED
    return JobStatus.SUCCEEDED if outcome == RunStatus.SUCCEEDED else JobStatus.FAILED


def of_run(order: RunOrder, state: JobStatus, last_run: LastRun) -> JobState:
    """A worker's write of ``state`` for the run ``order`` asks for: decided after the dispatch it answers (the
    order carries when), whatever the clocks say."""
    return JobState(job_id=order.job.job_id, state=state, last_run=last_run, at_us=decision_us(after=order.decided_us))


def rejected() -> JobStatus:
    """The writer parked the job's submission: it will never run."""
    return JobStatus.FAILED
