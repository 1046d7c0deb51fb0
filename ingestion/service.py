"""Ingestion: the HTTP API (seed 004 compatible) in front of the submissions log.

Every change to a job is appended to the log as a full new definition (:class:`libs.models.Submission`); a
``202`` means the record is durable in the log. Reads come from the store, scoped to the caller: another user's
job is a 404, never a 403, so ids cannot be probed.
"""

from __future__ import annotations

import contextlib
import hashlib
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import orjson
from aiohttp import web
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from pydantic import ValidationError

from dsched.ingestion import console, guards, openapi
from dsched.ingestion.admin import AdminRoutes
from dsched.ingestion.admission import RETRY_AFTER_S, Admission, Overloaded
from dsched.ingestion.auth import Authenticator, principal_of
from dsched.ingestion.http_errors import JsonErrorAppRunner
from dsched.ingestion.requests import (
    USER_ID,
    JobFields,
    RequestError,
    SubmitRequest,
    check_definition,
    dead_letter_view,
    definition_changes,
    int_param,
    job_view,
    next_fire,
    pydantic_detail,
    run_view,
)
from dsched.libs import logs, tracing
from dsched.libs.blobs.base import BlobNotFound, BlobStore
from dsched.libs.clock import now_ms, to_rfc3339
from dsched.libs.coordination.base import Coordination
from dsched.libs.coordination.keys import CANCEL_PREFIX
from dsched.libs.limits import MAX_JSON_DEPTH, json_depth_exceeds
from dsched.libs.log.base import SubmissionLog
from dsched.libs.metrics import (
    BLOB_OFFLOADS,
    HTTP_REQUESTS,
    SUBMISSIONS,
    TENANT_SUBMISSIONS,
    child,
    exposition,
    tenant_label,
)
from dsched.libs.models import (
    ACCEPTED_VERSION,
    Job,
    JobStatus,
    Payload,
    RetryPolicy,
    Run,
    RunStatus,
    Submission,
    job_id_ms,
    new_job_id,
)
from dsched.libs.queue.base import WorkQueue
from dsched.libs.schedule import ScheduleError, first_undispatched, parse_schedule, upcoming
from dsched.libs.settings import Settings
from dsched.libs.store.base import InvalidCursor, JobStore
from dsched.libs.supervisor import Supervisor

logger = logs.get("ingestion")
IDEMPOTENCY_TTL_S = 86_400
PAYLOAD_JSON_FRAMING = 256  # bytes of an HTTP payload's JSON besides its strings (names, method, nulls)
MAX_BATCH_JOBS = 1000  # items per POST /submit/batch (the body limit DSCHED_MAX_BODY_BYTES applies too)
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class ApiError(Exception):
    def __init__(self, status: int, error: str, detail: str) -> None:
        super().__init__(detail)
        self.status, self.error, self.detail = status, error, detail


def json_response(data: Any, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(data), status=status, content_type="application/json")


def error_response(status: int, error: str, detail: str) -> web.Response:
    return json_response({"error": error, "detail": detail}, status)


