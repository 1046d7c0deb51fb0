"""Every job store keeps a run's output flags: ``output_ref`` (stored as a blob) and ``output_capped``."""

from __future__ import annotations

import uuid

from dsched.libs.clock import now_ms
from dsched.libs.models import Run, RunStatus
from dsched.libs.store.base import JobStore


async def test_output_capped_and_output_ref_round_trip(store: JobStore) -> None:
    now = now_ms()
    job_id = str(uuid.uuid4())
    capped = Run(
        run_id=str(uuid.uuid4()),
        job_id=job_id,
        user_id="u",
        scheduled_ms=now,
        attempt=0,
        status=RunStatus.SUCCEEDED,
        output="x" * 10,
        output_ref="outputs/r",
        output_capped=True,
    )
    plain = capped.model_copy(update={"run_id": str(uuid.uuid4()), "attempt": 1, "output_ref": None})
    plain.output_capped = False
    await store.put_runs([capped, plain])
    got = await store.get_runs([capped.run_id, plain.run_id])
    assert (got[capped.run_id].output_capped, got[capped.run_id].output_ref) == (True, "outputs/r")
    assert (got[plain.run_id].output_capped, got[plain.run_id].output_ref) == (False, None)
    listed, _ = await store.list_runs(job_id, 10)
    assert {r.run_id: r.output_capped for r in listed} == {capped.run_id: True, plain.run_id: False}
