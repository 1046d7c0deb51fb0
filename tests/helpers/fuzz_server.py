"""An in-process dsched for the fuzz tests, on its own event loop in a background thread.

schemathesis and hypothesis drive synchronous calls (``requests``), so the services run beside the test, not in
its loop. Only 127.0.0.1; :meth:`FuzzServer.close` stops every service (bounded join).
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from dsched.app.runner import started
from tests.helpers.cluster import cluster_settings

START_TIMEOUT_S = 30.0


class FuzzServer:
    def __init__(self, tmp_path: Path, services: list[str], **overrides: Any) -> None:
        self.settings = cluster_settings(tmp_path, **overrides)
        self.services = services
        self.base = ""
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=self._main, name="fuzz-server", daemon=True)

    def _main(self) -> None:
        try:
            asyncio.run(self._serve())
        except BaseException as exc:  # reported to the test thread by start()
            self._error = exc
            self._ready.set()

    async def _serve(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        async with started(self.settings, self.services, self._stop) as services:
            port = services["ingestion"].port  # type: ignore[attr-defined]
            self.base = f"http://127.0.0.1:{port}"
            self._ready.set()
            await self._stop.wait()

    def start(self) -> None:
        self._thread.start()
        if not self._ready.wait(START_TIMEOUT_S):
            raise AssertionError(f"the services did not start within {START_TIMEOUT_S}s")
        if self._error is not None:
            raise AssertionError("the services failed to start") from self._error

    def close(self) -> None:
        if self._loop is not None and self._stop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(START_TIMEOUT_S)
        assert not self._thread.is_alive(), "the services did not stop"


@contextmanager
def fuzz_server(tmp_path: Path, services: list[str], **overrides: Any) -> Iterator[FuzzServer]:
    server = FuzzServer(tmp_path, services, **overrides)
    server.start()
    try:
        yield server
    finally:
        server.close()
