"""All five services in this process on embedded backends, with an HTTP client for the API."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from dsched.app.runner import started
from dsched.libs.settings import SERVICES
from tests.helpers.cluster import Api, cluster_settings


@pytest.fixture
async def make_cluster(tmp_path: Path) -> AsyncIterator[Callable[..., Any]]:
    """``async with make_cluster(**settings) as api`` runs every service in this process."""
    import contextlib

    @contextlib.asynccontextmanager
    async def factory(**overrides: Any) -> AsyncIterator[Api]:
        settings = cluster_settings(tmp_path, **overrides)
        stop = asyncio.Event()
        async with started(settings, list(SERVICES), stop) as services:
            ingestion = services["ingestion"]
            port = ingestion.port  # type: ignore[attr-defined]
            async with aiohttp.ClientSession() as session:
                yield Api(base=f"http://127.0.0.1:{port}", session=session)

    yield factory


@pytest.fixture
async def api(make_cluster: Callable[..., Any]) -> AsyncIterator[Api]:
    async with make_cluster() as client:
        yield client
