"""Prometheus (Debian's ``prometheus`` package, which also brings ``promtool``) on 127.0.0.1.

The launcher writes its own ``prometheus.yml``: one scrape job per entry of ``targets`` (job name → list of
``host:port``), the given rule files, and short scrape/evaluation intervals (1 s by default) so tests see data
within seconds. Ready means ``/-/ready`` answers 200 (the TSDB is open and the rules are loaded), not merely
that the port is open. :meth:`query` and :meth:`alerts` wrap the HTTP API; :meth:`set_targets` rewrites the
configuration and reloads it (``/-/reload``) without a restart.

``promtool`` is found the same way (``$DSCHED_PROMTOOL``, /usr/bin, PATH); :func:`promtool` runs it.

:data:`DSCHED_RULES` are dsched's alerting rules; ``python -m dsched.libs.servers.prometheus --target
ingestion=127.0.0.1:8080 …`` runs a Prometheus with them next to ``make run`` (or any set of processes) until
Ctrl-C, and ``make stack`` starts one the same way (:meth:`PrometheusServer.for_dsched`).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from dsched.libs.servers.base import ServerError, ServerProcess, free_port, http_ok

PROMETHEUS_ENV = "DSCHED_PROMETHEUS"
DSCHED_RULES = Path(__file__).resolve().parents[2] / "deploy" / "prometheus" / "alerts.yml"
PROMTOOL_ENV = "DSCHED_PROMTOOL"


def _binary(name: str, env: str) -> str | None:
    override = os.environ.get(env)
    if override:
        return override if Path(override).is_file() else None
    if Path(f"/usr/bin/{name}").is_file():
        return f"/usr/bin/{name}"
    return shutil.which(name)


def prometheus_binary() -> str | None:
    """``$DSCHED_PROMETHEUS``, /usr/bin/prometheus or ``prometheus`` on PATH; None if absent."""
    return _binary("prometheus", PROMETHEUS_ENV)


def promtool_binary() -> str | None:
    """``$DSCHED_PROMTOOL``, /usr/bin/promtool or ``promtool`` on PATH; None if absent."""
    return _binary("promtool", PROMTOOL_ENV)


def promtool(*args: str, cwd: Path | None = None, timeout_s: float = 60.0) -> subprocess.CompletedProcess[str]:
    """Run ``promtool args…`` and return its result (never raises on a non-zero exit; check ``returncode``)."""
    binary = promtool_binary()
    if binary is None:
        raise ServerError("promtool not found (install Debian's prometheus package: make system-deps)")
    return subprocess.run([binary, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout_s, check=False)


class PrometheusServer(ServerProcess):
    """One Prometheus scraping ``targets`` every ``scrape_interval_s`` and evaluating ``rule_files``."""

    name = "prometheus"

    def __init__(
        self,
        base_dir: Path | None = None,
        *,
        targets: Mapping[str, Sequence[str]] | None = None,
        rule_files: Sequence[Path] = (),
        scrape_interval_s: float = 1.0,
        evaluation_interval_s: float = 1.0,
        binary: str | None = None,
        port: int | None = None,
    ) -> None:
        found = binary or prometheus_binary()
        if found is None:
            raise ServerError("prometheus not found (install Debian's prometheus package: make system-deps)")
        self.binary = found
        super().__init__(base_dir)
        self.port = port or free_port()
        self.targets = {job: list(hosts) for job, hosts in (targets or {}).items()}
        self.rule_files = [Path(p).resolve() for p in rule_files]
        self.scrape_interval_s = scrape_interval_s
        self.evaluation_interval_s = evaluation_interval_s
        self.config_path = self.base_dir / "prometheus.yml"
        self.data_dir = self.base_dir / "data"

    @classmethod
    def for_dsched(
        cls, targets: Mapping[str, Sequence[str]], base_dir: Path | None = None, *, port: int | None = None
    ) -> PrometheusServer:
        """A Prometheus for a running dsched: scrapes ``targets`` (service name → ``host:port`` of each process's
        ``/metrics``) every 5 s, as deploy/prometheus.yml does, with dsched's alerting rules loaded."""
        return cls(
            base_dir,
            targets=targets,
            rule_files=[DSCHED_RULES],
            scrape_interval_s=5,
            evaluation_interval_s=5,
            port=port,
        )

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def config(self) -> dict[str, Any]:
        """The configuration this launcher writes (scrape jobs named after ``targets``' keys)."""
        return {
            "global": {
                "scrape_interval": _duration(self.scrape_interval_s),
                "scrape_timeout": _duration(min(self.scrape_interval_s, 10.0)),
                "evaluation_interval": _duration(self.evaluation_interval_s),
            },
            "rule_files": [str(p) for p in self.rule_files],
            "scrape_configs": [
                {"job_name": job, "static_configs": [{"targets": hosts}]} for job, hosts in sorted(self.targets.items())
            ],
        }

    def _prepare(self) -> None:
        self.config_path.write_text(yaml.safe_dump(self.config(), sort_keys=False))

    def _command(self) -> list[str]:
        return [
            self.binary,
            f"--config.file={self.config_path}",
            f"--storage.tsdb.path={self.data_dir}",
            f"--web.listen-address=127.0.0.1:{self.port}",
            "--web.enable-lifecycle",
            "--log.level=warn",
        ]

    def _healthy(self) -> bool:
        return http_ok(f"{self.url}/-/ready") is not None

    # -- HTTP API

    def set_targets(self, targets: Mapping[str, Sequence[str]]) -> None:
        """Replace the scrape targets and reload the configuration in place."""
        self.targets = {job: list(hosts) for job, hosts in targets.items()}
        self._prepare()
        self._post("/-/reload")

    def query(self, expr: str, *, time_s: float | None = None) -> list[dict[str, Any]]:
        """``/api/v1/query``: the result vector of ``expr`` (raises :class:`ServerError` on a query error)."""
        params = {"query": expr}
        if time_s is not None:
            params["time"] = f"{time_s:.3f}"
        data = self._get("/api/v1/query", params)
        result = data["result"]
        if data["resultType"] == "scalar":
            return [{"metric": {}, "value": result}]
        return _as_list("/api/v1/query result", result)

    def alerts(self) -> list[dict[str, Any]]:
        """``/api/v1/alerts``: active alerts (pending or firing) with their labels and state."""
        return _as_list("/api/v1/alerts", self._get("/api/v1/alerts", {})["alerts"])

    def rules(self) -> list[dict[str, Any]]:
        """``/api/v1/rules``: the loaded rule groups (rules with their health and last error)."""
        return _as_list("/api/v1/rules", self._get("/api/v1/rules", {})["groups"])

    def target_health(self) -> dict[str, str]:
        """``instance`` → ``up``/``down``/``unknown`` for every active target."""
        targets = self._get("/api/v1/targets", {"state": "active"})["activeTargets"]
        return {t["labels"]["instance"]: t["health"] for t in targets}

    def _get(self, path: str, params: Mapping[str, str]) -> Any:
        url = f"{self.url}{path}?{urllib.parse.urlencode(params)}"
        try:
            with urllib.request.urlopen(url, timeout=10) as resp:
                body = json.loads(resp.read())
        except urllib.error.HTTPError as err:
            body = json.loads(err.read() or b"{}")
        except (urllib.error.URLError, OSError) as exc:
            raise ServerError(f"prometheus {path}: {exc}") from exc
        if body.get("status") != "success":
            raise ServerError(f"prometheus {path} {dict(params)}: {body.get('errorType')}: {body.get('error')}")
        return body["data"]

    def _post(self, path: str) -> None:
        req = urllib.request.Request(f"{self.url}{path}", method="POST")
        try:
            with urllib.request.urlopen(req, timeout=10):
                pass
        except (urllib.error.URLError, OSError) as exc:
            raise ServerError(f"prometheus {path}: {exc}") from exc


