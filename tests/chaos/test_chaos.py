"""The chaos suite, short version: every named scenario once, against a real multi-process cluster on real etcd
and moto (SQS + S3), each as ``python -m dsched.chaos --scenario NAME --seed N`` (the command that reproduces it).

Each must pass every required check, in particular: no accepted job lost, no at-most-once run executed twice.
``CHAOS_SEED`` picks another seed (default 1). Together they take about 2.5 minutes on 2 cores. Every scenario
runs a second time on the production backends (``--backends production``: Kafka, Cassandra, ElasticMQ, etcd, S3).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from dsched.chaos.cluster import parse_use_servers
from dsched.chaos.scenarios import SCENARIOS
from dsched.libs.servers import CassandraServer, KafkaServer, etcd_binary, moto_binary

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


# On the production backends (Kafka, Cassandra, etcd, ElasticMQ, S3): every scenario, on the session's Kafka,
# Cassandra and ElasticMQ (started once; each run keeps to a topic, keyspace and queue of its own) with an etcd and
# a moto of the run's own (the etcd-restart faults restart it). The picker scenarios' required
# picker_failover_lateness check bounds the lateness after a picker kill by TTL + 1 s on these backends too.
PRODUCTION_TIMEOUT_S = 240


@pytest.mark.slow
@pytest.mark.timeout(PRODUCTION_TIMEOUT_S + 30)
@pytest.mark.parametrize("scenario", list(SCENARIOS), ids=list(SCENARIOS))
def test_scenario_on_production_backends(
    scenario: str,
    tmp_path: Path,
    kafka_server: KafkaServer,
    cassandra_server: CassandraServer,
) -> None:
    if etcd_binary() is None or moto_binary() is None:
        pytest.fail("the chaos suite needs etcd and moto_server: run `make test`, which installs them", pytrace=False)
    # Kafka and Cassandra are the session's (minutes to start); each scenario gets an ElasticMQ of its own (seconds).
    # Twice in clean-clone runs the session's ElasticMQ, after the rest of the suite had used it, left one
    # SendMessageBatch unanswered until its 21 s request timeout, and the picker waiting on it kept its shards
    # (docs/chaos.md "Known findings"); a fresh one, as a standalone run has, never did.
    servers = f"kafka={kafka_server.port},cassandra={cassandra_server.port}"
    _run_scenario(
        scenario, tmp_path, "--backends", "production", "--use-servers", servers, timeout_s=PRODUCTION_TIMEOUT_S
    )


def test_use_servers_names_each_jvm_server_once() -> None:
    assert parse_use_servers("kafka=9092, cassandra=9042,elasticmq=9324") == {
        "kafka": 9092,
        "cassandra": 9042,
        "elasticmq": 9324,
    }
    assert parse_use_servers("kafka=9092,cassandra=9042") == {"kafka": 9092, "cassandra": 9042}  # ElasticMQ: own
    for wrong in ("", "kafka=9092,kafka=1,cassandra=9042", "etcd=2379", "kafka=x"):
        with pytest.raises(ValueError, match="expected kafka=PORT"):
            parse_use_servers(wrong)
