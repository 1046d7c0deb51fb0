"""The data every service and backend shares.

Times inside the system are integer epoch milliseconds (``*_ms``); RFC3339 appears only at the HTTP edge.
Models are pydantic so that decoding a queue message or a log record validates it.
"""

from __future__ import annotations

import contextlib
import hashlib
import uuid
from enum import StrEnum
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from dsched.libs.clock import decision_us
from dsched.libs.entropy import random_bytes

# Why a time-bucket entry / queue message exists: a schedule occurrence, a retry, a manual trigger or a replay.
EntryKind = Literal["schedule", "retry", "trigger", "replay"]
ACCEPTED_VERSION = -1  # Job.version of a job accepted by ingestion and not yet stored by the writer
RUN_NAMESPACE = uuid.UUID("5b0c6f0e-6a53-4d4f-9a39-7f2d1c1e0d5a")


class JobStatus(StrEnum):
    SUBMITTED = "submitted"  # accepted (durable in the log), not yet stored by the writer
    SCHEDULED = "scheduled"  # waiting for its next occurrence
    QUEUED = "queued"  # handed to the work queue
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"  # retries used up; dead-lettered
    PAUSED = "paused"
    DELETED = "deleted"


class RunStatus(StrEnum):
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    TIMED_OUT = "timed_out"
    SKIPPED = "skipped"  # an occurrence deliberately not run (misfire, overlap, paused, duplicate delivery)
    CANCELLED = "cancelled"


FINISHED_RUN_STATUSES = frozenset(
    {RunStatus.SUCCEEDED, RunStatus.FAILED, RunStatus.TIMED_OUT, RunStatus.SKIPPED, RunStatus.CANCELLED}
)


class Model(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=False)


class RetryPolicy(Model):
    backoff: Literal["exponential", "linear", "fixed"] = "exponential"
    initial_s: float = Field(default=1.0, ge=0)
    max_s: float = Field(default=300.0, ge=0)
    multiplier: float = Field(default=2.0, ge=1)
    jitter: bool = True
    max_age_s: float | None = Field(default=None, gt=0)  # stop retrying this long after the scheduled time
    retry_on_status: list[int] | None = None  # HTTP statuses worth a retry; None = 5xx, 429 (+ network errors)


class HttpTarget(Model):
    url: str
    method: str = "GET"
    headers: dict[str, str] = Field(default_factory=dict)
    body: str | None = None
    timeout_s: float | None = None


class Payload(Model):
    """What a run does. ``blob_key`` set means the content lives in the blob store (it was over the offload size)."""

    kind: Literal["cmd", "echo", "http"]
    text: str | None = None  # command line for cmd, the echoed text for echo
    http: HttpTarget | None = None
    blob_key: str | None = None
    size: int | None = None  # bytes in the blob store when ``blob_key`` is set (tenant stored-bytes quota)


class LastRun(Model):
    run_id: str
    status: RunStatus
    attempt: int
    scheduled_ms: int
    finished_ms: int | None = None


class Job(Model):
    """A job's definition (written by the writer from the log) plus its runtime state (picker/worker).

    ``version`` is the log offset of the definition's latest change; queue entries carry the version they
    were created for, and a ``schedule`` entry of an older version is dropped by the picker. ``ACCEPTED_VERSION``
    (-1) marks the row ingestion writes before it appends a new job, so the job is readable at once; the writer
    replaces it with the logged definition.
    """

    job_id: str
    user_id: str
    project_id: str
    name: str = ""
    payload: Payload
    cron_schedule: str | None = None
    timezone: str = "UTC"
    next_fire_ms: int
    max_retries: int = 3
    timeout_s: float = 90.0
    retry: RetryPolicy = Field(default_factory=RetryPolicy)
    execution: Literal["at_least_once", "at_most_once"] = "at_least_once"
    priority: int = Field(default=50, ge=0, le=100)
    overlap: Literal["allow", "skip", "replace"] = "allow"
    misfire: Literal["fire_once", "skip", "fire_all"] = "fire_once"
    max_lateness_s: float | None = None
    created_ms: int
    # sha256 of the submit request when it carried an Idempotency-Key: a retry with another body is refused.
    submit_digest: str | None = None
    # W3C trace context of the hop that last handled this definition (see libs.tracing); None while tracing is off.
    traceparent: str | None = None
    version: int = 0
    paused: bool = False
    deleted: bool = False
    # Runtime state. Never written by the writer, so a log replay cannot reset it.
    state: JobStatus | None = None
    last_run: LastRun | None = None
    dispatched_through_ms: int = -1  # scheduled time of the last occurrence handed to the work queue
    # The latest decision time (libs.clock.decision_us) among the runtime state fields as read; 0 if none.
    state_at_us: int = 0

    @property
    def status(self) -> JobStatus:
        """What the user sees (:func:`libs.job_states.status_of`)."""
        from dsched.libs.job_states import status_of  # the state machine imports this module

        return status_of(self)

    @property
    def recurring(self) -> bool:
        return bool(self.cron_schedule)


class JobState(Model):
    """A runtime-state update of one job (idempotent column writes).

    ``at_us`` is when it was decided (:func:`libs.clock.decision_us`, by default when it is built): per field,
    the store keeps the value decided last, whatever order the writes arrive in."""

    job_id: str
    state: JobStatus | None = None
    last_run: LastRun | None = None
    dispatched_through_ms: int | None = None
    at_us: int = Field(default_factory=decision_us)


