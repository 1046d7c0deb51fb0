"""What a chaos run must show, computed from evidence gathered after the run (pure functions, no I/O).

Evidence: the workload plan with what the API answered, every hit at the target, the ``cmd:`` marker lines,
and the store's jobs, runs and dead letters read after the cluster stopped; plus the fault timeline.

An *execution* of a run is a hit at the target (HTTP jobs) or a ``start`` marker line (``cmd:`` jobs): both are
recorded by something outside the scheduler, when the run really begins. Required checks (any failure makes
the run fail):

``no_lost_jobs``              every accepted one-off job executed at least once.
``at_most_once``              no at-most-once run (one run id = one job, occurrence and attempt) executed twice.
``recurring_no_gaps``         every occurrence of each recurring job up to the end of the window executed, and
                              no gap between consecutive executions exceeds interval + TTL + 2 s, plus the
                              length of any fault overlapping the gap that the system cannot mask faster (backend
                              outages, leader elections, frozen/killed workers holding the message).
``dead_letters``              every one-off job whose last run failed for good is in the dead letters; no job that
                              eventually succeeded is.
``transient_failures_retried`` jobs failing their first n attempts with max_retries = n succeeded.
``runs_match_hits``           every succeeded or HTTP-failed run in the store has a hit with its run id, and every
                              hit has a run record in the store.
``picker_failover_lateness``  lateness of jobs whose shard belonged to a killed/frozen picker and which fell due
                              during the failover, counted from the later of their due time and the fault's start
                              (a run due just before the fault was not yet late by the fault's doing): at most
                              TTL + 1 s for an isolated picker fault (no other fault touching those jobs),
                              2 * TTL + 1 s when the leader was lost at the same time; plus the run's baseline,
                              the median lateness of the one-off runs no fault touched (the normal path's own).

``job_states_settled``        every executed one-off job shows what its runs say: ``succeeded`` if one
                              succeeded, ``running`` while its latest run is (its worker died under it and the
                              message has not come back yet), else ``failed``; a job whose retry moto's restart
                              wiped from its in-memory queue is counted apart.

Advisory (reported, never failing): the work queue's own dead-letter store, processes that exited on their own,
at-least-once duplicates.
"""

from __future__ import annotations

import itertools
import math
import statistics
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Any

from dsched.chaos.faults import FaultRecord
from dsched.chaos.target import Hit
from dsched.chaos.workload import JobSpec
from dsched.libs.models import DeadLetter, Job, Run, RunStatus, run_id_for
from dsched.libs.sharding import shard_for

CLAIM_LOST_PREFIX = "at_most_once:"
EXAMPLES = 20


@dataclass
class Evidence:
    window_start_ms: int
    window_end_ms: int
    jobs: list[JobSpec]
    hits: list[Hit]
    markers: list[tuple[str, str, int, int]]  # (phase, token, pid, at_ms)
    store_jobs: dict[str, Job]
    runs: dict[str, list[Run]]  # job id -> runs
    dead_letters: list[DeadLetter]
    faults: list[FaultRecord]
    ttl_s: float
    visibility_s: float
    shard_count: int
    queue_dead: int | None = None
    process_events: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class CheckResult:
    name: str
    passed: bool
    required: bool
    summary: str
    examples: list[Any] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "passed": self.passed,
            "required": self.required,
            "summary": self.summary,
            "examples": self.examples[:EXAMPLES],
        }


def percentiles(values: list[float]) -> dict[str, float | int | None]:
    """p50/p90/p99/max (nearest rank) of seconds; ``n`` is the sample size."""
    if not values:
        return {"n": 0, "p50": None, "p90": None, "p99": None, "max": None}
    ordered = sorted(values)

    def rank(p: float) -> float:
        return round(ordered[min(len(ordered) - 1, max(0, math.ceil(p * len(ordered)) - 1))], 3)

    return {"n": len(ordered), "p50": rank(0.50), "p90": rank(0.90), "p99": rank(0.99), "max": round(ordered[-1], 3)}


