"""The OpenAPI 3.1 description of the HTTP API, served at ``GET /openapi.json``.

Request bodies come from the pydantic models that validate them, so the spec cannot drift from the code; a
test checks that every route the app serves is described here.
"""

from __future__ import annotations

from typing import Any

from ingestion.requests import JobFields, SubmitRequest

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
        },
        "components": {"schemas": components},
    }
