"""Shared pieces of the benchmarks: a local HTTP target that records every hit, and a scheduler process."""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
from aiohttp import web
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families

from dsched.app.client import retry_after_s

KEEP_DATA_ENV = "DSCHED_BENCH_KEEP_DATA"  # =1: a bench leaves its scheduler's data directory (and logs) behind
# "name=pid,..." of backend servers (bench.production sets it) whose CPU the benches report beside the services'.
SERVER_PIDS_ENV = "DSCHED_BENCH_SERVER_PIDS"
SERVER_PREFIX = "server:"  # cpu_breakdown's keys for those servers: "server:<name>/all"


def process_cpu_s(pid: int) -> float:
    """CPU seconds (user + system) process ``pid`` has used so far (Linux /proc); OSError once it has ended."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime in clock ticks


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Target:
    """Records (job_id, arrival time in epoch ms) of every hit."""

    hits: list[tuple[str, float]] = field(default_factory=list)
    runner: web.AppRunner | None = None
    url: str = ""

    async def start(self) -> None:
        async def hook(request: web.Request) -> web.Response:
            self.hits.append((request.headers.get("X-Dsched-Job-Id", ""), time.time() * 1000))
            return web.Response(text="ok")

        app = web.Application()
        app.router.add_route("*", "/hook", hook)
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        port = free_port()
        await web.TCPSite(self.runner, "127.0.0.1", port).start()
        self.url = f"http://127.0.0.1:{port}/hook"

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()


class Scheduler:
    """``dsched run all`` on a fresh data directory, in its own process (as a user runs it)."""

    def __init__(self, extra_env: dict[str, str] | None = None, *, split: bool = False, workers: int = 1) -> None:
        """``split``: each service in its own ``dsched run <service>`` process on one data directory, the worker in
        ``workers`` of them (the issue's production layout has two)."""
        if workers != 1 and not split:
            raise ValueError("workers > 1 needs split (run all sets its worker children with DSCHED_PROCESSES)")
        self.port = free_port()
        self.data_dir = Path(tempfile.mkdtemp(prefix="dsched-bench-"))
        self.extra_env = extra_env or {}
        self.split = split
        self.workers = workers
        self.procs: list[subprocess.Popen[bytes]] = []
        self.metrics_urls = [f"http://127.0.0.1:{self.port}/metrics"]

    async def start(self) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("DSCHED_")}
        env.update(
            {
                "DSCHED_PORT": str(self.port),
                "DSCHED_DATA_DIR": str(self.data_dir),
                "DSCHED_LOG_LEVEL": "WARNING",
                "DSCHED_ALLOW_PRIVATE_HTTP": "true",
                **self.extra_env,
                **{k: v for k, v in os.environ.items() if k.startswith("DSCHED_")},
            }
        )
        dsched = str(Path(sys.executable).with_name("dsched"))
        services = self._names()
        for name in services:
            service = name.split("-")[0]  # "worker-2" runs the worker
            proc_env = dict(env, DSCHED_NODE_ID=f"bench-{name}")
            if service in ("picker", "worker"):
                metrics_port = free_port()
                proc_env["DSCHED_METRICS_PORT"] = str(metrics_port)
                self.metrics_urls.append(f"http://127.0.0.1:{metrics_port}/metrics")
            # `run all`'s API port serves its worker children's metrics too (labelled process="worker-<i>").
            with (self.data_dir / f"{name}.log").open("wb") as log:
                self.procs.append(
                    subprocess.Popen(  # noqa: ASYNC220 - started once, before the measurement
                        [dsched, "run", service], env=proc_env, stdout=subprocess.DEVNULL, stderr=log
                    )
                )
        async with aiohttp.ClientSession() as session:
            for _ in range(300):
                try:
                    async with session.get(f"http://127.0.0.1:{self.port}/health") as resp:
                        if resp.status == 200:
                            return
                except aiohttp.ClientError:
                    pass
                await asyncio.sleep(0.1)
        raise RuntimeError("scheduler did not start")

    async def metric_families(self) -> list[Metric]:
        """Every metric family the scheduler's processes export right now (a process that does not answer is
        left out)."""
        families: list[Metric] = []
        async with aiohttp.ClientSession() as session:
            for url in self.metrics_urls:
                try:
                    async with session.get(url) as resp:
                        text = await resp.text()
                except aiohttp.ClientError:
                    continue
                families += text_string_to_metric_families(text)
        return families

    async def samples(self, name: str) -> list[float]:
        """Every sample of metric ``name`` (any labels) the scheduler's processes export right now."""
        return [s.value for family in await self.metric_families() for s in family.samples if s.name == name]

    async def lag_summary(self) -> str:
        """Mean dispatch lag (picker) and fire lag (worker start) from the scheduler's own metrics, with the bucket
        bounds holding their p50 and p99 (the scheduler's own view, free of the bench target's loop delays)."""
        values: dict[str, float] = {}
        buckets: dict[str, dict[float, float]] = {}
        for family in await self.metric_families():
            name = family.name
            if name not in ("dsched_dispatch_lag_seconds", "dsched_fire_lag_seconds"):
                continue
            for sample in family.samples:  # summed over processes (labels other than le)
                if sample.name in (f"{name}_sum", f"{name}_count"):
                    values[sample.name] = values.get(sample.name, 0.0) + sample.value
                elif sample.name == f"{name}_bucket":
                    bound = float(sample.labels["le"])
                    per_bound = buckets.setdefault(name, {})
                    per_bound[bound] = per_bound.get(bound, 0.0) + sample.value
        parts = []
        for name in ("dsched_dispatch_lag_seconds", "dsched_fire_lag_seconds"):
            count = values.get(f"{name}_count", 0)
            if count:
                cumulative = sorted(buckets.get(name, {}).items())
                p50, p99 = (
                    next((1000 * b for b, c in cumulative if c >= q * count), float("inf")) for q in (0.5, 0.99)
                )
                parts.append(
                    f"{name} mean {1000 * values[f'{name}_sum'] / count:.1f} ms over {count:.0f}"
                    f" (p50 <= {p50:g} ms, p99 <= {p99:g} ms)"
                )
        return "; ".join(parts)

    def _names(self) -> list[str]:
        """The name of each started process: the ``dsched run`` argument, a second worker as ``worker-2``."""
        if not self.split:
            return ["all"]
        workers = ["worker"] + [f"worker-{i}" for i in range(2, self.workers + 1)]
        return ["ingestion", "writer", "coordinator", "picker", *workers]

    def _processes(self) -> list[tuple[str, int]]:
        """(name, pid) of every scheduler process: the started ones and their children (``run all`` with
        ``DSCHED_PROCESSES`` > 1), named ``<name>+<what the child runs>``, e.g. ``all+writer,picker``."""
        names = self._names()
        parents: dict[int, list[int]] = {}
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                try:
                    ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
                except (OSError, IndexError, ValueError):
                    continue
                parents.setdefault(ppid, []).append(int(entry.name))
        out = []
        for name, proc in zip(names, self.procs, strict=False):
            out.append((name, proc.pid))
            for i, child in enumerate(sorted(parents.get(proc.pid, [])), start=1):
                try:  # named by what it runs: the last argument of its `dsched run`
                    runs = Path(f"/proc/{child}/cmdline").read_bytes().split(b"\0")[-2].decode()
                except (OSError, IndexError, UnicodeDecodeError):
                    runs = f"child{i}"
                out.append((f"{name}+{runs}", child))
        return out

    def cpu_s(self) -> float:
        """CPU seconds (user + system) the scheduler processes (children included) have used so far (Linux /proc)."""
        total = 0.0
        for _, pid in self._processes():
            try:
                total += process_cpu_s(pid)
            except OSError:  # ended meanwhile
                continue
        return total

    def cpu_breakdown(self) -> dict[str, float]:
        """CPU seconds so far per process (``--split``: per service; children as ``<name>+<what it runs>``) and, within
        each, its event-loop (main) thread versus its helper threads (SQLite calls run on those); then each backend
        server named in ``$DSCHED_BENCH_SERVER_PIDS`` as a whole, keyed ``server:<name>/all``."""
        out: dict[str, float] = {}
        for name, pid in server_pids().items():
            with contextlib.suppress(OSError):  # ended meanwhile
                out[f"{SERVER_PREFIX}{name}/all"] = process_cpu_s(pid)
        tick = os.sysconf("SC_CLK_TCK")
        for name, pid in self._processes():
            try:
                tasks = list(Path(f"/proc/{pid}/task").iterdir())
            except OSError:
                continue
            for task in tasks:
                try:
                    fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
                except OSError:  # the thread ended meanwhile
                    continue
                kind = "loop" if task.name == str(pid) else "threads"
                key = f"{name}/{kind}"
                out[key] = out.get(key, 0.0) + (int(fields[11]) + int(fields[12])) / tick
        return out

    def rss_mb(self) -> float:
        """Resident memory of the scheduler processes (children included), in MiB (Linux /proc)."""
        total = 0
        for _, pid in self._processes():
            try:
                lines = Path(f"/proc/{pid}/status").read_text().splitlines()
            except OSError:
                continue
            for line in lines:
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        return total / 1024

    def stop(self, *, keep_data: bool = False) -> None:
        """Stop the scheduler's processes; remove its data directory unless ``keep_data`` (a restart follows)
        or ``DSCHED_BENCH_KEEP_DATA=1``."""
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(15)
        # A bench's data directory holds up to gigabytes (10^6 future jobs); kept only when asked, for a look.
        if not keep_data and os.environ.get(KEEP_DATA_ENV) != "1":
            shutil.rmtree(self.data_dir, ignore_errors=True)


