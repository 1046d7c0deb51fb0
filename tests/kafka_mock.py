"""librdkafka's in-process mock Kafka cluster, served from a subprocess, for the ``kafka-mock`` tests.

``confluent_kafka`` (librdkafka) stands up a mock cluster of N brokers on 127.0.0.1 when a client is
created with ``test.mock.num.brokers``; it lives as long as that client. A small child process creates one,
prints the brokers' addresses on one line and sleeps; aiokafka in the test process talks to it like to real
brokers.

What the mock supports with aiokafka 0.14: idempotent produce, topic auto-creation (4 partitions), a
one-member consumer group with commits, and resuming from committed offsets. What it does not: CreateTopics
from the admin client, and a rebalance between two group members (SyncGroup fails); those run only against
a real broker (``DSCHED_TEST_KAFKA``).

Group joins are slow on the mock: 3 s for a new group, ``session_timeout_ms - 1 s`` for a rejoin, so the
``kafka-mock`` backend uses ``session_timeout_ms=4000``.

Register with ``from tests.kafka_mock import kafka_mock  # noqa: F401`` in a conftest.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator

import pytest

START_TIMEOUT_S = 30.0

_SCRIPT = """
import sys, time
from confluent_kafka import Producer
producer = Producer({"test.mock.num.brokers": 3, "bootstrap.servers": "mock"})
brokers = producer.list_topics(timeout=10).brokers.values()
print(",".join(f"{b.host}:{b.port}" for b in brokers), flush=True)
while True:
    time.sleep(3600)
"""


def _die_with_parent() -> list[str]:
    """SIGTERM the child when pytest dies (``setpriv --pdeathsig``), so no mock outlives a killed run."""
    setpriv = shutil.which("setpriv")
    if setpriv is None or threading.current_thread() is not threading.main_thread():
        return []
    return [setpriv, "--pdeathsig", "TERM", "--"]


class KafkaMock:
    """The mock cluster process; ``bootstrap`` is ``127.0.0.1:p1,127.0.0.1:p2,127.0.0.1:p3``."""

    def __init__(self) -> None:
        self.bootstrap = ""
        self._proc: subprocess.Popen[str] | None = None

    def start(self) -> str:
        proc = subprocess.Popen(
            [*_die_with_parent(), sys.executable, "-c", _SCRIPT],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,  # librdkafka logs its banner there
            text=True,
            start_new_session=True,
        )
        self._proc = proc
        line: list[str] = []
        reader = threading.Thread(target=lambda: line.append(proc.stdout.readline() if proc.stdout else ""))
        reader.start()
        reader.join(START_TIMEOUT_S)
        brokers = line[0].strip() if line else ""
        if not brokers:
            self.stop()
            raise RuntimeError("the librdkafka mock cluster did not report its brokers")
        self.bootstrap = brokers
        return brokers

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        proc.kill()
        proc.wait(timeout=10)
        if proc.stdout is not None:
            proc.stdout.close()


@pytest.fixture(scope="session")
def kafka_mock() -> Iterator[str]:
    """Bootstrap servers of a 3-broker mock Kafka cluster shared by the session (tests use unique topics)."""
    mock = KafkaMock()
    try:
        yield mock.start()
    finally:
        mock.stop()
