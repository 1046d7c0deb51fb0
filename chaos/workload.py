"""The chaos workload: a seeded plan of jobs, and the client that submits it during the window.

Kinds of jobs (each one-off job's expected outcome follows from its spec):

- quick HTTP jobs to the target, due immediately or up to a few seconds after submission, some
  ``at_most_once``; some fail their first ``fail`` attempts (transient: must still succeed), some always fail
  (permanent: must end in the dead letters after ``max_retries + 1`` attempts);
- quick and long ``cmd:`` jobs; a command appends ``start|end <token> <worker pid> <epoch ms>`` lines to the
  run directory's marker file, which shows executions (and which worker ran them) without the store;
- long HTTP jobs (the target sleeps) and long commands (``sleep``), due just before a planned worker kill;
- bursts of quick jobs due at the exact moment a picker is frozen (so it is likely frozen mid-dispatch);
- recurring ``@every 1s`` / ``@every 2s`` HTTP jobs.

A submission is retried on connection errors, timeouts and 5xx (ingestion may be down) with the same
``Idempotency-Key``, so a retry cannot create a second job; a job counts as accepted once the API answered
``202``, or ``200`` "already submitted with this Idempotency-Key" (a retry of a submission whose first answer
was lost).
"""

from __future__ import annotations

import asyncio
import random
import shlex
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import aiohttp
import orjson

from dsched.chaos.target import Target

