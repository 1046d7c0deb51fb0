"""The client half of the ``dsched`` command: talk to a running API over HTTP.

dsched jobs submit PAYLOAD [--project P] [--name N] [--cron EXPR] [--at TIME] [--tz ZONE] [--max-retries N] [--wait]
dsched jobs list [--status S] [--project P] [--search Q] [--limit N]
dsched jobs get|runs|schedule ID
dsched jobs pause|resume|trigger|delete ID [ID ...]     (several ids: one bulk request)
dsched jobs wait ID [--timeout S]                      waits for the job's next run to finish
dsched runs get|output|cancel RUN_ID                   output is streamed as it arrives
dsched dlq list | dlq replay ID [ID ...]
dsched cluster status | cluster workers
dsched completion bash|zsh                             print a shell completion script

Every command takes ``--url`` (``DSCHED_URL``, default ``http://127.0.0.1:8080``), ``--api-key``
(``DSCHED_API_KEY``, sent as ``Authorization: Bearer``), ``--user`` (``DSCHED_USER``, sent as ``X-User-ID`` for
``dev`` mode) and ``--json`` (print the API's JSON answer instead of text, for scripts), after the command or
before it (``dsched --url U --json jobs list``); given in both places, the one after the command wins.

Exit status: 0 done; 1 the API refused (4xx/5xx) or, for ``jobs wait``, the run failed; 2 usage; 3 the server is
unreachable or ``jobs wait`` timed out. Errors are one line on stderr, ``dsched: ...``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import re
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from datetime import UTC, datetime, timedelta
from typing import Any

DEFAULT_URL = "http://127.0.0.1:8080"
COMMANDS = ("jobs", "runs", "dlq", "cluster", "completion")
FINAL = {"succeeded", "failed", "timed_out", "cancelled"}
FAILED = {"failed", "timed_out", "cancelled"}
SPINNER = "⠋⠙⠹⠸⠼⠴⠦⠧⠇⠏"
JOB_STATUSES = ["submitted", "scheduled", "queued", "running", "succeeded", "failed", "paused", "deleted"]


class CliError(Exception):
    """A one-line failure with its exit status."""

    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self.code = code


def version() -> str:
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as package_version

    try:
        return package_version("dsched")
    except PackageNotFoundError:
        return "unknown"


# HTTP -----------------------------------------------------------------------------------------------------
RETRY_ATTEMPTS = 5  # tries of a request the API refused with Retry-After (503 overloaded, 429 rate limited)
MAX_RETRY_AFTER_S = 30  # a longer Retry-After is reported, not waited for


def retry_after_s(status: int, retry_after: str | None, longest_s: float = MAX_RETRY_AFTER_S) -> float | None:
    """Seconds to wait before sending the same request again, when the API refused it without doing anything
    and said when to come back (429, or 503 with ``Retry-After`` of at most ``longest_s``); None when the
    answer is final."""
    if status not in (429, 503) or retry_after is None or not retry_after.isdigit() or int(retry_after) > longest_s:
        return None
    return float(retry_after)


class Client:
    """A small synchronous client for the dsched HTTP API (stdlib only, so the CLI starts fast)."""

    def __init__(self, url: str, api_key: str | None = None, user: str | None = None, timeout: float = 30) -> None:
        self.url = url.rstrip("/")
        self.api_key = api_key
        self.user = user
        self.timeout = timeout

    def headers(self) -> dict[str, str]:
        headers = {"Accept": "application/json", "User-Agent": f"dsched-cli/{version()}"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        if self.user:
            headers["X-User-ID"] = self.user
        return headers

    def open(self, method: str, path: str, body: Any = None, headers: dict[str, str] | None = None) -> Any:
        """Send a request; returns the open response (2xx) or raises :class:`CliError` with a one-line reason."""
        data = None if body is None else json.dumps(body).encode()
        all_headers = self.headers() | (headers or {})
        if data is not None:
            all_headers["Content-Type"] = "application/json"
        for attempt in range(1, RETRY_ATTEMPTS + 1):
            request = urllib.request.Request(self.url + path, data=data, method=method, headers=all_headers)
            try:
                return urllib.request.urlopen(request, timeout=self.timeout)
            except urllib.error.HTTPError as err:
                wait_s = retry_after_s(err.code, err.headers.get("Retry-After") if err.headers is not None else None)
                if wait_s is None or attempt == RETRY_ATTEMPTS:
                    raise CliError(self._describe(err)) from None
                time.sleep(wait_s)  # refused before anything was done (overloaded, rate limited): send it again
            except urllib.error.URLError as err:
                reason = getattr(err.reason, "strerror", None) or str(err.reason)
                raise CliError(
                    f"cannot reach {self.url} ({reason}); is the server running? (--url, DSCHED_URL)", 3
                ) from None
            except (TimeoutError, OSError) as err:
                raise CliError(
                    f"cannot reach {self.url} ({err}); is the server running? (--url, DSCHED_URL)", 3
                ) from None
        raise AssertionError("unreachable")  # the last attempt returned or raised

    def call(self, method: str, path: str, body: Any = None, headers: dict[str, str] | None = None) -> Any:
        with self.open(method, path, body, headers) as response:
            raw = response.read()
        return json.loads(raw) if raw else {}

    def _describe(self, err: urllib.error.HTTPError) -> str:
        detail = ""
        try:
            answer = json.loads(err.read() or b"{}")
            detail = str(answer.get("detail") or answer.get("error") or "")
        except (ValueError, AttributeError):
            pass
        hint = ""
        if err.code == 401:
            hint = " (set --api-key/DSCHED_API_KEY, or --user/DSCHED_USER in dev mode)"
        elif err.code == 403:
            hint = " (your key's role may not do this)"
        return f"{err.code} {err.reason.lower() if isinstance(err.reason, str) else err.reason}: {detail}{hint}"


# Formatting -----------------------------------------------------------------------------------------------
def table(rows: list[list[str]], header: list[str]) -> str:
    """A plain left-aligned text table (two spaces between columns)."""
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in [header, *rows]]
    return "\n".join(lines)


def short_time(value: str | None) -> str:
    if not value:
        return "-"
    return value.replace("T", " ").replace("Z", "")[:19]


def payload_text(job: dict[str, Any]) -> str:
    payload = job.get("payload") or {}
    if payload.get("kind") == "http" and payload.get("http"):
        return f"{payload['http'].get('method', 'GET')} {payload['http'].get('url', '')}"
    if payload.get("offloaded"):
        return "(large payload)"
    prefix = "cmd:" if payload.get("kind") == "cmd" else ""
    return prefix + str(payload.get("text") or "")


def emit(args: argparse.Namespace, data: Any, text: str) -> None:
    print(json.dumps(data, indent=2) if args.json else text)


def parse_at(value: str) -> str:
    """``--at``: RFC3339 as is, or ``+30s`` / ``+5m`` / ``+2h`` / ``+1d`` from now (UTC)."""
    relative = re.fullmatch(r"\+(\d+(?:\.\d+)?)([smhd])", value.strip())
    if relative is None:
        return value
    seconds = float(relative.group(1)) * {"s": 1, "m": 60, "h": 3600, "d": 86400}[relative.group(2)]
    at = datetime.now(UTC) + timedelta(seconds=seconds)
    return at.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def parse_payload(value: str) -> Any:
    """A JSON object (``{"http": {...}}``) is sent as JSON; anything else as the string it is."""
    if value.lstrip().startswith("{"):
        try:
            return json.loads(value)
        except ValueError as exc:
            raise CliError(f"PAYLOAD looks like JSON but is not: {exc}", 2) from None
    return value


# Commands -------------------------------------------------------------------------------------------------
def jobs_submit(client: Client, args: argparse.Namespace) -> int:
    body: dict[str, Any] = {"project_id": args.project, "payload": parse_payload(args.payload)}
    if args.name:
        body["name"] = args.name
    if args.cron:
        body["cron_schedule"] = args.cron
    if args.at:
        body["next_fire_at"] = parse_at(args.at)
    if args.tz:
        body["timezone"] = args.tz
    if args.max_retries is not None:
        body["max_retries"] = args.max_retries
    headers = {"Idempotency-Key": args.idempotency_key} if args.idempotency_key else None
    answer = client.call("POST", "/submit", body, headers)
    if args.wait:
        if not args.json:
            print(answer["job_id"], flush=True)
        return jobs_wait(client, args, answer["job_id"], quiet_json=answer)
    emit(args, answer, str(answer["job_id"]))
    return 0


def jobs_list(client: Client, args: argparse.Namespace) -> int:
    query: dict[str, Any] = {"limit": args.limit}
    if args.status:
        query["status"] = args.status
    if args.project:
        query["project_id"] = args.project
    if args.search:
        query["q"] = args.search
    if args.cursor:
        query["cursor"] = args.cursor
    answer = client.call("GET", "/jobs?" + urllib.parse.urlencode(query))
    rows = [
        [
            j["job_id"],
            (j.get("name") or "-")[:24],
            j.get("project_id", ""),
            j.get("status", ""),
            j.get("cron_schedule") or "once",
            short_time(j.get("next_fire_at")),
            (j.get("last_run") or {}).get("status", "-"),
        ]
        for j in answer.get("jobs", [])
    ]
    text = table(rows, ["JOB ID", "NAME", "PROJECT", "STATUS", "SCHEDULE", "NEXT FIRE (UTC)", "LAST RUN"])
    if not rows:
        text = "no jobs"
    if answer.get("next_cursor"):
        text += f"\n(more: --cursor {answer['next_cursor']})"
    emit(args, answer, text)
    return 0


def job_text(job: dict[str, Any]) -> str:
    last = job.get("last_run") or {}
    fields = [
        ("job", job["job_id"]),
        ("name", job.get("name") or "-"),
        ("project", job.get("project_id", "")),
        ("status", job.get("status", "")),
        ("payload", payload_text(job)),
        ("schedule", f"{job.get('cron_schedule') or 'once'} ({job.get('timezone', 'UTC')})"),
        ("next fire", short_time(job.get("next_fire_at")) + (" UTC" if job.get("next_fire_at") else "")),
        ("retries", str(job.get("max_retries"))),
        ("created", short_time(job.get("created_at"))),
        ("last run", f"{last.get('status')} {last.get('run_id')}" if last else "-"),
    ]
    return "\n".join(f"{k + ':':<11}{v}" for k, v in fields)


def jobs_get(client: Client, args: argparse.Namespace) -> int:
    job = client.call("GET", f"/jobs/{quote(args.id)}")
    emit(args, job, job_text(job))
    return 0


def run_rows(runs: list[dict[str, Any]]) -> list[list[str]]:
    rows = []
    for r in runs:
        result = r.get("error") or ""
        if r.get("exit_code") is not None:
            result = f"exit {r['exit_code']}" + (f": {result}" if result else "")
        elif r.get("http_status") is not None:
            result = f"HTTP {r['http_status']}" + (f": {result}" if result else "")
        rows.append(
            [
                r["run_id"],
                str(r.get("attempt", 0)),
                r.get("status", ""),
                short_time(r.get("scheduled_for")),
                short_time(r.get("finished_at")),
                (result or "-")[:60],
            ]
        )
    return rows


def jobs_runs(client: Client, args: argparse.Namespace) -> int:
    answer = client.call("GET", f"/jobs/{quote(args.id)}/runs?limit={args.limit}")
    runs = answer.get("runs", [])
    text = table(run_rows(runs), ["RUN ID", "ATTEMPT", "STATUS", "SCHEDULED (UTC)", "FINISHED", "RESULT"])
    emit(args, answer, text if runs else "no runs yet")
    return 0


def jobs_schedule(client: Client, args: argparse.Namespace) -> int:
    answer = client.call("GET", f"/jobs/{quote(args.id)}/schedule?next={args.next}")
    lines = [f"next fire times (UTC; the job's time zone is {answer.get('timezone')}):"]
    lines += [f"  {short_time(t)}" for t in answer.get("next", [])] or ["  none (paused, deleted or done)"]
    emit(args, answer, "\n".join(lines))
    return 0


def jobs_action(client: Client, args: argparse.Namespace) -> int:
    action = args.jobs_command
    if len(args.ids) == 1:
        method, path = ("DELETE", f"/jobs/{quote(args.ids[0])}") if action == "delete" else ("POST", "")
        if method == "POST":
            path = f"/jobs/{quote(args.ids[0])}/{action}"
        answer = client.call(method, path)
        emit(args, answer, f"{answer.get('job_id')}: {answer.get('status')}")
        return 0
    answer = client.call("POST", "/jobs/bulk", {"action": action, "job_ids": args.ids})
    lines = [f"{r['job_id']}: {r.get('status') if r['ok'] else r.get('error')}" for r in answer["results"]]
    emit(args, answer, "\n".join(lines))
    return 0 if answer.get("failed", 0) == 0 else 1


def jobs_wait(
    client: Client, args: argparse.Namespace, job_id: str | None = None, quiet_json: dict[str, Any] | None = None
) -> int:
    """Wait for the job's next run to finish: the first run, not already final when waiting began, whose
    outcome is final (succeeded, or failed with no retry left). A one-shot job that already finished reports its
    last run at once. Exit 0 succeeded, 1 failed, 3 timed out."""
    job_id = job_id or args.id
    deadline = time.monotonic() + args.timeout
    if quiet_json is not None:  # just accepted: tolerate the moment before the job is readable
        for _ in range(50):
            try:
                client.call("GET", f"/jobs/{quote(job_id)}")
                break
            except CliError as exc:
                if not str(exc).startswith("404"):
                    raise
                time.sleep(0.1)
    runs = client.call("GET", f"/jobs/{quote(job_id)}/runs?limit=50").get("runs", [])
    job = client.call("GET", f"/jobs/{quote(job_id)}")
    before = {r["run_id"] for r in runs if r.get("status") in FINAL}
    if runs and not job.get("next_fire_at") and not job.get("cron_schedule") and runs[0].get("status") in FINAL:
        if _final(runs[0], job):
            return _report(args, job, runs[0], quiet_json)
    spinner = itertools.cycle(SPINNER)
    show = sys.stderr.isatty() and not args.json
    started = time.monotonic()
    state = "waiting for the next run"
    while time.monotonic() < deadline:
        runs = client.call("GET", f"/jobs/{quote(job_id)}/runs?limit=50").get("runs", [])
        fresh = [r for r in runs if r["run_id"] not in before and r.get("status") != "skipped"]
        finished = [r for r in fresh if r.get("status") in FINAL]
        if finished:
            job = client.call("GET", f"/jobs/{quote(job_id)}")
            newest = finished[0]
            if _final(newest, job):
                if show:
                    sys.stderr.write("\r\033[K")
                return _report(args, job, newest, quiet_json)
            state = f"attempt {newest.get('attempt', 0)} {newest['status']}, retrying"
        elif fresh:
            running = fresh[0]
            state = f"run {running['run_id'][:8]} {running.get('status')}"
        if show:
            elapsed = time.monotonic() - started
            sys.stderr.write(f"\r\033[K{next(spinner)} job {job_id[:8]}: {state} ({elapsed:.1f}s)")
            sys.stderr.flush()
        time.sleep(min(0.25, max(0.0, deadline - time.monotonic())))
    if show:
        sys.stderr.write("\r\033[K")
    raise CliError(f"timed out after {args.timeout:g}s waiting for job {job_id}: {state}", 3)


def _final(run: dict[str, Any], job: dict[str, Any]) -> bool:
    if run.get("status") == "succeeded":
        return True
    return int(run.get("attempt", 0)) >= int(job.get("max_retries") or 0) or job.get("status") == "failed"


def _report(args: argparse.Namespace, job: dict[str, Any], run: dict[str, Any], extra: dict[str, Any] | None) -> int:
    ok = run.get("status") == "succeeded"
    data = {"job_id": job["job_id"], "run": run} | ({"submitted": extra} if extra else {})
    detail = run.get("error") or (f"exit {run['exit_code']}" if run.get("exit_code") is not None else "")
    text = f"{'✓' if ok else '✗'} run {run['run_id']} {run['status']}" + (f" ({detail})" if detail else "")
    if run.get("output"):
        text += "\n" + str(run["output"]).rstrip("\n")
    emit(args, data, text)
    return 0 if ok else 1


def runs_get(client: Client, args: argparse.Namespace) -> int:
    run = client.call("GET", f"/runs/{quote(args.run_id)}")
    text = table(run_rows([run]), ["RUN ID", "ATTEMPT", "STATUS", "SCHEDULED (UTC)", "FINISHED", "RESULT"])
    emit(args, run, text)
    return 0


def runs_output(client: Client, args: argparse.Namespace) -> int:
    """Stream the run's output to stdout as it arrives (64 KiB at a time)."""
    if args.json:
        run = client.call("GET", f"/runs/{quote(args.run_id)}")
        with client.open("GET", f"/runs/{quote(args.run_id)}/output") as response:
            output = response.read().decode(errors="replace")
        print(json.dumps({"run_id": run["run_id"], "status": run["status"], "output": output}, indent=2))
        return 0
    with client.open("GET", f"/runs/{quote(args.run_id)}/output") as response:
        while chunk := response.read(65536):
            sys.stdout.buffer.write(chunk)
            sys.stdout.buffer.flush()
    return 0


