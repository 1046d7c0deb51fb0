"""Validation of API request bodies, and the JSON shapes of responses.

Requests are strict: JSON types are not coerced (``true`` is not an integer, ``"5"`` is not a number), unknown
keys are refused at every level, and every bound of :mod:`libs.limits` is checked, so an accepted definition can
always be stored, scheduled, retried and rendered. :func:`definition_changes` is the one path for submit and
PATCH: both are validated the same way, before anything is appended.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping
from typing import Any, Literal, TypeVar
from urllib.parse import urlsplit

import orjson
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from dsched.libs import limits
from dsched.libs.clock import parse_rfc3339, to_rfc3339
from dsched.libs.models import DeadLetter, HttpTarget, Job, Payload, RetryPolicy, Run
from dsched.libs.schedule import ScheduleError, first_undispatched, next_in_chain, parse_schedule

T = TypeVar("T", str, str | None)

USER_ID = re.compile(r"^[A-Za-z0-9._@:+\-]{1,128}$")
# RFC 9110 token characters: what a header name may contain.
HEADER_NAME = re.compile(r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")
HTTP_METHODS = ("GET", "POST", "PUT", "PATCH", "DELETE", "HEAD")


class RequestError(ValueError):
    """A 400 with a one-line detail."""


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


URL_CACHE_SIZE = 4096  # distinct target URLs whose check is remembered (a batch often repeats one URL)


@functools.lru_cache(maxsize=URL_CACHE_SIZE)
def url_problem(value: str) -> str | None:
    """Why ``value`` is not an acceptable HTTP target URL, or None. Pure, so its answers are cached."""
    if not value.startswith(("http://", "https://")):
        return "must start with http:// or https://"
    if any(c in value for c in "\r\n\t\x00 "):
        return "must not contain whitespace or control characters"
    try:
        parts = urlsplit(value)
        port = parts.port  # raises ValueError for a port out of range
    except ValueError as exc:
        return f"not a valid URL ({exc})"
    if not parts.hostname:
        return "must name a host"
    if port == 0:  # parses, but nothing can ever be connected to on it
        return "not a valid URL (port 0)"
    return None


class HttpSpec(Strict):
    url: str = Field(min_length=1, max_length=4096)
    method: str = "GET"
    headers: dict[str, str] = Field(default_factory=dict)
    body: str | dict[str, Any] | list[Any] | None = None
    timeout_s: float | None = Field(default=None, gt=0, le=3600)

    @field_validator("url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        if (problem := url_problem(value)) is not None:
            raise ValueError(problem)
        return value

    @field_validator("method")
    @classmethod
    def _method(cls, value: str) -> str:
        if value.upper() not in HTTP_METHODS:
            raise ValueError(f"one of {', '.join(HTTP_METHODS)}")
        return value.upper()

    @field_validator("headers")
    @classmethod
    def _headers(cls, value: dict[str, str]) -> dict[str, str]:
        if len(value) > limits.MAX_HTTP_HEADERS:
            raise ValueError(f"at most {limits.MAX_HTTP_HEADERS} headers")
        for name, text in value.items():
            if not HEADER_NAME.match(name):
                raise ValueError(f"{name!r} is not a valid header name")
            if name.lower() in limits.FORBIDDEN_HTTP_HEADERS:
                raise ValueError(f"{name!r} is set by the HTTP client itself (framing or hop-by-hop header)")
            if any(c in text for c in "\r\n\x00"):
                raise ValueError(f"the value of {name!r} contains CR, LF or NUL")
            if len(name) + len(text) > limits.MAX_HTTP_HEADER_BYTES:
                raise ValueError(f"{name!r} is over {limits.MAX_HTTP_HEADER_BYTES} bytes")
        return value


class RetrySpec(Strict):
    """The request form of :class:`libs.models.RetryPolicy`, with the bounds of :mod:`libs.limits`."""

    backoff: Literal["exponential", "linear", "fixed"] | None = None
    initial_s: float | None = Field(default=None, ge=0, le=limits.MAX_RETRY_DELAY_S)
    max_s: float | None = Field(default=None, ge=0, le=limits.MAX_RETRY_DELAY_S)
    multiplier: float | None = Field(default=None, ge=1, le=limits.MAX_RETRY_MULTIPLIER)
    jitter: bool | None = None
    max_age_s: float | None = Field(default=None, gt=0, le=limits.MAX_RETRY_AGE_S)
    retry_on_status: list[int] | None = Field(default=None, max_length=500)

    @field_validator("retry_on_status")
    @classmethod
    def _statuses(cls, value: list[int] | None) -> list[int] | None:
        if value is not None and any(not 100 <= status <= 599 for status in value):
            raise ValueError("HTTP statuses are between 100 and 599")
        return value


class JobFields(Strict):
    """Fields shared by submit and PATCH (PATCH: all optional; ``null`` means "the default")."""

    name: str | None = Field(default=None, max_length=200)
    payload: str | dict[str, Any] | None = None
    next_fire_at: str | None = Field(default=None, max_length=64)
    cron_schedule: str | None = Field(default=None, max_length=200)
    timezone: str | None = Field(default=None, max_length=64)
    max_retries: int | None = Field(default=None, ge=0, le=limits.MAX_RETRIES)
    timeout_s: float | None = Field(default=None, gt=0, le=limits.MAX_TIMEOUT_S)
    retry: RetrySpec | None = None
    execution: Literal["at_least_once", "at_most_once"] | None = None
    priority: int | None = Field(default=None, ge=0, le=100)
    overlap: Literal["allow", "skip", "replace"] | None = None
    misfire: Literal["fire_once", "skip", "fire_all"] | None = None
    max_lateness_s: float | None = Field(default=None, gt=0, le=limits.MAX_LATENESS_S)

    @field_validator("name")
    @classmethod
    def _name(cls, value: str | None) -> str | None:
        return _without_control_characters(value)


class SubmitRequest(JobFields):
    project_id: str = Field(min_length=1, max_length=200)
    payload: str | dict[str, Any]

    @field_validator("project_id")
    @classmethod
    def _project(cls, value: str) -> str:
        return _without_control_characters(value)


_CONTROL_CHARACTER = re.compile("[\x00-\x1f\x7f]")  # C0 controls and DEL


def _without_control_characters(value: T) -> T:
    """A name or project id as given, refused if it holds a control character (NUL, CR, LF, ESC, ...): they end
    up in log lines, CLI tables, listings and partition keys, where none of them means anything."""
    if isinstance(value, str) and _CONTROL_CHARACTER.search(value):
        raise ValueError("control characters (NUL, CR, LF, TAB, ...) are not allowed")
    return value


# Definition fields copied as given (``null`` = the model's default).
PLAIN_FIELDS = ("name", "max_retries", "timeout_s", "execution", "priority", "overlap", "misfire", "max_lateness_s")


def int_param(query: Mapping[str, str], name: str, default: int, low: int, high: int) -> int:
    """An integer query parameter within ``[low, high]`` (``default`` when absent); RequestError otherwise."""
    text = query.get(name)
    if text is None or text == "":
        return default
    try:
        value = int(text)
    except ValueError:
        raise RequestError(f"{name}: not an integer") from None
    if not low <= value <= high:
        raise RequestError(f"{name}: must be between {low} and {high}")
    return value


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
            if (problem := limits.command_problem(command)) is not None:
                raise RequestError(f"payload: {problem}")
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
        body = orjson.dumps(body).decode()
    return Payload(
        kind="http",
        http=HttpTarget(url=spec.url, method=spec.method, headers=spec.headers, body=body, timeout_s=spec.timeout_s),
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
        ms = parse_rfc3339(value)
    except (ValueError, OverflowError) as exc:
        raise RequestError(f"{field}: not an RFC3339 timestamp with an offset ({exc})") from exc
    if not limits.MIN_INSTANT_MS <= ms <= limits.MAX_INSTANT_MS:
        raise RequestError(f"{field}: must be between 1970-01-01T00:00:00Z and 9999-12-31T23:59:59Z")
    return ms


def first_fire(cron: str | None, timezone: str, next_fire_at: str | None, now: int) -> int:
    """When a new or rescheduled job fires first: ``next_fire_at`` (one in the past fires now), else the
    schedule's first occurrence after ``now``, else now."""
    if next_fire_at:
        return parse_time(next_fire_at, "next_fire_at")
    if cron:
        try:
            return parse_schedule(cron, timezone).next_after(now)
        except ScheduleError as exc:
            raise RequestError(f"cron_schedule: {exc}") from exc
    return now