def server_pids() -> dict[str, int]:
    """The backend servers named in ``$DSCHED_BENCH_SERVER_PIDS`` (``name=pid,...``), by name."""
    pairs = (item.partition("=") for item in os.environ.get(SERVER_PIDS_ENV, "").split(",") if item)
    return {name: int(pid) for name, _, pid in pairs}


def servers_cpu_s(before: dict[str, float], after: dict[str, float]) -> float:
    """CPU seconds the backend servers used between two :meth:`Scheduler.cpu_breakdown` readings."""
    return sum(after[k] - before.get(k, 0.0) for k in after if k.startswith(SERVER_PREFIX))


def print_cpu(before: dict[str, float], after: dict[str, float], jobs: int) -> None:
    """CPU ms per job of each process/thread group between two :meth:`Scheduler.cpu_breakdown` readings, then
    the backend servers' (if any) and their total."""
    for key in sorted(after):
        used = after[key] - before.get(key, 0.0)
        print(f"{'cpu_ms_per_job ' + key:>36}: {1000 * used / max(1, jobs):.3f}")
    if any(k.startswith(SERVER_PREFIX) for k in after):
        print(f"{'servers_cpu_ms_per_job':>36}: {1000 * servers_cpu_s(before, after) / max(1, jobs):.3f}")