def runs_cancel(client: Client, args: argparse.Namespace) -> int:
    answer = client.call("POST", f"/runs/{quote(args.run_id)}/cancel")
    emit(args, answer, f"{answer.get('run_id')}: {answer.get('status')}")
    return 0


def dlq_list(client: Client, args: argparse.Namespace) -> int:
    answer = client.call("GET", f"/dead-letters?limit={args.limit}")
    letters = answer.get("dead_letters", [])
    rows = [
        [
            d["id"],
            d["job_id"],
            d.get("project_id", ""),
            str(d.get("attempts")),
            short_time(d.get("dead_at")),
            (d.get("error") or "")[:50],
        ]
        for d in letters
    ]
    text = table(rows, ["ID", "JOB ID", "PROJECT", "ATTEMPTS", "DEAD AT (UTC)", "ERROR"]) if rows else "no dead letters"
    emit(args, answer, text)
    return 0


def dlq_replay(client: Client, args: argparse.Namespace) -> int:
    if len(args.ids) == 1:
        answer = client.call("POST", f"/dead-letters/{quote(args.ids[0])}/replay")
        emit(args, answer, f"{args.ids[0]}: {answer.get('status')} (job {answer.get('job_id')})")
        return 0
    answer = client.call("POST", "/dead-letters/replay", {"ids": args.ids})
    lines = [f"{r['id']}: {r.get('status') if r['ok'] else r.get('error')}" for r in answer["results"]]
    emit(args, answer, "\n".join(lines))
    return 0 if answer.get("failed", 0) == 0 else 1


