"""Payload parsing and submit validation (what a bad request is told)."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from dsched.ingestion.requests import RequestError, SubmitRequest, check_schedule, next_fire, parse_payload, parse_time
from dsched.libs.models import Job, Payload


def test_cmd_prefix_makes_a_command_job() -> None:
    assert parse_payload("cmd:echo hi") == Payload(kind="cmd", text="echo hi")
    assert parse_payload("cmd:  ls -l ") == Payload(kind="cmd", text="ls -l")


def test_any_other_string_is_an_echo_job() -> None:
    assert parse_payload("hello cmd:") == Payload(kind="echo", text="hello cmd:")
    assert parse_payload("") == Payload(kind="echo", text="")


def test_http_object_defaults_and_json_body() -> None:
    payload = parse_payload({"http": {"url": "https://example.com/x", "body": {"a": [1, 2]}}})
    assert payload.kind == "http" and payload.http is not None
    assert payload.http.method == "GET"
    assert payload.http.body == '{"a":[1,2]}'
    assert parse_payload({"http": {"url": "http://h/", "method": "post"}}).http.method == "POST"  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("value", "fragment"),
    [
        ("cmd:", "needs a command"),
        ({"url": "http://x"}, '{"http"'),
        ({"http": {"url": "ftp://x"}}, "payload.http: url"),
        ({"http": {"url": "http://x", "method": "BREW"}}, "payload.http: method"),
        ({"http": {"url": "http://x", "timeout_s": 0}}, "timeout_s"),
        ({"http": {"url": "http://x", "unknown": 1}}, "unknown"),
    ],
)
def test_bad_payloads_say_what_is_wrong(value: object, fragment: str) -> None:
    with pytest.raises(RequestError, match=None) as err:
        parse_payload(value)  # type: ignore[arg-type]
    assert fragment in str(err.value)


def test_submit_requires_project_and_payload_and_bounds_numbers() -> None:
    with pytest.raises(ValidationError):
        SubmitRequest.model_validate({"payload": "x"})
    with pytest.raises(ValidationError):
        SubmitRequest.model_validate({"project_id": "p"})
    with pytest.raises(ValidationError):
        SubmitRequest.model_validate({"project_id": "p", "payload": "x", "max_retries": -1})
    with pytest.raises(ValidationError):
        SubmitRequest.model_validate({"project_id": "p", "payload": "x", "priority": 101})
    with pytest.raises(ValidationError):
        SubmitRequest.model_validate({"project_id": "p", "payload": "x", "execution": "exactly_once"})
    ok = SubmitRequest.model_validate({"project_id": "p", "payload": "x", "cron_schedule": "@every 5m"})
    assert ok.cron_schedule == "@every 5m"


def test_schedule_and_timezone_errors_name_the_field() -> None:
    with pytest.raises(RequestError, match="cron_schedule"):
        check_schedule("61 * * * *", "UTC")
    with pytest.raises(RequestError, match="timezone"):
        check_schedule(None, "Mars/Olympus")
    check_schedule("0 30 9 * * MON-FRI", "Europe/Berlin")


def test_timestamps_need_an_offset() -> None:
    assert parse_time("2030-01-01T00:00:00Z", "next_fire_at") == 1_893_456_000_000
    assert parse_time("2030-01-01T01:00:00+01:00", "next_fire_at") == 1_893_456_000_000
    with pytest.raises(RequestError, match="next_fire_at"):
        parse_time("2030-01-01T00:00:00", "next_fire_at")


def _job(**kw: object) -> Job:
    base: dict[str, object] = dict(
        job_id="j",
        user_id="u",
        project_id="p",
        payload=Payload(kind="echo", text=""),
        next_fire_ms=10_000,
        created_ms=0,
    )
    base.update(kw)
    return Job.model_validate(base)


def test_next_fire_follows_the_chain_of_every_jobs() -> None:
    assert next_fire(_job(), now=0) == 10_000
    assert next_fire(_job(dispatched_through_ms=10_000), now=11_000) is None  # one-off, already fired
    job = _job(cron_schedule="@every 1h", next_fire_ms=0, dispatched_through_ms=0)
    assert next_fire(job, now=1_800_000) == 3_600_000  # not now + 1 h
    assert next_fire(_job(paused=True), now=0) is None
