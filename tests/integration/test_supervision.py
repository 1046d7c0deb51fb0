"""Issue 9: a failing service loop is logged, reported (/health 503, dsched_service_up 0), restarted with
backoff and counted; one that keeps failing makes the process exit non-zero. Never a silent stop."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from dsched.app import cli, runner
from dsched.app.runner import started
from dsched.libs.metrics import REGISTRY
from dsched.libs.settings import SERVICES
from dsched.libs.supervisor import ServiceFailed, Supervisor
from tests.helpers.cluster import Api, cluster_settings


def _metric(name: str, service: str) -> float:
    value = REGISTRY.get_sample_value(name, {"service": service})
    return 0.0 if value is None else value


def _fail_once(target: Any, method: str, failed: asyncio.Event) -> None:
    original = getattr(target, method)

    async def broken(*args: Any, **kwargs: Any) -> Any:
        if not failed.is_set():
            failed.set()
            raise RuntimeError(f"injected failure in {method}")
        return await original(*args, **kwargs)

    setattr(target, method, broken)


@pytest.mark.parametrize(("service", "method"), [("writer", "step"), ("worker", "_start")])
async def test_a_failing_loop_turns_health_red_then_comes_back(tmp_path: Path, service: str, method: str) -> None:
    settings = cluster_settings(tmp_path)
    supervisor = Supervisor(backoff_initial_s=2.0)  # a window wide enough to see the 503 without racing it
    stop = asyncio.Event()
    restarts_before = _metric("dsched_service_restarts_total", service)
    async with started(settings, list(SERVICES), stop, supervisor) as instances, aiohttp.ClientSession() as session:
        api = Api(base=f"http://127.0.0.1:{instances['ingestion'].port}", session=session)  # type: ignore[attr-defined]
        failed = asyncio.Event()
        _fail_once(instances[service], method, failed)
        job_id = await api.submit(payload="survives")  # makes the writer (then the worker) take the broken path
        await asyncio.wait_for(failed.wait(), timeout=10)

        async def red() -> dict[str, Any] | None:
            status, health = await api.call("GET", "/health")
            return health if status == 503 else None

        health = await api.wait_for(red, timeout=2)
        assert health["services"][service]["state"] == "restarting", health
        assert _metric("dsched_service_up", service) == 0
        assert _metric("dsched_service_restarts_total", service) == restarts_before + 1

        async def green() -> bool:
            status, _ = await api.call("GET", "/health")
            return status == 200

        await api.wait_for(green, timeout=10)
        assert _metric("dsched_service_up", service) == 1
        runs = await api.finished_runs(job_id, timeout=15)  # nothing was lost on the way
        assert runs[0]["status"] == "succeeded"


def _fail_until(target: Any, method: str, released: asyncio.Event) -> None:
    original = getattr(target, method)

    async def hiccup(*args: Any, **kwargs: Any) -> Any:
        if not released.is_set():
            raise ConnectionError(f"injected backend hiccup in {method}")
        return await original(*args, **kwargs)

    setattr(target, method, hiccup)


@pytest.mark.parametrize(
    ("service", "target", "methods"),
    [
        ("picker", "picker", ["load"]),
        ("coordinator", "coordinator", ["rebalance", "_campaign"]),
        ("worker", "queue", ["receive"]),
    ],
)
async def test_a_loop_retrying_a_backend_hiccup_is_down_in_health_until_it_recovers(
    tmp_path: Path, service: str, target: str, methods: list[str]
) -> None:
    """Picker, coordinator and the worker's receive loop wait out a backend error themselves (no restart, never
    given up), but /health and dsched_service_up tell the truth meanwhile, and the streak counts as one restart."""
    settings = cluster_settings(tmp_path)
    stop = asyncio.Event()
    restarts_before = _metric("dsched_service_restarts_total", service)
    async with started(settings, list(SERVICES), stop) as instances, aiohttp.ClientSession() as session:
        api = Api(base=f"http://127.0.0.1:{instances['ingestion'].port}", session=session)  # type: ignore[attr-defined]
        patched: Any = instances["worker"].queue if target == "queue" else instances[target]  # type: ignore[attr-defined]
        released = asyncio.Event()
        for method in methods:
            _fail_until(patched, method, released)

        async def red() -> dict[str, Any] | None:
            status, health = await api.call("GET", "/health")
            return health if status == 503 else None

        health = await api.wait_for(red, timeout=10)
        assert health["services"][service]["state"] == "retrying", health
        assert health["services"][service]["last_error"] == "ConnectionError", health
        assert _metric("dsched_service_up", service) == 0
        released.set()

        async def green() -> bool:
            status, _ = await api.call("GET", "/health")
            return status == 200

        await api.wait_for(green, timeout=10)
        assert _metric("dsched_service_up", service) == 1
        assert _metric("dsched_service_restarts_total", service) == restarts_before + 1  # one streak, one restart
        job_id = await api.submit(payload="after the hiccup")
        runs = await api.finished_runs(job_id, timeout=15)
        assert runs[0]["status"] == "succeeded"


async def test_a_loop_that_keeps_failing_stops_the_process_with_an_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("dsched.libs.supervisor.MAX_RESTARTS", 2)
    monkeypatch.setattr("dsched.libs.supervisor.BACKOFF_INITIAL_S", 0.01)

    async def always_fails(self: Any, timeout_s: float) -> int:
        raise RuntimeError("the store rejects everything")

    monkeypatch.setattr("dsched.writer.service.Writer.step", always_fails)
    settings = cluster_settings(tmp_path)
    with pytest.raises(ServiceFailed, match="writer/consume"):
        await asyncio.wait_for(runner.serve(settings, ["writer"]), timeout=30)


def test_the_cli_exits_non_zero_with_one_line_when_a_service_gives_up(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    async def gives_up(settings: Any, services: list[str]) -> None:
        raise ServiceFailed("writer/consume failed 6 times within 60 s (last: RuntimeError)")

    monkeypatch.setattr(runner, "serve", gives_up)
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["run", "writer"])
    assert exit_info.value.code == "dsched: writer/consume failed 6 times within 60 s (last: RuntimeError)"


def test_a_busy_port_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        port = sock.getsockname()[1]
        monkeypatch.setenv("DSCHED_PORT", str(port))
        monkeypatch.setenv("DSCHED_DATA_DIR", str(tmp_path))
        with pytest.raises(SystemExit) as exit_info:
            cli.main(["run", "ingestion"])
    message = str(exit_info.value.code)
    assert message.startswith("dsched: cannot start:") and "\n" not in message, message