# Fault interference ----------------------------------------------------------------------------------------
def _picker_fault(f: FaultRecord) -> bool:
    return f.kind in ("kill", "freeze") and (f.target or "").startswith("picker") and not f.details.get("error")


def _leader_loss(f: FaultRecord) -> bool:
    return f.kind == "kill-leader" or (f.kind in ("kill", "freeze") and (f.target or "").startswith("coordinator"))


def allowance_s(f: FaultRecord, ttl_s: float, visibility_s: float) -> float:
    """Extra delay a fault may add beyond one picker failover (TTL + 2 s), for runs that it overlaps."""
    length = ((f.end_ms or f.start_ms) - f.start_ms) / 1000
    target = f.target or ""
    if f.kind in ("etcd-restart",):
        return length + ttl_s + 1.0
    if f.kind in ("moto-pause", "moto-restart"):
        return length + visibility_s + 1.0
    if _leader_loss(f):
        return ttl_s + 1.0
    if target.startswith("worker") or f.kind == "kill-busy-worker":
        return visibility_s + 1.0
    if target in ("writer", "ingestion"):
        return length
    return 0.0


def _overlaps(f: FaultRecord, lo_ms: int, hi_ms: int, tail_s: float = 0.0) -> bool:
    end = (f.end_ms or f.start_ms) + int(tail_s * 1000)
    return f.start_ms <= hi_ms and end >= lo_ms


# The analysis --------------------------------------------------------------------------------------------
@dataclass
class _JobView:
    spec: JobSpec
    job_id: str
    shard: int
    job: Job | None
    runs: list[Run]
    hits: list[Hit]
    starts: list[int]  # execution start times (hits or cmd start markers), epoch ms
    due_ms: int

    @property
    def executed(self) -> bool:
        return bool(self.starts)


def _views(ev: Evidence) -> list[_JobView]:
    hits_by_job: dict[str, list[Hit]] = defaultdict(list)
    for hit in ev.hits:
        hits_by_job[hit.job_id].append(hit)
    starts_by_token: dict[str, list[int]] = defaultdict(list)
    for phase, token, _, at_ms in ev.markers:
        if phase == "start":
            starts_by_token[token].append(at_ms)
    views = []
    for spec in ev.jobs:
        if spec.outcome != "accepted" or spec.job_id is None:
            continue
        job = ev.store_jobs.get(spec.job_id)
        hits = sorted(hits_by_job.get(spec.job_id, []), key=lambda h: h.at_ms)
        starts = [h.at_ms for h in hits] if spec.kind == "http" else sorted(starts_by_token.get(spec.token, []))
        if job is not None:
            due = max(job.next_fire_ms, job.created_ms)
        else:
            due = max(spec.requested_due_ms or 0, spec.accepted_ms or 0)
        views.append(
            _JobView(
                spec,
                spec.job_id,
                shard_for(spec.job_id, ev.shard_count),
                job,
                ev.runs.get(spec.job_id, []),
                hits,
                starts,
                due,
            )
        )
    return views


def _wiped(view: _JobView, ev: Evidence, at_ms: int) -> bool:
    """A run that may have sat in the work queue when moto (in-memory) was restarted and wiped it: due at most
    a visibility timeout (+ 2 s) before the restart, or while moto was down, and never started."""
    for f in ev.faults:
        lo = f.start_ms - int((ev.visibility_s + 2.0) * 1000)
        if f.kind == "moto-restart" and lo <= at_ms <= (f.end_ms or f.start_ms) + 1000:
            state = view.job.state.value if view.job is not None and view.job.state else None
            if view.spec.recurring or state in ("queued", "running"):
                return True
    return False


