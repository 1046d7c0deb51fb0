"""URL parsing of the production adapters (etcd, SQS, S3), and the one-line error for an unreachable server.

No server is needed: parsing is pure, and "unreachable" is a port nothing listens on.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from dsched.app.backends import Backends
from dsched.libs.blobs.s3 import S3BlobStore
from dsched.libs.coordination.etcd import EtcdCoordination, EtcdEndpoint
from dsched.libs.errors import BackendConfigError
from dsched.libs.queue.sqs import SqsQueue
from dsched.libs.servers import free_port
from dsched.libs.settings import Settings


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return Settings.from_env(data_dir=tmp_path, max_receives=7)


@pytest.fixture(autouse=True)
def _no_aws_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("AWS_REGION", "AWS_DEFAULT_REGION", "AWS_ACCESS_KEY_ID", "AWS_PROFILE"):
        monkeypatch.delenv(var, raising=False)


# etcd -----------------------------------------------------------------------------------------------------
def test_etcd_single_host(settings: Settings) -> None:
    etcd = EtcdCoordination.from_url("etcd://127.0.0.1:2379", settings)
    assert etcd.endpoints == [EtcdEndpoint("127.0.0.1", 2379)]
    assert etcd.prefix == ""
    assert etcd.timeout_s == 5.0


def test_etcd_several_hosts_in_order_with_default_port(settings: Settings) -> None:
    etcd = EtcdCoordination.from_url("etcd://h1:2379,h2,[::1]:23790", settings)
    assert etcd.endpoints == [EtcdEndpoint("h1", 2379), EtcdEndpoint("h2", 2379), EtcdEndpoint("::1", 23790)]
    assert str(etcd.endpoints[2]) == "[::1]:23790"


@pytest.mark.parametrize(
    ("url", "prefix"),
    [
        ("etcd://h:2379/dsched", "dsched/"),
        ("etcd://h:2379/dsched/cluster-a/", "dsched/cluster-a/"),
        ("etcd://h:2379/", ""),
    ],
)
def test_etcd_path_is_a_key_prefix(settings: Settings, url: str, prefix: str) -> None:
    assert EtcdCoordination.from_url(url, settings).prefix == prefix


def test_etcd_credentials_and_timeout(settings: Settings) -> None:
    etcd = EtcdCoordination.from_url("etcd://user:p%40ss@h:2379?timeout=1.5", settings)
    assert etcd.timeout_s == 1.5
    assert (etcd._username, etcd._password) == ("user", "p@ss")


@pytest.mark.parametrize(
    ("url", "fragment"),
    [
        ("etcd://", "no host"),
        ("etcd://h:notaport", "bad port"),
        ("etcd://h:70000", "bad port"),
        ("etcd://h1,,h2", "empty host"),
        ("etcd://h:2379?timout=3", "unknown parameter"),
        ("etcd://h:2379?timeout=-1", "timeout"),
        ("etcd://user@h:2379", "credentials"),
        ("etcds://h:2379", "scheme"),
    ],
)
def test_etcd_bad_urls_are_one_clear_line(settings: Settings, url: str, fragment: str) -> None:
    with pytest.raises(BackendConfigError) as info:
        EtcdCoordination.from_url(url, settings)
    assert fragment in str(info.value)
    assert "\n" not in str(info.value)


# SQS ------------------------------------------------------------------------------------------------------
def test_sqs_name_endpoint_region_and_max_receives(settings: Settings) -> None:
    queue = SqsQueue.from_url("sqs://work?endpoint=http://127.0.0.1:9324&region=eu-west-1", settings)
    assert (queue.name, queue.dlq_name) == ("work", "work-dlq")
    assert queue.endpoint == "http://127.0.0.1:9324"
    assert queue.region == "eu-west-1"
    assert queue.max_receives == 7


def test_sqs_without_endpoint_is_aws_with_the_environment_region(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert SqsQueue.from_url("sqs://work", settings).region == "us-east-1"
    monkeypatch.setenv("AWS_DEFAULT_REGION", "ap-south-1")
    queue = SqsQueue.from_url("sqs://work", settings)
    assert (queue.endpoint, queue.region) == (None, "ap-south-1")


@pytest.mark.parametrize(
    ("url", "fragment"),
    [
        ("sqs://", "expected sqs://queue-name"),
        ("sqs://work/extra", "expected sqs://queue-name"),
        ("sqs://work.fifo", "standard queues only"),
        ("sqs://" + "q" * 77, "1-76"),
        ("sqs://work?endpoint=127.0.0.1:9324", "endpoint must be http"),
        ("sqs://work?endpoint=http://127.0.0.1:port", "bad port"),
        ("sqs://work?endpiont=http://127.0.0.1:9324", "unknown parameter"),
    ],
)
def test_sqs_bad_urls_are_one_clear_line(settings: Settings, url: str, fragment: str) -> None:
    with pytest.raises(BackendConfigError) as info:
        SqsQueue.from_url(url, settings)
    assert fragment in str(info.value)
    assert "\n" not in str(info.value)


# S3 -------------------------------------------------------------------------------------------------------
def test_s3_bucket_endpoint_region(settings: Settings) -> None:
    blobs = S3BlobStore.from_url("s3://payloads?endpoint=http://127.0.0.1:4566/&region=us-west-2", settings)
    assert (blobs.bucket, blobs.prefix) == ("payloads", "")
    assert blobs.endpoint == "http://127.0.0.1:4566"
    assert blobs.region == "us-west-2"


@pytest.mark.parametrize(
    "url", ["s3://payloads/cluster-a", "s3://payloads/cluster-a/", "s3://payloads?prefix=cluster-a"]
)
def test_s3_key_prefix_from_path_or_parameter(settings: Settings, url: str) -> None:
    assert S3BlobStore.from_url(url, settings).prefix == "cluster-a/"


@pytest.mark.parametrize(
    ("url", "fragment"),
    [
        ("s3://", "expected s3://bucket"),
        ("s3://Upper_Case", "bucket name"),
        ("s3://ab", "bucket name"),
        ("s3://b-1/x?prefix=y", "not both"),
        ("s3://b-1?endpoint=ftp://h", "endpoint must be http"),
        ("s3://b-1?regoin=x", "unknown parameter"),
    ],
)
def test_s3_bad_urls_are_one_clear_line(settings: Settings, url: str, fragment: str) -> None:
    with pytest.raises(BackendConfigError) as info:
        S3BlobStore.from_url(url, settings)
    assert fragment in str(info.value)
    assert "\n" not in str(info.value)


# Unreachable servers --------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("role", "url"),
    [
        ("coordination", "etcd://127.0.0.1:{port}"),
        ("coordination", "etcd://127.0.0.1:{port},127.0.0.1:{port2}/ns"),
        ("queue", "sqs://work?endpoint=http://127.0.0.1:{port}"),
        ("blobs", "s3://payloads?endpoint=http://127.0.0.1:{port}"),
    ],
)
async def test_an_unreachable_server_fails_startup_with_one_line(tmp_path: Path, role: str, url: str) -> None:
    url = url.format(port=free_port(), port2=free_port())
    settings = Settings.from_env(data_dir=tmp_path, startup_retry_s=0, **{f"{role}_url": url})
    started = time.monotonic()
    with pytest.raises(BackendConfigError) as info:
        async with Backends.open(settings, {role}):
            pass
    message = str(info.value)
    assert "\n" not in message
    assert url in message
    assert "unreachable" in message
    assert time.monotonic() - started < 15  # refused connections fail fast (after the client's few retries)
