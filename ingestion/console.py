"""API additions for the dashboard and the client CLI: search, bulk actions, schedule preview, workers, cluster,
execution statistics over a window and a server-sent events stream.

Everything here goes through the same caller scoping as the rest of the API (``Ingestion._user``): a tenant only
ever sees and changes its own jobs; the cluster-wide views (``/workers``, ``/cluster``, ``/stats``) are refused with
403 to a caller whose role (the authenticated principal's, ``ingestion.auth.principal_of``) is not ``admin``; in
``dev`` mode every caller is an admin.

Routes (registered by :func:`register` before the core routes, so ``/jobs/bulk`` is not taken for a job id):

- ``GET /jobs?q=…`` — search the caller's jobs by id (exact), name, project or payload text (case-insensitive
  substring), with the usual ``status``/``project_id`` filters and cursor paging. Without ``q`` the core handler
  answers. The store matches over windows of ``SEARCH_SCAN`` jobs (``JobStore.search_jobs``: one SQL query per
  window on the embedded store; elsewhere a scan); a request goes on to the next, older window until it has a page
  of matches, reached the oldest job, or spent ``SEARCH_BUDGET_S`` searching (it always searches one window).
  Fewer matches than ``limit`` with a ``next_cursor`` means "not found yet: continue from the cursor", so a
  request stays bounded at any number of jobs while a search over 100,000 usually finishes in one.
- ``POST /jobs/bulk`` ``{"action": "pause|resume|trigger|delete", "job_ids": [...]}`` — per-job results.
- ``POST /dead-letters/replay`` ``{"ids": [...]}`` — replay several dead letters.
- ``GET /schedule/preview?cron=&timezone=&at=&next=`` — the fire times a submit would get, before submitting.
- ``GET /workers`` — live workers (from their ``workers/<node>`` presence keys).
- ``GET /cluster`` — leader, pickers with their shards, workers, queue depth.
- ``GET /stats?window_s=900`` — runs finished by status, throughput and fire-lag p50/p99 over the window, overall
  and per sample interval, from the workers' own metrics (sampled every ``SAMPLE_S``).
- ``GET /events?job_id=`` — ``text/event-stream`` of changes to the caller's newest jobs, one job's runs and the
  dead letters; see :meth:`Console.events`.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import math
import time
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import orjson
from aiohttp import web

from dsched.ingestion.auth import principal_of
from dsched.ingestion.requests import (
    RequestError,
    check_schedule,
    dead_letter_view,
    int_param,
    job_view,
    parse_time,
    run_view,
)
from dsched.libs.apikeys import Role
from dsched.libs.clock import now_ms, to_rfc3339
from dsched.libs.coordination.keys import ASSIGNMENTS_PREFIX, LEADER_KEY, PICKERS_PREFIX, WORKERS_PREFIX
from dsched.libs.models import Job, JobStatus
from dsched.libs.schedule import parse_schedule, upcoming

if TYPE_CHECKING:
    from dsched.ingestion.service import Ingestion

SEARCH_SCAN = 5000  # jobs matched per store call (one window)
SEARCH_BUDGET_S = 0.5  # a search request starts no new window after this long
BULK_MAX = 500
SAMPLE_S = 10.0
WINDOW_MAX_S = 3600
EVENTS_POLL_S = 1.0
EVENTS_MAX_S = 300.0  # a stream ends after this; EventSource-style clients reconnect
EVENTS_JOBS = 100
BULK_ACTIONS = ("pause", "resume", "trigger", "delete")


def _error(status: int, error: str, detail: str) -> Exception:
    from dsched.ingestion.service import ApiError

    return ApiError(status, error, detail)


def _json(data: Any, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(data), status=status, content_type="application/json")


def quantile(q: float, buckets: list[tuple[float, float]]) -> float | None:
    """``histogram_quantile``: ``buckets`` are (upper bound, cumulative count) ascending, the last being the total
    (an implicit +Inf bucket). Linear interpolation inside the bucket; None when there are no observations."""
    if not buckets or buckets[-1][1] <= 0:
        return None
    total = buckets[-1][1]
    rank = q * total
    lower_bound, lower_count = 0.0, 0.0
    for bound, count in buckets:
        if count >= rank:
            if math.isinf(bound):
                return lower_bound
            width = count - lower_count
            return bound if width <= 0 else lower_bound + (bound - lower_bound) * (rank - lower_count) / width
        lower_bound, lower_count = bound, count
    return lower_bound


@dataclass
class Sample:
    at_ms: int
    workers: dict[str, dict[str, Any]] = field(default_factory=dict)


def _delta(before: Sample, after: Sample) -> tuple[dict[str, float], list[tuple[float, float]]]:
    """Runs by status and fire-lag buckets observed between two samples, summed over workers. A worker absent
    before, or whose counters went down (restarted), contributes its whole value only if it started in between."""
    runs: dict[str, float] = {}
    buckets: dict[float, float] = {}
    total = 0.0
    for node, now in after.workers.items():
        prev = before.workers.get(node)
        prev_runs = (prev or {}).get("runs_total", {})
        restarted = prev is None or any(v < prev_runs.get(k, 0) for k, v in now.get("runs_total", {}).items())
        if restarted and now.get("_started_ms", 0) < before.at_ms:
            continue
        for status, value in now.get("runs_total", {}).items():
            runs[status] = runs.get(status, 0) + value - (0 if restarted else prev_runs.get(status, 0))
        lag_now = now.get("fire_lag", {})
        lag_prev = {} if restarted else (prev or {}).get("fire_lag", {})
        prev_buckets = {le: n for le, n in lag_prev.get("buckets", [])}
        for le, n in lag_now.get("buckets", []):
            buckets[le] = buckets.get(le, 0) + n - prev_buckets.get(le, 0)
        total += lag_now.get("count", 0) - lag_prev.get("count", 0)
    ordered = sorted(buckets.items())
    ordered.append((math.inf, total))
    return runs, ordered


def _lag_ms(q: float, buckets: list[tuple[float, float]]) -> float | None:
    value = quantile(q, buckets)
    return None if value is None else round(value * 1000, 1)


class Console:
    def __init__(self, ingestion: Ingestion) -> None:
        self.ingestion = ingestion
        self.samples: deque[Sample] = deque(maxlen=int(WINDOW_MAX_S / SAMPLE_S) + 10)
        self.closing = asyncio.Event()

    # Registration and lifecycle ---------------------------------------------------------------------------
    def register(self, app: web.Application) -> None:
        r = app.router
        r.add_get("/jobs", self.list_or_search_jobs)
        r.add_post("/jobs/bulk", self.bulk_jobs)
        r.add_post("/dead-letters/replay", self.bulk_replay)
        r.add_get("/schedule/preview", self.schedule_preview)
        r.add_get("/workers", self.workers)
        r.add_get("/cluster", self.cluster)
        r.add_get("/stats", self.stats)
        r.add_get("/events", self.events)
        app.cleanup_ctx.append(self._sampler)
        app.on_shutdown.append(self._on_shutdown)

    async def _on_shutdown(self, _: web.Application) -> None:
        self.closing.set()  # event streams end now instead of holding the shutdown

    async def _sampler(self, _: web.Application) -> AsyncIterator[None]:
        task = asyncio.create_task(self._sample_loop())
        yield
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task

    async def _sample_loop(self) -> None:
        while True:
            with contextlib.suppress(Exception):
                await self._sample()
            await asyncio.sleep(SAMPLE_S)

    async def _sample(self) -> Sample:
        sample = Sample(at_ms=now_ms(), workers=await self._worker_records())
        self.samples.append(sample)
        return sample

    async def _worker_records(self) -> dict[str, dict[str, Any]]:
        coordination = self.ingestion.coordination
        if coordination is None:
            return {}
        records: dict[str, dict[str, Any]] = {}
        for key, value in (await coordination.get_prefix(WORKERS_PREFIX)).items():
            with contextlib.suppress(orjson.JSONDecodeError, TypeError, ValueError):
                record = orjson.loads(value)
                if isinstance(record, dict):
                    with contextlib.suppress(ValueError, TypeError):
                        record["_started_ms"] = parse_time(str(record.get("started_at")), "started_at")
                    records[key[len(WORKERS_PREFIX) :]] = record
        return records

    # Access -----------------------------------------------------------------------------------------------
    def _user(self, request: web.Request) -> str:
        return self.ingestion._user(request)

    def _admin(self, request: web.Request) -> str:
        user = self._user(request)
        principal = principal_of(request)
        if principal is not None and principal.role is not Role.ADMIN:
            raise _error(403, "forbidden", "cluster-wide views need the admin role")
        return user

    # Search -----------------------------------------------------------------------------------------------
    async def list_or_search_jobs(self, request: web.Request) -> web.Response:
        """``GET /jobs``: with ``q``, a search (see the module docstring); otherwise the core listing."""
        query = request.query.get("q", "").strip()
        if not query:
            return await self.ingestion.list_jobs(request)
        user = self._user(request)
        limit, cursor = self.ingestion._page_args(request)
        status = request.query.get("status") or None
        if status is not None and status not in {s.value for s in JobStatus}:
            raise _error(400, "invalid_field", f"status: one of {', '.join(s.value for s in JobStatus)}")
        project = request.query.get("project_id") or None
        if len(query) > 200:
            raise _error(400, "invalid_field", "q: at most 200 characters")
        now = now_ms()
        if cursor is None:  # an exact id is found at once, whatever its age
            exact = (await self.ingestion.store.get_jobs([query])).get(query)
            if exact is not None and exact.user_id == user:
                found = [exact] if _matches_filters(exact, status, project, now) else []
                return _json({"jobs": [job_view(j, now) for j in found], "next_cursor": None})
        matches: list[Job] = []
        next_cursor = cursor
        deadline = time.monotonic() + SEARCH_BUDGET_S
        while True:  # window after window, newest first, while the page is short and time is left
            found, next_cursor = await self.ingestion.store.search_jobs(
                user, query, limit - len(matches), next_cursor, status=status, project_id=project, scan=SEARCH_SCAN
            )
            matches += found
            if len(matches) >= limit or next_cursor is None or time.monotonic() >= deadline:
                break
        return _json({"jobs": [job_view(j, now) for j in matches], "next_cursor": next_cursor})

    # Bulk -------------------------------------------------------------------------------------------------
    async def bulk_jobs(self, request: web.Request) -> web.Response:
        """Apply one action to many of the caller's jobs. Each job gets its own result; unknown or foreign ids
        are ``not_found``, a deleted job is a ``conflict`` for pause/resume/trigger. 200 with the results."""
        user = self._user(request)
        body = await self.ingestion._body(request)
        action = body.get("action")
        ids = body.get("job_ids")
        if action not in BULK_ACTIONS:
            raise _error(400, "invalid_field", f"action: one of {', '.join(BULK_ACTIONS)}")
        if not isinstance(ids, list) or not ids or not all(isinstance(i, str) for i in ids):
            raise _error(400, "invalid_field", "job_ids: a non-empty list of job ids")
        if len(ids) > BULK_MAX:
            raise _error(400, "invalid_field", f"job_ids: at most {BULK_MAX}")
        if action == "trigger":  # new runs: refused while the writer lags (pause/resume/delete stop a flood)
            await self.ingestion.admission.check(user)
        ids = list(dict.fromkeys(ids))
        jobs = await self.ingestion.store.get_jobs(ids)
        now = now_ms()
        results: list[dict[str, Any]] = []
        changes: list[tuple[str, Job]] = []
        for job_id in ids:
            job = jobs.get(job_id)
            if job is None or job.user_id != user:
                results.append({"job_id": job_id, "ok": False, "error": "not_found"})
            elif job.deleted and action != "delete":
                results.append({"job_id": job_id, "ok": False, "error": "conflict", "detail": "the job is deleted"})
            else:
                changes.append((action, _apply(action, job, now)))
                results.append({"job_id": job_id, "ok": True, "status": _DONE[action]})
        for start in range(0, len(changes), 50):
            await asyncio.gather(*(self.ingestion._append(op, job) for op, job in changes[start : start + 50]))
        ok = sum(1 for r in results if r["ok"])
        return _json({"action": action, "ok": ok, "failed": len(results) - ok, "results": results})

    async def bulk_replay(self, request: web.Request) -> web.Response:
        """Replay several of the caller's dead letters: each one's job runs again now."""
        user = self._user(request)
        await self.ingestion.admission.check(user)
        body = await self.ingestion._body(request)
        ids = body.get("ids")
        if not isinstance(ids, list) or not ids or not all(isinstance(i, str) for i in ids):
            raise _error(400, "invalid_field", "ids: a non-empty list of dead letter ids")
        if len(ids) > BULK_MAX:
            raise _error(400, "invalid_field", f"ids: at most {BULK_MAX}")
        results: list[dict[str, Any]] = []
        for letter_id in dict.fromkeys(ids):
            letter = await self.ingestion.store.get_dead_letter(user, letter_id)
            job = (await self.ingestion.store.get_jobs([letter.job_id])).get(letter.job_id) if letter else None
            if letter is None or job is None or job.user_id != user:
                results.append({"id": letter_id, "ok": False, "error": "not_found"})
                continue
            await self.ingestion._append("replay", job)
            results.append({"id": letter_id, "ok": True, "job_id": job.job_id, "status": "Replayed"})
        ok = sum(1 for r in results if r["ok"])
        return _json({"ok": ok, "failed": len(results) - ok, "results": results})

    # Schedule preview -------------------------------------------------------------------------------------
    async def schedule_preview(self, request: web.Request) -> web.Response:
        """The first ``next`` fire times (UTC and in ``timezone``) a job submitted now with ``cron`` and/or
        ``at`` would get; 400 with the parser's message for an invalid expression or zone."""
        self._user(request)
        cron = request.query.get("cron", "").strip() or None
        timezone = request.query.get("timezone", "").strip() or "UTC"
        at = request.query.get("at", "").strip() or None
        count = int_param(request.query, "next", 5, 1, 100)
        now = now_ms()
        try:
            check_schedule(cron, timezone)
            first = parse_time(at, "at") if at else None
        except RequestError as exc:
            raise _error(400, "invalid_field", str(exc)) from exc
        times: list[int]
        if cron:
            schedule = parse_schedule(cron, timezone)
            start = first if first is not None else schedule.next_after(now)
            times = [start, *upcoming(schedule, start, count - 1)]
        else:
            times = [first if first is not None else now]
        from zoneinfo import ZoneInfo

        zone = ZoneInfo(timezone)
        from datetime import UTC, datetime

        local = [datetime.fromtimestamp(t / 1000, UTC).astimezone(zone).isoformat(timespec="seconds") for t in times]
        return _json(
            {
                "cron": cron,
                "timezone": timezone,
                "recurring": cron is not None,
                "next": [to_rfc3339(t) for t in times[:count]],
                "next_local": local[:count],
            }
        )

    # Cluster ----------------------------------------------------------------------------------------------
    async def workers(self, request: web.Request) -> web.Response:
        """Live workers: node id, slots, busy slots, runs held for their due time, current run ids, heartbeat."""
        self._admin(request)
        records = await self._worker_records()
        return _json({"workers": [_worker_view(r) for _, r in sorted(records.items())]})

    async def cluster(self, request: web.Request) -> web.Response:
        """The leader, each picker with its shards, each worker, the work queue's depth and the writers' backlog."""
        self._admin(request)
        coordination = self.ingestion.coordination
        leader: str | None = None
        pickers: list[dict[str, Any]] = []
        if coordination is not None:
            raw_leader = await coordination.get(LEADER_KEY)
            leader = raw_leader.decode(errors="replace") if raw_leader else None
            live = {k[len(PICKERS_PREFIX) :] for k in await coordination.get_prefix(PICKERS_PREFIX)}
            assignments: dict[str, list[int]] = {}
            for key, value in (await coordination.get_prefix(ASSIGNMENTS_PREFIX)).items():
                with contextlib.suppress(orjson.JSONDecodeError, TypeError, AttributeError):
                    assignments[key[len(ASSIGNMENTS_PREFIX) :]] = list(orjson.loads(value).get("shards", []))
            pickers = [{"node_id": n, "shards": sorted(assignments.get(n, []))} for n in sorted(live)]
        queue: dict[str, int] | None = None
        if self.ingestion.queue is not None:
            counts = await self.ingestion.queue.counts()
            queue = {"visible": counts.visible, "in_flight": counts.in_flight}
        workers = [_worker_view(r) for _, r in sorted((await self._worker_records()).items())]
        # Log records the writers have yet to store (None: the log did not answer), and admission control's bound.
        writer = {
            "backlog": await self.ingestion.admission.backlog(),
            "max_backlog": self.ingestion.settings.max_writer_backlog,
            "refuse_all_above": self.ingestion.admission.refuse_all_above,
        }
        return _json(
            {
                "leader": leader,
                "pickers": pickers,
                "workers": workers,
                "queue": queue,
                "writer": writer,
                "shard_count": self.ingestion.settings.shard_count,
                "time": to_rfc3339(now_ms()),
            }
        )

    async def stats(self, request: web.Request) -> web.Response:
        """Runs finished by status, throughput and fire-lag percentiles over the last ``window_s`` seconds
        (default 900, at most 3600), overall and per sample interval. Approximate to one sample interval: a
        sample is taken now if the last one is older than 2 s."""
        self._admin(request)
        window_s = int_param(request.query, "window_s", 900, 10, WINDOW_MAX_S)
        if not self.samples or now_ms() - self.samples[-1].at_ms > 2000:
            await self._sample()
        since = now_ms() - window_s * 1000
        samples = [s for s in self.samples if s.at_ms >= since]
        older = [s for s in self.samples if s.at_ms < since]
        if older:
            samples.insert(0, older[-1])  # the interval that crosses the window's start
        points: list[dict[str, Any]] = []
        totals: dict[str, float] = {}
        all_buckets: dict[float, float] = {}
        for before, after in itertools.pairwise(samples):
            runs, buckets = _delta(before, after)
            seconds = max(0.001, (after.at_ms - before.at_ms) / 1000)
            finished = sum(runs.values())
            points.append(
                {
                    "at": to_rfc3339(after.at_ms),
                    "runs": {k: int(v) for k, v in sorted(runs.items())},
                    "throughput_per_s": round(finished / seconds, 3),
                    "fire_lag_p50_ms": _lag_ms(0.5, buckets),
                    "fire_lag_p99_ms": _lag_ms(0.99, buckets),
                }
            )
            for k, v in runs.items():
                totals[k] = totals.get(k, 0) + v
            for le, n in buckets:
                all_buckets[le] = all_buckets.get(le, 0) + n
        merged = sorted(all_buckets.items())
        span_s = (samples[-1].at_ms - samples[0].at_ms) / 1000 if len(samples) > 1 else 0.0
        return _json(
            {
                "window_s": window_s,
                "sample_s": SAMPLE_S,
                "span_s": span_s,
                "runs": {k: int(v) for k, v in sorted(totals.items())},
                "throughput_per_s": round(sum(totals.values()) / span_s, 3) if span_s else 0.0,
                "fire_lag_p50_ms": _lag_ms(0.5, merged),
                "fire_lag_p99_ms": _lag_ms(0.99, merged),
                "points": points,
            }
        )

    # Events -----------------------------------------------------------------------------------------------
    async def events(self, request: web.Request) -> web.StreamResponse:
        """Server-sent events for the caller: ``jobs`` (job views whose status or last run changed among the
        newest ``EVENTS_JOBS``), ``runs`` (with ``job_id=``: that job's runs that appeared or changed, and the job
        itself), ``dead_letters`` (the newest dead letter changed). The first events carry the current state.
        The server checks every ``EVENTS_POLL_S`` and ends the stream after ``EVENTS_MAX_S`` (reconnect) or at
        shutdown; a comment line every 15 s keeps proxies from closing it. Works with ``fetch`` (which can send
        the auth headers) as well as ``EventSource``."""
        user = self._user(request)
        job_id = request.query.get("job_id") or None
        if job_id is not None:
            await self.ingestion._owned_job(request, job_id)
        response = web.StreamResponse(
            headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        )
        await response.prepare(request)
        store = self.ingestion.store
        seen_jobs: dict[str, bytes] = {}
        seen_runs: dict[str, bytes] = {}
        seen_letter: str | None = ""
        started = last_write = time.monotonic()
        await response.write(b"retry: 2000\nevent: hello\ndata: {}\n\n")
        while not self.closing.is_set() and time.monotonic() - started < EVENTS_MAX_S:
            now = now_ms()
            chunks: list[bytes] = []
            jobs, _ = await store.list_jobs(user, EVENTS_JOBS)
            changed = []
            for job in jobs:
                view = job_view(job, now)
                digest = orjson.dumps([view["status"], view["last_run"], view["next_fire_at"]])
                if seen_jobs.get(job.job_id) != digest:
                    seen_jobs[job.job_id] = digest
                    changed.append(view)
            if changed:
                chunks.append(_sse("jobs", {"jobs": changed}))
            if job_id is not None:
                runs, _ = await store.list_runs(job_id, 50)
                changed_runs = []
                for run in runs:
                    view = run_view(run)
                    digest = orjson.dumps(view)
                    if seen_runs.get(run.run_id) != digest:
                        seen_runs[run.run_id] = digest
                        changed_runs.append(view)
                if changed_runs:
                    current = (await store.get_jobs([job_id])).get(job_id)
                    chunks.append(
                        _sse(
                            "runs",
                            {
                                "job_id": job_id,
                                "runs": changed_runs,
                                "job": job_view(current, now) if current else None,
                            },
                        )
                    )
            letters, _ = await store.list_dead_letters(user, 1)
            newest = letters[0].dead_letter_id if letters else None
            if newest != seen_letter:
                seen_letter = newest
                chunks.append(_sse("dead_letters", {"newest": dead_letter_view(letters[0]) if letters else None}))
            if not chunks and time.monotonic() - last_write > 15:
                chunks.append(b": ping\n\n")
            if chunks:
                try:
                    await response.write(b"".join(chunks))
                except (ConnectionResetError, RuntimeError):
                    break
                last_write = time.monotonic()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.closing.wait(), EVENTS_POLL_S)
        with contextlib.suppress(ConnectionResetError, RuntimeError):
            await response.write_eof()
        return response