def analyse(ev: Evidence) -> tuple[list[CheckResult], dict[str, Any], dict[str, Any]]:
    """Returns (checks, counts, lateness)."""
    views = _views(ev)
    one_offs = [v for v in views if not v.spec.recurring]
    recurring = [v for v in views if v.spec.recurring]
    checks: list[CheckResult] = []
    counts: dict[str, Any] = {}

    # no_lost_jobs --------------------------------------------------------------------------------------------
    lost, wiped, forfeited = [], [], []
    for v in one_offs:
        if v.executed:
            continue
        if v.spec.execution == "at_most_once" and any((r.error or "").startswith(CLAIM_LOST_PREFIX) for r in v.runs):
            forfeited.append(v)
        elif _wiped(v, ev, v.due_ms):
            wiped.append(v)
        else:
            lost.append(v)
    checks.append(
        CheckResult(
            "no_lost_jobs",
            not lost,
            True,
            f"{len(one_offs) - len(lost) - len(wiped) - len(forfeited)} of {len(one_offs)} accepted one-off jobs "
            f"executed; lost {len(lost)}; wiped with moto's in-memory queue {len(wiped)}; at-most-once runs "
            f"forfeited to a crash after their claim {len(forfeited)}",
            [_describe(v) for v in lost],
        )
    )

    # at_most_once ------------------------------------------------------------------------------------------
    duplicates: list[dict[str, Any]] = []
    alo_duplicates = 0
    for v in views:
        per_run = Counter(h.run_id for h in v.hits)
        if v.spec.kind == "cmd":
            per_run = Counter({f"cmd:{v.spec.token}": len(v.starts)})
        extra = sum(n - 1 for n in per_run.values() if n > 1)
        if v.spec.execution == "at_most_once" and extra:
            duplicates.append({**_describe(v), "executions_per_run": {k: n for k, n in per_run.items() if n > 1}})
        elif extra:
            alo_duplicates += extra
    dup_count = sum(sum(n - 1 for n in d["executions_per_run"].values()) for d in duplicates)
    checks.append(
        CheckResult(
            "at_most_once",
            not duplicates,
            True,
            f"{dup_count} duplicate executions of at-most-once runs "
            f"({sum(1 for v in views if v.spec.execution == 'at_most_once')} at-most-once jobs)",
            duplicates,
        )
    )

    # recurring_no_gaps -------------------------------------------------------------------------------------
    gap_problems: list[dict[str, Any]] = []
    occurrence_lateness: list[tuple[_JobView, int, float]] = []  # (job, occurrence, seconds)
    occurrences_checked = 0
    for v in recurring:
        if v.job is None or v.spec.every_s is None:
            gap_problems.append({**_describe(v), "problem": "recurring job not in the store"})
            continue
        interval = v.spec.every_s * 1000
        first_hit: dict[str, int] = {}
        for h in v.hits:
            first_hit.setdefault(h.run_id, h.at_ms)
        skipped = {r.scheduled_ms for r in v.runs if r.status == RunStatus.SKIPPED}
        forfeited_occ = {r.scheduled_ms for r in v.runs if (r.error or "").startswith(CLAIM_LOST_PREFIX)}
        occ = v.job.next_fire_ms
        while occ <= ev.window_end_ms:
            occurrences_checked += 1
            run_ids = [run_id_for(v.job_id, occ, attempt) for attempt in range(v.job.max_retries + 1)]
            seen = [first_hit[r] for r in run_ids if r in first_hit]
            if seen:
                occurrence_lateness.append((v, occ, (min(seen) - occ) / 1000))
            elif occ in forfeited_occ:
                pass  # at-most-once: claimed by a worker that died; never run again by design
            elif occ in skipped:
                gap_problems.append({**_describe(v), "problem": "occurrence skipped", "scheduled_ms": occ})
            elif not _wiped(v, ev, occ):
                gap_problems.append({**_describe(v), "problem": "occurrence never executed", "scheduled_ms": occ})
            occ += interval
        # Executions up to the window's end (plus one interval), and the first one after: a gap that starts in the
        # window and ends past its end is still a gap.
        cutoff = ev.window_end_ms + interval
        times = sorted(first_hit.values())
        times = times[: next((i + 1 for i, t in enumerate(times) if t > cutoff), len(times))]
        for a, b in itertools.pairwise(times):
            allowed = interval / 1000 + ev.ttl_s + 2.0
            allowed += sum(allowance_s(f, ev.ttl_s, ev.visibility_s) for f in ev.faults if _overlaps(f, a, b))
            if (b - a) / 1000 > allowed:
                gap_problems.append(
                    {
                        **_describe(v),
                        "problem": "gap",
                        "from_ms": a,
                        "to_ms": b,
                        "gap_s": round((b - a) / 1000, 3),
                        "allowed_s": round(allowed, 3),
                    }
                )
    checks.append(
        CheckResult(
            "recurring_no_gaps",
            not gap_problems,
            True,
            f"{len(recurring)} recurring jobs, {occurrences_checked} occurrences up to the end of the window; "
            f"{len(gap_problems)} problems",
            gap_problems,
        )
    )

    # dead_letters -------------------------------------------------------------------------------------------
    letters_by_job: dict[str, list[DeadLetter]] = defaultdict(list)
    for letter in ev.dead_letters:
        letters_by_job[letter.job_id].append(letter)
    dl_problems: list[dict[str, Any]] = []
    expected_letters = 0
    for v in one_offs:
        succeeded = any(r.status == RunStatus.SUCCEEDED for r in v.runs)
        failed_for_good = not succeeded and bool(v.runs) and _last_attempt_failed(v)
        if v.spec.permanent_failure or failed_for_good:
            expected_letters += 1
            if not letters_by_job.get(v.job_id):
                dl_problems.append(
                    {
                        **_describe(v),
                        "problem": "failed for good but not in the dead letters",
                        "runs": _runs_brief(v.runs),
                    }
                )
            elif v.spec.permanent_failure and v.spec.kind == "http":
                attempts = {h.attempt for h in v.hits}
                if attempts != set(range(v.spec.max_retries + 1)):
                    dl_problems.append(
                        {
                            **_describe(v),
                            "problem": "attempts at the target",
                            "attempts": sorted(attempts),
                            "expected": v.spec.max_retries + 1,
                        }
                    )
        elif succeeded and letters_by_job.get(v.job_id):
            dl_problems.append({**_describe(v), "problem": "succeeded but dead-lettered", "runs": _runs_brief(v.runs)})
    checks.append(
        CheckResult(
            "dead_letters",
            not dl_problems,
            True,
            f"{expected_letters} one-off jobs failed for good ({sum(1 for v in one_offs if v.spec.permanent_failure)} "
            f"by design); {len(ev.dead_letters)} dead letters; {len(dl_problems)} problems",
            dl_problems,
        )
    )

    # transient_failures_retried ----------------------------------------------------------------------------
    transient = [v for v in one_offs if v.spec.transient_failure]
    not_recovered = [
        {**_describe(v), "runs": _runs_brief(v.runs)}
        for v in transient
        if not any(r.status == RunStatus.SUCCEEDED for r in v.runs)
        and not any((r.error or "").startswith(CLAIM_LOST_PREFIX) for r in v.runs)
    ]
    checks.append(
        CheckResult(
            "transient_failures_retried",
            not not_recovered,
            True,
            f"{len(transient) - len(not_recovered)} of {len(transient)} jobs failing their first attempts succeeded",
            not_recovered,
        )
    )

    # runs_match_hits ---------------------------------------------------------------------------------------
    mismatch: list[dict[str, Any]] = []
    run_ids_in_store = {r.run_id for v in views for r in v.runs}
    for v in views:
        if v.spec.kind != "http":
            continue
        hit_runs = {h.run_id for h in v.hits}
        for r in v.runs:
            if (r.status == RunStatus.SUCCEEDED or r.http_status is not None) and r.run_id not in hit_runs:
                mismatch.append(
                    {
                        **_describe(v),
                        "problem": f"{r.status.value} run without a hit",
                        "run_id": r.run_id,
                        "attempt": r.attempt,
                        "scheduled_ms": r.scheduled_ms,
                    }
                )
        for run_id in sorted(hit_runs - run_ids_in_store):
            mismatch.append({**_describe(v), "problem": "hit without a run record", "run_id": run_id})
    checks.append(
        CheckResult(
            "runs_match_hits",
            not mismatch,
            True,
            f"{sum(len(v.runs) for v in views)} runs in the store, {len(ev.hits)} hits; {len(mismatch)} mismatches",
            mismatch,
        )
    )

    # picker_failover_lateness ------------------------------------------------------------------------------
    lateness_rows, bound_problems = _failover_lateness(ev, one_offs, occurrence_lateness)
    checks.append(
        CheckResult(
            "picker_failover_lateness",
            not bound_problems,
            True,
            f"{len(lateness_rows)} runs fell due during {sum(1 for f in ev.faults if _picker_fault(f))} picker "
            f"faults in the failed picker's shards; {len(bound_problems)} over their bound",
            bound_problems or lateness_rows,
        )
    )

    # job_states_settled ------------------------------------------------------------------------------------
    unsettled, unsettled_wiped = [], 0
    for v in one_offs:
        state = v.job.status.value if v.job is not None else None
        succeeded = any(r.status == RunStatus.SUCCEEDED for r in v.runs)
        latest = max(v.runs, key=lambda r: (r.scheduled_ms, r.attempt), default=None)
        if succeeded:
            expected = "succeeded"
        elif latest is not None and latest.status == RunStatus.RUNNING:
            expected = "running"  # its worker died under it and the message has not come back yet: still pending
        else:
            expected = "failed"
        if not v.executed or state == expected:
            continue
        last_end = max((r.finished_ms or r.started_ms or r.scheduled_ms for r in v.runs), default=v.due_ms)
        if not succeeded and _wiped(v, ev, last_end):
            unsettled_wiped += 1  # its retry went with moto's in-memory queue: nothing will ever settle it
        else:
            unsettled.append({**_describe(v), "state": state, "expected": expected})
    checks.append(
        CheckResult(
            "job_states_settled",
            not unsettled,
            True,
            f"{len(unsettled)} one-off jobs whose final state disagrees with their runs"
            + (f" (and {unsettled_wiped} whose retry moto's restart wiped)" if unsettled_wiped else ""),
            unsettled,
        )
    )

    # Advisory ----------------------------------------------------------------------------------------------
    checks.append(
        CheckResult(
            "queue_dead_letters_empty",
            not ev.queue_dead,
            False,
            f"work queue's own dead-letter store holds {ev.queue_dead} messages (never run, invisible to the API)"
            if ev.queue_dead is not None
            else "work queue counts unavailable",
            [],
        )
    )
    checks.append(
        CheckResult(
            "no_spontaneous_exits",
            not ev.process_events,
            False,
            f"{len(ev.process_events)} service processes exited without being killed",
            ev.process_events,
        )
    )

    # Counts and lateness -----------------------------------------------------------------------------------
    first_lateness = [(v.starts[0] - v.due_ms) / 1000 for v in one_offs if v.starts]
    counts.update(
        {
            "planned": len(ev.jobs),
            "accepted": sum(1 for j in ev.jobs if j.outcome == "accepted"),
            "unconfirmed": sum(1 for j in ev.jobs if j.outcome == "unconfirmed"),
            "rejected": sum(1 for j in ev.jobs if j.outcome == "rejected"),
            "accepted_one_off": len(one_offs),
            "accepted_recurring": len(recurring),
            "executed": sum(1 for v in one_offs if v.executed),
            "lost": len(lost),
            "wiped_by_moto_restart": len(wiped),
            "at_most_once_forfeited": len(forfeited),
            "duplicate_at_most_once_executions": dup_count,
            "duplicate_at_least_once_executions": alo_duplicates,
            "dead_letters": len(ev.dead_letters),
            "dead_letters_expected": expected_letters,
            "recurring_occurrences_checked": occurrences_checked,
            "hits": len(ev.hits),
            "runs": sum(len(v.runs) for v in views),
            "faults_injected": sum(1 for f in ev.faults if not f.details.get("error")),
            "faults_failed": sum(1 for f in ev.faults if f.details.get("error")),
            "queue_dead_letters": ev.queue_dead,
        }
    )
    lateness = {
        "definition": "first execution (hit at the target / cmd start marker) minus due time, seconds; the due "
        "time of a one-off job accepted after it was due is its acceptance time",
        "one_off": percentiles(first_lateness),
        "recurring": percentiles([s for _, _, s in occurrence_lateness]),
        "all": percentiles(first_lateness + [s for _, _, s in occurrence_lateness]),
        "picker_failover": percentiles([row["lateness_s"] for row in lateness_rows]),
    }
    return checks, counts, lateness