def cluster_status(client: Client, args: argparse.Namespace) -> int:
    cluster = client.call("GET", "/cluster")
    stats = client.call("GET", "/stats?window_s=900")
    queue = cluster.get("queue") or {}
    lines = [
        f"leader:   {cluster.get('leader') or '(none)'}",
        f"queue:    {queue.get('visible', '-')} waiting, {queue.get('in_flight', '-')} in flight",
        writer_line(cluster.get("writer") or {}),
        f"last 15m: {sum(stats.get('runs', {}).values())} runs"
        + (" (" + ", ".join(f"{k} {v}" for k, v in stats.get("runs", {}).items()) + ")" if stats.get("runs") else "")
        + f"; fire lag p50 {fmt_ms(stats.get('fire_lag_p50_ms'))}, p99 {fmt_ms(stats.get('fire_lag_p99_ms'))}",
        "",
        table(
            [[p["node_id"], shard_ranges(p.get("shards", []))] for p in cluster.get("pickers", [])],
            ["PICKER", "SHARDS"],
        ),
        "",
        table(
            [
                [
                    w["node_id"],
                    f"{w.get('busy', 0)}/{w.get('slots', 0)}",
                    str(len(w.get("running") or [])),
                    short_time(w.get("heartbeat_at")),
                ]
                for w in cluster.get("workers", [])
            ],
            ["WORKER", "BUSY/SLOTS", "RUNNING", "HEARTBEAT (UTC)"],
        ),
    ]
    emit(args, {"cluster": cluster, "stats": stats}, "\n".join(lines))
    return 0


