"""Issue 9: random schema-valid submissions through ingestion, writer, picker and worker.

Submit bodies are drawn from the served OpenAPI document's ``POST /submit`` schema (schemathesis), with some
fields pushed towards plausible edges (schedules, zones, instants near 1970 and 9999, retry policies) so that
many are accepted, and each accepted job is then changed with a PATCH drawn from ``PATCH /jobs/{job_id}``. Every
answer must be a 202 or a JSON 400 (never a 5xx). Afterwards the pipeline must still be whole: ``/health`` is ok,
every accepted job was stored by the writer, every accepted job due now has a run or a dead letter, and an
ordinary job submitted last runs and succeeds. Some jobs are also triggered (they must run too).

Safe by construction: a ``cmd:`` payload is only ever ``printf`` of a quoted random text or ``exit N``, and every
HTTP job's URL is rewritten to a receiver on 127.0.0.1 in this process.
"""

from __future__ import annotations

import hashlib
import os
import shlex
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import hypothesis
import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode

from dsched.libs.settings import SERVICES
from tests.helpers.fuzz_server import FuzzServer, fuzz_server

SEED = int(os.environ.get("DSCHED_FUZZ_SEED", "20261130"))
MAX_EXAMPLES = int(os.environ.get("DSCHED_FUZZ_EXAMPLES_PIPELINE", "80"))
USER = "fuzz-pipeline"
HTTP_TIMEOUT_S = 10.0
SETTLE_S = 30.0  # bound for every "eventually" below

CRONS = [
    "@every 1s",
    "@every 3s",
    "@every 8784h",
    "@every 8785h",
    "@every 2600000000000h",
    "* * * * * *",
    "*/2 * * * * *",
    "0 0 29 2 *",
    "0 0 30 2 *",
    "0 30 2 * * *",
    "@yearly",
    "@hourly",
    "59 59 23 31 12 *",
    "0 0 1 1 * 9999",
    "",
]
ZONES = ["UTC", "Europe/Berlin", "America/New_York", "Australia/Lord_Howe", "Asia/Kathmandu", "Pacific/Kiritimati"]
INSTANTS = st.one_of(
    st.datetimes(min_value=datetime(1, 1, 2), max_value=datetime(9999, 12, 30)),
    st.sampled_from([datetime(1970, 1, 1), datetime(1969, 12, 31, 23, 59, 59), datetime(9999, 12, 31, 23, 59, 59)]),
).flatmap(
    lambda dt: st.sampled_from(
        [
            dt.isoformat() + "Z",
            dt.isoformat() + "+14:00",
            dt.isoformat() + "-12:00",
            dt.isoformat(),  # no offset: refused
        ]
    )
)
PAST_OR_NOW = st.integers(min_value=0, max_value=86_400).map(
    lambda s: (datetime.now(UTC) - timedelta(seconds=s)).isoformat().replace("+00:00", "Z")
)
RETRY = st.fixed_dictionaries(
    {},
    optional={
        "backoff": st.sampled_from(["exponential", "linear", "fixed"]),
        "initial_s": st.one_of(st.floats(min_value=0, max_value=0.2), st.floats(min_value=0, max_value=7 * 86_400)),
        "max_s": st.floats(min_value=0, max_value=8 * 86_400),
        "multiplier": st.floats(min_value=1, max_value=200),
        "jitter": st.booleans(),
        "max_age_s": st.floats(min_value=0, max_value=400 * 86_400),
        "retry_on_status": st.lists(st.integers(min_value=0, max_value=700), max_size=5),
    },
)


class _Receiver(BaseHTTPRequestHandler):
    """The target of every HTTP job: answers the status named by the path (``/s/503``), else 200."""

    def _answer(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        if length:
            self.rfile.read(min(length, 1 << 20))
        parts = self.path.split("/")
        status = int(parts[2]) if len(parts) > 2 and parts[1] == "s" and parts[2].isdigit() else 200
        body = b"received"
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = do_HEAD = _answer

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture(scope="module")
def receiver() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Receiver)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FuzzServer]:
    tmp: Path = tmp_path_factory.mktemp("fuzz-pipeline")
    with fuzz_server(tmp, list(SERVICES), allow_cmd=True, allow_private_http=True) as running:
        yield running


def _safe_payload(drawn: Any, text: str, code: int, receiver: str, status: int) -> Any:
    """The drawn payload, made safe to run: no ``cmd:`` but ``printf``/``exit``, every URL on the receiver."""
    if isinstance(drawn, str):
        if drawn.startswith("cmd:"):
            return f"cmd:printf '%s\\n' {shlex.quote(text)}" if code == 0 else f"cmd:exit {code}"
        return drawn
    if isinstance(drawn, dict) and isinstance(drawn.get("http"), dict):
        return {"http": {**drawn["http"], "url": f"{receiver}/s/{status}"}}
    return drawn


