"""Bounded retries for start-up calls to backends (one place for every service).

A service that starts while a backend is briefly down (an etcd restart, moto still booting, a store failing over)
waits for it instead of exiting: :func:`until_up` calls ``attempt()`` again after a growing pause (``initial_s``
doubling up to ``max_s``) and logs every failure as one ``startup_retry`` warning line (what, attempt, error,
next pause). After ``budget_s`` seconds of failures — and at least ``MIN_ATTEMPTS`` attempts, since one attempt of a
client with its own retries can take the whole budget — it gives up and raises the last error, so a backend that
stays down (or a wrong URL that only looks like an outage) still ends the process with that error; the deployment's
restart policy then takes over. A budget of 0 means one attempt. Exceptions of a ``fatal`` type (configuration
errors) are raised at once.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

from dsched.libs import logs

T = TypeVar("T")

INITIAL_S = 0.2
MAX_S = 2.0
MIN_ATTEMPTS = 3  # with a positive budget

logger = logs.get("startup")


async def until_up(
    what: str,
    attempt: Callable[[], Awaitable[T]],
    *,
    budget_s: float,
    fatal: tuple[type[BaseException], ...] = (),
    initial_s: float = INITIAL_S,
    max_s: float = MAX_S,
) -> T:
    """``await attempt()`` until it succeeds, for at most ``budget_s`` seconds of failures (at least one call, and at
    least ``MIN_ATTEMPTS`` when ``budget_s`` is positive).

    Returns its result; raises its last exception once the budget is spent, or at once for a ``fatal`` one.
    Cancellation is never swallowed.
    """
    deadline = time.monotonic() + max(0.0, budget_s)
    pause = initial_s
    for number in range(1, 1_000_000):  # bounded by the deadline; the count only keeps the loop finite
        try:
            result = await attempt()
        except fatal:
            raise
        except Exception as exc:
            remaining = deadline - time.monotonic()
            if budget_s > 0 and number < MIN_ATTEMPTS:
                remaining = max(remaining, initial_s)
            if remaining <= 0:
                logger.error("startup_gave_up", what=what, attempts=number, error=f"{type(exc).__name__}: {exc}")
                raise
            wait = min(pause, remaining)
            logger.warning(
                "startup_retry", what=what, attempt=number, error=f"{type(exc).__name__}: {exc}", retry_in_s=wait
            )
            await asyncio.sleep(wait)
            pause = min(max_s, pause * 2)
            continue
        if number > 1:
            logger.info("startup_recovered", what=what, attempts=number)
        return result
    raise RuntimeError("unreachable")  # pragma: no cover
