"""A dsched cluster of real processes scraped by a real Prometheus, for the dashboard and alert tests.

Every service is its own ``dsched run <service>`` process on shared embedded backends (one data directory),
each serving ``/metrics`` (ingestion on its API port, the others on ``DSCHED_METRICS_PORT``), so Prometheus
scrapes every process, as in production. The service ``all`` is ``dsched run all`` (``make run``), scraped on its
API port only, where it serves its worker children's metrics too (labelled ``process="worker-<i>"``).
:func:`scaled_rules` writes the real alert rules with their ``for:`` durations divided by :data:`FOR_SCALE` (at
least 1 s), so an alert's whole life fits in a test.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, TypeVar

import yaml

from dsched.libs.servers.base import free_port
from dsched.libs.servers.prometheus import PrometheusServer
from tests.helpers.processes import wait_until

REPO = Path(__file__).resolve().parents[2]
RULES = REPO / "deploy" / "prometheus" / "alerts.yml"
DASHBOARDS = REPO / "deploy" / "grafana" / "dashboards"
DSCHED = str(Path(sys.executable).with_name("dsched"))
API_SERVICES = ("ingestion", "all")  # processes serving /metrics on the API port
FOR_SCALE = 15  # `for: 30s` becomes 2 s, `for: 5m` 20 s
T = TypeVar("T")


def _seconds(duration: str) -> float:
    units = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}
    total = 0.0
    for value, unit in re.findall(r"(\d+)(ms|s|m|h|d)", duration):
        total += int(value) * units[unit]
    return total


def scaled_rules(target: Path, scale: int = FOR_SCALE) -> Path:
    """The real rules file with every ``for:`` divided by ``scale`` (at least 1 s); expressions unchanged."""
    data = yaml.safe_load(RULES.read_text())
    for group in data["groups"]:
        for rule in group["rules"]:
            if "for" in rule:
                rule["for"] = f"{max(1, round(_seconds(rule['for']) / scale))}s"
    target.write_text(yaml.safe_dump(data, sort_keys=False))
    return target


class Process:
    """One ``dsched run <service>`` with its own metrics port; stderr (JSON logs) to a file."""

    def __init__(self, service: str, env: dict[str, str], log_dir: Path, *, api_port: int | None = None) -> None:
        self.service = service
        self.metrics_port = api_port or free_port()
        self.env = dict(env, DSCHED_NODE_ID=f"{service}-1")
        if api_port is None:
            self.env["DSCHED_METRICS_PORT"] = str(self.metrics_port)
        self.log_path = log_dir / f"{service}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.metrics_port}"

    def start(self) -> None:
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [DSCHED, "run", self.service],
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                start_new_session=True,
            )

    def healthy(self) -> bool:
        if self.proc is None or self.proc.poll() is not None:
            raise AssertionError(f"{self.service} exited: {self.log_tail()}")
        try:
            with urllib.request.urlopen(f"http://{self.target}/health", timeout=1) as resp:
                return bool(resp.status == 200)
        except (urllib.error.URLError, OSError):
            return False

    def stop(self, timeout_s: float = 10.0) -> None:
        """SIGTERM (a clean stop: leases revoked) and wait; SIGKILL if it does not exit in time."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)
        self.proc = None

    def log_tail(self, lines: int = 15) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        return ""