def load_average() -> str:
    """The 1/5/15-minute load averages now (other work on the machine skews wall-clock figures)."""
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def percentile(values: Sequence[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def report(
    title: str,
    due: dict[str, float],
    hits: list[tuple[str, float]],
    accepted: int,
    submit_s: float,
    first_due: float,
) -> dict[str, float]:
    seen: dict[str, float] = {}
    duplicates = 0
    for job_id, at in hits:
        if job_id in seen:
            duplicates += 1
        else:
            seen[job_id] = at
    lags = [seen[j] - due[j] for j in seen if j in due]
    executed = len(seen)
    span_s = (max(seen.values()) - first_due) / 1000 if seen else float("nan")
    result = {
        "accepted": accepted,
        "submit_rate_per_s": accepted / submit_s if submit_s else float("nan"),
        "executed": executed,
        "executed_per_s": executed / span_s if span_s and span_s > 0 else float("nan"),
        "lost": accepted - executed,
        "duplicates": duplicates,
        "lag_p50_ms": percentile(lags, 0.50),
        "lag_p99_ms": percentile(lags, 0.99),
        "lag_max_ms": max(lags) if lags else float("nan"),
    }
    print(f"== {title}")
    for key, value in result.items():
        print(f"{key:>20}: {value:,.1f}" if isinstance(value, float) else f"{key:>20}: {value:,}")
    return result


MISSING_SAMPLE = 200  # jobs that never reached the target whose state a bench looks up


async def describe_missing(base: str, due: dict[str, float], hits: list[tuple[str, float]]) -> str:
    """Where the accepted jobs that never reached the target are, as their owner sees them (``GET /jobs/{id}``):
    each status (with its last run's) tallied, and their due times from the first job's. The status says which
    service holds them: ``submitted`` the writer, ``scheduled`` the picker, ``queued`` the queue or a worker.
    Empty if every job arrived."""
    reached = {job_id for job_id, _ in hits}
    missing = sorted((at, job_id) for job_id, at in due.items() if job_id not in reached)
    if not missing:
        return ""
    first = min(due.values())
    states: Counter[str] = Counter()
    async with aiohttp.ClientSession() as session:
        for _, job_id in missing[:MISSING_SAMPLE]:
            try:
                async with session.get(f"{base}/jobs/{job_id}", headers={"X-User-ID": "bench"}) as resp:
                    view = await resp.json() if resp.status == 200 else {"status": f"HTTP {resp.status}"}
            except aiohttp.ClientError as exc:
                view = {"status": type(exc).__name__}
            last = view.get("last_run") or {}
            state = str(view.get("status")) + (f" (last run {last['status']})" if last.get("status") else "")
            states[state] += 1
    tally = ", ".join(f"{state}: {n}" for state, n in states.most_common())
    return (
        f"not reached: {len(missing)} (looked up {min(len(missing), MISSING_SAMPLE)}: {tally}); "
        f"due {(missing[0][0] - first) / 1000:.1f}-{(missing[-1][0] - first) / 1000:.1f} s after the first job"
    )


MAX_ATTEMPTS = 600  # per request: client errors, and 503s with Retry-After (at 1 s: ten minutes of back-pressure)


async def submit_all(
    base: str, bodies: list[dict[str, object]], *, rate: float | None, concurrency: int = 64
) -> tuple[list[str | None], float]:
    """POST every body to /submit (paced at ``rate``/s when given); returns job ids (None = refused)."""
    ids: list[str | None] = [None] * len(bodies)
    start = time.monotonic()
    sem = asyncio.Semaphore(concurrency)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency)) as session:

        async def one(i: int) -> None:
            if rate:
                delay = start + i / rate - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
            async with sem:
                for attempt in range(MAX_ATTEMPTS):
                    try:
                        async with session.post(
                            f"{base}/submit", json=bodies[i], headers={"X-User-ID": "bench"}
                        ) as resp:
                            if resp.status == 202:
                                ids[i] = (await resp.json())["job_id"]
                            if (
                                wait_s := retry_after_s(resp.status, resp.headers.get("Retry-After"), math.inf)
                            ) is None:
                                return
                        await asyncio.sleep(wait_s)
                    except aiohttp.ClientError:
                        await asyncio.sleep(0.1 * min(attempt + 1, 10))

        await asyncio.gather(*(one(i) for i in range(len(bodies))))
    return ids, time.monotonic() - start