class Ingestion:
    def __init__(
        self,
        *,
        log: SubmissionLog,
        store: JobStore,
        blobs: BlobStore,
        settings: Settings,
        queue: WorkQueue | None = None,
        coordination: Coordination | None = None,
        supervisor: Supervisor | None = None,
    ) -> None:
        self.log = log
        # The loops of every service in this process: /health reports them and answers 503 while one is down.
        self.supervisor = supervisor or Supervisor()
        self.store = store
        self.blobs = blobs
        self.queue = queue
        self.coordination = coordination
        self.settings = settings
        self.auth = Authenticator(store, settings)  # DSCHED_AUTH: who calls, which role, tenant limits, audit
        self.admission = Admission(log, settings.max_writer_backlog)  # new work waits while the writer lags
        self.app = self._build_app()
        self._runner: web.AppRunner | None = None
        self.port: int | None = None

    # Lifecycle --------------------------------------------------------------------------------------------
    @contextlib.asynccontextmanager
    async def open(self, host: str | None = None, port: int | None = None) -> AsyncIterator[Ingestion]:
        """Serve HTTP on ``host:port`` (settings by default; port 0 picks a free one, see ``self.port``)."""
        self._runner = JsonErrorAppRunner(self.app, access_log=None, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(
            self._runner,
            host or self.settings.host,
            self.settings.port if port is None else port,
            reuse_address=True,
        )
        await site.start()
        server = getattr(site, "_server", None)
        sockets = getattr(server, "sockets", None) or []
        self.port = sockets[0].getsockname()[1] if sockets else port
        logger.info("listening", host=host or self.settings.host, port=self.port)
        try:
            yield self
        finally:
            await self._runner.cleanup()
            self._runner = None

    def _build_app(self) -> web.Application:
        app = web.Application(
            client_max_size=self.settings.max_body_bytes,
            middlewares=[self._middleware, *guards.middlewares(self.settings), self.auth.middleware],
        )
        self.console = console.register(self, app)  # dashboard /ui and its API (issue 13), before the core routes
        r = app.router
        r.add_post("/submit", self.submit)
        r.add_post("/submit/batch", self.submit_batch)
        r.add_get("/job", self.get_job_query)
        r.add_get("/jobs", self.list_jobs)
        r.add_get("/jobs/{job_id}", self.get_job)
        r.add_patch("/jobs/{job_id}", self.patch_job)
        r.add_delete("/jobs/{job_id}", self.delete_job)
        r.add_get("/jobs/{job_id}/runs", self.list_runs)
        r.add_get("/jobs/{job_id}/schedule", self.preview_schedule)
        r.add_post("/jobs/{job_id}/pause", self.pause_job)
        r.add_post("/jobs/{job_id}/resume", self.resume_job)
        r.add_post("/jobs/{job_id}/trigger", self.trigger_job)
        r.add_get("/runs/{run_id}", self.get_run)
        r.add_get("/runs/{run_id}/output", self.get_run_output)
        r.add_post("/runs/{run_id}/cancel", self.cancel_run)
        r.add_get("/dead-letters", self.list_dead_letters)
        r.add_post("/dead-letters/{dead_letter_id}/replay", self.replay_dead_letter)
        r.add_get("/health", self.health)
        r.add_get("/metrics", self.metrics)
        r.add_get("/queue/stats", self.queue_stats)
        r.add_get("/openapi.json", self.openapi)
        AdminRoutes(self.auth).add_to(r)
        return app

    @web.middleware
    async def _middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        route = request.match_info.route.resource.canonical if request.match_info.route.resource else "unmatched"
        tracing.remember_inbound(request.headers.get("traceparent"))  # a caller's trace continues (if tracing)
        try:
            response = await handler(request)
        except ApiError as exc:
            response = error_response(exc.status, exc.error, exc.detail)
        except Overloaded as exc:
            response = error_response(503, "overloaded", str(exc))
            response.headers["Retry-After"] = str(RETRY_AFTER_S)
        except web.HTTPRequestEntityTooLarge as exc:
            response = error_response(413, "payload_too_large", exc.text or "request body too large")
        except web.HTTPException as exc:
            response = error_response(exc.status, exc.reason.lower().replace(" ", "_"), exc.reason)
            if "Allow" in exc.headers:  # 405
                response.headers["Allow"] = exc.headers["Allow"]
        except RequestError as exc:  # a query parameter or field no handler turned into its own answer
            response = error_response(400, "invalid_field", str(exc))
        except InvalidCursor:
            response = error_response(400, "invalid_field", "cursor: not a cursor this API returned")
        except Exception:
            # A backend that did not answer; the traceback goes to the log, never into the answer.
            logger.exception("request_failed", route=route)
            response = error_response(503, "unavailable", "a backend did not answer; retry later")
        child(HTTP_REQUESTS, route, request.method, str(response.status)).inc()
        return response

    # Helpers ----------------------------------------------------------------------------------------------
    @staticmethod
    def _user(request: web.Request) -> str:
        principal = principal_of(request)  # set by the auth middleware (keys/jwt/proxy, or dev X-User-ID)
        if principal is not None:
            return principal.tenant
        user = request.headers.get("X-User-ID", "")
        if not user:
            raise ApiError(401, "unauthorized", "missing X-User-ID header")
        if not USER_ID.match(user):
            raise ApiError(401, "unauthorized", "invalid X-User-ID (1-128 of A-Z a-z 0-9 . _ @ : + -)")
        return user

    async def _body(self, request: web.Request, tenant_cap: bool = False) -> dict[str, Any]:
        """The request's JSON object body (``{}`` when empty). ``tenant_cap``: the body is a job definition (submit,
        PATCH), so the caller's ``max_payload_bytes`` applies to its length as read — also when it came chunked,
        without a ``Content-Length`` for the auth middleware to check."""
        if request.content_length is not None and request.content_length > self.settings.max_body_bytes:
            raise ApiError(413, "payload_too_large", f"body over {self.settings.max_body_bytes} bytes")
        raw = await request.read()
        principal = principal_of(request)
        if tenant_cap and principal is not None:
            too_large = self.auth.limits.payload_over(principal.tenant, len(raw))
            if too_large is not None:
                raise ApiError(413, "payload_too_large", too_large)
        if not raw.strip():
            return {}
        try:
            body = orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            raise ApiError(400, "invalid_json", f"malformed JSON: {exc}") from exc
        if not isinstance(body, dict):
            raise ApiError(400, "invalid_json", "the body must be a JSON object")
        if json_depth_exceeds(body):
            raise ApiError(400, "invalid_json", f"the body nests deeper than {MAX_JSON_DEPTH} levels")
        return body

    async def _owned_job(self, request: web.Request, job_id: str | None = None) -> Job:
        user = self._user(request)
        job_id = job_id if job_id is not None else request.match_info["job_id"]
        job = (await self.store.get_jobs([job_id])).get(job_id) if job_id else None
        if job is None or job.user_id != user:
            raise ApiError(404, "not_found", f"no job {job_id!r}")
        return job

    async def _append(self, op: str, job: Job, attempt: int = 0) -> None:
        await self._append_many(op, [job], attempt)

    async def _append_many(self, op: str, jobs: list[Job], attempt: int = 0) -> None:
        """Append one record per job in one call to the log: returns when all are durable, raises if any is not."""
        spans = []
        records = []
        at = now_ms()
        for job in jobs:
            span = tracing.start(
                "ingestion", "dsched.submit", tracing.inbound(), {"dsched.job_id": job.job_id, "dsched.op": op}
            )
            if span is not None:  # the log record carries the trace to the writer (libs/tracing.py)
                job = job.model_copy(update={"traceparent": tracing.traceparent_of(span)})
                spans.append(span)
            submission = Submission(op=op, job=job, at_ms=at, attempt=attempt)  # type: ignore[arg-type]
            records.append((job.job_id, submission.model_dump_json().encode()))
        try:
            await self.log.append(records)
        finally:
            for span in spans:
                tracing.end(span)
        child(SUBMISSIONS, op).inc(len(jobs))
        by_tenant = Counter(job.user_id for job in jobs)
        for user_id, count in by_tenant.items():
            child(TENANT_SUBMISSIONS, tenant_label(user_id), op).inc(count)
        self.admission.appended(by_tenant)  # every record adds to the writer's backlog, whatever its op

    async def _offload(self, job_id: str, payload: Payload) -> Payload:
        """``payload`` itself when it is small enough to stay inline, else a reference to a blob holding it."""
        limit = self.settings.payload_offload_bytes
        if payload.kind != "http" and len(payload.text or "") * 4 <= limit:  # UTF-8: at most 4 bytes a character
            return payload
        if (http := payload.http) is not None:  # a bound on its JSON size: 6 bytes a character (\uXXXX) + framing
            chars = len(http.url) + len(http.body or "") + sum(len(k) + len(v) for k, v in http.headers.items())
            if 6 * chars + PAYLOAD_JSON_FRAMING + 8 * len(http.headers) <= limit:
                return payload
        data = payload.model_dump_json().encode()
        content = len((payload.text or "").encode()) if payload.kind != "http" else len(data)
        if content <= limit:
            return payload
        key = f"payloads/{job_id}/{hashlib.sha256(data).hexdigest()[:32]}"  # a retried submit writes the same
        await self.blobs.put(key, data)
        BLOB_OFFLOADS.labels("payload").inc()
        return Payload(kind=payload.kind, blob_key=key, size=len(data))

    @staticmethod
    def _page_args(request: web.Request) -> tuple[int, str | None]:
        return int_param(request.query, "limit", 50, 1, 1000), request.query.get("cursor") or None

    # Submit and change ------------------------------------------------------------------------------------
    async def submit(self, request: web.Request) -> web.Response:
        """Accept a job: validate, write the accepted row (readable at once, status ``submitted``), append to the
        log, answer 202. With an ``Idempotency-Key`` a retry gets the same job and never a second occurrence:
        the job id carries the first attempt's time, from which the retry rebuilds the identical definition."""
        user = self._user(request)
        await self.admission.check(user)
        body = await self._body(request, tenant_cap=True)
        try:
            req = SubmitRequest.model_validate(body)
        except ValidationError as exc:
            raise ApiError(400, "invalid_field", pydantic_detail(exc)) from exc
        idempotency_key = request.headers.get("Idempotency-Key")
        digest = None
        now = now_ms()
        job_id = new_job_id(now)
        if idempotency_key is not None:
            if not 1 <= len(idempotency_key) <= 200:
                raise ApiError(400, "invalid_field", "Idempotency-Key: 1 to 200 characters")
            digest = hashlib.sha256(orjson.dumps(body, option=orjson.OPT_SORT_KEYS)).hexdigest()
            bound = await self.store.claim_idempotency_key(user, idempotency_key, job_id, IDEMPOTENCY_TTL_S)
            if bound != job_id:
                job_id, now = bound, job_id_ms(bound) or now
                existing = (await self.store.get_jobs([bound])).get(bound)
                if existing is not None and existing.user_id == user:
                    return await self._resubmitted(existing, digest)
        job = self._new_job(user, req, job_id, now, digest)
        if (payload := await self._offload(job_id, job.payload)) is not job.payload:
            job = job.model_copy(update={"payload": payload})
        # Readable at once from any ingestion instance; the writer replaces the row with the logged definition.
        await self.store.put_jobs([job])
        try:
            await self._append("submit", job)
        except Exception:
            with contextlib.suppress(Exception):  # not accepted: don't leave a job that will never run
                await self.store.put_jobs([job.model_copy(update={"deleted": True})])
            raise
        logger.info("submitted", job_id=job_id, user_id=user, kind=job.payload.kind, recurring=job.recurring)
        return json_response({"job_id": job_id, "status": "Submitted", "message": "Job submitted successfully"}, 202)

    async def submit_batch(self, request: web.Request) -> web.Response:
        """Accept up to :data:`MAX_BATCH_JOBS` jobs in one request: ``{"jobs": [<submit body>, ...]}``.

        Each item is validated exactly as ``POST /submit`` validates a body (:meth:`_new_job`); an invalid item gets
        its own ``{"index", "error", "detail"}`` and does not stop the others. The valid ones are written to the
        store (readable at once, status ``submitted``) and appended to the log together, in one call each: the
        ``202`` means every accepted item is durable; if the append fails, none is accepted (their rows are
        marked deleted) and the answer is 503. Tenant limits (``DSCHED_AUTH`` keys/jwt) count every item.
        ``Idempotency-Key`` is not supported here (400)."""
        user = self._user(request)
        await self.admission.check(user)
        body = await self._body(request)
        if "Idempotency-Key" in request.headers:
            raise ApiError(400, "invalid_field", "Idempotency-Key: not supported by /submit/batch")
        items = body.get("jobs")
        if set(body) != {"jobs"} or not isinstance(items, list):
            raise ApiError(400, "invalid_field", 'body: {"jobs": [<submit body>, ...]} and nothing else')
        if not 1 <= len(items) <= MAX_BATCH_JOBS:
            raise ApiError(400, "invalid_field", f"jobs: 1 to {MAX_BATCH_JOBS} items")
        principal = principal_of(request)
        limits = self.auth.limits
        # Limits per item, as for a single submit (max_payload_bytes: each item's JSON), looked up only when the
        # tenant has one (the batch path is hot).
        limited = principal is not None and any(
            limits.limit(principal.tenant, name) > 0
            for name in ("submit_rate", "max_active_jobs", "max_payload_bytes", "max_stored_bytes")
        )
        sized = principal is not None and any(
            limits.limit(principal.tenant, name) > 0 for name in ("max_payload_bytes", "max_stored_bytes")
        )
        results: list[dict[str, Any]] = []
        jobs: list[Job] = []
        now = now_ms()
        for index, item in enumerate(items):
            try:
                if not isinstance(item, dict):
                    raise ApiError(400, "invalid_field", "jobs[]: each item is a JSON object")
                try:
                    req = SubmitRequest.model_validate(item)
                except ValidationError as exc:
                    raise ApiError(400, "invalid_field", pydantic_detail(exc)) from exc
                size = len(orjson.dumps(item)) if sized else None
                if limited and principal is not None:  # the same per-tenant limits as a single submit, one per job
                    refused = await limits.check_submit(principal.tenant, size)
                    if refused is not None:
                        detail = orjson.loads(refused.body) if isinstance(refused.body, bytes) else {}
                        raise ApiError(refused.status, detail.get("error", "refused"), detail.get("detail", ""))
                job = self._new_job(user, req, new_job_id(now), now, None)
                if limited and principal is not None:
                    limits.accepted(principal.tenant, size)  # counted at once: the batch's next item sees it
            except ApiError as exc:
                results.append({"index": index, "error": exc.error, "detail": exc.detail, "status": exc.status})
                continue
            if (payload := await self._offload(job.job_id, job.payload)) is not job.payload:
                job = job.model_copy(update={"payload": payload})
            jobs.append(job)
            results.append({"index": index, "job_id": job.job_id, "status": "Submitted"})
        if jobs:
            await self.store.put_jobs(jobs)
            try:
                await self._append_many("submit", jobs)
            except Exception:
                with contextlib.suppress(Exception):  # not accepted: don't leave jobs that will never run
                    await self.store.put_jobs([job.model_copy(update={"deleted": True}) for job in jobs])
                raise
        logger.info("submitted_batch", user_id=user, accepted=len(jobs), refused=len(items) - len(jobs))
        answer: dict[str, Any] = {"accepted": len(jobs), "refused": len(items) - len(jobs), "results": results}
        if not jobs:  # nothing accepted: an error answer that still gives every item's reason
            first = results[0]
            detail = f"no job accepted; jobs[{first['index']}]: {first['detail']}"
            return json_response({"error": first["error"], "detail": detail, **answer}, int(first["status"]))
        return json_response(answer, 202)

    async def _resubmitted(self, existing: Job, digest: str) -> web.Response:
        """A retry of an idempotent submit: the same job if the body is the same, else 422."""
        if existing.submit_digest != digest:
            raise ApiError(422, "idempotency_key_reused", "this Idempotency-Key was used with a different request body")
        if existing.version == ACCEPTED_VERSION and not existing.deleted:
            await self._append("submit", existing)  # the first attempt may not have reached the log
        return json_response(
            {
                "job_id": existing.job_id,
                "status": "Submitted",
                "message": "Job already submitted with this Idempotency-Key",
            },
            200,
        )

    def _new_job(self, user: str, req: SubmitRequest, job_id: str, now: int, digest: str | None) -> Job:
        """The definition a submit asks for; deterministic in its arguments (idempotent retries rely on it)."""
        try:
            changes = definition_changes(req, None, now, self._default_retry())
            job = Job(
                job_id=job_id,
                user_id=user,
                project_id=req.project_id,
                created_ms=now,
                submit_digest=digest,
                version=ACCEPTED_VERSION,
                **changes,
            )
            check_definition(job)
        except RequestError as exc:
            raise ApiError(400, "invalid_field", str(exc)) from exc
        return job

    def _default_retry(self) -> RetryPolicy:
        return RetryPolicy(initial_s=self.settings.retry_initial_s, max_s=self.settings.retry_max_s)

    async def patch_job(self, request: web.Request) -> web.Response:
        """Change a job's definition: validated exactly like a submit, before anything is appended."""
        job = await self._owned_job(request)
        if job.deleted:
            raise ApiError(409, "conflict", "the job is deleted")
        body = await self._body(request, tenant_cap=True)
        if not body:
            raise ApiError(400, "invalid_field", "nothing to change: the body is empty")
        if "project_id" in body:
            raise ApiError(400, "invalid_field", "project_id cannot be changed")
        try:
            fields = JobFields.model_validate(body)
        except ValidationError as exc:
            raise ApiError(400, "invalid_field", pydantic_detail(exc)) from exc
        now = now_ms()
        try:
            changes = definition_changes(fields, job, now, self._default_retry())
            if all(getattr(job, name) == value for name, value in changes.items()):
                raise RequestError("nothing to change: every given field already has that value")
            if "payload" in changes:
                changes["payload"] = await self._offload(job.job_id, changes["payload"])
            updated = job.model_copy(update=changes)
            if job.recurring and "next_fire_ms" not in changes:
                updated.next_fire_ms = self._resume_point(updated)
            check_definition(updated)
        except (RequestError, ScheduleError) as exc:
            raise ApiError(400, "invalid_field", str(exc)) from exc
        await self._append("update", updated)
        return json_response({"job_id": job.job_id, "status": "Updated", "job": job_view(updated, now)}, 202)

    @staticmethod
    def _resume_point(job: Job) -> int:
        """Where a job's schedule continues after a change or a resume: the first occurrence not yet dispatched
        (the picker's misfire policy then handles any that are already late)."""
        first = first_undispatched(job) if job.recurring else None
        return job.next_fire_ms if first is None else first

    async def delete_job(self, request: web.Request) -> web.Response:
        job = await self._owned_job(request)
        await self._append("delete", job.model_copy(update={"deleted": True}))
        return json_response(
            {"job_id": job.job_id, "status": "Deleted", "message": "future runs cancelled; history kept"}, 202
        )

    async def pause_job(self, request: web.Request) -> web.Response:
        job = await self._owned_job(request)
        if job.deleted:
            raise ApiError(409, "conflict", "the job is deleted")
        await self._append("pause", job.model_copy(update={"paused": True}))
        return json_response({"job_id": job.job_id, "status": "Paused"}, 202)

    async def resume_job(self, request: web.Request) -> web.Response:
        job = await self._owned_job(request)
        if job.deleted:
            raise ApiError(409, "conflict", "the job is deleted")
        resumed = job.model_copy(update={"paused": False})
        resumed.next_fire_ms = self._resume_point(resumed)
        await self._append("resume", resumed)
        return json_response({"job_id": job.job_id, "status": "Resumed"}, 202)

    async def trigger_job(self, request: web.Request) -> web.Response:
        await self.admission.check(self._user(request))
        job = await self._owned_job(request)
        if job.deleted:
            raise ApiError(409, "conflict", "the job is deleted")
        await self._append("trigger", job)
        return json_response({"job_id": job.job_id, "status": "Triggered"}, 202)

    # Reads ------------------------------------------------------------------------------------------------
    async def get_job_query(self, request: web.Request) -> web.Response:
        job_id = request.query.get("id", "")
        if not job_id:
            self._user(request)
            raise ApiError(400, "invalid_field", "id: query parameter required")
        return json_response(job_view(await self._owned_job(request, job_id), now_ms()))

    async def get_job(self, request: web.Request) -> web.Response:
        return json_response(job_view(await self._owned_job(request), now_ms()))

    async def list_jobs(self, request: web.Request) -> web.Response:
        user = self._user(request)
        limit, cursor = self._page_args(request)
        status = request.query.get("status") or None
        if status is not None and status not in {s.value for s in JobStatus}:
            raise ApiError(400, "invalid_field", f"status: one of {', '.join(s.value for s in JobStatus)}")
        jobs, next_cursor = await self.store.list_jobs(
            user, limit, cursor, status=status, project_id=request.query.get("project_id") or None
        )
        now = now_ms()
        return json_response({"jobs": [job_view(j, now) for j in jobs], "next_cursor": next_cursor})

    async def list_runs(self, request: web.Request) -> web.Response:
        job = await self._owned_job(request)
        limit, cursor = self._page_args(request)
        runs, next_cursor = await self.store.list_runs(job.job_id, limit, cursor)
        return json_response({"runs": [run_view(r) for r in runs], "next_cursor": next_cursor})

    async def preview_schedule(self, request: web.Request) -> web.Response:
        job = await self._owned_job(request)
        count = int_param(request.query, "next", 5, 1, 1000)
        now = now_ms()
        first = next_fire(job, now)
        times: list[int] = []
        if first is not None:
            times = [first]
            if job.recurring:
                with contextlib.suppress(ScheduleError):  # the schedule ends (year 10000) or no longer parses
                    schedule = parse_schedule(job.cron_schedule or "", job.timezone)
                    times += upcoming(schedule, first, count - 1)
        return json_response(
            {"job_id": job.job_id, "timezone": job.timezone, "next": [to_rfc3339(t) for t in times[:count]]}
        )

    async def _owned_run(self, request: web.Request) -> Run:
        user = self._user(request)
        run_id = request.match_info["run_id"]
        run = (await self.store.get_runs([run_id])).get(run_id)
        if run is None or run.user_id != user:
            raise ApiError(404, "not_found", f"no run {run_id!r}")
        return run

    async def get_run(self, request: web.Request) -> web.Response:
        return json_response(run_view(await self._owned_run(request)))

    async def get_run_output(self, request: web.Request) -> web.StreamResponse:
        run = await self._owned_run(request)
        if run.output_ref is None:
            return web.Response(body=(run.output or "").encode(), content_type="text/plain", charset="utf-8")
        # Streamed from the blob store a chunk at a time (chunked transfer): up to DSCHED_OUTPUT_CAP_BYTES per run.
        async with contextlib.aclosing(self.blobs.iter_chunks(run.output_ref)) as chunks:
            try:
                first = await anext(chunks, b"")
            except BlobNotFound as exc:
                raise ApiError(404, "not_found", "the run's output is no longer stored") from exc
            response = web.StreamResponse(headers={"Content-Type": "text/plain; charset=utf-8"})
            await response.prepare(request)
            await response.write(first)
            async for chunk in chunks:
                await response.write(chunk)
        await response.write_eof()
        return response

    async def cancel_run(self, request: web.Request) -> web.Response:
        run = await self._owned_run(request)
        if run.status != RunStatus.RUNNING:
            raise ApiError(409, "conflict", f"the run is {run.status.value}, not running")
        if self.coordination is None:
            raise ApiError(503, "unavailable", "run cancellation needs the coordination backend")
        # A short-lived key the worker running it watches; the lease removes it afterwards.
        lease = await self.coordination.grant_lease(60)
        await self.coordination.put(CANCEL_PREFIX + run.run_id, b"1", lease)
        return json_response({"run_id": run.run_id, "status": "Cancelling"}, 202)

    async def list_dead_letters(self, request: web.Request) -> web.Response:
        user = self._user(request)
        limit, cursor = self._page_args(request)
        letters, next_cursor = await self.store.list_dead_letters(user, limit, cursor)
        return json_response({"dead_letters": [dead_letter_view(d) for d in letters], "next_cursor": next_cursor})

    async def replay_dead_letter(self, request: web.Request) -> web.Response:
        user = self._user(request)
        await self.admission.check(user)
        letter = await self.store.get_dead_letter(user, request.match_info["dead_letter_id"])
        if letter is None:
            raise ApiError(404, "not_found", "no such dead letter")
        job = await self._owned_job(request, letter.job_id)
        if job.deleted:
            raise ApiError(409, "conflict", "the job is deleted; a dead letter of a deleted job cannot be replayed")
        await self._append("replay", job)
        return json_response(
            {
                "job_id": job.job_id,
                "status": "Replayed",
                "message": "a new run of the same payload was scheduled now",
            },
            202,
        )

    # Operations -------------------------------------------------------------------------------------------
    async def health(self, request: web.Request) -> web.Response:
        report = {**self.supervisor.report(), "time": to_rfc3339(now_ms())}
        return json_response(report, 200 if self.supervisor.healthy else 503)

    async def openapi(self, request: web.Request) -> web.Response:
        return json_response(openapi.spec())

    async def metrics(self, request: web.Request) -> web.Response:
        return web.Response(body=await exposition(), headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def queue_stats(self, request: web.Request) -> web.Response:
        started = time.perf_counter()
        counts = await self.store.stats(now_ms())
        stats = {k: counts.get(k, 0) for k in ("scheduled", "due", "queued", "running", "succeeded", "failed", "dead")}
        if self.queue is not None:
            queue_counts = await self.queue.counts()
            stats["queue_visible"] = queue_counts.visible
            stats["queue_in_flight"] = queue_counts.in_flight
        stats["took_ms"] = int((time.perf_counter() - started) * 1000)
        return json_response(stats)