def writer_line(writer: dict[str, Any]) -> str:
    """The writers' backlog and admission control's bound, as ``cluster status`` shows them."""
    backlog, bound = writer.get("backlog"), writer.get("max_backlog") or 0
    left = "(the log did not answer)" if backlog is None else f"{backlog} submissions left to store"
    every = writer.get("refuse_all_above") or bound
    refused = f"new work refused above {bound} from tenants over their share, above {every} from all"
    refused = refused if bound else "admission control off"
    return f"writer:   {left}; {refused}"


def cluster_workers(client: Client, args: argparse.Namespace) -> int:
    answer = client.call("GET", "/workers")
    rows = [
        [w["node_id"], f"{w.get('busy', 0)}/{w.get('slots', 0)}", ", ".join(w.get("running") or []) or "-"]
        for w in answer.get("workers", [])
    ]
    emit(args, answer, table(rows, ["WORKER", "BUSY/SLOTS", "RUNS"]) if rows else "no live workers")
    return 0


def fmt_ms(value: float | None) -> str:
    return "-" if value is None else f"{value:g} ms"


def shard_ranges(shards: list[int]) -> str:
    """``[0, 1, 2, 5]`` → ``0-2,5``."""
    parts: list[str] = []
    for _, group in itertools.groupby(enumerate(sorted(shards)), lambda p: p[1] - p[0]):
        values = [v for _, v in group]
        parts.append(str(values[0]) if len(values) == 1 else f"{values[0]}-{values[-1]}")
    return ",".join(parts) or "-"


