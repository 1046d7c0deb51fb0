"""Issue 9: schemathesis against the served OpenAPI document.

Every operation of ``GET /openapi.json`` gets requests generated from its description, schema-valid (positive)
and schema-invalid (negative), and every answer must: not be a 5xx, have a status the document lists for that
operation, have the content type the document lists for that status, and match the document's response schema.
Bounded: a fixed seed and ``MAX_EXAMPLES`` per operation and mode (``DSCHED_FUZZ_SEED`` and
``DSCHED_FUZZ_EXAMPLES`` override them for a longer hunt).

The services run without a worker, so nothing a generated job says is ever executed; ingestion, writer,
coordinator and picker are the real ones, on embedded backends, on 127.0.0.1.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import hypothesis
import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from dsched.ingestion import console
from dsched.ingestion.openapi import spec
from tests.helpers.fuzz_server import FuzzServer, fuzz_server

SEED = int(os.environ.get("DSCHED_FUZZ_SEED", "20261130"))
MAX_EXAMPLES = int(os.environ.get("DSCHED_FUZZ_EXAMPLES", "12"))
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]
USER = "fuzzer"
HTTP_TIMEOUT_S = 10.0

OPERATIONS = sorted(
    (method.upper(), path) for path, ops in spec()["paths"].items() for method in ops if method != "parameters"
)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FuzzServer]:
    saved = console.EVENTS_MAX_S, console.EVENTS_POLL_S
    # An event stream answers its first events, then ends: a whole response to validate.
    console.EVENTS_MAX_S, console.EVENTS_POLL_S = 0.2, 0.05
    try:
        tmp: Path = tmp_path_factory.mktemp("fuzz-api")
        with fuzz_server(tmp, ["ingestion", "writer", "coordinator", "picker"]) as running:
            yield running
    finally:
        console.EVENTS_MAX_S, console.EVENTS_POLL_S = saved


@pytest.fixture(scope="module")
def known(server: FuzzServer) -> dict[str, str]:
    """Ids that exist for the fuzzing user, so path parameters sometimes name a real job."""
    with requests.Session() as session:
        response = session.post(
            server.base + "/submit",
            json={"project_id": "fuzz", "payload": "hello", "cron_schedule": "@every 1h"},
            headers={"X-User-ID": USER},
            timeout=HTTP_TIMEOUT_S,
        )
        assert response.status_code == 202, response.text
        return {"job_id": response.json()["job_id"]}


@pytest.fixture(scope="module")
def schema(server: FuzzServer) -> Any:
    document = requests.get(server.base + "/openapi.json", timeout=HTTP_TIMEOUT_S).json()
    return schemathesis.openapi.from_dict(document)


def _real_ids(case: Any, known: dict[str, str]) -> None:
    """Half of the generated ``job_id`` path parameters (by a hash of the value: deterministic) become the
    id of a real job, and a valid user is sent unless the case generated its own."""
    params = case.path_parameters or {}
    for name, value in known.items():
        if name in params and hashlib.sha256(str(params[name]).encode()).digest()[0] % 2 == 0:
            params[name] = value


@pytest.mark.parametrize(("method", "path"), OPERATIONS, ids=[f"{m} {p}" for m, p in OPERATIONS])
def test_operation_conforms_to_the_document(
    method: str, path: str, server: FuzzServer, schema: Any, known: dict[str, str]
) -> None:
    operation = schema[path][method]
    strategy = st.one_of(
        operation.as_strategy(generation_mode=GenerationMode.POSITIVE),
        operation.as_strategy(generation_mode=GenerationMode.NEGATIVE),
    )
    session = requests.Session()

    @hypothesis.seed(SEED)
    @settings(
        max_examples=MAX_EXAMPLES * 2,
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
        derandomize=False,
        phases=[hypothesis.Phase.explicit, hypothesis.Phase.generate],
    )
    @given(case=strategy)
    def fuzz(case: Any) -> None:
        _real_ids(case, known)
        headers = {} if "X-User-ID" in (case.headers or {}) else {"X-User-ID": USER}
        case.call_and_validate(
            base_url=server.base, session=session, headers=headers, checks=CHECKS, timeout=HTTP_TIMEOUT_S
        )

    try:
        fuzz()
    finally:
        session.close()


def test_a_deep_link_with_an_encoded_newline_serves_the_dashboard(server: FuzzServer) -> None:
    """Found by the fuzzer: ``/ui/{path}`` was a 404 for a path holding a newline (the route's ``.*``)."""
    response = requests.get(server.base + "/ui/jobs%0Aabc", timeout=HTTP_TIMEOUT_S)
    assert response.status_code == 200
    assert response.headers["Content-Type"].startswith("text/html")