def _last_attempt_failed(v: _JobView) -> bool:
    """The job's latest attempt failed and no further attempt exists (retries used up or not retryable)."""
    last = max(v.runs, key=lambda r: (r.scheduled_ms, r.attempt))
    return last.status in (RunStatus.FAILED, RunStatus.TIMED_OUT)


def _failover_lateness(
    ev: Evidence, one_offs: list[_JobView], occurrences: list[tuple[_JobView, int, float]]
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Runs due during a picker fault in that picker's shards, with their lateness and bound."""
    rows: list[dict[str, Any]] = []
    problems: list[dict[str, Any]] = []
    window_ms = int((ev.ttl_s + 2.0) * 1000)
    samples: list[tuple[_JobView, int, float]] = [
        (v, v.due_ms, (v.starts[0] - v.due_ms) / 1000) for v in one_offs if v.starts
    ]
    # The normal path's own lateness in this run: the median of the one-off runs no fault could have delayed. On a
    # loaded machine every run is that late; only what a failover adds on top of it is the failover's.
    undisturbed = [late for v, due, late in samples if not any(_interferes(f, v, due, ev) for f in ev.faults)]
    baseline_s = round(max(0.0, statistics.median(undisturbed)), 3) if undisturbed else 0.0
    samples += occurrences
    for fault in ev.faults:
        if not _picker_fault(fault) or not fault.affected_shards:
            continue
        for v, due, late in samples:
            if v.shard not in fault.affected_shards or not fault.start_ms - 200 <= due <= fault.start_ms + window_ms:
                continue
            others = [f for f in ev.faults if f is not fault and _interferes(f, v, due, ev)]
            if others and not all(_leader_loss(f) for f in others):
                continue  # compound with other kinds of faults: only reported in the overall percentiles
            bound = round((ev.ttl_s + 1.0 if not others else 2 * ev.ttl_s + 1.0) + baseline_s, 3)
            # What the failover owes: the delay after the fault began (a run due up to 200 ms before it may have
            # been in the failed picker's hands, but its lateness until then is the normal path's).
            failover_s = late - max(0, fault.start_ms - due) / 1000
            row = {
                "fault": fault.index,
                "fault_kind": fault.kind,
                "picker": fault.node,
                "key": v.spec.key,
                "job_id": v.job_id,
                "shard": v.shard,
                "due_ms": due,
                "lateness_s": round(late, 3),
                "after_fault_start_s": round(failover_s, 3),
                "bound_s": bound,
                "baseline_s": baseline_s,
                "with_leader_loss": bool(others),
            }
            rows.append(row)
            if failover_s > bound:
                problems.append(row)
    return rows, problems


def _interferes(f: FaultRecord, v: _JobView, due_ms: int, ev: Evidence) -> bool:
    """Whether fault ``f`` may have delayed this run independently of the picker fault being measured."""
    created_ms = v.job.created_ms if v.job is not None else due_ms
    hi = due_ms + int((ev.ttl_s + 1.0) * 1000)
    if _picker_fault(f):
        return v.shard in (f.affected_shards or []) and _overlaps(f, due_ms - 1000, hi, ev.ttl_s)
    if (f.target or "") in ("writer", "ingestion"):
        return _overlaps(f, created_ms, due_ms, 1.0)
    if allowance_s(f, ev.ttl_s, ev.visibility_s) > 0:
        return _overlaps(f, due_ms - 1000, hi, ev.ttl_s)
    return False


def _describe(v: _JobView) -> dict[str, Any]:
    state = v.job.status.value if v.job is not None else "not in store"
    return {
        "key": v.spec.key,
        "job_id": v.job_id,
        "kind": v.spec.kind,
        "purpose": v.spec.purpose,
        "execution": v.spec.execution,
        "shard": v.shard,
        "due_ms": v.due_ms,
        "state": state,
        "executions": len(v.starts),
    }


def _runs_brief(runs: list[Run]) -> list[dict[str, Any]]:
    return [
        {"run_id": r.run_id, "attempt": r.attempt, "status": r.status.value, "error": r.error, "worker": r.worker_id}
        for r in sorted(runs, key=lambda r: (r.scheduled_ms, r.attempt))
    ]


# Recovery figures (issue 10) -----------------------------------------------------------------------------------
def recovery(report: dict[str, Any]) -> dict[str, Any]:
    """How fast the cluster recovered, from a finished report: one-off lateness p99/max and, per recurring job, the
    largest gap between consecutive executions beyond its interval — both against lease TTL + 2 s, with **no**
    allowance for the faults (unlike ``recurring_no_gaps``). Works on old reports too (hits and workload only).

    ``met`` is true when the one-off p99 and every recurring gap excess are within the target. Scenarios whose
    faults overlap (``mixed``) or take a backend down for longer than a second may exceed it by design; the figures
    are reported, never failing the run."""
    ttl_s = float(report.get("cluster", {}).get("lease_ttl_s", 0.0))
    target_s = ttl_s + 2.0
    recurring = {
        str(w["job_id"]): w for w in report.get("workload", []) if w.get("purpose") == "recurring" and w.get("job_id")
    }
    first: dict[str, dict[str, int]] = defaultdict(dict)
    for hit in report.get("hits", []):
        if hit.get("job_id") in recurring:
            runs = first[str(hit["job_id"])]
            runs[str(hit["run_id"])] = min(int(hit["at_ms"]), runs.get(str(hit["run_id"]), int(hit["at_ms"])))
    timeline = report.get("fault_timeline") or []
    window_start_ms = int(timeline[0]["start_ms"] - timeline[0]["t_s"] * 1000) if timeline else None
    gaps: list[dict[str, Any]] = []
    for job_id, runs in first.items():
        interval_s = float(recurring[job_id].get("every_s") or 0)
        for a, b in itertools.pairwise(sorted(runs.values())):
            gaps.append(
                {
                    "key": recurring[job_id].get("key"),
                    "every_s": interval_s,
                    "gap_s": round((b - a) / 1000, 3),
                    "excess_s": round((b - a) / 1000 - interval_s, 3),
                    "from_t_s": None if window_start_ms is None else round((a - window_start_ms) / 1000, 3),
                }
            )
    gaps.sort(key=lambda g: -float(g["excess_s"]))
    one_off = report.get("lateness", {}).get("one_off", {})
    occurrences = report.get("lateness", {}).get("recurring", {})
    p99 = one_off.get("p99")
    worst_excess = float(gaps[0]["excess_s"]) if gaps else 0.0
    return {
        "target_s": target_s,
        "one_off_p99_s": p99,
        "one_off_max_s": one_off.get("max"),
        "recurring_lateness_p99_s": occurrences.get("p99"),
        "recurring_lateness_max_s": occurrences.get("max"),
        "recurring_max_gap_excess_s": round(worst_excess, 3),
        "recurring_gaps_over_target": sum(1 for g in gaps if float(g["excess_s"]) > target_s),
        "worst_recurring_gaps": gaps[:5],
        "met": (p99 is None or float(p99) <= target_s) and worst_excess <= target_s,
    }