USER = "chaos"
PROJECT = "chaos"
RETRY_POLICY = {"backoff": "fixed", "initial_s": 0.2, "jitter": False}
LONG_RUN_S = 3.0
SUBMIT_GIVE_UP_S = 30.0
SUBMIT_CONCURRENCY = 16


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def rfc3339(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


@dataclass
class JobSpec:
    """One planned job and, once submitted, what the API said."""

    key: str
    submit_at_s: float  # from the window start
    kind: Literal["http", "cmd"]
    purpose: str  # quick | long | burst | recurring
    execution: Literal["at_least_once", "at_most_once"] = "at_least_once"
    due_in_s: float | None = None  # after the submission; None: due at once
    due_at_s: float | None = None  # from the window start (overrides due_in_s)
    every_s: int | None = None
    fail: int = 0  # HTTP: the first `fail` attempts answer 500; -1: every attempt does
    max_retries: int = 2
    sleep_s: float = 0.0
    # Filled in by the submitter.
    job_id: str | None = None
    outcome: str = "planned"  # planned | accepted | unconfirmed | rejected
    requested_due_ms: int | None = None
    first_try_ms: int | None = None
    accepted_ms: int | None = None
    attempts: int = 0
    last_error: str | None = None

    @property
    def token(self) -> str:
        return f"tok-{self.key}"

    @property
    def recurring(self) -> bool:
        return self.every_s is not None

    @property
    def permanent_failure(self) -> bool:
        return self.fail < 0

    @property
    def transient_failure(self) -> bool:
        return self.fail > 0

    def payload(self, target: Target, markers: Path) -> str | dict[str, Any]:
        if self.kind == "http":
            return {"http": {"url": target.url(self.key, fail=self.fail, sleep_s=self.sleep_s), "method": "POST"}}
        path = shlex.quote(str(markers))
        start = f'echo "start {self.token} $PPID $(date +%s%3N)" >> {path}'
        end = f'echo "end {self.token} $PPID $(date +%s%3N)" >> {path}'
        if self.sleep_s <= 0:
            return f"cmd:{start}; {end}"
        return f"cmd:{start}; sleep {self.sleep_s:g}; {end}"

    def body(self, target: Target, markers: Path, window_start_ms: int, submit_ms: int) -> dict[str, Any]:
        body: dict[str, Any] = {
            "project_id": PROJECT,
            "name": self.key,
            "payload": self.payload(target, markers),
            "max_retries": self.max_retries,
            "retry": RETRY_POLICY,
            "execution": self.execution,
        }
        if self.every_s is not None:
            body["cron_schedule"] = f"@every {self.every_s}s"
        elif self.due_at_s is not None:
            self.requested_due_ms = window_start_ms + int(self.due_at_s * 1000)
            body["next_fire_at"] = rfc3339(self.requested_due_ms)
        elif self.due_in_s is not None:
            self.requested_due_ms = submit_ms + int(self.due_in_s * 1000)
            body["next_fire_at"] = rfc3339(self.requested_due_ms)
        return body

    def as_dict(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items()}


@dataclass
class WorkloadPlan:
    jobs: list[JobSpec] = field(default_factory=list)

    def add(self, **kwargs: Any) -> JobSpec:
        spec = JobSpec(key=f"j{len(self.jobs):04d}", **kwargs)
        self.jobs.append(spec)
        return spec


def _quick(plan: WorkloadPlan, rng: random.Random, submit_at_s: float, due_in_s: float | None) -> None:
    """One quick one-off job of a random flavour."""
    execution: Literal["at_least_once", "at_most_once"] = "at_most_once" if rng.random() < 0.3 else "at_least_once"
    if rng.random() < 0.15:
        plan.add(
            submit_at_s=submit_at_s, kind="cmd", purpose="quick", execution=execution, due_in_s=due_in_s, max_retries=1
        )
        return
    roll = rng.random()
    if roll < 0.12:
        fail = rng.choice([1, 2])
        plan.add(
            submit_at_s=submit_at_s,
            kind="http",
            purpose="quick",
            execution=execution,
            due_in_s=due_in_s,
            fail=fail,
            max_retries=fail,
        )  # exactly enough retries to succeed on the last one
    elif roll < 0.20:
        plan.add(
            submit_at_s=submit_at_s,
            kind="http",
            purpose="quick",
            execution=execution,
            due_in_s=due_in_s,
            fail=-1,
            max_retries=rng.choice([0, 1, 2]),
        )
    else:
        plan.add(submit_at_s=submit_at_s, kind="http", purpose="quick", execution=execution, due_in_s=due_in_s)


def make_workload(
    rng: random.Random,
    window_s: float,
    *,
    long_run_at_s: list[float],
    burst_at_s: list[float],
    probe_at_s: list[float],
    probe_span_s: float,
    rate_per_s: float,
    recurring: int,
    prologue: int,
) -> WorkloadPlan:
    """The job plan for one window: a prologue at t=0, a steady stream, and where the fault plan asks: long runs
    (worker kills), bursts (picker freezes) and probes (jobs falling due one after the other through
    ``probe_span_s`` after a picker fault, to measure how late the failover makes them)."""
    plan = WorkloadPlan()
    for i in range(recurring):
        plan.add(
            submit_at_s=0.0,
            kind="http",
            purpose="recurring",
            every_s=1 if i % 2 == 0 else 2,
            execution="at_most_once" if i % 4 == 1 else "at_least_once",
        )
    for _ in range(prologue):
        _quick(plan, rng, 0.0, rng.uniform(1.5, max(2.0, window_s - 0.5)))
    t = 0.5
    while t < window_s - 1.0:
        # Due within the window, so the drain does not wait for jobs planned after the faults.
        _quick(plan, rng, t, None if rng.random() < 0.4 else rng.uniform(0.5, min(4.0, window_s - t - 0.5)))
        t += rng.expovariate(rate_per_s)
    for at in long_run_at_s:
        # Due ~1 s before the fault: each is running (a worker holds it) when the fault strikes.
        due = max(0.8, at - 1.0)
        submit = max(0.0, due - 2.5)
        for kind in ("http", "cmd"):
            for execution in ("at_least_once", "at_most_once"):
                plan.add(
                    submit_at_s=submit,
                    kind=kind,
                    purpose="long",
                    execution=execution,
                    due_at_s=due,
                    sleep_s=LONG_RUN_S,
                    max_retries=1,
                )
    for at in burst_at_s:
        submit = max(0.0, at - 2.5)
        for i in range(24):
            plan.add(
                submit_at_s=submit,
                kind="http",
                purpose="burst",
                execution="at_most_once" if i % 2 else "at_least_once",
                due_at_s=at,
            )
    for at in probe_at_s:
        submit = max(0.0, at - 2.5)
        for i in range(16):
            plan.add(
                submit_at_s=submit,
                kind="http",
                purpose="probe",
                execution="at_most_once" if i % 2 else "at_least_once",
                due_at_s=at + probe_span_s * i / 16,
            )
    plan.jobs.sort(key=lambda j: j.submit_at_s)
    return plan


class Submitter:
    """Submits the plan's jobs at their times; retries like a careful client (same Idempotency-Key)."""

    def __init__(self, api: str, target: Target, markers: Path, unique: str) -> None:
        self.api = api
        self.target = target
        self.markers = markers
        self.unique = unique
        self._slots = asyncio.Semaphore(SUBMIT_CONCURRENCY)

    async def run(self, plan: WorkloadPlan, window_start_ms: int) -> None:
        timeout = aiohttp.ClientTimeout(total=5)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            await asyncio.gather(*(self._one(session, job, window_start_ms) for job in plan.jobs))

    async def _one(self, session: aiohttp.ClientSession, job: JobSpec, window_start_ms: int) -> None:
        delay = (window_start_ms + job.submit_at_s * 1000 - now_ms()) / 1000
        if delay > 0:
            await asyncio.sleep(delay)
        async with self._slots:
            job.first_try_ms = now_ms()
            body = orjson.dumps(job.body(self.target, self.markers, window_start_ms, job.first_try_ms))
            headers = {
                "X-User-ID": USER,
                "Content-Type": "application/json",
                "Idempotency-Key": f"chaos-{self.unique}-{job.key}",
            }
            deadline = time.monotonic() + SUBMIT_GIVE_UP_S
            while True:
                job.attempts += 1
                try:
                    async with session.post(f"{self.api}/submit", data=body, headers=headers) as resp:
                        data = await resp.read()
                        if resp.status in (200, 202):
                            job.job_id = str(orjson.loads(data)["job_id"])
                            job.accepted_ms = now_ms()
                            job.outcome = "accepted"
                            return
                        job.last_error = f"HTTP {resp.status}: {data[:200].decode(errors='replace')}"
                        if resp.status < 500:
                            job.outcome = "rejected"
                            return
                except (aiohttp.ClientError, TimeoutError, orjson.JSONDecodeError) as exc:
                    job.last_error = f"{type(exc).__name__}: {exc}"
                if time.monotonic() > deadline:
                    job.outcome = "unconfirmed"
                    return
                await asyncio.sleep(0.25)
