"""``python -m dsched.chaos``: run a chaos scenario against a real multi-process cluster and check what survived.

    python -m dsched.chaos [--scenario NAME] [--seed N] [--long] [--backends distributed|embedded|production]
        [--use-servers kafka=PORT,cassandra=PORT,elasticmq=PORT] [--report PATH]

One run: start the backend servers (etcd, moto) and the cluster (ingestion, writer, 2 coordinators, 2-3
pickers, 2-3 workers as separate ``dsched run`` processes), the target HTTP server and the workload; inject the
scenario's faults during the window; let the cluster drain; stop it; check the evidence (see
:mod:`chaos.checks`); write a JSON report. The exit status is 0 only if every required check passed.
Everything (service logs, data directory, report) stays in the run directory, printed at the end together with
the one command that replays the run.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import random
import sys
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

import orjson
import structlog

from dsched.chaos.checks import Evidence, analyse, percentiles, recovery
from dsched.chaos.cluster import (
    BUCKET_GRACE_S,
    BUCKET_S,
    LEASE_TTL_S,
    SHARD_COUNT,
    VISIBILITY_TIMEOUT_S,
    Backends,
    Cluster,
    Event,
    log_lines,
    now_ms,
    parse_use_servers,
)
from dsched.chaos.faults import BACKEND_KINDS, Injector, read_markers
from dsched.chaos.scenarios import LONG_MIN_FAULTS, LONG_WINDOW_S, SCENARIOS, burst_times, long_run_times, probe_times
from dsched.chaos.target import Target
from dsched.chaos.workload import SUBMIT_GIVE_UP_S, USER, Submitter, make_workload
from dsched.libs import logs
from dsched.libs.models import DeadLetter, Job, Run, run_id_for

# Which backend-server faults each backend choice can take. production: moto holds only S3 there, and a restart
# of it would lose blobs, not queued messages, which the checks do not model; etcd restarts apply as before.
BACKEND_FAULTS: dict[str, frozenset[str]] = {
    "embedded": frozenset(),
    "distributed": BACKEND_KINDS,
    "production": frozenset({"etcd-restart"}),
}
DRAIN_MIN_S = VISIBILITY_TIMEOUT_S + 1.0  # after the last fault: redeliveries of killed workers' runs show up
DRAIN_MAX_S = 30.0
DRAIN_MAX_LONG_S = 90.0
LONG_TOTAL_BUDGET_S = 600.0  # the whole long run, startup to report
SHORT_TOTAL_BUDGET_S = 300.0


@dataclass(frozen=True)
class Config:
    scenario: str
    seed: int
    long: bool = False
    backends: Backends = "distributed"
    report: Path | None = None
    run_dir: Path | None = None
    # Production's Kafka, Cassandra and ElasticMQ already running on these ports (not part of `reproduce`: the
    # same run without them starts its own).
    use_servers: dict[str, int] | None = None

    def reproduce(self) -> str:
        parts = [f"python -m dsched.chaos --scenario {self.scenario} --seed {self.seed}"]
        if self.long:
            parts.append("--long")
        if self.backends != "distributed":
            parts.append(f"--backends {self.backends}")
        return " ".join(parts)


async def run(cfg: Config) -> dict[str, Any]:
    """One chaos run; returns the report (also written to ``cfg.report`` or ``<run dir>/report.json``)."""
    scenario = SCENARIOS[cfg.scenario]
    if scenario.needs_distributed and cfg.backends == "embedded":
        raise ValueError(f"scenario {cfg.scenario!r} needs --backends distributed or production")
    window_s = LONG_WINDOW_S if cfg.long else scenario.window_s
    plan = scenario.plan(random.Random(f"{cfg.seed}/faults/{cfg.scenario}"), window_s, cfg.backends)
    plan = [f for f in plan if f.kind not in BACKEND_KINDS or f.kind in BACKEND_FAULTS[cfg.backends]]
    workload = make_workload(
        random.Random(f"{cfg.seed}/workload/{cfg.scenario}"),
        window_s,
        long_run_at_s=long_run_times(plan, window_s),
        burst_at_s=burst_times(plan),
        probe_at_s=probe_times(plan),
        probe_span_s=LEASE_TTL_S + 2.0,
        rate_per_s=scenario.rate_per_s,
        recurring=scenario.recurring + (4 if cfg.long else 0),
        prologue=scenario.prologue,
    )
    stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
    run_dir = (cfg.run_dir or Path("reports") / "chaos" / f"{cfg.scenario}-seed{cfg.seed}-{stamp}").resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    markers = run_dir / "cmd-markers.log"
    markers.touch()
    runner_log = _log_to_file(run_dir / "runner.log")
    events: list[Event] = []
    started = time.monotonic()
    target = Target()
    await target.start()
    cluster = Cluster(run_dir, scenario.shape, cfg.backends, on_event=events.append, use_servers=cfg.use_servers)
    durations: dict[str, float] = {}
    report: dict[str, Any] = {
        "scenario": cfg.scenario,
        "summary": scenario.summary,
        "seed": cfg.seed,
        "backends": cfg.backends,
        "long": cfg.long,
        "reproduce": cfg.reproduce(),
        "run_dir": str(run_dir),
        "started_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    _say(
        f"chaos: {cfg.scenario} seed={cfg.seed} backends={cfg.backends} window={window_s:g}s "
        f"faults={len(plan)} jobs={len(workload.jobs)} run dir {run_dir}"
    )
    try:
        durations["startup_s"] = round(await cluster.start(), 3)
        _say(f"chaos: cluster up in {durations['startup_s']}s")
        window_start = now_ms()
        injector = Injector(cluster, target, markers, cfg.seed)
        submitter = Submitter(cluster.api, target, markers, cluster.unique)
        submitting = asyncio.create_task(submitter.run(workload, window_start))
        injecting = asyncio.create_task(injector.run(plan, window_start))
        await asyncio.sleep(window_s)
        window_end = now_ms()
        await injecting
        await injector.wait(timeout_s=60.0)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(submitting, SUBMIT_GIVE_UP_S + 10.0)
        durations["window_s"] = round((now_ms() - window_start) / 1000, 3)
        _say(f"chaos: window over, {len(injector.records)} faults injected; draining")
        drain_started = time.monotonic()
        last_fault_end = max([f.end_ms or f.start_ms for f in injector.records] or [window_end])
        await _drain(cluster, workload.jobs, last_fault_end, DRAIN_MAX_LONG_S if cfg.long else DRAIN_MAX_S)
        durations["drain_s"] = round(time.monotonic() - drain_started, 3)
        exit_codes = await cluster.stop()
        store_jobs, runs, letters = await _read_store(cluster, workload.jobs)
        queue = await cluster.queue_counts()
        evidence = Evidence(
            window_start_ms=window_start,
            window_end_ms=window_end,
            jobs=workload.jobs,
            hits=list(target.hits),
            markers=read_markers(markers),
            store_jobs=store_jobs,
            runs=runs,
            dead_letters=letters,
            faults=injector.records,
            ttl_s=LEASE_TTL_S,
            visibility_s=VISIBILITY_TIMEOUT_S,
            shard_count=SHARD_COUNT,
            queue_dead=None if queue is None else queue.dead,
            process_events=[{"at_ms": e.at_ms, "slot": e.slot, "what": e.what, **e.details} for e in events],
        )
        checks, counts, lateness = analyse(evidence)
        report.update(
            {
                "window_s": window_s,
                "cluster": {
                    "shape": scenario.shape.__dict__,
                    "lease_ttl_s": LEASE_TTL_S,
                    "visibility_timeout_s": VISIBILITY_TIMEOUT_S,
                    "shard_count": SHARD_COUNT,
                    "bucket_s": BUCKET_S,
                    "bucket_grace_s": BUCKET_GRACE_S,
                    "urls": cluster.urls(),
                },
                "fault_plan": [f.as_dict() for f in plan],
                "fault_timeline": [r.as_dict(window_start) for r in injector.records],
                "process_events": evidence.process_events,
                "counts": counts,
                "lateness": lateness,
                "failover": {
                    "leader_reelection_s": percentiles(
                        [float(r.details["leader_after_s"]) for r in injector.records if "leader_after_s" in r.details]
                    ),
                    "process_restart_up_s": percentiles(
                        [
                            float(r.details["up_after_restart_s"])
                            for r in injector.records
                            if r.details.get("up_after_restart_s")
                        ]
                    ),
                },
                "checks": [c.as_dict() for c in checks],
                "passed": all(c.passed for c in checks if c.required),
                "exit_codes_on_sigterm": exit_codes,
                "log_warnings": _log_warnings(cluster),
                "notes": {
                    "affected": "a run is affected by a picker fault when its job's shard was assigned to the killed "
                    "or frozen picker at the moment of the fault (read from the coordination backend) "
                    "and it fell due between 0.2 s before the fault and TTL + 2 s after it",
                    "wiped_by_moto_restart": "moto keeps SQS in memory: a restart deletes queued messages, which a "
                    "real SQS never does; such runs are counted apart from 'lost'",
                },
                "workload": [j.as_dict() for j in workload.jobs],
                "hits": [h.as_dict() for h in target.hits],
            }
        )
        report["recovery"] = recovery(report)
    except BaseException as exc:
        report.update({"passed": False, "error": f"{type(exc).__name__}: {exc}"})
        raise
    finally:
        durations["total_s"] = round(time.monotonic() - started, 3)
        report["durations"] = durations
        with contextlib.suppress(Exception):
            await cluster.close()
        await target.stop()
        structlog.configure(logger_factory=structlog.PrintLoggerFactory(file=sys.stderr))
        runner_log.close()
        path = cfg.report or run_dir / "report.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(orjson.dumps(report, option=orjson.OPT_INDENT_2, default=str))
        report["report_path"] = str(path)
    return report


async def _drain(cluster: Cluster, jobs: list[Any], last_fault_end_ms: int, max_s: float) -> None:
    """Wait until every accepted one-off job is settled — a succeeded run, or a dead letter (failed for good)
    — and at least DRAIN_MIN_S after the last fault, so redeliveries have surfaced; bounded by ``max_s``.

    Settled is read from runs and dead letters, not from the job's state: a wrong final state is one of the
    things the checks report, and must not hold the drain up.
    """
    deadline = time.monotonic() + max_s
    earliest = last_fault_end_ms + int(DRAIN_MIN_S * 1000)
    pending = {j.job_id: j for j in jobs if j.outcome == "accepted" and j.job_id and not j.recurring}
    store = await cluster.store()
    while time.monotonic() < deadline:
        with contextlib.suppress(Exception):
            found = await store.get_jobs(list(pending))
            candidates = {
                run_id_for(job_id, job.next_fire_ms, attempt): job_id
                for job_id, job in found.items()
                for attempt in range(job.max_retries + 1)
            }
            runs = await store.get_runs(list(candidates))
            settled = {candidates[r.run_id] for r in runs.values() if r.status.value == "succeeded"}
            letters, _ = await store.list_dead_letters(USER, 1000)
            settled |= {letter.job_id for letter in letters}
            for job_id in settled:
                pending.pop(job_id, None)
        if not pending and now_ms() >= earliest:
            return
        await asyncio.sleep(0.5)


async def _read_store(
    cluster: Cluster, jobs: list[Any]
) -> tuple[dict[str, Job], dict[str, list[Run]], list[DeadLetter]]:
    store = await cluster.store()
    ids = [j.job_id for j in jobs if j.job_id]
    store_jobs = await store.get_jobs(ids)
    runs: dict[str, list[Run]] = {}
    for job_id in ids:
        collected: list[Run] = []
        cursor: str | None = None
        for _ in range(100):  # bounded pagination
            page, cursor = await store.list_runs(job_id, 1000, cursor)
            collected += page
            if cursor is None:
                break
        runs[job_id] = collected
    letters: list[DeadLetter] = []
    cursor = None
    for _ in range(100):
        page_letters, cursor = await store.list_dead_letters(USER, 1000, cursor)
        letters += page_letters
        if cursor is None:
            break
    return store_jobs, runs, letters


def _log_warnings(cluster: Cluster) -> dict[str, int]:
    """Warning and error events per ``service:event`` across all logs (what to read first on a failure)."""
    found: dict[str, int] = {}
    for process in cluster.processes.values():
        for line in log_lines(process.log_path):
            if line.get("level") in ("warning", "error", "critical"):
                key = f"{line.get('level')} {line.get('service')}:{line.get('event')}"
                found[key] = found.get(key, 0) + 1
    return dict(sorted(found.items(), key=lambda kv: -kv[1]))


def _log_to_file(path: Path) -> IO[str]:
    """The runner's own backend clients (etcd, SQS, SQLite) log here, not over the summary on the console."""
    handle = path.open("a")
    logs.configure("INFO")
    # Not cached: every log call looks the factory up again, so pointing it back at stderr releases the file.
    structlog.configure(logger_factory=structlog.PrintLoggerFactory(file=handle), cache_logger_on_first_use=False)
    return handle


