"""The HTTP endpoint the chaos workload's jobs call: it records every hit and answers as the job asked.

A job's URL says how the target behaves, so the target needs no knowledge of job ids:
``/t/<key>?fail=<n>&sleep=<s>`` answers 500 while ``X-Dsched-Attempt < n`` (``n = -1``: always), after
sleeping ``s`` seconds (a long run a worker can be killed in the middle of), else 200. ``<key>`` is the
workload's own name for the job, known before the job id is.

Every hit is recorded when it *arrives* (before any sleep), with the scheduler's headers: a run counts as
executed once its request reached the target, whatever happens to the worker afterwards.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web


@dataclass(slots=True)
class Hit:
    """One request that reached the target."""

    key: str
    job_id: str
    run_id: str
    attempt: int
    idempotency_key: str
    at_ms: int  # arrival, epoch ms
    status: int = 0  # what the target answered (0: the caller went away first)
    done_ms: int | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "key": self.key,
            "job_id": self.job_id,
            "run_id": self.run_id,
            "attempt": self.attempt,
            "idempotency_key": self.idempotency_key,
            "at_ms": self.at_ms,
            "status": self.status,
            "done_ms": self.done_ms,
        }


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


@dataclass
class Target:
    """An aiohttp server on 127.0.0.1 (free port) that records hits; run it inside the runner's loop."""

    host: str = "127.0.0.1"
    hits: list[Hit] = field(default_factory=list)
    in_flight: dict[int, Hit] = field(default_factory=dict)  # id(hit) -> hit, while its handler runs
    port: int = 0
    _runner: web.AppRunner | None = None

    async def start(self) -> None:
        app = web.Application()
        app.router.add_route("*", "/t/{key}", self._handle)
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, 0)
        await site.start()
        server = getattr(site, "_server", None)
        sockets = getattr(server, "sockets", None) or []
        self.port = int(sockets[0].getsockname()[1])

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    def url(self, key: str, *, fail: int = 0, sleep_s: float = 0.0) -> str:
        return f"http://{self.host}:{self.port}/t/{key}?fail={fail}&sleep={sleep_s:g}"

    async def _handle(self, request: web.Request) -> web.Response:
        headers = request.headers
        try:
            attempt = int(headers.get("X-Dsched-Attempt", "0"))
        except ValueError:
            attempt = -1
        hit = Hit(
            key=request.match_info["key"],
            job_id=headers.get("X-Dsched-Job-Id", ""),
            run_id=headers.get("X-Dsched-Run-Id", ""),
            attempt=attempt,
            idempotency_key=headers.get("Idempotency-Key", ""),
            at_ms=_now_ms(),
        )
        self.hits.append(hit)
        self.in_flight[id(hit)] = hit
        try:
            fail = int(request.query.get("fail", "0"))
            sleep_s = float(request.query.get("sleep", "0"))
            if sleep_s > 0:
                await asyncio.sleep(sleep_s)
            failing = fail < 0 or attempt < fail
            hit.status = 500 if failing else 200
            return web.Response(status=hit.status, text="chaos: failing on purpose" if failing else "ok")
        finally:
            hit.done_ms = _now_ms()
            with contextlib.suppress(KeyError):
                del self.in_flight[id(hit)]
