"""An in-process cluster's HTTP client and settings, for tests that run the services in this process."""

from __future__ import annotations

import asyncio
import contextlib
import io
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import orjson

from dsched.app.runner import started
from dsched.libs.settings import Settings


@dataclass
class Api:
    base: str
    session: aiohttp.ClientSession
    user: str = "alice"

    async def call(
        self,
        method: str,
        path: str,
        *,
        user: str | None = "",
        json: Any = None,
        headers: dict[str, str] | None = None,
        data: bytes | None = None,
    ) -> tuple[int, Any]:
        hdrs = dict(headers or {})
        who = self.user if user == "" else user
        if who is not None:
            hdrs["X-User-ID"] = who
        if json is not None:
            data = orjson.dumps(json)
            hdrs.setdefault("Content-Type", "application/json")
        body_stream = io.BytesIO(data) if data is not None else None
        async with self.session.request(method, self.base + path, data=body_stream, headers=hdrs) as resp:
            body = await resp.read()
            if resp.content_type == "application/json":
                return resp.status, orjson.loads(body)
            return resp.status, body.decode()

    async def submit(self, **body: Any) -> str:
        body.setdefault("project_id", "p1")
        status, data = await self.call("POST", "/submit", json=body)
        assert status == 202, data
        return str(data["job_id"])

    async def wait_for(self, check: Callable[[], Awaitable[Any]], timeout: float = 10.0) -> Any:
        """Poll ``check`` until it returns something truthy (bounded in time)."""
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            result = await check()
            if result:
                return result
            if asyncio.get_running_loop().time() > deadline:
                raise AssertionError(f"condition not met within {timeout}s (last: {result!r})")
            await asyncio.sleep(0.05)

    async def runs(self, job_id: str) -> list[dict[str, Any]]:
        status, data = await self.call("GET", f"/jobs/{job_id}/runs")
        return list(data["runs"]) if status == 200 else []

    async def finished_runs(self, job_id: str, count: int = 1, timeout: float = 10.0) -> list[dict[str, Any]]:
        async def check() -> list[dict[str, Any]] | None:
            runs = [r for r in await self.runs(job_id) if r["status"] != "running"]
            return runs if len(runs) >= count else None

        return list(await self.wait_for(check, timeout))


def rfc3339(dt: datetime) -> str:
    """``dt`` as the API writes times: UTC, milliseconds, ``Z``."""
    return dt.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def parse(ts: str) -> datetime:
    """A time the API returned, as an aware datetime."""
    return datetime.fromisoformat(ts.replace("Z", "+00:00"))


async def job_exists(api: Api, job_id: str) -> bool:
    """Whether ``GET /jobs/{job_id}`` finds the job (for ``api.wait_for``)."""
    return (await api.call("GET", f"/jobs/{job_id}"))[0] == 200


def cluster_settings(tmp_path: Path, **overrides: Any) -> Settings:
    base: dict[str, Any] = dict(
        data_dir=tmp_path / "data",
        port=0,
        shard_count=4,
        bucket_s=10,
        bucket_grace_s=2.0,
        lease_ttl_s=2.0,
        picker_tick_s=0.05,
        retry_initial_s=0.1,
        retry_max_s=0.5,
        visibility_timeout_s=5.0,
        node_id="test-node",
        shutdown_grace_s=1.0,
    )
    base.update(overrides)
    return Settings.from_env(**base).with_dev_defaults()


@contextlib.asynccontextmanager
async def running(settings: Settings, services: list[str]) -> AsyncIterator[dict[str, object]]:
    """The given services in this process, until the block ends."""
    stop = asyncio.Event()
    async with started(settings, services, stop) as instances:
        yield instances


@contextlib.asynccontextmanager
async def api_only(settings: Settings) -> AsyncIterator[Api]:
    """Ingestion alone: nothing stores, schedules or runs what it accepts until the others start."""
    async with running(settings, ["ingestion"]) as instances, aiohttp.ClientSession() as session:
        port = instances["ingestion"].port  # type: ignore[attr-defined]
        yield Api(base=f"http://127.0.0.1:{port}", session=session)
