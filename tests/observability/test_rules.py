"""The alert rules: valid for promtool, unit-tested by promtool, on exported metrics, each with a runbook; the
Prometheus of `make stack` loads them and scrapes every service process under the job names they select."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from dsched.libs.servers.prometheus import PrometheusServer, promtool, promtool_binary
from dsched.libs.servers.stack import REPLICAS, Stack
from dsched.libs.settings import SERVICES
from tests.helpers.observability import REPO, RULES, scaled_rules
from tests.helpers.promql import PROMETHEUS_SERIES, exposed_metric_names, metric_names

RULE_TESTS = RULES.with_name("alerts.test.yml")
REQUIRED = {
    "DschedNoLeader",
    "DschedShardWithoutOwner",
    "DschedFireLagHigh",
    "DschedSLOFastBurn",
    "DschedDeadLettersGrowing",
    "DschedWriterLagGrowing",
    "DschedQueueBacklogSaturated",
    "DschedServiceDown",
    "DschedServiceRestarting",
    "DschedIngestion5xx",
    "DschedSubmissionsRefused",
}


@pytest.fixture(scope="module", autouse=True)
def _promtool() -> None:
    if promtool_binary() is None:
        pytest.fail("promtool is not installed: run `make test` (make system-deps installs prometheus)", pytrace=False)


def alerts() -> list[dict[str, object]]:
    data = yaml.safe_load(RULES.read_text())
    return [rule for group in data["groups"] for rule in group["rules"] if "alert" in rule]


def test_promtool_checks_the_rules() -> None:
    result = promtool("check", "rules", str(RULES))
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(alerts())} rules found" in result.stdout


def test_promtool_unit_tests_pass() -> None:
    result = promtool("test", "rules", RULE_TESTS.name, cwd=RULE_TESTS.parent)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_promtool_unit_tests_fail_on_a_broken_rule(tmp_path: Path) -> None:
    """The unit tests can fail: without ``or vector(0)`` a cluster whose only picker stopped has no series to
    compare, and "shard without owner" never fires."""
    owned = "sum(dsched_picker_owned_shards)"
    broken = RULES.read_text().replace(f"({owned} or vector(0))", owned)
    assert broken != RULES.read_text()
    (tmp_path / "alerts.yml").write_text(broken)
    (tmp_path / "alerts.test.yml").write_text(RULE_TESTS.read_text())
    result = promtool("test", "rules", "alerts.test.yml", cwd=tmp_path)
    assert result.returncode != 0
    assert "DschedShardWithoutOwner" in result.stdout + result.stderr


def test_the_compose_prometheus_config_loads_the_rules() -> None:
    config = REPO / "deploy" / "prometheus.yml"
    result = promtool("check", "config", str(config))
    assert result.returncode == 0, result.stdout + result.stderr
    rule_files = yaml.safe_load(config.read_text())["rule_files"]
    assert [(config.parent / path).resolve() for path in rule_files] == [RULES]


def test_every_required_alert_exists_with_severity_and_runbook() -> None:
    names = {str(rule["alert"]) for rule in alerts()}
    assert REQUIRED <= names, sorted(REQUIRED - names)
    readme = (REPO / "README.md").read_text()
    for rule in alerts():
        labels, annotations = rule["labels"], rule["annotations"]
        assert isinstance(labels, dict) and labels["severity"] in ("critical", "warning"), rule["alert"]
        assert isinstance(annotations, dict) and annotations["summary"] and annotations["description"]
        anchor = f"README.md#{str(rule['alert']).lower()}"
        assert annotations["runbook"] == anchor, rule["alert"]
        assert re.search(rf"^#+ `?{rule['alert']}`?\s*$", readme, re.M), f"README has no runbook for {rule['alert']}"


def test_every_rule_uses_only_exported_metrics() -> None:
    exported = exposed_metric_names() | PROMETHEUS_SERIES
    for rule in alerts():
        used = metric_names(str(rule["expr"]))
        assert used, rule["alert"]
        assert used <= exported, f"{rule['alert']}: {sorted(used - exported)} not in libs.metrics"


def test_every_alert_is_tested_firing_and_silent() -> None:
    tests = yaml.safe_load(RULE_TESTS.read_text())["tests"]
    firing: set[str] = set()
    silent: set[str] = set()
    for case in tests:
        for check in case.get("alert_rule_test", []):
            (firing if check.get("exp_alerts") else silent).add(check["alertname"])
    names = {str(rule["alert"]) for rule in alerts()}
    assert names <= firing, f"never shown firing: {sorted(names - firing)}"
    assert names <= silent, f"never shown silent: {sorted(names - silent)}"


def test_scaled_rules_keep_expressions_and_shorten_for(tmp_path: Path) -> None:
    scaled = yaml.safe_load(scaled_rules(tmp_path / "scaled.yml").read_text())
    original = yaml.safe_load(RULES.read_text())
    pairs = zip(scaled["groups"][0]["rules"], original["groups"][0]["rules"], strict=True)
    for new, old in pairs:
        assert new["expr"] == old["expr"]
        if "for" in old:
            assert new["for"].endswith("s") and int(new["for"][:-1]) <= 20
    by_name = {rule["alert"]: rule for rule in scaled["groups"][0]["rules"]}
    assert by_name["DschedShardWithoutOwner"]["for"] == "2s"
    result = promtool("check", "rules", str(tmp_path / "scaled.yml"))
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_stack_prometheus_loads_the_real_rules_and_scrapes_every_5s() -> None:
    server = PrometheusServer.for_dsched({"ingestion": ["127.0.0.1:8080"], "worker": ["127.0.0.1:9101"]})
    try:
        config = server.config()
    finally:
        server.close()
    assert config["rule_files"] == [str(RULES)]
    assert config["global"]["scrape_interval"] == "5s"
    assert {job["job_name"] for job in config["scrape_configs"]} == {"ingestion", "worker"}


def test_the_stack_prometheus_scrapes_every_service_process_as_the_rules_name_them(tmp_path: Path) -> None:
    """``make stack``'s Prometheus has one target per service process (ingestion on its API port, every replica on
    its own metrics port), in jobs named after the services, the names DschedServiceDown's ``up{job=~...}`` and the
    overview's health panels select."""
    stack = Stack(tmp_path, prometheus=False)
    expected: dict[str, list[str]] = {}
    for service, count in REPLICAS.items():
        for i in range(count):
            env = stack.service_env(f"{service}-{i}")
            port = env["DSCHED_PORT"] if service == "ingestion" else env["DSCHED_METRICS_PORT"]
            expected.setdefault(service, []).append(f"{env['DSCHED_HOST']}:{port}")
    targets = stack.metrics_targets()
    assert {job: sorted(hosts) for job, hosts in targets.items()} == {job: sorted(h) for job, h in expected.items()}
    [down] = [rule for rule in alerts() if rule["alert"] == "DschedServiceDown"]
    match = re.search(r'up\{job=~"([^"]+)"\}', str(down["expr"]))
    assert match is not None
    assert all(re.fullmatch(match.group(1), job) for job in targets), (match.group(1), sorted(targets))
    assert set(targets) == set(SERVICES)