@st.composite
def _edges(draw: st.DrawFn, receiver: str, fields: set[str]) -> dict[str, Any]:
    """Plausible values pushed at the edges, for some of ``fields``; the rest stay as drawn from the schema."""
    edge: dict[str, Any] = {}
    if "payload" in fields:
        kind = draw(st.sampled_from(["keep", "echo", "cmd", "http"]))
        text = draw(st.text(max_size=40))
        if kind == "echo":
            edge["payload"] = text if not text.startswith("cmd:") else "x" + text
        elif kind == "cmd":
            edge["payload"] = "cmd:"
        elif kind == "http":
            edge["payload"] = {
                "http": draw(
                    st.fixed_dictionaries(
                        {"url": st.just("")},
                        optional={
                            "method": st.sampled_from(["GET", "post", "PUT", "PATCH", "DELETE", "HEAD", "TRACE"]),
                            "headers": st.dictionaries(
                                st.sampled_from(["X-A", "x-b", "Content-Type", "Host", "X A", "TE", "Expect"]),
                                st.sampled_from(["1", "a b", "v\r\nX-Injected: 1", "\x00", "é"]),
                                max_size=3,
                            ),
                            "body": st.one_of(
                                st.none(),
                                st.text(max_size=20),
                                st.dictionaries(st.text(max_size=5), st.integers(), max_size=3),
                            ),
                            "timeout_s": st.floats(min_value=0.001, max_value=5),
                        },
                    )
                )
            }
    if "cron_schedule" in fields and draw(st.booleans()):
        edge["cron_schedule"] = draw(st.sampled_from(CRONS))
    if "timezone" in fields and draw(st.booleans()):
        edge["timezone"] = draw(st.sampled_from(ZONES))
    if "next_fire_at" in fields:
        choice = draw(st.sampled_from(["keep", "drop", "now", "edge"]))
        if choice == "now":
            edge["next_fire_at"] = draw(PAST_OR_NOW)
        elif choice == "edge":
            edge["next_fire_at"] = draw(INSTANTS)
        elif choice == "drop":
            edge["next_fire_at"] = None
    if "retry" in fields and draw(st.booleans()):
        edge["retry"] = draw(RETRY)
    if "max_retries" in fields and draw(st.booleans()):
        edge["max_retries"] = draw(st.integers(min_value=0, max_value=3))
    if "timeout_s" in fields and draw(st.booleans()):
        edge["timeout_s"] = draw(st.floats(min_value=0.5, max_value=5))
    return edge


def _body(case_body: Any, edge: dict[str, Any], receiver: str, salt: str) -> dict[str, Any]:
    body: dict[str, Any] = dict(case_body) if isinstance(case_body, dict) else {}
    for name, value in edge.items():
        if value is None:
            body.pop(name, None)
        else:
            body[name] = value
    if "payload" in body:
        digest = hashlib.sha256((salt + repr(body["payload"])).encode()).digest()
        body["payload"] = _safe_payload(
            body["payload"], salt, digest[0] % 3, receiver, (200, 200, 503, 404)[digest[1] % 4]
        )
    return body


def _check_answer(response: requests.Response, accepted: int) -> None:
    assert response.status_code < 500, (response.status_code, response.text)
    assert response.headers["Content-Type"].startswith("application/json"), response.headers
    data = response.json()
    if response.status_code != accepted:
        assert response.status_code in (400, 409), (response.status_code, data)
        assert set(data) == {"error", "detail"} and data["detail"], data


def _due_now(body: dict[str, Any]) -> bool:
    """Whether an accepted job fires at once: triggered, or no schedule and no future first fire."""
    if body.get("triggered"):
        return True
    if body.get("cron_schedule"):
        return False
    at = body.get("next_fire_at")
    if not at:
        return True
    return datetime.fromisoformat(at.replace("Z", "+00:00")) <= datetime.now(UTC)


