"""Every panel of every dashboard under deploy/grafana returns data on a real Prometheus scraping a real cluster.

The live test starts the five services as separate ``dsched run`` processes (each scraped on its own port), and
again as ``dsched run all`` over four processes (one scrape of the API port, the children's series
labelled ``process``), a local HTTP target, and Debian's Prometheus scraping every second with the alert rules
loaded; it runs a mixed workload (succeeded, failed and retried, dead-lettered, recurring, cmd, echo and http
jobs, a late submission) and then evaluates each panel's query through the HTTP API, with Grafana's variables
replaced as Grafana would (``$__rate_interval`` by four scrape intervals and more, ``$__range`` by the
dashboard's range, ``$tenant`` by its "All" value). A query that returns nothing, or only NaN, is a panel that
would say "No data". A static check makes every panel and alert aggregate a metric over processes the way its
meaning needs (sum what each process counts, max what each process sees whole).
"""

from __future__ import annotations

import json
import math
import re
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml

from dsched.libs.metrics import FIRE_LAG_OBJECTIVE_S, LAG_BUCKETS
from dsched.libs.servers.prometheus import prometheus_binary
from dsched.libs.settings import SERVICES
from tests.helpers.observability import DASHBOARDS, RULES, Cluster, Hook, running_cluster, wait_until
from tests.helpers.promql import enclosing_aggregations, exposed_metric_names, metric_names

VARIABLES = {"__rate_interval": "20s", "__interval": "5s", "__range": "10m", "tenant": ".*"}


def dashboards() -> dict[str, dict[str, Any]]:
    return {path.name: json.loads(path.read_text()) for path in sorted(DASHBOARDS.glob("*.json"))}


def panel_queries() -> list[tuple[str, str, str]]:
    """``(dashboard file, panel title / refId, expr)`` for every target of every panel."""
    return [
        (name, f"{panel['title']} / {target['refId']}", target["expr"])
        for name, board in dashboards().items()
        for panel in board["panels"]
        for target in panel.get("targets", [])
    ]


def substitute(expr: str) -> str:
    def value(match: re.Match[str]) -> str:
        name = match.group(1) or match.group(2)
        assert name in VARIABLES, f"unknown dashboard variable ${name} in {expr}"
        return VARIABLES[name]

    return re.sub(r"\$\{(\w+)\}|\$(\w+)", value, expr)


# -- static checks ---------------------------------------------------------------------------------------------
def test_the_three_dashboards_exist() -> None:
    uids = {board["uid"] for board in dashboards().values()}
    assert {"dsched-overview", "dsched-tenants", "dsched-slo"} <= uids


def test_every_panel_has_a_unit_thresholds_and_legends() -> None:
    for name, board in dashboards().items():
        ids = [panel["id"] for panel in board["panels"]]
        assert len(ids) == len(set(ids)), f"{name}: duplicate panel ids"
        for panel in board["panels"]:
            where = f"{name}: {panel['title']}"
            defaults = panel["fieldConfig"]["defaults"]
            assert defaults.get("unit"), f"{where}: no unit"
            assert defaults.get("thresholds", {}).get("steps"), f"{where}: no thresholds"
            assert panel.get("description"), f"{where}: no description"
            assert panel["datasource"]["uid"] == "prometheus", where
            for target in panel["targets"]:
                assert target.get("legendFormat"), f"{where}: target {target['refId']} has no legend"


def test_the_overview_covers_what_operators_need() -> None:
    text = " ".join(expr for name, _, expr in panel_queries() if name == "dsched.json")
    for needle in (
        "dsched_submissions_total",
        "histogram_quantile(0.50, sum by (le) (rate(dsched_fire_lag_seconds_bucket",
        "histogram_quantile(0.95, sum by (le) (rate(dsched_fire_lag_seconds_bucket",
        "histogram_quantile(0.99, sum by (le) (rate(dsched_fire_lag_seconds_bucket",
        "dsched_dispatch_lag_seconds_bucket",
        "dsched_runs_total",
        "dsched_retries_total",
        "dsched_dead_letters_total",
        "dsched_queue_depth",
        "dsched_writer_lag_seconds",
        "dsched_writer_lag_records",
        "dsched_service_up",
        "dsched_service_restarts_total",
        "dsched_coordinator_is_leader",
        "dsched_picker_owned_shards",
    ):
        assert needle in text, needle


