"""End to end on a real Prometheus: stop the only picker and "shard without owner" fires; start it, it resolves;
stop the only coordinator and "no leader" fires.

The rules are the real ``deploy/prometheus/alerts.yml`` with each ``for:`` divided by 15 (``for: 30s`` becomes
2 s: see ``cluster.scaled_rules``); the expressions are unchanged. Prometheus scrapes and evaluates every second.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from dsched.libs.servers.prometheus import prometheus_binary
from tests.helpers.observability import running_cluster, wait_until

ALERT = "DschedShardWithoutOwner"


@pytest.mark.timeout(150)
def test_stopping_the_only_picker_fires_shard_without_owner(tmp_path: Path) -> None:
    if prometheus_binary() is None:
        pytest.fail("prometheus is not installed: run `make test` (make system-deps installs it)", pytrace=False)
    started = time.monotonic()
    with running_cluster(tmp_path, ["coordinator", "picker"]) as cluster:
        cluster.wait_scraped()
        # Healthy: the picker owns all 4 shards, one leader, and the alert is inactive for several evaluations.
        wait_until(lambda: cluster.value("sum(dsched_picker_owned_shards)") == 4, 20, "picker owns every shard")
        wait_until(lambda: cluster.value("sum(dsched_coordinator_is_leader)") == 1, 20, "one leader")
        time.sleep(3)  # longer than the scaled `for:` (2 s): a false positive would be firing by now
        assert cluster.alert_state(ALERT) != "firing"

        cluster.processes["picker"].stop()
        wait_until(lambda: cluster.alert_state(ALERT) == "firing", 20, f"{ALERT} firing")
        [alert] = [a for a in cluster.prometheus.alerts() if a["labels"]["alertname"] == ALERT]
        assert alert["labels"]["severity"] == "critical"
        assert alert["annotations"]["summary"] == "4 shard(s) owned by no live picker for 30 s"
        assert cluster.alert_state("DschedNoLeader") != "firing"  # the coordinator still leads

        cluster.processes["picker"].start()
        wait_until(lambda: cluster.alert_state(ALERT) is None, 30, f"{ALERT} resolved after the restart")
        assert cluster.value("sum(dsched_picker_owned_shards)") == 4

        # The same for the leader: the only coordinator stops, no process reports a leader, "no leader" fires.
        cluster.processes["coordinator"].stop()
        wait_until(lambda: cluster.alert_state("DschedNoLeader") == "firing", 20, "DschedNoLeader firing")
    assert time.monotonic() - started < 100