def quote(value: str) -> str:
    return urllib.parse.quote(value, safe="")


# Parser -----------------------------------------------------------------------------------------------------
def _common() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--url", default=os.environ.get("DSCHED_URL", DEFAULT_URL), help="API base URL (DSCHED_URL)")
    common.add_argument("--api-key", default=os.environ.get("DSCHED_API_KEY"), help="API key (DSCHED_API_KEY)")
    common.add_argument("--user", default=os.environ.get("DSCHED_USER"), help="user id in dev mode (DSCHED_USER)")
    common.add_argument("--json", action="store_true", help="print the API's JSON answer")
    return common


def add_commands(sub: Any) -> None:
    """Add ``jobs``, ``runs``, ``dlq``, ``cluster`` and ``completion`` to the ``dsched`` subparsers."""
    common = _common()
    jobs = sub.add_parser("jobs", help="submit, list, inspect and steer jobs").add_subparsers(
        dest="jobs_command", required=True
    )
    p = jobs.add_parser("submit", parents=[common], help="submit a job; prints its id")
    p.add_argument("payload", help="'cmd:<shell>', any other text, or a JSON object like '{\"http\": {...}}'")
    p.add_argument("--project", default=os.environ.get("DSCHED_PROJECT", "default"))
    p.add_argument("--name")
    p.add_argument("--cron", help="5/6-field cron, @every 5m, @hourly, ...")
    p.add_argument("--at", help="first fire time: RFC3339 or +30s/+5m/+2h/+1d")
    p.add_argument("--tz", help="IANA time zone for --cron (default UTC)")
    p.add_argument("--max-retries", type=int)
    p.add_argument("--idempotency-key")
    p.add_argument("--wait", action="store_true", help="then wait for its first run (like jobs wait)")
    p.add_argument("--timeout", type=float, default=3600.0, help="with --wait: seconds to wait at most")
    p.set_defaults(handler=jobs_submit)
    p = jobs.add_parser("list", parents=[common], help="your jobs, newest first")
    p.add_argument("--status", choices=JOB_STATUSES)
    p.add_argument("--project")
    p.add_argument("--search", "-q", help="job id, or text in the name/project/payload")
    p.add_argument("--limit", type=int, default=50)
    p.add_argument("--cursor")
    p.set_defaults(handler=jobs_list)
    for name, handler, help_text in (
        ("get", jobs_get, "show a job"),
        ("runs", jobs_runs, "a job's runs, newest first"),
        ("schedule", jobs_schedule, "a job's next fire times"),
        ("wait", jobs_wait, "wait for the job's next run to finish (exit 0 succeeded, 1 failed)"),
    ):
        p = jobs.add_parser(name, parents=[common], help=help_text)
        p.add_argument("id", metavar="JOB_ID")
        p.set_defaults(handler=handler)
        if name == "runs":
            p.add_argument("--limit", type=int, default=20)
        if name == "schedule":
            p.add_argument("--next", type=int, default=5)
        if name == "wait":
            p.add_argument("--timeout", type=float, default=3600.0, help="seconds to wait at most (exit 3)")
    for name in ("pause", "resume", "trigger", "delete"):
        p = jobs.add_parser(name, parents=[common], help=f"{name} one or more jobs")
        p.add_argument("ids", nargs="+", metavar="JOB_ID")
        p.set_defaults(handler=jobs_action)

    runs = sub.add_parser("runs", help="inspect runs").add_subparsers(dest="runs_command", required=True)
    for name, handler, help_text in (
        ("get", runs_get, "show a run"),
        ("output", runs_output, "stream a run's full output"),
        ("cancel", runs_cancel, "stop a running run"),
    ):
        p = runs.add_parser(name, parents=[common], help=help_text)
        p.add_argument("run_id", metavar="RUN_ID")
        p.set_defaults(handler=handler)

    dlq = sub.add_parser("dlq", help="dead letters").add_subparsers(dest="dlq_command", required=True)
    p = dlq.add_parser("list", parents=[common], help="your dead letters, newest first")
    p.add_argument("--limit", type=int, default=50)
    p.set_defaults(handler=dlq_list)
    p = dlq.add_parser("replay", parents=[common], help="run dead-lettered jobs again now")
    p.add_argument("ids", nargs="+", metavar="ID")
    p.set_defaults(handler=dlq_replay)

    cluster = sub.add_parser("cluster", help="the cluster (admin)").add_subparsers(
        dest="cluster_command", required=True
    )
    p = cluster.add_parser("status", parents=[common], help="leader, pickers, workers, queue, last 15 minutes")
    p.set_defaults(handler=cluster_status)
    p = cluster.add_parser("workers", parents=[common], help="live workers and their runs")
    p.set_defaults(handler=cluster_workers)

    p = sub.add_parser("completion", help='print a shell completion script: eval "$(dsched completion bash)"')
    p.add_argument("shell", choices=["bash", "zsh"])
    p.set_defaults(handler=None, completion=True)