def test_the_slo_objective_is_a_histogram_bucket() -> None:
    """The SLI counts the bucket ``le="1.0"``: the objective must be one of the buckets, written as Python does."""
    assert FIRE_LAG_OBJECTIVE_S in LAG_BUCKETS
    slo = " ".join(expr for name, _, expr in panel_queries() if name == "dsched-slo.json")
    assert f'dsched_fire_lag_seconds_bucket{{le="{FIRE_LAG_OBJECTIVE_S}"}}' in slo


# Gauges every exporting process reports whole (each worker samples the one queue, pickers and coordinators know
# the shard count, an embedded-log writer reads every partition): aggregated with max, never added up.
WHOLE_GAUGES = {"dsched_queue_depth", "dsched_shard_count", "dsched_writer_lag_seconds", "dsched_writer_lag_records"}
# Gauges of one process's own share (its shards, its leadership, its slots): added up over processes.
SHARE_GAUGES = {"dsched_picker_owned_shards", "dsched_coordinator_is_leader", "dsched_worker_slots"}
SHARE_GAUGES |= {"dsched_worker_inflight_runs"}


def test_every_query_aggregates_over_processes_the_right_way() -> None:
    """A series may come from several processes of one service (replicas, or ``run all``'s worker children, which
    add a ``process`` label): counters and histograms are summed (a max or a bare series would miss the other
    processes' counts), share gauges summed, whole gauges maxed (a sum would count the one queue twice)."""
    rules = yaml.safe_load(RULES.read_text())["groups"]
    exprs = [(f"{name}: {panel}", expr) for name, panel, expr in panel_queries()]
    exprs += [(f"alert {rule['alert']}", str(rule["expr"])) for group in rules for rule in group["rules"]]
    counted = {n for n in exposed_metric_names() if n.endswith(("_total", "_bucket", "_count", "_sum"))}
    wrong: list[str] = []
    for where, expr in exprs:
        for metric in metric_names(expr):
            if metric in WHOLE_GAUGES:
                allowed = {"max", "min"}
            elif metric in SHARE_GAUGES:
                allowed = {"sum"}
            elif metric in counted:
                allowed = {"sum", "count"}
            else:
                continue
            for aggregation in enclosing_aggregations(expr, metric):
                if aggregation not in allowed:
                    wrong.append(f"{where}: {metric} under {aggregation}: {expr}")
    assert not wrong, "\n".join(wrong)


def test_enclosing_aggregations() -> None:
    expr = 'max(x) - (sum(rate(y{a="b"}[5m])) or vector(0)) + sum by (le) (deriv(x[1m])) + histogram_quantile(0.5, y)'
    assert enclosing_aggregations(expr, "x") == ["max", "sum"]
    assert enclosing_aggregations(expr, "y") == ["sum", None]
    assert enclosing_aggregations("count(count by (t) (z or w))", "z") == ["count"]


def test_variable_substitution() -> None:
    assert substitute('rate(x{t=~"$tenant"}[$__rate_interval]) $__range ${__interval}') == (
        'rate(x{t=~".*"}[20s]) 10m 5s'
    )


# -- live ------------------------------------------------------------------------------------------------------
def mixed_workload(cluster: Cluster, hook: Hook) -> dict[str, str]:
    """Jobs of three tenants covering every outcome the dashboards show. Returns name -> job id."""
    fail_fast: dict[str, Any] = {"max_retries": 1, "retry": {"backoff": "fixed", "initial_s": 0.1, "jitter": False}}
    past = (datetime.now(UTC) - timedelta(hours=1)).strftime("%Y-%m-%dT%H:%M:%SZ")
    future = (datetime.now(UTC) + timedelta(hours=1)).strftime("%Y-%m-%dT%H:%M:%SZ")
    jobs = {f"cmd_ok_{i}": cluster.submit(payload=f"cmd:echo ok {i}") for i in range(3)}
    jobs["echo"] = cluster.submit(payload="hello")
    jobs["cmd_fail"] = cluster.submit(payload="cmd:exit 3", **fail_fast)
    jobs["http_ok"] = cluster.submit(
        user="bob", payload={"http": {"url": f"{hook.url}/ok", "method": "POST", "body": "{}"}}
    )
    jobs["http_fail"] = cluster.submit(user="bob", payload={"http": {"url": f"{hook.url}/fail"}}, **fail_fast)
    jobs["recurring"] = cluster.submit(user="bob", payload="tick", cron_schedule="@every 1s")
    jobs["late"] = cluster.submit(user="carol", payload="cmd:echo late", next_fire_at=past)
    jobs["future"] = cluster.submit(user="carol", payload="cmd:echo later", next_fire_at=future)
    return jobs


