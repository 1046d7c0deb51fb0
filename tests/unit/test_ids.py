"""Job and run ids: what the API hands out and what the stores key on."""

from __future__ import annotations

import uuid

from dsched.libs.models import job_id_ms, new_job_id, run_id_for, uuid5_text


def test_job_id_is_a_uuid7_that_gives_back_its_creation_time() -> None:
    job_id = new_job_id(1_760_000_000_123)
    assert uuid.UUID(job_id).version == 7
    assert job_id_ms(job_id) == 1_760_000_000_123
    assert job_id_ms("not-a-uuid") is None


def test_run_id_is_deterministic_per_job_occurrence_and_attempt() -> None:
    job_id = new_job_id(1_760_000_000_000)
    run_id = run_id_for(job_id, 1_760_000_060_000, 0)
    parsed = uuid.UUID(run_id)
    assert str(parsed) == run_id
    assert (parsed.version, parsed.variant) == (8, uuid.RFC_4122)
    assert run_id_for(job_id, 1_760_000_060_000, 0) == run_id  # a re-dispatch finds the same run
    others = {
        run_id_for(job_id, 1_760_000_060_000, 1),
        run_id_for(job_id, 1_760_000_120_000, 0),
        run_id_for(new_job_id(1_760_000_000_000), 1_760_000_060_000, 0),
    }
    assert run_id not in others and len(others) == 3


def test_run_ids_sort_by_their_jobs_creation_time() -> None:
    """An ordered store keeps a job's runs together and a burst's run records side by side."""
    jobs = [new_job_id(1_760_000_000_000 + i) for i in range(200)]
    run_ids = {run_id_for(job_id, 1_760_000_500_000, attempt): job_id for job_id in jobs for attempt in (0, 1, 2)}
    assert [run_ids[r] for r in sorted(run_ids)] == [job_id for job_id in jobs for _ in range(3)]


def test_run_id_of_a_job_id_that_is_not_a_uuid() -> None:
    run_id = run_id_for("nightly-report", 1_760_000_000_000, 0)
    assert uuid.UUID(run_id).version == 8
    assert run_id == run_id_for("nightly-report", 1_760_000_000_000, 0)
    assert run_id != run_id_for("nightly-report", 1_760_000_000_000, 1)


def test_uuid5_text_is_the_standard_uuid5() -> None:
    """The worker's per-run ``Idempotency-Key`` header: targets that stored one must keep seeing the same key."""
    namespace = uuid.UUID("0f6f3f1c-9a8e-4a51-8c0b-6f7b2f4f9d11")
    names = ["", "a", new_job_id(1_760_000_000_000) + "/1760000060000", "é/ünïcode/" + "x" * 300]
    for name in names:
        assert uuid5_text(namespace, name) == str(uuid.uuid5(namespace, name))
