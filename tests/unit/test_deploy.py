"""The deploy/ stack stays consistent with the code: settings, commands, metric names, provisioning.

No Docker here: the files are parsed and checked against ``Settings``, the CLI and ``libs.metrics.REGISTRY``.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from dsched.libs.settings import SERVICES, Settings
from tests.helpers.promql import PROMETHEUS_SERIES, exposed_metric_names, metric_names

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
DSCHED_IMAGE = "dsched:local"


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    data = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())
    assert isinstance(data, dict)
    return data


def dsched_services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {name: svc for name, svc in compose["services"].items() if svc.get("image") == DSCHED_IMAGE}


def entrypoint() -> list[str]:
    match = re.search(r"^ENTRYPOINT\s+(\[.*\])\s*$", (DEPLOY / "Dockerfile").read_text(), re.M)
    assert match, "the Dockerfile has an exec-form ENTRYPOINT"
    value = json.loads(match.group(1))
    assert isinstance(value, list)
    return value


def test_every_dsched_env_var_is_a_settings_field(compose: dict[str, Any]) -> None:
    fields = {f"DSCHED_{name.upper()}" for name in Settings.model_fields}
    seen: set[str] = set()
    for name, svc in compose["services"].items():
        env = svc.get("environment") or {}
        assert isinstance(env, dict), f"{name}: use the mapping form for environment"
        for var, value in env.items():
            if var.startswith("DSCHED_"):
                assert var in fields, f"{name}: {var} is not a field of libs.settings.Settings"
                assert isinstance(value, str), f"{name}: quote {var} so YAML keeps it a string"
                seen.add(var)
    urls = {f"DSCHED_{role}_URL" for role in ("LOG", "STORE", "COORDINATION", "QUEUE", "BLOBS")}
    assert urls | {"DSCHED_HOST", "DSCHED_METRICS_PORT"} <= seen


def test_the_settings_parse(compose: dict[str, Any]) -> None:
    for name, svc in dsched_services(compose).items():
        env = {k.removeprefix("DSCHED_").lower(): v for k, v in svc["environment"].items()}
        settings = Settings(**env)
        assert settings.log_url.startswith("kafka://") and settings.store_url.startswith("scylla://"), name


def test_every_dsched_service_runs_a_known_command(compose: dict[str, Any]) -> None:
    assert entrypoint() == ["dsched"]
    allowed = {("dsched", "run", service) for service in SERVICES} | {("dsched", "db", "migrate")}
    commands = {name: tuple(entrypoint() + svc["command"]) for name, svc in dsched_services(compose).items()}
    for name, command in commands.items():
        assert command in allowed, f"{name}: {' '.join(command)}"
    assert {c[2] for c in commands.values() if c[1] == "run"} == set(SERVICES)
    assert ("dsched", "db", "migrate") in commands.values()


def test_replicas_and_shared_layout(compose: dict[str, Any]) -> None:
    services = dsched_services(compose)
    replicas = {name: svc.get("deploy", {}).get("replicas", 1) for name, svc in services.items()}
    assert (replicas["writer"], replicas["coordinator"], replicas["picker"], replicas["worker"]) == (2, 2, 2, 2)
    layouts = {(s["environment"]["DSCHED_SHARD_COUNT"], s["environment"]["DSCHED_BUCKET_S"]) for s in services.values()}
    assert len(layouts) == 1, "every service must use the same shard count and bucket width"


def test_services_wait_for_the_init_jobs_and_restart(compose: dict[str, Any]) -> None:
    for name, svc in dsched_services(compose).items():
        if svc["command"] == ["db", "migrate"]:
            assert svc["restart"] == "no" and svc["depends_on"]["scylla"]["condition"] == "service_healthy"
            continue
        assert svc["restart"] == "unless-stopped", name
        assert svc["depends_on"]["migrate"]["condition"] == "service_completed_successfully", name
        assert svc["depends_on"]["kafka-init"]["condition"] == "service_completed_successfully", name
        assert svc["environment"]["DSCHED_HOST"] == "0.0.0.0", name
        port = "DSCHED_PORT" if svc["command"] == ["run", "ingestion"] else "DSCHED_METRICS_PORT"
        assert svc["environment"][port] not in ("", "0"), f"{name}: /health needs {port}"


def test_backends_have_health_checks(compose: dict[str, Any]) -> None:
    for name in ("kafka", "scylla", "etcd", "localstack", "prometheus", "grafana"):
        assert compose["services"][name]["healthcheck"]["test"], name
    assert "HEALTHCHECK" in (DEPLOY / "Dockerfile").read_text()
    assert "/health" in (DEPLOY / "Dockerfile").read_text()


def test_kafka_runs_in_kraft_mode(compose: dict[str, Any]) -> None:
    kafka = compose["services"]["kafka"]["environment"]
    assert "controller" in kafka["KAFKA_PROCESS_ROLES"]
    assert not any("zookeeper" in str(v).lower() for v in compose["services"].values())


def test_prometheus_scrapes_every_service() -> None:
    config = yaml.safe_load((DEPLOY / "prometheus.yml").read_text())
    jobs = {job["job_name"] for job in config["scrape_configs"]}
    assert jobs == set(SERVICES)


# Dashboard metric names -----------------------------------------------------------------------------------
def dashboard_exprs() -> list[str]:
    exprs = []
    for path in sorted((DEPLOY / "grafana" / "dashboards").glob("*.json")):
        for panel in json.loads(path.read_text())["panels"]:
            exprs += [target["expr"] for target in panel.get("targets", [])]
    return exprs


def test_metric_name_extraction() -> None:
    assert metric_names('histogram_quantile(0.9, sum by (le) (rate(a_bucket{x="y"}[5m])))') == {"a_bucket"}
    assert metric_names("count by (service) (up == 1)") == {"up"}


def test_the_dashboard_queries_only_metrics_the_code_exports() -> None:
    exported = exposed_metric_names() | PROMETHEUS_SERIES
    exprs = dashboard_exprs()
    assert exprs
    used = set().union(*(metric_names(e) for e in exprs))
    assert used, "no metric found in the dashboard"
    assert used <= exported, f"not in libs.metrics: {sorted(used - exported)}"


def test_the_dashboard_has_the_required_panels() -> None:
    text = " ".join(dashboard_exprs())
    required = [
        "dsched_submissions_total",  # job throughput
        "histogram_quantile(0.99, sum by (le) (rate(dsched_fire_lag_seconds_bucket",  # fire lag percentiles
        "dsched_runs_total",  # run outcomes
        "dsched_queue_depth",
        "dsched_retries_total",
        "dsched_dead_letters_total",
        "dsched_service_up",  # per-service health
    ]
    for needle in required:
        assert needle in text, needle


def test_grafana_provisioning_points_at_prometheus_and_the_dashboards(compose: dict[str, Any]) -> None:
    datasources = yaml.safe_load((DEPLOY / "grafana/provisioning/datasources/prometheus.yml").read_text())
    [source] = datasources["datasources"]
    assert (source["type"], source["uid"], source["url"]) == (
        "prometheus",
        "prometheus",
        "http://prometheus:9090",
    )
    providers = yaml.safe_load((DEPLOY / "grafana/provisioning/dashboards/dsched.yml").read_text())
    path = providers["providers"][0]["options"]["path"]
    assert f"./grafana/dashboards:{path}:ro" in compose["services"]["grafana"]["volumes"]
    for panel in json.loads((DEPLOY / "grafana/dashboards/dsched.json").read_text())["panels"]:
        assert panel["datasource"]["uid"] == source["uid"]
