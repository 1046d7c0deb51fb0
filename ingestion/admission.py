"""Admission control: new work waits at the door while the writer is too far behind the log.

A 202 means the job is durable and visible at once, which holds however far behind the writer is; it also means
the job fires on time, which does not: a job fires only once the writer has stored it. A flood of submissions
that outruns the writer (batch submits on two cores, a writer down) makes every job due within the writer's
backlog fire late by up to that backlog. So while the writer group has more than ``DSCHED_MAX_WRITER_BACKLOG``
records appended and not yet stored, new work (``POST /submit``, ``/submit/batch``, ``/jobs/{id}/trigger``,
``/dead-letters/{id}/replay``) is answered ``503 {"error": "overloaded"}`` with ``Retry-After`` (from which
tenants: below), before its body is read: the clients slow down to what the writer stores instead of the backlog
growing. Changes to existing jobs (PATCH, DELETE, pause, resume) are always accepted: they are how an operator
stops a flood.

**Fair to tenants.** One tenant's flood must not shut every other tenant out. Between the bound and
:data:`ALL_REFUSED_FACTOR` times it, only the tenants that appended at least their fair share of the recent records
are refused (reason ``tenant_share``): with N tenants appending lately, a tenant is refused once its share reaches
1/N, so a flooding tenant waits while the others' submits still get in. A tenant whose recent records weigh less
than :data:`HEAVY_FRACTION` of the bound is never refused there: it is not what fills the backlog. Above
:data:`ALL_REFUSED_FACTOR` times the bound every tenant is refused (reason ``writer_backlog``), so the backlog stays
bounded whoever sends. Shares are each ingestion process's own count of what it appended (:class:`RecentShares`),
weighed over about :data:`FAIR_WINDOW_S`, so no state is shared: behind a load balancer a process sees a sample of
the tenants' traffic, or a few tenants whole (a client's kept-alive connection stays on one process). A light
tenant alone on its process is then still admitted, thanks to the weight floor.

The backlog is asked of the log (:meth:`SubmissionLog.backlog`) at most once per :data:`PROBE_S`; requests in
between use the last answer, so the check costs no I/O per request. If the log does not answer within
:data:`PROBE_TIMEOUT_S`, nothing is refused here (the append that follows reports the outage).
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Mapping

from dsched.libs import logs
from dsched.libs.log.base import WRITER_GROUP, SubmissionLog
from dsched.libs.metrics import SUBMISSIONS_REFUSED

logger = logs.get("ingestion.admission")

PROBE_S = 0.25  # how long one answer of the log's backlog is used
PROBE_TIMEOUT_S = 1.0  # a log slower than this to say its backlog admits the request (the append will tell)
RETRY_AFTER_S = 1  # the Retry-After of an "overloaded" answer
ALL_REFUSED_FACTOR = 2  # over this many times the bound, every tenant's new work is refused, not only the busiest
FAIR_WINDOW_S = 10.0  # a record appended this long ago weighs 1/e in a tenant's share (exponential decay)
# Below the all-refused level, a tenant whose recent records weigh less than this fraction of the bound (2,000 of
# 20,000: about 200 a second kept up) is admitted whatever its share.
HEAVY_FRACTION = 0.1
DECAY_EVERY_S = 0.25  # how often the shares are aged (each ageing walks every tenant seen lately)
FORGET_BELOW = 0.5  # a tenant whose weighed records fall below this is no longer counted among the N tenants


class Overloaded(Exception):
    """New work is refused for now; ``backlog`` records wait for the writer. ``over_share``: refused because this
    tenant sent at least its share of the recent records (other tenants are still admitted)."""

    def __init__(self, backlog: int, limit: int, *, over_share: bool = False) -> None:
        why = " and this tenant sent at least its share of the recent ones" if over_share else ""
        super().__init__(f"the scheduler is storing {backlog} earlier submissions (limit {limit}){why}; retry later")
        self.backlog = backlog
        self.over_share = over_share


class RecentShares:
    """Each tenant's share of the records appended lately: a record appended ``age`` seconds ago weighs
    ``exp(-age / FAIR_WINDOW_S)``. Adding is O(1); ageing walks the tenants at most once per :data:`DECAY_EVERY_S`
    and forgets those whose weight fell below :data:`FORGET_BELOW`."""

    def __init__(self) -> None:
        self._weights: dict[str, float] = {}
        self._total = 0.0
        self._aged_at = time.monotonic()

    def add(self, counts: Mapping[str, int]) -> None:
        self._age()
        for tenant, count in counts.items():
            self._weights[tenant] = self._weights.get(tenant, 0.0) + count
            self._total += count

    def at_least_fair(self, tenant: str, *, min_weight: float = 0.0) -> bool:
        """Whether ``tenant``'s share is at least 1/N of the N tenants that appended lately and its records weigh at
        least ``min_weight`` (False for one that appended nothing lately)."""
        self._age()
        mine = self._weights.get(tenant, 0.0)
        return mine > 0 and mine >= min_weight and mine * len(self._weights) >= self._total

    def _age(self) -> None:
        now = time.monotonic()
        if now - self._aged_at < DECAY_EVERY_S:
            return
        factor = math.exp((self._aged_at - now) / FAIR_WINDOW_S)
        self._aged_at = now
        weights = ((tenant, weight * factor) for tenant, weight in self._weights.items())
        self._weights = {tenant: weight for tenant, weight in weights if weight >= FORGET_BELOW}
        self._total = sum(self._weights.values())


class Admission:
    def __init__(self, log: SubmissionLog, max_backlog: int) -> None:
        """``max_backlog`` 0 admits everything without asking the log."""
        self.log = log
        self.max_backlog = max_backlog
        self._backlog = 0
        self._fresh_until = 0.0  # monotonic time until which ``_backlog`` is used without asking again
        self._probing = False
        self._failing = False  # the last probe failed (logged once until one succeeds)
        self.shares = RecentShares()
        for reason in ("writer_backlog", "tenant_share"):  # exported from 0, so the first refusal shows in rate()
            SUBMISSIONS_REFUSED.labels(reason)

    @property
    def refuse_all_above(self) -> int:
        """The backlog over which every tenant's new work is refused (0: admission control is off)."""
        return ALL_REFUSED_FACTOR * self.max_backlog

    def appended(self, counts: Mapping[str, int]) -> None:
        """Count records this process appended to the log, by tenant (what :meth:`check` weighs shares on)."""
        if self.max_backlog > 0:
            self.shares.add(counts)

    async def check(self, tenant: str) -> None:
        """Raise :class:`Overloaded` while the writer's backlog is over the bound and ``tenant`` appended at least its
        share of the recent records (and :data:`HEAVY_FRACTION` of the bound), or while it is over
        :attr:`refuse_all_above`."""
        if self.max_backlog <= 0:
            return
        if time.monotonic() >= self._fresh_until and not self._probing:
            self._probing = True  # one probe at a time; concurrent requests use the previous answer
            try:
                self._backlog = await self.backlog() or 0
            finally:
                self._probing = False
                self._fresh_until = time.monotonic() + PROBE_S
        if self._backlog <= self.max_backlog:
            return
        if self._backlog > self.refuse_all_above:
            SUBMISSIONS_REFUSED.labels("writer_backlog").inc()
            raise Overloaded(self._backlog, self.refuse_all_above)
        if self.shares.at_least_fair(tenant, min_weight=HEAVY_FRACTION * self.max_backlog):
            SUBMISSIONS_REFUSED.labels("tenant_share").inc()
            raise Overloaded(self._backlog, self.max_backlog, over_share=True)

    async def backlog(self) -> int | None:
        """The writer group's backlog, asked of the log now; None if it failed or took over :data:`PROBE_TIMEOUT_S`
        (logged once per streak of failures)."""
        try:
            async with asyncio.timeout(PROBE_TIMEOUT_S):
                backlog = await self.log.backlog(WRITER_GROUP)
        except Exception as exc:
            if not self._failing:  # once per outage, not per probe
                self._failing = True
                logger.warning("backlog_probe_failed", error=type(exc).__name__)
            return None
        if self._failing:
            self._failing = False
            logger.info("backlog_probe_recovered")
        return backlog
