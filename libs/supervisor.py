"""One supervisor over every long-running task of the services in a process.

Semantics:
- ``start(service, name, loop)`` runs ``loop()`` as a task. If it raises, the exception is logged once with its
  traceback, ``dsched_service_restarts_total{service}`` is incremented, the service is reported down
  (``dsched_service_up{service} 0``, ``/health`` 503) and ``loop()`` is called again after a bounded, growing
  backoff. A loop that ran for :data:`HEALTHY_AFTER_S` without failing starts its backoff over.
- A loop that fails more than :data:`MAX_RESTARTS` times within :data:`RESTART_WINDOW_S` is given up: the
  supervisor records the failure and sets :attr:`Supervisor.failed`; the process runner then shuts everything
  down in order and exits non-zero, so systemd / compose / k8s restart the process. Never a silent stop.
- A loop that handles a backend hiccup itself (logs it, pauses, tries again) reports it with ``retrying`` and
  ``recovered``: down in ``/health`` and ``dsched_service_up`` meanwhile, counted once per streak, never given up.
- A loop that returns normally is finished (it saw its stop signal); it is not restarted.
- ``close()`` cancels every task and waits for them (shutdown in the caller's order: stop loops, then close).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from dsched.libs import logs
from dsched.libs.metrics import SERVICE_RESTARTS, SERVICE_UP

# Restarts of one loop allowed within the window before the process gives up and exits non-zero.
MAX_RESTARTS = 5
RESTART_WINDOW_S = 60.0
# Backoff before a restart: doubles from the first value up to the cap.
BACKOFF_INITIAL_S = 0.1
BACKOFF_MAX_S = 5.0
# A loop that ran this long since its last failure starts its backoff over.
HEALTHY_AFTER_S = 30.0

logger = logs.get("supervisor")
Loop = Callable[[], Awaitable[None]]


class ServiceFailed(RuntimeError):
    """A supervised loop kept failing; the process must exit non-zero."""


@dataclass
class LoopState:
    service: str
    name: str
    state: str = "up"  # up | starting | restarting | retrying | failed | stopped
    restarts: int = 0
    last_error: str | None = None
    failures: deque[float] = field(default_factory=deque)


class Supervisor:
    def __init__(
        self,
        *,
        max_restarts: int | None = None,
        window_s: float | None = None,
        backoff_initial_s: float | None = None,
        backoff_max_s: float | None = None,
    ) -> None:
        """Unset arguments take the module's constants (read now, so tests can change them)."""
        self.max_restarts = MAX_RESTARTS if max_restarts is None else max_restarts
        self.window_s = RESTART_WINDOW_S if window_s is None else window_s
        self.backoff_initial_s = BACKOFF_INITIAL_S if backoff_initial_s is None else backoff_initial_s
        self.backoff_max_s = BACKOFF_MAX_S if backoff_max_s is None else backoff_max_s
        self.failed = asyncio.Event()
        self.failure: ServiceFailed | None = None
        self._loops: dict[tuple[str, str], LoopState] = {}
        self._tasks: dict[tuple[str, str], asyncio.Task[None]] = {}
        self._services: set[str] = set()

    def register(self, service: str) -> None:
        """Declare a service of this process (reported up until one of its loops fails). Its restart counter is
        exported from 0 on, so Prometheus's ``increase()`` counts the first restart too (a counter series that
        first appears at 1 hides its first increment)."""
        self._services.add(service)
        SERVICE_UP.labels(service).set(1)
        SERVICE_RESTARTS.labels(service)

    def start(self, service: str, name: str, loop: Loop) -> asyncio.Task[None]:
        """Run ``loop()`` under supervision; returns its task (done when the loop returns or is given up)."""
        key = (service, name)
        if key in self._tasks and not self._tasks[key].done():
            raise ValueError(f"loop {service}/{name} already runs")
        self.register(service)
        self._loops[key] = LoopState(service, name)
        task = asyncio.create_task(self._guard(self._loops[key], loop), name=f"{service}/{name}")
        self._tasks[key] = task
        return task

    async def _guard(self, state: LoopState, loop: Loop) -> None:
        delay = self.backoff_initial_s
        while True:
            started = time.monotonic()
            try:
                await loop()
                state.state = "stopped"
                return
            except asyncio.CancelledError:
                state.state = "stopped"
                raise
            except Exception as exc:
                now = time.monotonic()
                if now - started >= HEALTHY_AFTER_S:
                    delay = self.backoff_initial_s
                state.restarts += 1
                state.last_error = type(exc).__name__
                state.failures.append(now)
                while state.failures and state.failures[0] < now - self.window_s:
                    state.failures.popleft()
                SERVICE_RESTARTS.labels(state.service).inc()
                if len(state.failures) > self.max_restarts:
                    state.state = "failed"
                    self._refresh(state.service)
                    logger.error("loop_given_up", service=state.service, loop=state.name, exc_info=exc)
                    if self.failure is None:
                        self.failure = ServiceFailed(
                            f"{state.service}/{state.name} failed {len(state.failures)} times within "
                            f"{self.window_s:.0f} s (last: {type(exc).__name__})"
                        )
                    self.failed.set()
                    return
                state.state = "restarting"
                self._refresh(state.service)
                logger.error(
                    "loop_failed", service=state.service, loop=state.name, restart_in_s=round(delay, 3), exc_info=exc
                )
                await asyncio.sleep(delay)
                delay = min(delay * 2, self.backoff_max_s)
                state.state = "up"
                self._refresh(state.service)

    def set_state(self, service: str, name: str, state: str) -> None:
        """Report a loop ``starting`` (down in ``/health``, e.g. a child process not yet ready; also before
        :meth:`start`) or ``up``."""
        loop = self._loops.get((service, name))
        if loop is None:
            self.register(service)
            loop = self._loops[(service, name)] = LoopState(service, name)
        if loop.state in ("up", "starting"):
            loop.state = state
            self._refresh(service)

    def retrying(self, service: str, name: str, exc: BaseException) -> None:
        """A loop that handles its own errors (a backend hiccup: it logs, pauses and tries again without
        returning) reports each one here. The first of a streak counts as a restart
        (``dsched_service_restarts_total``) and shows the loop ``retrying``: the service is down (``/health`` 503,
        ``dsched_service_up`` 0) until the loop calls :meth:`recovered`. Never gives the process up: an outage of a
        backend is waited out, not exited (a loop that raises instead is restarted and given up as above)."""
        loop = self._loops.get((service, name))
        if loop is None:
            self.register(service)
            loop = self._loops[(service, name)] = LoopState(service, name)
        loop.last_error = type(exc).__name__
        if loop.state != "retrying":
            loop.state = "retrying"
            loop.restarts += 1
            SERVICE_RESTARTS.labels(service).inc()
            self._refresh(service)

    def recovered(self, service: str, name: str) -> None:
        """A loop that reported :meth:`retrying` made a whole step again: it is up."""
        loop = self._loops.get((service, name))
        if loop is not None and loop.state == "retrying":
            loop.state = "up"
            self._refresh(service)

    def _refresh(self, service: str) -> None:
        SERVICE_UP.labels(service).set(1 if self.service_up(service) else 0)

    def service_up(self, service: str) -> bool:
        return all(s.state in ("up", "stopped") for s in self._loops.values() if s.service == service)

    def health(self) -> dict[str, dict[str, object]]:
        """Per service: ``state`` (up / starting / restarting / retrying / failed), restarts so far, and each
        loop's state."""
        report: dict[str, dict[str, object]] = {}
        for service in sorted(self._services):
            loops = [s for s in self._loops.values() if s.service == service]
            states = {s.state for s in loops}
            overall = next((s for s in ("failed", "restarting", "retrying", "starting") if s in states), "up")
            report[service] = {
                "state": overall,
                "restarts": sum(s.restarts for s in loops),
                "loops": {s.name: s.state for s in loops},
                **({"last_error": e} if (e := next((s.last_error for s in loops if s.last_error), None)) else {}),
            }
        return report

    def report(self) -> dict[str, object]:
        """What ``/health`` answers: ``ok`` only while every supervised loop of every service here is up."""
        return {"status": "ok" if self.healthy else "degraded", "services": self.health()}

    @property
    def healthy(self) -> bool:
        return all(self.service_up(service) for service in self._services)

    async def wait(self, tasks: list[asyncio.Task[None]] | None = None, grace_s: float | None = None) -> None:
        """Wait for ``tasks`` (default: all) to finish, up to ``grace_s``; cancel what is left."""
        pending = [t for t in (tasks if tasks is not None else self._tasks.values()) if not t.done()]
        if pending:
            _, left = await asyncio.wait(pending, timeout=grace_s)
            for task in left:
                task.cancel()
            for task in left:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task

    async def close(self) -> None:
        """Cancel every loop still running and report the services down."""
        await self.wait(grace_s=0.0)
        for service in self._services:
            SERVICE_UP.labels(service).set(0)
