"""Admission control's use of the log: one backlog probe per interval whatever the request rate, and a log that
fails or stalls refuses nothing (the append that follows reports it). Between the bound and twice it, only the
tenants that sent at least their share of the recent records are refused."""

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
    return await asyncio.gather(*(gate.check("t1") for _ in range(n)), return_exceptions=True)


async def test_over_the_limit_is_refused_and_the_log_is_asked_once_per_interval() -> None:
    log = _Log(backlog=11)
    gate = Admission(log, max_backlog=10)
    gate.appended({"t1": 1})  # the only tenant lately: over the bound, refused
    first = await _outcomes(gate, 1)
    assert isinstance(first[0], Overloaded) and first[0].backlog == 11
    assert all(isinstance(o, Overloaded) for o in await _outcomes(gate, 50))
    assert log.asked == 1  # within PROBE_S every request uses the last answer
    log.value = 10
    await asyncio.sleep(admission.PROBE_S)
    await gate.check("t1")  # asks again: at the limit is admitted
    assert await _outcomes(gate, 50) == [None] * 50
    assert log.asked == 2


async def test_requests_during_a_probe_use_the_last_answer() -> None:
    log = _Log(backlog=0)
    gate = Admission(log, max_backlog=10)
    gate.appended({"t1": 5})  # still heavy (over a tenth of the bound) once aged
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
    gate.appended({"t1": 1})
    with pytest.raises(Overloaded):
        await gate.check("t1")
    if trouble == "fails":
        log.fail = ConnectionError("down")
    else:
        log.stall = True
    await asyncio.sleep(admission.PROBE_S)
    await gate.check("t1")  # the probe fails or times out: admitted
    assert await _outcomes(gate, 3) == [None] * 3
    assert log.asked == 2


async def test_over_the_bound_only_tenants_at_their_share_are_refused() -> None:
    log = _Log(backlog=15)
    gate = Admission(log, max_backlog=10)
    gate.appended({"flood": 90, "steady": 9, "quiet": 1})
    with pytest.raises(Overloaded) as refused:
        await gate.check("flood")  # 90 % of the recent records, fair share one third
    assert refused.value.over_share and "its share" in str(refused.value)
    await gate.check("steady")
    await gate.check("quiet")
    await gate.check("newcomer")  # nothing appended lately: admitted
    gate.appended({"steady": 40})  # now 49 of 140: over one third
    with pytest.raises(Overloaded):
        await gate.check("steady")
    log.value = 10  # at the bound: everyone, whatever their share
    await asyncio.sleep(admission.PROBE_S)
    await gate.check("flood")
    await gate.check("steady")


async def test_over_twice_the_bound_every_tenant_is_refused() -> None:
    gate = Admission(_Log(backlog=21), max_backlog=10)
    assert gate.refuse_all_above == 20
    gate.appended({"flood": 100})
    for tenant in ("flood", "newcomer"):
        with pytest.raises(Overloaded) as refused:
            await gate.check(tenant)
        assert not refused.value.over_share and "(limit 20)" in str(refused.value)


async def test_one_tenant_alone_is_refused_at_the_bound() -> None:
    gate = Admission(_Log(backlog=11), max_backlog=10)
    gate.appended({"only": 1})  # a tenth of the bound: heavy enough
    with pytest.raises(Overloaded):
        await gate.check("only")


async def test_a_light_tenant_is_admitted_until_twice_the_bound_whatever_its_share() -> None:
    log = _Log(backlog=15_000)
    gate = Admission(log, max_backlog=10_000)
    gate.appended({"alone": 999})  # all the records this process saw lately, under a tenth of the bound
    await gate.check("alone")  # e.g. a client kept on this process while another floods the others
    gate.appended({"alone": 1})
    with pytest.raises(Overloaded):
        await gate.check("alone")
    log.value = 20_001
    gate = Admission(log, max_backlog=10_000)
    gate.appended({"light": 1})
    with pytest.raises(Overloaded):
        await gate.check("light")


def test_shares_age_so_a_refused_tenant_gets_its_turn_again(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = [1000.0]
    monkeypatch.setattr(admission.time, "monotonic", lambda: clock[0])
    shares = admission.RecentShares()
    shares.add({"flood": 1000})
    shares.add({"quiet": 10})
    assert shares.at_least_fair("flood") and not shares.at_least_fair("quiet")
    for _ in range(40):  # 40 s in which only the quiet tenant is admitted and appends
        clock[0] += 1.0
        shares.add({"quiet": 10})
    assert not shares.at_least_fair("flood")  # its old records weigh e^-4 of what they did
    assert shares.at_least_fair("quiet")
    clock[0] += admission.FAIR_WINDOW_S * 20  # both forgotten: nothing appended lately, nobody over a share
    assert not shares.at_least_fair("quiet") and not shares.at_least_fair("flood")