def _say(text: str) -> None:
    print(text, flush=True)


def format_summary(report: dict[str, Any]) -> str:
    lines = [
        f"chaos: {report['scenario']} seed={report['seed']} backends={report['backends']}: "
        f"{'PASSED' if report.get('passed') else 'FAILED'}"
    ]
    if "error" in report:
        lines.append(f"  error: {report['error']}")
    for check in report.get("checks", []):
        mark = "ok  " if check["passed"] else ("FAIL" if check["required"] else "warn")
        lines.append(f"  [{mark}] {check['name']}: {check['summary']}")
    counts = report.get("counts", {})
    if counts:
        lines.append("  counts: " + ", ".join(f"{k}={v}" for k, v in counts.items()))
    failover = report.get("failover", {})
    for name, p in failover.items():
        lines.append(f"  {name}: n={p['n']} p50={p['p50']}s max={p['max']}s")
    lateness = report.get("lateness", {})
    for name in ("one_off", "recurring", "picker_failover"):
        if name in lateness:
            p = lateness[name]
            lines.append(
                f"  lateness {name}: n={p['n']} p50={p['p50']}s p90={p['p90']}s p99={p['p99']}s max={p['max']}s"
            )
    if "recovery" in report:
        r = report["recovery"]
        lines.append(
            f"  recovery (target TTL + 2 s = {r['target_s']}s): one-off p99={r['one_off_p99_s']}s "
            f"max={r['one_off_max_s']}s; recurring gap beyond interval max={r['recurring_max_gap_excess_s']}s "
            f"({r['recurring_gaps_over_target']} over target){'' if r['met'] else ' -- NOT MET'}"
        )
    lines.append(f"  durations: {report.get('durations')}")
    lines.append(f"  report: {report.get('report_path')}")
    lines.append(f"  reproduce: {report['reproduce']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Parse ``argv`` (default ``sys.argv[1:]``), run, print a summary; returns the exit status (0 = passed)."""
    parser = argparse.ArgumentParser(prog="python -m dsched.chaos", description=__doc__.splitlines()[0])
    parser.add_argument("--scenario", choices=sorted(SCENARIOS), default=None, help="named scenario (default: mixed)")
    parser.add_argument("--seed", type=int, default=None, help="seed of faults and workload (default: random)")
    parser.add_argument(
        "--long",
        action="store_true",
        help=f"the long run: mixed, {LONG_WINDOW_S:g} s window, >= {LONG_MIN_FAULTS} faults",
    )
    parser.add_argument(
        "--backends",
        choices=["distributed", "embedded", "production"],
        default="distributed",
        help="distributed: etcd + SQS/S3 (moto) + embedded log/store; embedded: all SQLite; "
        "production: Kafka + Cassandra + etcd + ElasticMQ + S3 (moto)",
    )
    parser.add_argument(
        "--use-servers",
        default=None,
        metavar="kafka=PORT,cassandra=PORT,elasticmq=PORT",
        help="production only: use these running servers on 127.0.0.1 (e.g. make stack's), any of Kafka, Cassandra "
        "and ElasticMQ, and start the others; the run keeps to a topic, keyspace and queue of its own",
    )
    parser.add_argument("--report", type=Path, default=None, help="where to write the JSON report")
    parser.add_argument("--run-dir", type=Path, default=None, help="logs and data (default reports/chaos/...)")
    parser.add_argument("--list", action="store_true", help="list the scenarios and exit")
    args = parser.parse_args(argv)
    if args.list:
        for scenario in SCENARIOS.values():
            print(f"{scenario.name:26} {scenario.summary}")
        return 0
    if args.long and args.scenario not in (None, "mixed"):
        parser.error("--long runs the mixed scenario")
    if args.scenario and SCENARIOS[args.scenario].needs_distributed and args.backends == "embedded":
        parser.error(f"scenario {args.scenario} needs --backends distributed or production")
    use_servers = None
    if args.use_servers is not None:
        if args.backends != "production":
            parser.error("--use-servers needs --backends production")
        try:
            use_servers = parse_use_servers(args.use_servers)
        except ValueError as exc:
            parser.error(f"--use-servers: {exc}")
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(1, 1_000_000)
    cfg = Config(
        scenario=args.scenario or "mixed",
        seed=seed,
        long=args.long,
        backends=args.backends,
        use_servers=use_servers,
        report=args.report,
        run_dir=args.run_dir,
    )
    budget = LONG_TOTAL_BUDGET_S if cfg.long else SHORT_TOTAL_BUDGET_S
    # The runner's idle etcd client draws GOAWAY "too_many_pings" lines from gRPC's C core into the summary.
    os.environ["GRPC_VERBOSITY"] = "NONE"
    try:
        report = asyncio.run(asyncio.wait_for(run(cfg), budget))
    except KeyboardInterrupt:
        print("chaos: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        print(f"chaos: run failed: {type(exc).__name__}: {exc}\n  reproduce: {cfg.reproduce()}", file=sys.stderr)
        return 2
    print(format_summary(report))
    return 0 if report.get("passed") else 1