def completion_script(parser: argparse.ArgumentParser, shell: str) -> str:
    """A bash completion script (zsh: through ``bashcompinit``) completing subcommands and options."""
    words: dict[str, list[str]] = {}

    def walk(p: argparse.ArgumentParser, path: str) -> None:
        options = [o for a in p._actions for o in a.option_strings if o.startswith("--")]
        children: list[str] = []
        for action in p._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, child in action.choices.items():
                    children.append(name)
                    walk(child, f"{path} {name}".strip())
            elif action.choices and not action.option_strings:
                children.extend(str(c) for c in action.choices)
        words[path] = children + options

    walk(parser, "")
    cases = "\n".join(f'        "{path}") words="{" ".join(ws)}" ;;' for path, ws in sorted(words.items()))
    script = f"""# dsched completion ({shell}); install: eval "$(dsched completion {shell})"
_dsched_complete() {{
    local cur path="" w i
    cur="${{COMP_WORDS[COMP_CWORD]}}"
    for ((i = 1; i < COMP_CWORD; i++)); do
        w="${{COMP_WORDS[i]}}"
        [[ "$w" == -* ]] && continue
        case "${{path:+$path }}$w" in
{chr(10).join(f'            "{p}") path="{p}" ;;' for p in sorted(words) if p)}
        esac
    done
    local words=""
    case "$path" in
{cases}
    esac
    COMPREPLY=($(compgen -W "$words" -- "$cur"))
}}
complete -F _dsched_complete dsched
"""
    if shell == "zsh":
        script = "autoload -U +X bashcompinit && bashcompinit\n" + script
    return script


