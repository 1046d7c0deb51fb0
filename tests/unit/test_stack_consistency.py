"""``make stack`` (libs/servers/stack.py) and deploy/docker-compose.yml run the same thing: the same server
versions where an image exists (Kafka, ElasticMQ), the same layout settings, the same backend per role, the same
services with the same replica counts."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import yaml

from dsched.libs.servers.stack import LAYOUT, REPLICAS, Stack

ROOT = Path(__file__).resolve().parents[2]


def _compose() -> dict[str, Any]:
    data = yaml.safe_load((ROOT / "deploy" / "docker-compose.yml").read_text())
    assert isinstance(data, dict)
    return data


def _pom_version(server: str, artifact: str) -> str:
    text = (ROOT / "deploy" / "jars" / server / "pom.xml").read_text()
    match = re.search(rf"<artifactId>{artifact}</artifactId>\s*<version>([^<]+)</version>", text)
    assert match, f"{artifact} not in deploy/jars/{server}/pom.xml"
    return match.group(1)


def test_kafka_and_elasticmq_images_match_the_jars_the_stack_runs() -> None:
    services = _compose()["services"]
    kafka_images = {svc["image"] for svc in services.values() if str(svc.get("image", "")).startswith("apache/kafka")}
    assert kafka_images == {f"apache/kafka:{_pom_version('kafka', 'kafka_2.13')}"}
    elasticmq = services["elasticmq"]["image"]
    assert elasticmq.endswith(":" + _pom_version("elasticmq", "elasticmq-server_2.13"))


def test_layout_and_backends_match(tmp_path: Path) -> None:
    env = _compose()["x-dsched-env"]
    assert {k: env[k] for k in LAYOUT} == LAYOUT
    stack = Stack(tmp_path, prometheus=False)
    for var, url in stack.urls().items():
        assert urlsplit(url).scheme == urlsplit(env[var]).scheme, var
        assert urlsplit(url).path == urlsplit(env[var]).path or var == "DSCHED_QUEUE_URL", var
    ours = stack.service_env("writer-0")
    # Per process in the stack: host and metrics port. Authentication is the operator's choice there, as with
    # `make run` (DSCHED_AUTH* pass through from the environment); compose turns API keys on.
    own = {"DSCHED_HOST", "DSCHED_METRICS_PORT", "DSCHED_AUTH", "DSCHED_AUTH_PEPPER"}
    assert sorted(k for k in env if k.startswith("DSCHED_") and k not in own and k not in ours) == []


def test_the_stack_runs_every_service_as_many_times_as_compose() -> None:
    compose_replicas = {
        svc["command"][1]: svc.get("deploy", {}).get("replicas", 1)
        for svc in _compose()["services"].values()
        if svc.get("command", [""])[0] == "run"
    }
    assert compose_replicas == REPLICAS