def test_random_submissions_leave_the_pipeline_running(server: FuzzServer, receiver: str) -> None:
    document = requests.get(server.base + "/openapi.json", timeout=HTTP_TIMEOUT_S).json()
    schema = schemathesis.openapi.from_dict(document)
    submit_case = schema["/submit"]["POST"].as_strategy(generation_mode=GenerationMode.POSITIVE)
    patch_case = schema["/jobs/{job_id}"]["PATCH"].as_strategy(generation_mode=GenerationMode.POSITIVE)
    submit_fields = set(document["components"]["schemas"]["SubmitRequest"]["properties"])
    patch_fields = set(document["components"]["schemas"]["JobFields"]["properties"])
    session = requests.Session()
    session.headers["X-User-ID"] = USER
    accepted: dict[str, dict[str, Any]] = {}  # job id -> the body of its submit
    answers: dict[int, int] = {}

    @hypothesis.seed(SEED)
    @settings(
        max_examples=MAX_EXAMPLES,
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
        phases=[hypothesis.Phase.explicit, hypothesis.Phase.generate],
    )
    @given(
        submit=submit_case,
        submit_edge=_edges(receiver, submit_fields),
        patch=patch_case,
        patch_edge=_edges(receiver, patch_fields - {"payload"}),
        salt=st.text(alphabet="abcdefxyz -'\"$`\\;", max_size=12),
        trigger=st.booleans(),
    )
    def fuzz(
        submit: Any, submit_edge: dict[str, Any], patch: Any, patch_edge: dict[str, Any], salt: str, trigger: bool
    ) -> None:
        body = _body(submit.body, submit_edge, receiver, salt)
        response = session.post(server.base + "/submit", json=body, timeout=HTTP_TIMEOUT_S)
        _check_answer(response, 202)
        answers[response.status_code] = answers.get(response.status_code, 0) + 1
        if response.status_code != 202:
            return
        job_id = response.json()["job_id"]
        accepted[job_id] = body
        changes = _body(patch.body, patch_edge, receiver, salt)
        response = session.patch(f"{server.base}/jobs/{job_id}", json=changes, timeout=HTTP_TIMEOUT_S)
        _check_answer(response, 202)
        if response.status_code == 202:
            accepted[job_id] = {**body, **changes, "patched": True}
        if trigger:  # a run now, whatever the schedule
            response = session.post(f"{server.base}/jobs/{job_id}/trigger", timeout=HTTP_TIMEOUT_S)
            assert response.status_code == 202, (response.status_code, response.text)
            accepted[job_id]["triggered"] = True

    try:
        fuzz()
        patched = sum("patched" in body for body in accepted.values())
        triggered = sum("triggered" in body for body in accepted.values())
        counts = f"{answers}, patched {patched}, triggered {triggered}"
        assert len(accepted) >= 10 and patched >= 5 and triggered >= 3, f"too little reached the pipeline: {counts}"
        _assert_pipeline_whole(server, session, accepted)
    finally:
        session.close()


def _eventually(problems: Callable[[], list[str]], what: str) -> None:
    """Poll until ``problems()`` is empty (bounded by ``SETTLE_S``)."""
    deadline = time.monotonic() + SETTLE_S
    while found := problems():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} within {SETTLE_S}s: {found}")
        time.sleep(0.2)


def _assert_pipeline_whole(server: FuzzServer, session: requests.Session, accepted: dict[str, dict[str, Any]]) -> None:
    base = server.base

    def get(path: str) -> Any:
        response = session.get(base + path, timeout=HTTP_TIMEOUT_S)
        assert response.status_code == 200, (path, response.status_code, response.text)
        return response.json()

    # An ordinary job, submitted after everything else, runs and succeeds.
    response = session.post(
        base + "/submit", json={"project_id": "after", "payload": "cmd:echo still-running"}, timeout=HTTP_TIMEOUT_S
    )
    assert response.status_code == 202, response.text
    ordinary = response.json()["job_id"]

    def not_succeeded() -> list[str]:
        runs = get(f"/jobs/{ordinary}/runs")["runs"]
        done = [r for r in runs if r["status"] == "succeeded" and r["output"] == "still-running\n"]
        return [] if done else [f"{r['status']}: {r['error']}" for r in runs] or ["no run yet"]

    _eventually(not_succeeded, "the ordinary job did not succeed")

    # No loop died or is restarting.
    health = session.get(base + "/health", timeout=HTTP_TIMEOUT_S)
    assert health.status_code == 200, health.text

    # Every accepted job was stored by the writer (no longer "submitted").
    _eventually(
        lambda: [job_id for job_id in accepted if get(f"/jobs/{job_id}")["status"] == "submitted"],
        "accepted jobs were not stored by the writer",
    )

    # Every accepted job due at once (as last submitted or changed) got a run or a dead letter.
    due = [job_id for job_id, body in accepted.items() if _due_now(body)]

    def never_ran() -> list[str]:
        dead = {d["job_id"] for d in get("/dead-letters?limit=1000")["dead_letters"]}
        missing = [job_id for job_id in due if job_id not in dead and not get(f"/jobs/{job_id}/runs")["runs"]]
        return [f"{accepted[job_id]} -> {get(f'/jobs/{job_id}')}" for job_id in missing]

    _eventually(never_ran, "accepted jobs due now never ran")
