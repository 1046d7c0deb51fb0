"""An in-process cluster's HTTP client and settings, for tests that run the services in this process."""

from __future__ import annotations

import asyncio
import contextlib
import io
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import orjson
from prometheus_client.parser import text_string_to_metric_families

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

    async def wait_for(
        self, check: Callable[[], Awaitable[Any]], timeout: float = 10.0, what: str = "condition"
    ) -> Any:
        """Poll ``check`` until it returns something truthy (bounded in time); the error names ``what``."""
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            result = await check()
            if result:
                return result
            if asyncio.get_running_loop().time() > deadline:
                raise AssertionError(f"{what} not met within {timeout}s (last: {result!r})")
            await asyncio.sleep(0.05)

    async def runs(self, job_id: str) -> list[dict[str, Any]]:
        status, data = await self.call("GET", f"/jobs/{job_id}/runs")
        return list(data["runs"]) if status == 200 else []

    async def finished_runs(self, job_id: str, count: int = 1, timeout: float = 10.0) -> list[dict[str, Any]]:
        async def check() -> list[dict[str, Any]] | None:
            runs = [r for r in await self.runs(job_id) if r["status"] != "running"]
            return runs if len(runs) >= count else None

        return list(await self.wait_for(check, timeout))

    async def status(self, job_id: str) -> str | None:
        """The job's status, None while it cannot be read."""
        status, job = await self.call("GET", f"/jobs/{job_id}")
        return str(job["status"]) if status == 200 else None

    async def metric(self, name: str, **labels: str) -> float:
        """The sum of the ``/metrics`` samples called ``name`` with ``labels`` (0 when there is none). In-process
        services share one registry: the API's ``/metrics`` shows the picker's and the worker's counters too."""
        status, text = await self.call("GET", "/metrics")
        assert status == 200, text
        return sum(
            sample.value
            for family in text_string_to_metric_families(text)
            for sample in family.samples
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items())
        )

    async def idle(self) -> bool:
        """Nothing due in the store, nothing in the work queue or in flight, no job queued or running."""
        _, stats = await self.call("GET", "/queue/stats")
        busy = ("due", "queued", "running", "queue_visible", "queue_in_flight")
        return all(stats.get(key, 0) == 0 for key in busy)

    async def fired_through(self, moment: datetime, timeout: float = 10.0) -> None:
        """Until the pipeline has had its chance to fire everything due by ``moment``: a witness job due then has
        run (the cluster's picker dispatches entries in due order: every entry due earlier was dispatched before it)
        and the pipeline is idle (what was dispatched has run). A bounded wait on observable state, for tests that
        assert something did *not* happen."""
        witness = await self.submit(payload="witness", project_id="witness", next_fire_at=rfc3339(moment))
        limit = timeout + max(0.0, (moment - datetime.now(UTC)) / timedelta(seconds=1))
        await self.finished_runs(witness, timeout=limit)
        await self.wait_for(self.idle, timeout, what="an idle pipeline")


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
