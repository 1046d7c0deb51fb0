"""Drive the real ``dsched`` CLI as subprocesses (procrastinate's acceptance style)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers.processes import DSCHED, Http, Service, base_env, free_port  # noqa: F401


@pytest.fixture
def services(tmp_path: Path) -> Iterator[list[Service]]:
    started: list[Service] = []
    yield started
    for service in started:
        service.stop(timeout=5)
