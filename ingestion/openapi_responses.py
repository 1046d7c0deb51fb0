"""The answers half of the OpenAPI document: per operation its ``operationId``, the schema (or media type) and an
example of its success answer, and every error status it really returns, each with the ``{"error", "detail"}``
body. Applied last by :func:`ingestion.openapi.spec`, over the routes of every module (core, console, admin).

The schemas describe what the handlers build (:func:`ingestion.requests.job_view`, ``run_view``,
``dead_letter_view``, the console's and admin's answers); ``tests/integration/test_fuzz_api.py`` (schemathesis)
checks every answer against them, and ``tests/unit/test_openapi.py`` that no operation is left without them.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

from dsched.libs.models import HttpTarget, JobStatus, RetryPolicy, RunStatus

JSON = "application/json"
STR = {"type": "string"}
INT = {"type": "integer"}
NUM = {"type": "number"}
BOOL = {"type": "boolean"}
OPT_STR = {"type": ["string", "null"]}
OPT_INT = {"type": ["integer", "null"]}
OPT_NUM = {"type": ["number", "null"]}
TIME = {"type": ["string", "null"], "format": "date-time", "description": "RFC3339, UTC; null when unknown"}
CURSOR = {"type": ["string", "null"], "description": "pass as ``cursor`` for the next page; null on the last"}


def _obj(required: list[str], properties: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {"type": "object", "required": required, "properties": properties, **extra}


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _list_of(name: str, key: str) -> dict[str, Any]:
    return _obj([key, "next_cursor"], {key: {"type": "array", "items": _ref(name)}, "next_cursor": CURSOR})


def schemas() -> dict[str, Any]:
    """The response schemas (``components.schemas``)."""
    retry = RetryPolicy.model_json_schema(mode="serialization")
    http = HttpTarget.model_json_schema(mode="serialization")
    run_status = {"type": "string", "enum": [s.value for s in RunStatus]}
    return {
        "RetryPolicy": retry,
        "HttpTarget": http,
        "PayloadView": _obj(
            ["kind"],
            {
                "kind": {"enum": ["cmd", "echo", "http"]},
                "text": OPT_STR,
                "http": _ref("HttpTarget"),
                "offloaded": {"const": True, "description": "kept in the blob store (over the inline size)"},
            },
            description="``text`` for cmd/echo, ``http`` for an HTTP call, ``offloaded`` for a large payload.",
        ),
        "LastRun": {
            "type": ["object", "null"],
            "required": ["run_id", "status", "attempt", "scheduled_for", "finished_at"],
            "properties": {
                "run_id": STR,
                "status": run_status,
                "attempt": INT,
                "scheduled_for": TIME,
                "finished_at": TIME,
            },
        },
        "Job": _obj(
            [
                "job_id",
                "user_id",
                "project_id",
                "name",
                "payload",
                "cron_schedule",
                "timezone",
                "next_fire_at",
                "max_retries",
                "timeout_s",
                "retry",
                "execution",
                "priority",
                "overlap",
                "misfire",
                "max_lateness_s",
                "status",
                "created_at",
                "last_run",
            ],
            {
                "job_id": STR,
                "user_id": STR,
                "project_id": STR,
                "name": STR,
                "payload": _ref("PayloadView"),
                "cron_schedule": OPT_STR,
                "timezone": STR,
                "next_fire_at": TIME,
                "max_retries": INT,
                "timeout_s": NUM,
                "retry": _ref("RetryPolicy"),
                "execution": {"enum": ["at_least_once", "at_most_once"]},
                "priority": {"type": "integer", "minimum": 0, "maximum": 100},
                "overlap": {"enum": ["allow", "skip", "replace"]},
                "misfire": {"enum": ["fire_once", "skip", "fire_all"]},
                "max_lateness_s": OPT_NUM,
                "status": {"type": "string", "enum": [s.value for s in JobStatus]},
                "created_at": TIME,
                "last_run": _ref("LastRun"),
            },
        ),
        "JobList": {
            **_list_of("Job", "jobs"),
            "properties": {
                **_list_of("Job", "jobs")["properties"],
                "scanned": {**INT, "description": "with ``q``: how many jobs this page read"},
            },
        },
        "Run": _obj(
            ["run_id", "job_id", "attempt", "status", "scheduled_for", "output_stored", "output_capped", "error"],
            {
                "run_id": STR,
                "job_id": STR,
                "attempt": INT,
                "status": run_status,
                "scheduled_for": TIME,
                "due_at": TIME,
                "started_at": TIME,
                "finished_at": TIME,
                "worker_id": OPT_STR,
                "exit_code": OPT_INT,
                "http_status": OPT_INT,
                "output": OPT_STR,
                "output_stored": BOOL,
                "output_truncated": BOOL,
                "output_capped": BOOL,
                "error": OPT_STR,
            },
        ),
        "RunList": _list_of("Run", "runs"),
        "DeadLetter": _obj(
            ["id", "job_id", "project_id", "scheduled_for", "attempts", "error", "dead_at"],
            {
                "id": STR,
                "job_id": STR,
                "project_id": STR,
                "scheduled_for": TIME,
                "attempts": INT,
                "error": OPT_STR,
                "dead_at": TIME,
            },
        ),
        "DeadLetterList": _list_of("DeadLetter", "dead_letters"),
        "Accepted": _obj(
            ["job_id", "status"],
            {
                "job_id": STR,
                "status": {"enum": ["Submitted", "Updated", "Deleted", "Paused", "Resumed", "Triggered", "Replayed"]},
                "message": STR,
                "job": _ref("Job"),
            },
        ),
        "Health": _obj(
            ["status", "services"],
            {
                "status": {"enum": ["ok", "degraded"]},
                "services": {
                    "type": "object",
                    "additionalProperties": _obj(
                        ["state", "restarts", "loops"],
                        {
                            "state": {"enum": ["up", "restarting", "failed"]},
                            "restarts": INT,
                            "loops": {"type": "object", "additionalProperties": STR},
                            "last_error": STR,
                        },
                    ),
                },
                "time": TIME,
            },
        ),
        "BulkResult": _obj(
            ["ok", "failed", "results"],
            {
                "action": {"enum": ["pause", "resume", "trigger", "delete"]},
                "ok": INT,
                "failed": INT,
                "results": {
                    "type": "array",
                    "items": _obj(
                        ["ok"],
                        {
                            "job_id": STR,
                            "id": STR,
                            "ok": BOOL,
                            "status": STR,
                            "error": {"enum": ["not_found", "conflict"]},
                            "detail": STR,
                        },
                    ),
                },
            },
        ),
        "Worker": _obj(
            ["node_id"],
            {
                "node_id": OPT_STR,
                "slots": OPT_INT,
                "busy": OPT_INT,
                "held": OPT_INT,
                "running": {"type": ["array", "integer", "null"]},
                "started_at": {"type": ["string", "number", "null"]},
                "heartbeat_at": {"type": ["string", "number", "null"]},
                "runs_total": {"type": ["object", "number", "null"]},
            },
        ),
    }


@dataclass(frozen=True)
class Answer:
    """What one operation answers: ``op_id``; its success ``ok`` status with ``schema`` (JSON) or ``media``
    (other types, each mapped to its schema); the error statuses it returns; an example of the success body."""

    op_id: str
    ok: str = "200"
    schema: dict[str, Any] | None = None
    media: dict[str, dict[str, Any]] = field(default_factory=dict)
    errors: tuple[int, ...] = ()
    example: Any = None
    also: dict[str, str] = field(default_factory=dict)  # another success status (same body) -> its description


ERROR_TEXT = {
    400: "invalid input: malformed JSON, an invalid or unknown field, a bad query parameter (``detail`` says which)",
    403: "the caller's role is too low",
    404: "not found (or not the caller's)",
    409: "conflicts with the job's state (e.g. the job is deleted)",
    413: "body over DSCHED_MAX_BODY_BYTES",
    415: "a request body that is not Content-Type: application/json (while cmd: jobs are enabled)",
    421: "Host is not a loopback name (while cmd: jobs are enabled: DNS-rebinding guard)",
    422: "the Idempotency-Key was used with a different request body",
    429: "a tenant limit (rate or quota) refused every item of a batch",
    503: "a backend did not answer; retry later (never for client input)",
}
JOB_EXAMPLE = {
    "job_id": "01a22b23-4bd8-7db1-9c29-bfbc84a00077",
    "user_id": "demo",
    "project_id": "demo",
    "name": "hello",
    "payload": {"kind": "cmd", "text": "echo hi"},
    "cron_schedule": None,
    "timezone": "UTC",
    "next_fire_at": None,
    "max_retries": 3,
    "timeout_s": 90.0,
    "retry": {
        "backoff": "exponential",
        "initial_s": 1.0,
        "max_s": 300.0,
        "multiplier": 2.0,
        "jitter": True,
        "max_age_s": None,
        "retry_on_status": None,
    },
    "execution": "at_least_once",
    "priority": 50,
    "overlap": "allow",
    "misfire": "fire_once",
    "max_lateness_s": None,
    "status": "succeeded",
    "created_at": "2026-11-30T06:27:43.120Z",
    "last_run": {
        "run_id": "54902a41-f190-54cf-92bb-eea961e7c5e4",
        "status": "succeeded",
        "attempt": 0,
        "scheduled_for": "2026-11-30T06:27:43.120Z",
        "finished_at": "2026-11-30T06:27:43.141Z",
    },
}
RUN_EXAMPLE = {
    "run_id": "54902a41-f190-54cf-92bb-eea961e7c5e4",
    "job_id": "01a22b23-4bd8-7db1-9c29-bfbc84a00077",
    "attempt": 0,
    "status": "succeeded",
    "scheduled_for": "2026-11-30T06:27:43.120Z",
    "due_at": "2026-11-30T06:27:43.120Z",
    "started_at": "2026-11-30T06:27:43.125Z",
    "finished_at": "2026-11-30T06:27:43.141Z",
    "worker_id": "node-1",
    "exit_code": 0,
    "http_status": None,
    "output": "hi\n",
    "output_stored": False,
    "output_truncated": False,
    "output_capped": False,
    "error": None,
}
ACCEPTED = _ref("Accepted")
SSE_EVENT = _obj(  # each event of the stream (``data`` is JSON text)
    ["data"],
    {
        "event": {"enum": ["hello", "jobs", "runs", "dead_letters"]},
        "data": {"type": "string", "contentMediaType": "application/json"},
        "retry": INT,
        "id": STR,
    },
)
TEXT = {"text/plain": STR}
PAGE_ERRORS = (400,)  # limit / cursor
PREVIEW = _obj(
    ["cron", "timezone", "recurring", "next", "next_local"],
    {
        "cron": OPT_STR,
        "timezone": STR,
        "recurring": BOOL,
        "next": {"type": "array", "items": STR},
        "next_local": {"type": "array", "items": STR},
    },
)

ANSWERS: dict[tuple[str, str], Answer] = {
    # Core (ingestion/service.py)
    ("post", "/submit"): Answer(
        "submitJob",
        "202",
        ACCEPTED,
        errors=(400, 413, 415, 422),
        example={"job_id": JOB_EXAMPLE["job_id"], "status": "Submitted", "message": "Job submitted successfully"},
        also={"200": "an earlier submit with the same Idempotency-Key and body: its job"},
    ),
    ("post", "/submit/batch"): Answer(
        "submitJobBatch",
        "202",
        _obj(
            ["accepted", "refused", "results"],
            {
                "accepted": INT,
                "refused": INT,
                "results": {
                    "type": "array",
                    "items": _obj(
                        ["index", "status"],
                        {
                            "index": INT,
                            "job_id": STR,
                            "status": {"type": ["string", "integer"]},
                            "error": STR,
                            "detail": STR,
                        },
                    ),
                },
            },
        ),
        errors=(400, 413, 415, 429),
        example={
            "accepted": 1,
            "refused": 1,
            "results": [
                {"index": 0, "job_id": JOB_EXAMPLE["job_id"], "status": "Submitted"},
                {"index": 1, "error": "invalid_field", "detail": "project_id: Field required", "status": 400},
            ],
        },
    ),
    ("get", "/job"): Answer("getJobByQuery", schema=_ref("Job"), errors=(400, 404), example=JOB_EXAMPLE),
    ("get", "/jobs"): Answer(
        "listJobs", schema=_ref("JobList"), errors=PAGE_ERRORS, example={"jobs": [JOB_EXAMPLE], "next_cursor": None}
    ),
    ("get", "/jobs/{job_id}"): Answer("getJob", schema=_ref("Job"), errors=(404,), example=JOB_EXAMPLE),
    ("patch", "/jobs/{job_id}"): Answer("updateJob", "202", ACCEPTED, errors=(400, 404, 409, 413, 415)),
    ("delete", "/jobs/{job_id}"): Answer("deleteJob", "202", ACCEPTED, errors=(404, 415)),
    ("get", "/jobs/{job_id}/runs"): Answer(
        "listJobRuns", schema=_ref("RunList"), errors=(400, 404), example={"runs": [RUN_EXAMPLE], "next_cursor": None}
    ),
    ("get", "/jobs/{job_id}/schedule"): Answer(
        "previewJobSchedule",
        schema=_obj(["job_id", "timezone", "next"], {"job_id": STR, "timezone": STR, "next": {"type": "array"}}),
        errors=(400, 404),
    ),
    ("post", "/jobs/{job_id}/pause"): Answer("pauseJob", "202", ACCEPTED, errors=(404, 409, 415)),
    ("post", "/jobs/{job_id}/resume"): Answer("resumeJob", "202", ACCEPTED, errors=(404, 409, 415)),
    ("post", "/jobs/{job_id}/trigger"): Answer("triggerJob", "202", ACCEPTED, errors=(404, 409, 415)),
    ("get", "/runs/{run_id}"): Answer("getRun", schema=_ref("Run"), errors=(404,), example=RUN_EXAMPLE),
    ("get", "/runs/{run_id}/output"): Answer("getRunOutput", media=TEXT, errors=(404,)),
    ("post", "/runs/{run_id}/cancel"): Answer(
        "cancelRun", "202", _obj(["run_id", "status"], {"run_id": STR, "status": STR}), errors=(404, 409, 415)
    ),
    ("get", "/dead-letters"): Answer("listDeadLetters", schema=_ref("DeadLetterList"), errors=PAGE_ERRORS),
    ("post", "/dead-letters/{dead_letter_id}/replay"): Answer(
        "replayDeadLetter", "202", ACCEPTED, errors=(404, 409, 415)
    ),
    ("get", "/health"): Answer("health", schema=_ref("Health")),  # 503 (same body) while a service is down
    ("get", "/metrics"): Answer("metrics", media={"text/plain": STR}),
    ("get", "/queue/stats"): Answer(
        "queueStats", schema={"type": "object", "additionalProperties": INT, "required": ["scheduled", "took_ms"]}
    ),
    ("get", "/openapi.json"): Answer("openapi", schema={"type": "object", "required": ["openapi", "paths"]}),
    # Console (ingestion/console.py, ingestion/ui.py)
    ("post", "/jobs/bulk"): Answer("bulkJobs", schema=_ref("BulkResult"), errors=(400, 413, 415)),
    ("post", "/dead-letters/replay"): Answer(
        "bulkReplayDeadLetters", schema=_ref("BulkResult"), errors=(400, 413, 415)
    ),
    ("get", "/schedule/preview"): Answer("previewSchedule", schema=PREVIEW, errors=(400,)),
    ("get", "/workers"): Answer(
        "listWorkers", schema=_obj(["workers"], {"workers": {"type": "array", "items": _ref("Worker")}})
    ),
    ("get", "/cluster"): Answer(
        "clusterStatus",
        schema=_obj(
            ["leader", "pickers", "workers", "queue", "writer", "shard_count"],
            {
                "leader": OPT_STR,
                "pickers": {"type": "array"},
                "workers": {"type": "array", "items": _ref("Worker")},
                "queue": {"type": ["object", "null"]},
                "writer": _obj(
                    ["backlog", "max_backlog", "refuse_all_above"],
                    {"backlog": {"type": ["integer", "null"]}, "max_backlog": INT, "refuse_all_above": INT},
                ),
                "shard_count": INT,
                "time": TIME,
            },
        ),
    ),
    ("get", "/stats"): Answer(
        "runStats",
        schema=_obj(["window_s", "runs", "points"], {"window_s": INT, "runs": {"type": "object"}, "points": {}}),
        errors=(400,),
    ),
    ("get", "/events"): Answer("events", media={"text/event-stream": SSE_EVENT}, errors=(404,)),
    ("get", "/ui"): Answer("dashboard", media={"text/html": STR}),
    ("get", "/ui/{path}"): Answer("dashboardPage", media={"text/html": STR}),
    ("get", "/ui/static/{name}"): Answer(
        "dashboardAsset",
        media={"text/javascript": STR, "text/css": STR, "text/html": STR, "image/svg+xml": STR},
        errors=(404,),
    ),
    ("get", "/ui/config.json"): Answer("dashboardConfig", schema=_obj(["auth"], {"auth": STR})),
    # Admin (ingestion/admin.py)
    ("get", "/admin/keys"): Answer("listApiKeys", schema=_obj(["keys"], {"keys": {"type": "array"}})),
    ("post", "/admin/keys"): Answer("createApiKey", "201", _obj(["key"], {"key": STR}), errors=(400, 413, 415)),
    ("delete", "/admin/keys/{key_id}"): Answer(
        "revokeApiKey", schema=_obj(["key_id", "status"], {"key_id": STR, "status": STR}), errors=(404, 415)
    ),
    ("get", "/admin/tenants/{tenant}/signing-secrets"): Answer(
        "listSigningSecrets",
        schema=_obj(["tenant", "secrets"], {"tenant": STR, "secrets": {"type": "array"}}),
        errors=(400,),
    ),
    ("post", "/admin/tenants/{tenant}/signing-secrets/rotate"): Answer(
        "rotateSigningSecret", "201", {"type": "object"}, errors=(400, 415)
    ),
    ("post", "/admin/tenants/{tenant}/signing-secrets/retire"): Answer(
        "retireSigningSecrets",
        schema=_obj(["tenant", "secrets"], {"tenant": STR, "secrets": {"type": "array"}}),
        errors=(400, 415),
    ),
}
# Request examples (sent as they are by the fuzz test's explicit phase).
REQUEST_EXAMPLES: dict[tuple[str, str], Any] = {
    ("post", "/submit"): {
        "project_id": "demo",
        "name": "weekday-report",
        "payload": "cmd:./report.sh",
        "cron_schedule": "0 30 9 * * MON-FRI",
        "timezone": "Europe/Berlin",
        "max_retries": 5,
        "retry": {"backoff": "exponential", "initial_s": 2, "max_s": 120, "jitter": True},
    },
    ("post", "/submit/batch"): {"jobs": [{"project_id": "demo", "payload": "cmd:echo hi"}]},
    ("patch", "/jobs/{job_id}"): {"cron_schedule": "@every 5m", "max_retries": 1},
    ("post", "/jobs/bulk"): {"action": "pause", "job_ids": ["01a22b23-4bd8-7db1-9c29-bfbc84a00077"]},
}
# OpenAPI links: which later requests take an id from an answer (clients and schemathesis' stateful tests).
JOB_ROUTES = ("getJob", "updateJob", "deleteJob", "pauseJob", "resumeJob", "triggerJob", "listJobRuns")
LINKS: dict[tuple[str, str], dict[str, Any]] = {
    ("post", "/submit"): {
        op: {"operationId": op, "parameters": {"job_id": "$response.body#/job_id"}}
        for op in (*JOB_ROUTES, "previewJobSchedule")
    },
    ("get", "/jobs/{job_id}/runs"): {
        op: {"operationId": op, "parameters": {"run_id": "$response.body#/runs/0/run_id"}}
        for op in ("getRun", "getRunOutput", "cancelRun")
    },
    ("get", "/dead-letters"): {
        "replayDeadLetter": {
            "operationId": "replayDeadLetter",
            "parameters": {"dead_letter_id": "$response.body#/dead_letters/0/id"},
        }
    },
}
# New work, answered 503 "overloaded" with Retry-After while the writer lags (ingestion/admission.py).
ADMISSION_CONTROLLED = {
    ("post", "/submit"),
    ("post", "/submit/batch"),
    ("post", "/jobs/{job_id}/trigger"),
    ("post", "/dead-letters/{dead_letter_id}/replay"),
    ("post", "/jobs/bulk"),
    ("post", "/dead-letters/replay"),
}
OVERLOADED_TEXT = (
    "a backend did not answer, or (`overloaded`) the writer has more than DSCHED_MAX_WRITER_BACKLOG earlier "
    "submissions left to store and this tenant sent at least its share of the recent ones (over twice that bound: "
    "any tenant): send the same request again after `Retry-After` seconds"
)
# Answered by any route while cmd: jobs are enabled (ingestion/guards.py), and 503 by any that reads a backend.
NO_BACKEND = {("get", "/openapi.json"), ("get", "/metrics"), ("get", "/ui"), ("get", "/ui/{path}")}
NO_BACKEND |= {("get", "/ui/static/{name}"), ("get", "/ui/config.json")}


def _error(status: int) -> dict[str, Any]:
    return {"description": ERROR_TEXT[status], "content": {JSON: {"schema": _ref("Error")}}}


def complete(document: dict[str, Any]) -> dict[str, Any]:
    """Fill in every operation's ``operationId``, success body, example and error answers; returns
    ``document``. An operation without an entry in :data:`ANSWERS` is left as it is (the unit test says so)."""
    document.setdefault("components", {}).setdefault("schemas", {}).update(schemas())
    for path in list(document["paths"]):
        ops = document["paths"][path] = dict(document["paths"][path])  # paths may share one object too
        for method in list(ops):
            answer = ANSWERS.get((method, path))
            if answer is None:
                continue
            op = ops[method] = copy.deepcopy(ops[method])  # routes may share one description object
            op["operationId"] = answer.op_id
            if (example := REQUEST_EXAMPLES.get((method, path))) is not None and "requestBody" in op:
                op["requestBody"]["content"][JSON]["example"] = example
            responses = op.setdefault("responses", {})
            ok = responses.pop(answer.ok, None) or {}
            for other in ("200", "201", "202"):
                if other != answer.ok and other not in answer.also:
                    responses.pop(other, None)
            if answer.media:
                content = {media: {"schema": schema} for media, schema in answer.media.items()}
            else:
                content = {JSON: {"schema": answer.schema or {"type": "object"}}}
                if answer.example is not None:
                    content[JSON]["example"] = answer.example
            responses[answer.ok] = {"description": ok.get("description", "OK"), "content": content}
            if (links := LINKS.get((method, path))) is not None:
                responses[answer.ok]["links"] = copy.deepcopy(links)
            for status, description in answer.also.items():
                responses[status] = {"description": description, "content": content}
            for generic in (400, 404):  # the generic ones of ingestion/openapi._op, where the route has none
                if generic not in answer.errors:
                    responses.pop(str(generic), None)
            codes = set(answer.errors) | {421}
            if (method, path) not in NO_BACKEND:
                codes.add(503)
            for code in sorted(codes):
                existing = responses.get(str(code))
                if existing is None or "content" not in existing:
                    responses[str(code)] = _error(code)
            if (method, path) in ADMISSION_CONTROLLED:
                responses["503"] = {
                    **_error(503),
                    "description": OVERLOADED_TEXT,
                    "headers": {"Retry-After": {"schema": {"type": "integer"}}},
                }
            if (method, path) == ("get", "/health"):
                responses["503"] = {
                    "description": "a service is down or restarting (the same report)",
                    "content": content,
                }
            for status, response in list(responses.items()):
                if status[0] in "45" and "content" not in response:  # every error is {"error", "detail"}
                    response["content"] = {JSON: {"schema": _ref("Error")}}
    return document