def _sse(event: str, data: Any) -> bytes:
    return b"event: " + event.encode() + b"\ndata: " + orjson.dumps(data) + b"\n\n"


_DONE = {"pause": "Paused", "resume": "Resumed", "trigger": "Triggered", "delete": "Deleted"}


def _apply(action: str, job: Job, now: int) -> Job:
    """The new definition a bulk action appends (the same as the single-job routes)."""
    from dsched.ingestion.service import Ingestion

    if action == "pause":
        return job.model_copy(update={"paused": True})
    if action == "resume":
        resumed = job.model_copy(update={"paused": False})
        resumed.next_fire_ms = Ingestion._resume_point(resumed)
        return resumed
    if action == "delete":
        return job.model_copy(update={"deleted": True})
    return job


def _matches_filters(job: Job, status: str | None, project: str | None, now: int) -> bool:
    return (status is None or job.status.value == status) and (project is None or job.project_id == project)


def _worker_view(record: dict[str, Any]) -> dict[str, Any]:
    return {
        key: record.get(key)
        for key in ("node_id", "slots", "busy", "held", "running", "started_at", "heartbeat_at", "runs_total")
    }


def register(ingestion: Ingestion, app: web.Application) -> Console:
    """Add the console routes and the dashboard (``/ui``) to ``app``; call before the core routes."""
    from dsched.ingestion import ui

    console = Console(ingestion)
    console.register(app)
    ui.register(app, ingestion.settings)
    return console
