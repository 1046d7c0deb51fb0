"""Validation of API request bodies, and the JSON shapes of responses."""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from libs.clock import parse_rfc3339, to_rfc3339
from libs.models import DeadLetter, HttpTarget, Job, Payload, RetryPolicy, Run
from libs.schedule import ScheduleError, next_in_chain, parse_schedule

USER_ID = re.compile(r"^[A-Za-z0-9._@:+\-]{1,128}$")


class RequestError(ValueError):
    """A 400 with a one-line detail."""


class HttpSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    url: str = Field(min_length=1, max_length=4096)
    method: Literal[
        "GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "get", "post", "put", "patch", "delete", "head"
    ] = "GET"
    headers: dict[str, str] = Field(default_factory=dict)
    body: str | dict[str, Any] | list[Any] | None = None
    timeout_s: float | None = Field(default=None, gt=0, le=3600)

    @field_validator("url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        if not value.startswith(("http://", "https://")):
            raise ValueError("must start with http:// or https://")
        return value


class JobFields(BaseModel):
    """Fields shared by submit and PATCH (PATCH: all optional)."""

    model_config = ConfigDict(extra="forbid")
    name: str | None = Field(default=None, max_length=200)
    payload: str | dict[str, Any] | None = None
    next_fire_at: str | None = None
    cron_schedule: str | None = Field(default=None, max_length=200)
    timezone: str | None = None
    max_retries: int | None = Field(default=None, ge=0, le=100)
    timeout_s: float | None = Field(default=None, gt=0, le=86400)
    retry: RetryPolicy | None = None
    execution: Literal["at_least_once", "at_most_once"] | None = None
    priority: int | None = Field(default=None, ge=0, le=100)
    overlap: Literal["allow", "skip", "replace"] | None = None
    misfire: Literal["fire_once", "skip", "fire_all"] | None = None
    max_lateness_s: float | None = Field(default=None, gt=0)


class SubmitRequest(JobFields):
    project_id: str = Field(min_length=1, max_length=200)
    payload: str | dict[str, Any]


def pydantic_detail(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors()[:5]:
        where = ".".join(str(p) for p in err["loc"]) or "body"
        parts.append(f"{where}: {err['msg']}")
    return "; ".join(parts)


def parse_payload(value: str | dict[str, Any]) -> Payload:
    if isinstance(value, str):
        if value.startswith("cmd:"):
            command = value[4:].strip()
            if not command:
                raise RequestError("payload: 'cmd:' needs a command after the prefix")
            return Payload(kind="cmd", text=command)
        return Payload(kind="echo", text=value)
    if set(value) != {"http"} or not isinstance(value["http"], dict):
        raise RequestError('payload: an object payload must be {"http": {"url": ..., ...}}')
    try:
        spec = HttpSpec.model_validate(value["http"])
    except ValidationError as exc:
        raise RequestError("payload.http: " + pydantic_detail(exc)) from exc
    body = spec.body
    if body is not None and not isinstance(body, str):
        import orjson

        body = orjson.dumps(body).decode()
    return Payload(
        kind="http",
        http=HttpTarget(
            url=spec.url,
            method=spec.method.upper(),
            headers=spec.headers,
            body=body,
            timeout_s=spec.timeout_s,
        ),
    )


def check_schedule(cron: str | None, timezone: str) -> None:
    try:
        if cron:
            parse_schedule(cron, timezone)
        else:
            parse_schedule("@every 1h", timezone)  # validates the timezone alone
    except ScheduleError as exc:
        raise RequestError(f"{'cron_schedule' if cron else 'timezone'}: {exc}") from exc


def parse_time(value: str, field: str) -> int:
    try:
        return parse_rfc3339(value)
    except ValueError as exc:
        raise RequestError(f"{field}: not an RFC3339 timestamp ({exc})") from exc


def job_view(job: Job, now: int) -> dict[str, Any]:
    payload: dict[str, Any] = {"kind": job.payload.kind}
    if job.payload.blob_key:
        payload["offloaded"] = True
    elif job.payload.kind == "http" and job.payload.http is not None:
        payload["http"] = job.payload.http.model_dump()
    else:
        payload["text"] = job.payload.text
    last_run = None
    if job.last_run is not None:
        last_run = {
            "run_id": job.last_run.run_id,
            "status": job.last_run.status.value,
            "attempt": job.last_run.attempt,
            "scheduled_for": to_rfc3339(job.last_run.scheduled_ms),
            "finished_at": to_rfc3339(job.last_run.finished_ms),
        }
    return {
        "job_id": job.job_id,
        "user_id": job.user_id,
        "project_id": job.project_id,
        "name": job.name,
        "payload": payload,
        "cron_schedule": job.cron_schedule,
        "timezone": job.timezone,
        "next_fire_at": to_rfc3339(next_fire(job, now)),
        "max_retries": job.max_retries,
        "timeout_s": job.timeout_s,
        "retry": job.retry.model_dump(),
        "execution": job.execution,
        "priority": job.priority,
        "overlap": job.overlap,
        "misfire": job.misfire,
        "max_lateness_s": job.max_lateness_s,
        "status": job.status.value,
        "created_at": to_rfc3339(job.created_ms),
        "last_run": last_run,
    }


def next_fire(job: Job, now: int) -> int | None:
    """The next occurrence the user can expect (derived: the store keeps the definition's first fire time)."""
    if job.deleted or job.paused:
        return None
    if job.dispatched_through_ms < job.next_fire_ms:
        return job.next_fire_ms
    if not job.recurring:
        return None
    try:
        return next_in_chain(parse_schedule(job.cron_schedule or "", job.timezone), job.dispatched_through_ms, now)
    except ScheduleError:
        return None


def run_view(run: Run) -> dict[str, Any]:
    return {
        "run_id": run.run_id,
        "job_id": run.job_id,
        "attempt": run.attempt,
        "status": run.status.value,
        "scheduled_for": to_rfc3339(run.scheduled_ms),
        "due_at": to_rfc3339(run.due_ms),
        "started_at": to_rfc3339(run.started_ms),
        "finished_at": to_rfc3339(run.finished_ms),
        "worker_id": run.worker_id,
        "exit_code": run.exit_code,
        "http_status": run.http_status,
        "output": run.output,
        # output_stored: ``output`` is only the start; the whole output is in the blob store, served by
        # GET /runs/{id}/output. output_truncated is its old name (same value, kept for compatibility).
        # output_capped: the run produced more than DSCHED_OUTPUT_CAP_BYTES and the rest was discarded.
        "output_stored": run.output_ref is not None,
        "output_truncated": run.output_ref is not None,
        "output_capped": run.output_capped,
        "error": run.error,
    }


def dead_letter_view(letter: DeadLetter) -> dict[str, Any]:
    return {
        "id": letter.dead_letter_id,
        "job_id": letter.job_id,
        "project_id": letter.project_id,
        "scheduled_for": to_rfc3339(letter.scheduled_ms),
        "attempts": letter.attempts,
        "error": letter.error,
        "dead_at": to_rfc3339(letter.dead_ms),
    }
