"""The OpenAPI 3.1 description of the HTTP API, served at ``GET /openapi.json``.

Request bodies come from the pydantic models that validate them, so the spec cannot drift from the code; a
test checks that every route the app serves is described here.
"""

from __future__ import annotations

from typing import Any

from dsched.ingestion import openapi_auth, openapi_responses
from dsched.ingestion.requests import JobFields, SubmitRequest

_ERROR = {"$ref": "#/components/schemas/Error"}
_USER = {
    "name": "X-User-ID",
    "in": "header",
    "required": True,
    "schema": {"type": "string"},
    "description": "The caller. Every read and change is scoped to it; another user's job is a 404.",
}
_JOB_ID = {"name": "job_id", "in": "path", "required": True, "schema": {"type": "string"}}
_RUN_ID = {"name": "run_id", "in": "path", "required": True, "schema": {"type": "string"}}
_PAGE = [
    {
        "name": "limit",
        "in": "query",
        "schema": {"type": "integer", "minimum": 1, "maximum": 1000, "default": 50},
    },
    {
        "name": "cursor",
        "in": "query",
        "schema": {"type": "string"},
        "description": "``next_cursor`` of the previous page",
    },
]

_SEARCH = {
    "name": "q",
    "in": "query",
    "schema": {"type": "string", "maxLength": 200},
    "description": "Search: an exact job id, or a case-insensitive substring of the name, project or payload. "
    "Reads a bounded number of jobs per request; follow next_cursor to continue.",
}


def _op(
    summary: str,
    *,
    params: list[dict[str, Any]] | None = None,
    body: dict[str, Any] | None = None,
    ok: str = "200",
    description: str = "",
    user: bool = True,
) -> dict[str, Any]:
    op: dict[str, Any] = {
        "summary": summary,
        "parameters": ([_USER] if user else []) + (params or []),
        "responses": {
            ok: {"description": "OK"},
            "400": {"description": "invalid input", "content": {"application/json": {"schema": _ERROR}}},
            "401": {"description": "missing or invalid X-User-ID"},
            "404": {"description": "not found (or not the caller's)"},
        },
    }
    if description:
        op["description"] = description
    if body is not None:
        op["requestBody"] = {"required": True, "content": {"application/json": {"schema": body}}}
    return op


def spec() -> dict[str, Any]:
    """The document, with security schemes, least roles, 401/403/429 and /admin routes (ingestion/openapi_auth),
    then each operation's id, answer schemas, examples and error statuses (ingestion/openapi_responses)."""
    return openapi_responses.complete(openapi_auth.secure(_spec()))