async def submit_batches(
    base: str, bodies: list[dict[str, object]], *, batch: int = 1000, concurrency: int = 4
) -> tuple[list[str | None], float, list[float]]:
    """POST the bodies to /submit/batch in batches of ``batch`` from ``concurrency`` clients; returns job ids in
    order (None = refused), the seconds it took, and each request's latency in ms."""
    ids: list[str | None] = [None] * len(bodies)
    latencies: list[float] = []
    chunks = [range(i, min(i + batch, len(bodies))) for i in range(0, len(bodies), batch)]
    queue: asyncio.Queue[range] = asyncio.Queue()
    for chunk in chunks:
        queue.put_nowait(chunk)
    start = time.monotonic()
    async with aiohttp.ClientSession() as session:

        async def client() -> None:
            while not queue.empty():
                chunk = queue.get_nowait()
                for _attempt in range(MAX_ATTEMPTS):
                    began = time.monotonic()
                    try:
                        async with session.post(
                            f"{base}/submit/batch",
                            json={"jobs": [bodies[i] for i in chunk]},
                            headers={"X-User-ID": "bench"},
                        ) as resp:
                            if resp.status == 202:
                                for result in (await resp.json())["results"]:
                                    ids[chunk[result["index"]]] = result.get("job_id")
                            if (
                                wait_s := retry_after_s(resp.status, resp.headers.get("Retry-After"), math.inf)
                            ) is None:
                                latencies.append(1000 * (time.monotonic() - began))
                                break
                        await asyncio.sleep(wait_s)
                    except aiohttp.ClientError:
                        await asyncio.sleep(0.1)

        await asyncio.gather(*(client() for _ in range(concurrency)))
    return ids, time.monotonic() - start, latencies


async def wait_hits(target: Target, expected: int, timeout_s: float, not_before_ms: float = 0.0) -> None:
    """Wait until ``expected`` distinct jobs hit the target, or no new hit came for 15 s after ``not_before_ms``."""
    delay = max(0.0, (not_before_ms - time.time() * 1000) / 1000)
    await asyncio.sleep(delay)
    deadline = time.monotonic() + timeout_s
    last, last_change = -1, time.monotonic()
    while time.monotonic() < deadline:
        count = len({j for j, _ in target.hits})
        if count >= expected:
            await asyncio.sleep(1.0)  # let duplicates, if any, arrive
            return
        if count != last:
            last, last_change = count, time.monotonic()
        elif time.monotonic() - last_change > 15:
            return
        await asyncio.sleep(0.2)