class Cluster:
    """The given services as processes on one data directory, plus a Prometheus scraping each of them."""

    def __init__(self, base: Path, services: list[str], **settings: str) -> None:
        self.base = base
        self.api_port = free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith("DSCHED_")}
        env.update(
            {
                "DSCHED_DATA_DIR": str(base / "data"),
                "DSCHED_HOST": "127.0.0.1",
                "DSCHED_PORT": str(self.api_port),
                "DSCHED_SHARD_COUNT": "4",
                "DSCHED_BUCKET_S": "10",
                "DSCHED_BUCKET_GRACE_S": "2",
                "DSCHED_LEASE_TTL_S": "2",
                "DSCHED_PICKER_TICK_S": "0.05",
                "DSCHED_RETRY_INITIAL_S": "0.1",
                "DSCHED_RETRY_MAX_S": "0.5",
                "DSCHED_ALLOW_CMD": "true",
                "DSCHED_ALLOW_PRIVATE_HTTP": "true",
                "DSCHED_SHUTDOWN_GRACE_S": "2",
                "DSCHED_LOG_LEVEL": "WARNING",
            }
        )
        env.update({f"DSCHED_{k.upper()}": v for k, v in settings.items()})
        (base / "logs").mkdir(parents=True, exist_ok=True)
        self.processes = {
            name: Process(name, env, base / "logs", api_port=self.api_port if name in API_SERVICES else None)
            for name in services
        }
        self.prometheus = PrometheusServer(
            base / "prometheus",
            # `dsched run all` is scraped as the README says: one target, its API port, job "ingestion".
            targets={("ingestion" if name == "all" else name): [p.target] for name, p in self.processes.items()},
            rule_files=[scaled_rules(base / "alerts.scaled.yml")],
        )

    def start(self, timeout_s: float = 60.0) -> None:
        for process in self.processes.values():
            process.start()
        for process in self.processes.values():
            wait_until(process.healthy, timeout_s, f"{process.service} healthy")
        self.prometheus.start()

    def close(self) -> None:
        for process in self.processes.values():
            process.stop()
        self.prometheus.close()

    def logs(self) -> str:
        return "\n".join(f"--- {name}\n{p.log_tail()}" for name, p in self.processes.items())

    # -- Prometheus

    def value(self, expr: str) -> float | None:
        """The single value of an instant query, None when it returns nothing."""
        result = self.prometheus.query(expr)
        return float(result[0]["value"][1]) if result else None

    def wait_scraped(self, timeout_s: float = 30.0) -> None:
        """Until Prometheus has scraped every process successfully."""
        targets = {p.target for p in self.processes.values()}
        wait_until(
            lambda: all(self.prometheus.target_health().get(t) == "up" for t in targets),
            timeout_s,
            "every target scraped",
        )

    def alert_state(self, name: str) -> str | None:
        """``pending``/``firing`` for an active alert called ``name``, None when inactive."""
        states = [a["state"] for a in self.prometheus.alerts() if a["labels"]["alertname"] == name]
        return "firing" if "firing" in states else (states[0] if states else None)

    # -- the API

    def call(self, method: str, path: str, body: Any = None, user: str = "alice") -> tuple[int, Any]:
        req = urllib.request.Request(
            f"http://127.0.0.1:{self.api_port}{path}",
            data=json.dumps(body).encode() if body is not None else None,
            method=method,
            headers={"X-User-ID": user, "Content-Type": "application/json"},
        )
        try:
            with urllib.request.urlopen(req, timeout=10) as resp:
                return resp.status, json.loads(resp.read())
        except urllib.error.HTTPError as err:
            return err.code, json.loads(err.read() or b"{}")

    def submit(self, user: str = "alice", **body: Any) -> str:
        body.setdefault("project_id", "obs")
        status, data = self.call("POST", "/submit", body, user=user)
        assert status in (200, 202), data
        return str(data["job_id"])

    def runs(self, job_id: str, user: str = "alice") -> list[dict[str, Any]]:
        status, data = self.call("GET", f"/jobs/{job_id}/runs?limit=100", user=user)
        return list(data["runs"]) if status == 200 else []


class Hook:
    """A local HTTP target for ``http`` jobs: ``/ok`` answers 200, ``/fail`` 500; counts requests per path."""

    def __init__(self) -> None:
        hits: dict[str, int] = {}
        self.hits = hits

        class Handler(BaseHTTPRequestHandler):
            def _answer(self) -> None:
                hits[self.path] = hits.get(self.path, 0) + 1
                length = int(self.headers.get("Content-Length") or 0)
                if length:
                    self.rfile.read(length)
                self.send_response(200 if self.path == "/ok" else 500)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"{}")

            do_GET = do_POST = _answer

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> Hook:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()
        self._thread.join(5)


@contextlib.contextmanager
def running_cluster(base: Path, services: list[str], **settings: str) -> Iterator[Cluster]:
    cluster = Cluster(base, services, **settings)
    try:
        cluster.start()
        yield cluster
    except BaseException:
        print(cluster.logs())
        raise
    finally:
        cluster.close()