class BucketEntry(Model):
    """One pending firing in the sharded time-bucket table ``job_queue``.

    Primary key: partition ``(shard, bucket_ms)``, clustering ``(due_ms, job_id, scheduled_ms, attempt)``.
    ``scheduled_ms`` is the occurrence being fired; ``due_ms`` is when (later than scheduled for a retry).
    """

    shard: int
    bucket_ms: int
    due_ms: int
    job_id: str
    scheduled_ms: int
    attempt: int = 0
    kind: EntryKind = "schedule"
    version: int = 0
    priority: int = 50

    @property
    def key(self) -> tuple[int, int, int, str, int, int]:
        return (self.shard, self.bucket_ms, self.due_ms, self.job_id, self.scheduled_ms, self.attempt)


class Run(Model):
    """One attempt of one occurrence. ``run_id`` is deterministic: see :func:`run_id_for`."""

    run_id: str
    job_id: str
    user_id: str
    scheduled_ms: int
    attempt: int
    status: RunStatus
    due_ms: int | None = None
    started_ms: int | None = None
    finished_ms: int | None = None
    worker_id: str | None = None
    exit_code: int | None = None
    http_status: int | None = None
    output: str | None = None
    output_ref: str | None = None  # blob key when the output was too large to keep inline (the full output)
    output_capped: bool = False  # the run produced more than DSCHED_OUTPUT_CAP_BYTES; the rest was discarded
    error: str | None = None


class RunOrder(Model):
    """The body of a work-queue message: the picker's order to a worker to run one attempt of one occurrence, with
    everything the worker needs. Not the :class:`Run` record the store keeps of that attempt; held in variables named
    ``order``. The JSON field names are the wire format (messages already queued must still decode): keep them."""

    run_id: str
    job: Job
    scheduled_ms: int
    attempt: int
    due_ms: int
    kind: EntryKind = "schedule"
    dispatched_ms: int = 0
    # The decision time of the picker's "queued" write (libs.clock.decision_us): the worker's writes of this run's
    # state are decided after it. 0 in orders from before this field.
    decided_us: int = 0
    traceparent: str | None = None  # the picker's dispatch span (libs.tracing); None while tracing is off


class DeadLetter(Model):
    dead_letter_id: str  # the run_id of the last failed attempt
    job_id: str
    user_id: str
    project_id: str
    scheduled_ms: int
    attempts: int
    error: str | None
    dead_ms: int


class Submission(Model):
    """A log record: a job definition change. ``op`` says what happened; ``job`` is the full new definition."""

    op: Literal["submit", "update", "pause", "resume", "delete", "trigger", "replay"]
    job: Job
    at_ms: int  # when ingestion accepted it; used for trigger/replay occurrence times (deterministic on replay)
    attempt: int = 0


def run_id_for(job_id: str, scheduled_ms: int, attempt: int) -> str:
    """Deterministic run id: re-dispatching the same occurrence and attempt can never create a second run.

    A UUIDv8 (RFC 9562): the first 64 bits are those of the job id (a :func:`new_job_id`, so its creation time
    first; a SHA-1 of any other id), the last 62 a SHA-1 of (job id, occurrence, attempt). The runs of one job sort
    together and a burst's run records land next to each other in an ordered store (one page per few dozen runs,
    where a random id dirtied a page per run: 15-24 µs more per insert, measured on the embedded store).
    """
    head = _id_head(job_id)
    digest = hashlib.sha1(RUN_NAMESPACE.bytes + f"{job_id}/{scheduled_ms}/{attempt}".encode()).digest()
    tail = 0b10 << 62 | int.from_bytes(digest[:8], "big") & (2**62 - 1)
    return _uuid_text((head & ~0xF000 | 0x8000) << 64 | tail)


def _id_head(job_id: str) -> int:
    """The first 64 bits of a UUID-shaped ``job_id``, else of its SHA-1."""
    if len(job_id) == 36 and job_id[8] == job_id[13] == job_id[18] == "-":
        with contextlib.suppress(ValueError):
            return int(job_id[:8] + job_id[9:13] + job_id[14:18], 16)
    return int.from_bytes(hashlib.sha1(job_id.encode()).digest()[:8], "big")


def new_job_id(now_ms: int) -> str:
    """A UUIDv7 (RFC 9562): 48 bits of ``now_ms``, then random bits. Job ids sort by creation time, and the
    creation time can be read back (:func:`job_id_ms`): a retried idempotent submit rebuilds the first attempt's
    definition exactly from it."""
    rand = int.from_bytes(random_bytes(10), "big")
    value = (now_ms & 0xFFFF_FFFF_FFFF) << 80 | 0x7 << 76 | (rand >> 68 & 0xFFF) << 64 | 0b10 << 62 | rand & (2**62 - 1)
    return _uuid_text(value)


def uuid5_text(namespace: uuid.UUID, name: str) -> str:
    """``str(uuid.uuid5(namespace, name))`` without building the object (the worker derives one per run)."""
    value = int.from_bytes(hashlib.sha1(namespace.bytes + name.encode()).digest()[:16], "big")
    value = (value & ~(0xC000 << 48)) | 0x8000 << 48  # the RFC 4122 variant
    value = (value & ~(0xF000 << 64)) | 5 << 76  # version 5
    return _uuid_text(value)


def _uuid_text(value: int) -> str:
    """``str(uuid.UUID(int=value))`` without building the object."""
    text = f"{value:032x}"
    return f"{text[:8]}-{text[8:12]}-{text[12:16]}-{text[16:20]}-{text[20:]}"


def job_id_ms(job_id: str) -> int | None:
    """The creation time inside a :func:`new_job_id` id (None for other ids)."""
    try:
        parsed = uuid.UUID(job_id)
    except ValueError:
        return None
    return parsed.int >> 80 if parsed.version == 7 else None