def definition_changes(fields: JobFields, current: Job | None, now: int, default_retry: RetryPolicy) -> dict[str, Any]:
    """The definition fields a submit (``current`` None) or PATCH sets, validated; payloads are parsed but not
    yet offloaded. Raises :class:`RequestError`."""
    given = fields.model_fields_set - {"project_id"}
    changes: dict[str, Any] = {}
    for name in PLAIN_FIELDS:
        if name in given:
            value = getattr(fields, name)
            changes[name] = value if value is not None else Job.model_fields[name].get_default()
    if "retry" in given:
        # A given policy replaces the whole policy; what it leaves out takes the model's defaults.
        spec = fields.retry.model_dump(exclude_none=True) if fields.retry is not None else None
        changes["retry"] = RetryPolicy(**spec) if spec is not None else default_retry
    elif current is None:
        changes["retry"] = default_retry
    if fields.payload is not None:
        changes["payload"] = parse_payload(fields.payload)
    if current is None or {"cron_schedule", "timezone", "next_fire_at"} & given:
        cron = fields.cron_schedule if "cron_schedule" in given or current is None else current.cron_schedule
        timezone = fields.timezone if "timezone" in given or current is None else current.timezone
        timezone = timezone or "UTC"
        check_schedule(cron, timezone)
        changes["cron_schedule"] = cron or None
        changes["timezone"] = timezone
        if current is not None and not cron and not current.recurring and "next_fire_at" not in given:
            # A one-off job stays one-off at its time: a new time zone neither moves it nor runs it again.
            changes["next_fire_ms"] = current.next_fire_ms
        else:
            changes["next_fire_ms"] = first_fire(cron, timezone, fields.next_fire_at, now)
    return changes


def check_definition(job: Job) -> None:
    """Bounds that hold across fields: the first fire and every retry of it stay within the instant range
    (a later occurrence that would not is never scheduled: the schedule ends there)."""
    retry = job.retry
    span_ms = int(job.max_retries * max(retry.max_s, retry.initial_s) * 1000)
    if job.next_fire_ms + span_ms > limits.MAX_INSTANT_MS:
        raise RequestError("next_fire_at: the first fire and its retries must end before 9999-12-31T23:59:59Z")


def definition_key(job: Job) -> dict[str, Any]:
    """A job's definition as the user set it (no version or runtime state): equal keys = the same definition."""
    return job.model_dump(include=set(DEFINITION_FIELDS))


DEFINITION_FIELDS = (
    "project_id",
    "name",
    "payload",
    "cron_schedule",
    "timezone",
    "next_fire_ms",
    "max_retries",
    "timeout_s",
    "retry",
    "execution",
    "priority",
    "overlap",
    "misfire",
    "max_lateness_s",
)


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
    first = first_undispatched(job)
    if first is None or first > now or job.dispatched_through_ms < job.next_fire_ms:
        return first
    try:  # already late: the misfire policy decides about it; show the next one after now
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
