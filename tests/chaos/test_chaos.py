"""The chaos suite, short version: every named scenario once, against a real multi-process cluster on real etcd
and moto (SQS + S3), each as ``python -m dsched.chaos --scenario NAME --seed N`` (the command that reproduces it).

Each must pass every required check, in particular: no accepted job lost, no at-most-once run executed twice.
``CHAOS_SEED`` picks another seed (default 1). Together they take about 2.5 minutes on 2 cores.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from dsched.chaos.scenarios import SCENARIOS
from dsched.libs.servers import etcd_binary, moto_binary
from dsched.libs.servers.base import have_jars

ROOT = Path(__file__).resolve().parents[2]
SEED = int(os.environ.get("CHAOS_SEED", "1"))
RUN_TIMEOUT_S = 150


def _failure(report: dict[str, Any], output: str) -> str:
    lines = [
        f"chaos scenario {report.get('scenario')} failed; reproduce: {report.get('reproduce')}",
        f"run dir (service logs, data, report.json): {report.get('run_dir')}",
    ]
    if "error" in report:
        lines.append(f"error: {report['error']}")
    for check in report.get("checks", []):
        if check["required"] and not check["passed"]:
            lines.append(f"FAILED {check['name']}: {check['summary']}")
            lines += [f"    {json.dumps(example)}" for example in check["examples"][:5]]
    lines.append(output[-3000:])
    return "\n".join(lines)


def _run_scenario(scenario: str, tmp_path: Path, *extra: str, timeout_s: float = RUN_TIMEOUT_S) -> None:
    report_path = tmp_path / "report.json"
    command = [
        sys.executable,
        "-m",
        "dsched.chaos",
        "--scenario",
        scenario,
        "--seed",
        str(SEED),
        "--run-dir",
        str(tmp_path / "run"),
        "--report",
        str(report_path),
        *extra,
    ]
    proc = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=timeout_s, check=False)
    output = proc.stdout + proc.stderr
    report: dict[str, Any] = json.loads(report_path.read_text()) if report_path.exists() else {}
    assert report, f"no report written (exit {proc.returncode}):\n{output[-3000:]}"
    assert proc.returncode == 0 and report.get("passed"), _failure(report, output)
    counts = report["counts"]
    assert counts["lost"] == 0, _failure(report, output)
    assert counts["duplicate_at_most_once_executions"] == 0, _failure(report, output)
    # Every planned fault was injected (frozen-picker-long plans a single, long one).
    assert counts["faults_injected"] >= 1 and counts["faults_failed"] == 0, _failure(report, output)


@pytest.mark.slow
@pytest.mark.timeout(RUN_TIMEOUT_S + 30)
@pytest.mark.parametrize("scenario", list(SCENARIOS), ids=list(SCENARIOS))
def test_scenario(scenario: str, tmp_path: Path) -> None:
    if etcd_binary() is None or moto_binary() is None:
        pytest.fail("the chaos suite needs etcd and moto_server: run `make test`, which installs them", pytrace=False)
    _run_scenario(scenario, tmp_path)


# On the production backends (Kafka, Cassandra, etcd, ElasticMQ, S3): a scenario whose faults are process
# kills; the JVM servers' start-up (a minute or two on a loaded 2-core machine) is most of the time.
PRODUCTION_SCENARIOS = ["worker-crash-mid-run"]  # at-least-once and at-most-once through worker kills
PRODUCTION_TIMEOUT_S = 600


@pytest.mark.slow
@pytest.mark.timeout(PRODUCTION_TIMEOUT_S + 30)
@pytest.mark.parametrize("scenario", PRODUCTION_SCENARIOS, ids=PRODUCTION_SCENARIOS)
def test_scenario_on_production_backends(scenario: str, tmp_path: Path) -> None:
    missing = [name for name in ("kafka", "cassandra", "elasticmq") if not have_jars(name)]
    if missing or etcd_binary() is None:
        pytest.fail(f"missing {missing or 'etcd'}: run `make system-deps`", pytrace=False)
    _run_scenario(scenario, tmp_path, "--backends", "production", timeout_s=PRODUCTION_TIMEOUT_S)
