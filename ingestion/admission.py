"""Admission control: new work waits at the door while the writer is too far behind the log.

A 202 means the job is durable and visible at once, which holds however far behind the writer is; it also means
the job fires on time, which does not: a job fires only once the writer has stored it. A flood of submissions
that outruns the writer (batch submits on two cores, a writer down) makes every job due within the writer's
backlog fire late by up to that backlog. So while the writer group has more than ``DSCHED_MAX_WRITER_BACKLOG``
records appended and not yet stored, new work (``POST /submit``, ``/submit/batch``, ``/jobs/{id}/trigger``,
``/dead-letters/{id}/replay``) is answered ``503 {"error": "overloaded"}`` with ``Retry-After``, before its body is
read: the clients slow down to what the writer stores instead of the backlog growing. Changes to existing jobs
(PATCH, DELETE, pause, resume) are always accepted: they are how an operator stops a flood.

The backlog is asked of the log (:meth:`SubmissionLog.backlog`) at most once per :data:`PROBE_S`; requests in
between use the last answer, so the check costs no I/O per request. If the log does not answer within
:data:`PROBE_TIMEOUT_S`, nothing is refused here (the append that follows reports the outage).
"""

from __future__ import annotations

import asyncio
import time

from dsched.libs import logs
from dsched.libs.log.base import WRITER_GROUP, SubmissionLog
from dsched.libs.metrics import SUBMISSIONS_REFUSED

logger = logs.get("ingestion.admission")

PROBE_S = 0.25  # how long one answer of the log's backlog is used
PROBE_TIMEOUT_S = 1.0  # a log slower than this to say its backlog admits the request (the append will tell)
RETRY_AFTER_S = 1  # the Retry-After of an "overloaded" answer


class Overloaded(Exception):
    """New work is refused for now; ``backlog`` records wait for the writer."""

    def __init__(self, backlog: int, limit: int) -> None:
        super().__init__(f"the scheduler is storing {backlog} earlier submissions (limit {limit}); retry later")
        self.backlog = backlog


class Admission:
    def __init__(self, log: SubmissionLog, max_backlog: int) -> None:
        """``max_backlog`` 0 admits everything without asking the log."""
        self.log = log
        self.max_backlog = max_backlog
        self._backlog = 0
        self._fresh_until = 0.0  # monotonic time until which ``_backlog`` is used without asking again
        self._probing = False
        self._failing = False  # the last probe failed (logged once until one succeeds)
        SUBMISSIONS_REFUSED.labels("writer_backlog")  # exported from 0, so the first refusal shows in rate()

    async def check(self) -> None:
        """Raise :class:`Overloaded` while the writer's backlog is over the limit."""
        if self.max_backlog <= 0:
            return
        if time.monotonic() >= self._fresh_until and not self._probing:
            self._probing = True  # one probe at a time; concurrent requests use the previous answer
            try:
                self._backlog = await self.backlog() or 0
            finally:
                self._probing = False
                self._fresh_until = time.monotonic() + PROBE_S
        if self._backlog > self.max_backlog:
            SUBMISSIONS_REFUSED.labels("writer_backlog").inc()
            raise Overloaded(self._backlog, self.max_backlog)

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