def _spec() -> dict[str, Any]:
    submit_schema = SubmitRequest.model_json_schema(ref_template="#/components/schemas/{model}")
    patch_schema = JobFields.model_json_schema(ref_template="#/components/schemas/{model}")
    components: dict[str, Any] = {
        "Error": {
            "type": "object",
            "required": ["error", "detail"],
            "properties": {"error": {"type": "string"}, "detail": {"type": "string"}},
        },
    }
    for schema in (submit_schema, patch_schema):
        components.update(schema.pop("$defs", {}))
    components["SubmitRequest"] = submit_schema
    components["JobFields"] = patch_schema
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "dsched",
            "version": "0.1.0",
            "description": "Distributed job scheduler. Times are RFC3339 (UTC in responses).",
        },
        "paths": {
            "/submit": {
                "post": _op(
                    "Submit a job",
                    body={"$ref": "#/components/schemas/SubmitRequest"},
                    ok="202",
                    params=[
                        {
                            "name": "Idempotency-Key",
                            "in": "header",
                            "schema": {"type": "string"},
                            "description": "Same key, same user, within 24 h: the first job is returned (200).",
                        }
                    ],
                    description="202 means the submission is durable in the log. payload: 'cmd:<shell>', any "
                    'other string (echo), or {"http": {url, method, headers, body, timeout_s}}.',
                )
            },
            "/submit/batch": {
                "post": _op(
                    "Submit up to 1,000 jobs at once",
                    body={
                        "type": "object",
                        "required": ["jobs"],
                        "additionalProperties": False,
                        "properties": {
                            "jobs": {
                                "type": "array",
                                "minItems": 1,
                                "maxItems": 1000,
                                "items": {"$ref": "#/components/schemas/SubmitRequest"},
                            }
                        },
                    },
                    ok="202",
                    description="Each item is validated like a POST /submit body and answered in `results` (same "
                    "order, with its `index`): a `job_id`, or its own `error`/`detail`/`status`. The accepted items "
                    "are durable in the log together before the 202; if none is accepted the answer is the first "
                    "item's error status, still with every item's result. No Idempotency-Key (400).",
                )
            },
            "/job": {
                "get": _op(
                    "Get a job (seed 004 form)",
                    params=[{"name": "id", "in": "query", "required": True, "schema": {"type": "string"}}],
                )
            },
            "/jobs": {
                "get": _op(
                    "The caller's jobs, newest first",
                    params=[
                        *_PAGE,
                        {
                            "name": "status",
                            "in": "query",
                            "schema": {
                                "type": "string",
                                "enum": [
                                    "submitted",
                                    "scheduled",
                                    "queued",
                                    "running",
                                    "succeeded",
                                    "failed",
                                    "paused",
                                    "deleted",
                                ],
                            },
                        },
                        {"name": "project_id", "in": "query", "schema": {"type": "string"}},
                        _SEARCH,
                    ],
                )
            },
            "/jobs/{job_id}": {
                "get": _op("Get a job", params=[_JOB_ID]),
                "patch": _op(
                    "Change schedule, payload or retry settings",
                    params=[_JOB_ID],
                    ok="202",
                    body={"$ref": "#/components/schemas/JobFields"},
                ),
                "delete": _op("Cancel future runs (history is kept)", params=[_JOB_ID], ok="202"),
            },
            "/jobs/{job_id}/runs": {"get": _op("Runs of a job, newest first", params=[_JOB_ID, *_PAGE])},
            "/jobs/{job_id}/schedule": {
                "get": _op(
                    "Preview the next fire times (UTC)",
                    params=[
                        _JOB_ID,
                        {
                            "name": "next",
                            "in": "query",
                            "schema": {"type": "integer", "minimum": 1, "maximum": 1000, "default": 5},
                        },
                    ],
                )
            },
            "/jobs/{job_id}/pause": {
                "post": _op("Pause: no occurrence fires until resumed", params=[_JOB_ID], ok="202")
            },
            "/jobs/{job_id}/resume": {
                "post": _op("Resume; missed occurrences follow the misfire policy", params=[_JOB_ID], ok="202")
            },
            "/jobs/{job_id}/trigger": {"post": _op("Run now, outside the schedule", params=[_JOB_ID], ok="202")},
            "/runs/{run_id}": {"get": _op("Get a run", params=[_RUN_ID])},
            "/runs/{run_id}/output": {"get": _op("The run's full output (streamed as text/plain)", params=[_RUN_ID])},
            "/runs/{run_id}/cancel": {
                "post": _op("Kill a running cmd: job or abort an HTTP call", params=[_RUN_ID], ok="202")
            },
            "/dead-letters": {"get": _op("The caller's dead letters, newest first", params=_PAGE)},
            "/dead-letters/{dead_letter_id}/replay": {
                "post": _op(
                    "Run the dead-lettered job again now (a new run, same payload)",
                    ok="202",
                    params=[
                        {
                            "name": "dead_letter_id",
                            "in": "path",
                            "required": True,
                            "schema": {"type": "string"},
                        }
                    ],
                )
            },
            "/health": {"get": _op("Liveness", user=False)},
            "/metrics": {"get": _op("Prometheus metrics", user=False)},
            "/queue/stats": {
                "get": _op("Counts: scheduled, due, queued, running, succeeded, failed, dead", user=False)
            },
            "/openapi.json": {"get": _op("This document", user=False)},
            **_console_paths(),
        },
        "components": {"schemas": components},
    }


def _console_paths() -> dict[str, Any]:
    """The dashboard's and client CLI's routes (``ingestion/console.py``, ``ingestion/ui.py``)."""
    ids = {"type": "array", "items": {"type": "string"}, "minItems": 1, "maxItems": 500}
    bulk = {
        "type": "object",
        "required": ["action", "job_ids"],
        "properties": {"action": {"enum": ["pause", "resume", "trigger", "delete"]}, "job_ids": ids},
    }
    query = [
        {"name": "cron", "in": "query", "schema": {"type": "string"}},
        {"name": "timezone", "in": "query", "schema": {"type": "string", "default": "UTC"}},
        {"name": "at", "in": "query", "schema": {"type": "string", "format": "date-time"}},
        {"name": "next", "in": "query", "schema": {"type": "integer", "minimum": 1, "maximum": 100, "default": 5}},
    ]
    window = {"name": "window_s", "in": "query", "schema": {"type": "integer", "minimum": 10, "maximum": 3600}}
    page = {"get": _op("The dashboard (HTML; strict Content-Security-Policy)", user=False)}
    return {
        "/jobs/bulk": {
            "post": _op(
                "Pause, resume, trigger or delete many jobs; one result per job (not_found, conflict)", body=bulk
            )
        },
        "/dead-letters/replay": {
            "post": _op(
                "Replay several dead letters",
                body={"type": "object", "required": ["ids"], "properties": {"ids": ids}},
            )
        },
        "/schedule/preview": {"get": _op("Fire times a submit with this cron/time zone/at would get", params=query)},
        "/workers": {"get": _op("Live workers: slots, busy, current runs, heartbeat (admin)")},
        "/cluster": {"get": _op("Leader, pickers and their shards, workers, queue depth, writer backlog (admin)")},
        "/stats": {
            "get": _op(
                "Runs by status, throughput, fire-lag p50/p99 over a window, per sample interval (admin)",
                params=[window],
            )
        },
        "/events": {
            "get": _op(
                "Server-sent events: jobs, runs (with job_id), dead_letters",
                params=[{"name": "job_id", "in": "query", "schema": {"type": "string"}}],
                description="text/event-stream; the stream ends after 5 minutes, reconnect to continue.",
            )
        },
        "/ui": page,
        "/ui/{path}": page,
        "/ui/static/{name}": {"get": _op("Dashboard assets", user=False)},
        "/ui/config.json": {"get": _op("The dashboard's settings: the auth mode", user=False)},
    }
