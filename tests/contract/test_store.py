"""The job store contract (:mod:`tests.helpers.store_contract`) on every store backend: ``[<case>-<backend>]``."""

from __future__ import annotations

import pytest

from dsched.libs.store.base import JobStore
from tests.helpers.store_contract import CASES


@pytest.mark.parametrize("case", sorted(CASES))
async def test_store_contract(case: str, store: JobStore) -> None:
    await CASES[case](store)


def test_the_contract_has_its_cases() -> None:
    """Guards the test above against passing vacuously (e.g. a case no longer registered)."""
    assert len(CASES) >= 21 and "put_jobs_then_get_jobs_returns_the_definitions" in CASES
