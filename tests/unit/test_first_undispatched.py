"""The one rule for "what comes next" (picker chain, resume/PATCH continuation, the next fire time shown)."""

from __future__ import annotations

from dsched.libs.models import Job, Payload
from dsched.libs.schedule import first_undispatched


def _job(**fields: object) -> Job:
    base: dict[str, object] = dict(
        job_id="j",
        user_id="u",
        project_id="p",
        payload=Payload(kind="echo", text="x"),
        next_fire_ms=60_000,
        created_ms=0,
    )
    return Job.model_validate({**base, **fields})


def test_the_first_fire_until_it_was_dispatched() -> None:
    assert first_undispatched(_job()) == 60_000
    assert first_undispatched(_job(cron_schedule="@every 10s", dispatched_through_ms=59_999)) == 60_000


def test_a_one_off_already_dispatched_has_no_next() -> None:
    assert first_undispatched(_job(dispatched_through_ms=60_000)) is None


def test_a_recurring_job_continues_after_the_last_dispatched_occurrence_even_if_late() -> None:
    job = _job(cron_schedule="@every 10s", dispatched_through_ms=80_000)
    assert first_undispatched(job) == 90_000  # not re-anchored on "now"
    cron = _job(cron_schedule="*/15 * * * * *", dispatched_through_ms=75_000)
    assert first_undispatched(cron) == 90_000


def test_a_schedule_that_ended_or_no_longer_parses_has_no_next() -> None:
    assert first_undispatched(_job(cron_schedule="@every 1h", dispatched_through_ms=253_402_300_000_000)) is None
    assert first_undispatched(_job(cron_schedule="not a schedule", dispatched_through_ms=60_000)) is None