def run(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    """Run a parsed client command; one-line errors on stderr, exit status as in the module docstring."""
    if getattr(args, "completion", False):
        print(completion_script(parser, args.shell), end="")
        return 0
    client = Client(args.url, api_key=args.api_key, user=args.user)
    try:
        return int(args.handler(client, args))
    except CliError as exc:
        print(f"dsched: {exc}", file=sys.stderr)
        return exc.code
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0


FAST = ("jobs", "runs", "dlq", "cluster")
VALUED = ("--url", "--api-key", "--user")


def hoist_options(argv: list[str]) -> list[str]:
    """Let the common options come before a client command: ``--url U --json jobs list`` becomes
    ``jobs list --url U --json``. They go right after the command and its subcommand, so an option given after
    the command as well (parsed later) wins. Anything else is returned unchanged."""
    moved: list[str] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg == "--json" or (arg.split("=", 1)[0] in VALUED and "=" in arg):
            moved.append(arg)
            i += 1
        elif arg in VALUED and i + 1 < len(argv):
            moved += argv[i : i + 2]
            i += 2
        else:
            break
    rest = argv[i:]
    if not moved or not rest or rest[0] not in FAST:
        return argv
    depth = 2 if len(rest) > 1 and not rest[1].startswith("-") else 1
    return [*rest[:depth], *moved, *rest[depth:]]


def entry(argv: list[str] | None = None) -> None:
    """The ``dsched`` console script. Client commands and ``--version`` are parsed here, without importing the
    services (the server side's imports cost seconds on a busy machine); everything else goes to
    :func:`app.cli.main`, whose parser also knows these commands (``dsched --help``, completion)."""
    argv = hoist_options(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--version"]:
        print(f"dsched {version()}")
        sys.exit(0)
    if argv[:1] and argv[0] in FAST:
        parser = argparse.ArgumentParser(prog="dsched", description="Distributed job scheduler (client)")
        add_commands(parser.add_subparsers(dest="command", required=True))
        sys.exit(run(parser.parse_args(argv), parser))
    from dsched.app.cli import main

    main(argv)
