"""Admission control's use of the log: one backlog probe per interval whatever the request rate, and a log that
fails or stalls refuses nothing (the append that follows reports it)."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

import pytest

from dsched.ingestion import admission
from dsched.ingestion.admission import Admission, Overloaded
from dsched.libs.log.base import LogConsumer, SubmissionLog


class _Log(SubmissionLog):
    def __init__(self, backlog: int) -> None:
        self.value = backlog
        self.asked = 0
        self.fail: BaseException | None = None
        self.stall = False

    async def backlog(self, group: str) -> int:
        self.asked += 1
        await asyncio.sleep(0.01)
        if self.stall:
            await asyncio.sleep(60)
        if self.fail is not None:
            raise self.fail
        return self.value

    async def startup(self) -> None: ...
    async def shutdown(self) -> None: ...
    async def append(self, records: Sequence[tuple[str, bytes]]) -> None: ...

    def consumer(self, group: str) -> LogConsumer:
        raise NotImplementedError


async def _outcomes(gate: Admission, n: int) -> list[Any]:
    return await asyncio.gather(*(gate.check() for _ in range(n)), return_exceptions=True)


async def test_over_the_limit_is_refused_and_the_log_is_asked_once_per_interval() -> None:
    log = _Log(backlog=11)
    gate = Admission(log, max_backlog=10)
    first = await _outcomes(gate, 1)
    assert isinstance(first[0], Overloaded) and first[0].backlog == 11
    assert all(isinstance(o, Overloaded) for o in await _outcomes(gate, 50))
    assert log.asked == 1  # within PROBE_S every request uses the last answer
    log.value = 10
    await asyncio.sleep(admission.PROBE_S)
    await gate.check()  # asks again: at the limit is admitted
    assert await _outcomes(gate, 50) == [None] * 50
    assert log.asked == 2


async def test_requests_during_a_probe_use_the_last_answer() -> None:
    log = _Log(backlog=0)
    gate = Admission(log, max_backlog=10)
    assert await _outcomes(gate, 20) == [None] * 20
    assert log.asked == 1
    log.value = 11
    await asyncio.sleep(admission.PROBE_S)
    outcomes = await _outcomes(gate, 20)  # the first asks; the others, while it waits, admit on the last answer
    assert isinstance(outcomes[0], Overloaded) and outcomes[1:] == [None] * 19
    assert log.asked == 2


async def test_zero_never_asks_the_log() -> None:
    log = _Log(backlog=10**9)
    gate = Admission(log, max_backlog=0)
    assert await _outcomes(gate, 5) == [None] * 5
    assert log.asked == 0


@pytest.mark.parametrize("trouble", ["fails", "stalls"])
async def test_a_log_that_fails_or_stalls_refuses_nothing(trouble: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(admission, "PROBE_TIMEOUT_S", 0.1)
    log = _Log(backlog=10**6)
    gate = Admission(log, max_backlog=10)
    with pytest.raises(Overloaded):
        await gate.check()
    if trouble == "fails":
        log.fail = ConnectionError("down")
    else:
        log.stall = True
    await asyncio.sleep(admission.PROBE_S)
    await gate.check()  # the probe fails or times out: admitted
    assert await _outcomes(gate, 3) == [None] * 3
    assert log.asked == 2