def wait_for_outcomes(cluster: Cluster, jobs: dict[str, str]) -> None:
    def statuses(name: str, user: str) -> list[str]:
        return [run["status"] for run in cluster.runs(jobs[name], user=user)]

    def done() -> bool:
        return (
            all("succeeded" in statuses(f"cmd_ok_{i}", "alice") for i in range(3))
            and "succeeded" in statuses("echo", "alice")
            and statuses("cmd_fail", "alice").count("failed") == 2
            and "succeeded" in statuses("http_ok", "bob")
            and statuses("http_fail", "bob").count("failed") == 2
            and len(statuses("recurring", "bob")) >= 3
            and "succeeded" in statuses("late", "carol")
        )

    wait_until(done, 60, "every job of the workload reached its outcome", interval_s=0.5)
    for user in ("alice", "bob"):
        status, data = cluster.call("GET", "/dead-letters", user=user)
        assert status == 200 and len(data["dead_letters"]) == 1, (user, data)


# The five services as separate processes (one scrape target each), and `dsched run all` (`make run`) over four
# processes: one target, the API port, serving its children's series labelled process="writer-picker" and
# process="worker-<i>".
DEPLOYMENTS = {
    "separate processes": (list(SERVICES), {}),
    "run all over 4 processes": (["all"], {"processes": "4"}),
}


@pytest.mark.timeout(180)
@pytest.mark.parametrize("deployment", list(DEPLOYMENTS))
def test_every_panel_query_returns_data_on_a_cluster_after_a_mixed_workload(tmp_path: Path, deployment: str) -> None:
    if prometheus_binary() is None:
        pytest.fail("prometheus is not installed: run `make test` (make system-deps installs it)", pytrace=False)
    started = time.monotonic()
    services, settings = DEPLOYMENTS[deployment]
    with Hook() as hook, running_cluster(tmp_path, services, **settings) as cluster:
        cluster.wait_scraped()
        jobs = mixed_workload(cluster, hook)
        wait_for_outcomes(cluster, jobs)
        assert hook.hits.get("/ok") == 1 and hook.hits.get("/fail") == 2, hook.hits

        # Prometheus has seen the outcomes (scraped every second), from every process.
        wait_until(lambda: (cluster.value("sum(dsched_dead_letters_total)") or 0) >= 2, 20, "dead letters scraped")
        wait_until(lambda: (cluster.value("sum(dsched_retries_total)") or 0) >= 2, 20, "retries scraped")
        wait_until(lambda: cluster.value('count(up{job=~".+"} == 1)') == len(services), 20, "all targets up")
        if services == ["all"]:
            # The runs were counted by the worker children and dispatched by the writer-picker child, seen through
            # the one target with their process label; each child's supervised process loop is reported up.
            assert (cluster.value('sum(dsched_runs_total{process=~"worker-.+"})') or 0) >= 1
            assert (cluster.value('sum(dsched_picker_dispatched_total{process="writer-picker"})') or 0) >= 1
            assert cluster.value('count(dsched_service_up{service=~"worker-.+"} == 1)') == 2
            assert cluster.value('count(dsched_service_up{service="writer-picker"} == 1)') == 1
        # The late submission ran, was counted as such, and stayed out of the fire-lag histogram (an hour late).
        wait_until(lambda: (cluster.value("sum(dsched_late_submission_runs_total)") or 0) >= 1, 20, "late submission")
        over_10_min = 'sum(dsched_fire_lag_seconds_bucket{le="+Inf"}) - sum(dsched_fire_lag_seconds_bucket{le="600.0"})'
        assert cluster.value(over_10_min) == 0
        # The work queue depth is exported (sampled by the worker) and the writer reports being caught up.
        assert cluster.value('max(dsched_queue_depth{state="visible"})') is not None
        assert wait_until(lambda: cluster.value("max(dsched_writer_lag_records)") == 0, 10, "writer caught up") is True

        no_data: list[str] = []
        for name, panel, expr in panel_queries():
            result = cluster.prometheus.query(substitute(expr))
            values = [float(sample["value"][1]) for sample in result]
            if not values or all(math.isnan(v) for v in values):
                no_data.append(f"{name}: {panel}: {expr}")
        assert not no_data, "panels without data:\n" + "\n".join(no_data)

        # A healthy cluster pages nobody (rules loaded with `for:` scaled down; see cluster.scaled_rules).
        assert all(group["rules"] for group in cluster.prometheus.rules())
        for alert in ("DschedNoLeader", "DschedShardWithoutOwner", "DschedServiceDown", "DschedWriterLagGrowing"):
            assert cluster.alert_state(alert) != "firing", alert
    assert time.monotonic() - started < 150