def _as_list(what: str, value: Any) -> list[dict[str, Any]]:
    """``value`` from a Prometheus answer, which must be a list (raises :class:`ServerError` otherwise)."""
    if not isinstance(value, list):
        raise ServerError(f"prometheus {what}: expected a list, got {type(value).__name__}")
    return value


def _duration(seconds: float) -> str:
    """A Prometheus duration: whole milliseconds (``1500ms``), or seconds when whole (``5s``)."""
    ms = round(seconds * 1000)
    return f"{ms // 1000}s" if ms % 1000 == 0 else f"{ms}ms"


def main(argv: list[str] | None = None) -> int:
    """``python -m dsched.libs.servers.prometheus --target SERVICE=HOST:PORT …``: Prometheus with dsched's rules."""
    parser = argparse.ArgumentParser(prog="python -m dsched.libs.servers.prometheus", description=main.__doc__)
    parser.add_argument("--target", action="append", default=[], help="SERVICE=HOST:PORT (repeatable)")
    parser.add_argument("--port", type=int, default=9090, help="where Prometheus listens (default 9090)")
    parser.add_argument("--data-dir", type=Path, default=Path(".dsched/prometheus"))
    args = parser.parse_args(argv)
    targets: dict[str, list[str]] = {}
    for spec in args.target or ["ingestion=127.0.0.1:8080"]:
        service, _, address = spec.partition("=")
        if not address:
            parser.error(f"--target {spec!r}: expected SERVICE=HOST:PORT")
        targets.setdefault(service, []).append(address)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    with PrometheusServer.for_dsched(targets, args.data_dir, port=args.port) as server:
        print(f"prometheus at {server.url} scraping {targets}, rules {DSCHED_RULES}", file=sys.stderr)
        stop.wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
