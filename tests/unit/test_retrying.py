"""Start-up retries (issue 9, item 10): a service started while a backend is briefly down waits for it, bounded."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import pytest

from dsched.app import backends as backends_module
from dsched.app.backends import Backends
from dsched.libs.errors import BackendConfigError
from dsched.libs.queue.sqlite import SqliteQueue
from dsched.libs.retrying import until_up
from dsched.libs.settings import Settings


async def test_retries_until_the_call_succeeds() -> None:
    calls: list[float] = []

    async def attempt() -> str:
        calls.append(time.monotonic())
        if len(calls) < 3:
            raise ConnectionError("refused")
        return "up"

    assert await until_up("thing", attempt, budget_s=5, initial_s=0.01) == "up"
    assert len(calls) == 3


async def test_gives_up_with_the_last_error_once_the_budget_is_spent() -> None:
    calls = 0

    async def attempt() -> None:
        nonlocal calls
        calls += 1
        raise ConnectionError(f"refused {calls}")

    started = time.monotonic()
    with pytest.raises(ConnectionError, match="refused"):
        await until_up("thing", attempt, budget_s=0.3, initial_s=0.05, max_s=0.1)
    assert 0.25 <= time.monotonic() - started < 2.0
    assert 3 <= calls < 20


async def test_a_zero_budget_tries_once_and_a_fatal_error_is_not_retried() -> None:
    calls = 0

    async def attempt() -> None:
        nonlocal calls
        calls += 1
        raise BackendConfigError("bad url")

    with pytest.raises(BackendConfigError):
        await until_up("thing", attempt, budget_s=10, fatal=(BackendConfigError,))
    with pytest.raises(BackendConfigError):
        await until_up("thing", attempt, budget_s=0)
    assert calls == 2


async def test_backends_wait_for_a_backend_that_comes_up(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The queue refuses its first two start-ups (an outage); Backends.open starts a fresh instance each time and
    succeeds on the third, shutting the failed ones down."""
    made: list[Any] = []

    class FlakyQueue(SqliteQueue):
        async def startup(self) -> None:
            made.append(self)
            if len(made) < 3:
                raise ConnectionError("queue unreachable")
            await super().startup()

    monkeypatch.setitem(
        backends_module._BUILDERS,
        ("queue", "sqlite"),
        lambda url, s: FlakyQueue(s.data_dir / "queue.db", s.max_receives),
    )
    settings = Settings.from_env(data_dir=tmp_path, startup_retry_s=10)
    async with Backends.open(settings, {"queue"}) as b:
        assert b.queue is made[-1]
        assert (await b.queue.counts()).visible == 0
    assert len(made) == 3


async def test_backends_give_up_after_the_budget(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    class DownQueue(SqliteQueue):
        async def startup(self) -> None:
            raise ConnectionError("queue unreachable")

    monkeypatch.setitem(
        backends_module._BUILDERS,
        ("queue", "sqlite"),
        lambda url, s: DownQueue(s.data_dir / "queue.db", s.max_receives),
    )
    settings = Settings.from_env(data_dir=tmp_path, startup_retry_s=0.5)
    with pytest.raises(BackendConfigError, match="queue unreachable"):
        async with Backends.open(settings, {"queue"}):
            pass


async def test_a_slow_first_attempt_does_not_spend_the_whole_budget() -> None:
    """One attempt of a client with its own retries can outlast the budget: still three attempts in all."""
    calls = 0

    async def attempt() -> str:
        nonlocal calls
        calls += 1
        if calls == 1:
            await asyncio.sleep(0.3)  # longer than the whole budget
        if calls < 3:
            raise ConnectionError("refused")
        return "up"

    assert await until_up("thing", attempt, budget_s=0.1, initial_s=0.01) == "up"
    assert calls == 3
