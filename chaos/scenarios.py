"""Named chaos scenarios: a cluster shape, a window, a fault plan and the workload the faults need.

Every plan is a pure function of a seeded :class:`random.Random`, so ``--scenario NAME --seed N`` replays the
same faults at the same offsets with the same workload (timings of the processes themselves still vary).
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

from dsched.chaos.cluster import LEASE_TTL_S, VISIBILITY_TIMEOUT_S, Backends, Shape
from dsched.chaos.faults import BACKEND_KINDS, FaultSpec

LONG_WINDOW_S = 300.0
LONG_MIN_FAULTS = 55

Plan = Callable[[random.Random, float, Backends], list[FaultSpec]]


@dataclass(frozen=True)
class Scenario:
    name: str
    summary: str
    shape: Shape
    window_s: float
    plan: Plan
    needs_distributed: bool = False
    rate_per_s: float = 2.0  # quick one-off submissions per second during the window
    recurring: int = 4
    prologue: int = 16  # quick one-offs submitted at t=0, due over the window


def _picker_failover(rng: random.Random, window_s: float, backends: Backends) -> list[FaultSpec]:
    # First kill: restarted only after its lease expired, so its shards fail over to the other pickers and come
    # back when it rejoins under a new node id. Second kill: restarted at once under the same node id.
    first = rng.uniform(2.0, 3.0)
    down = rng.uniform(LEASE_TTL_S + 1.0, LEASE_TTL_S + 2.0)
    second = first + down + rng.uniform(3.0, 4.0)
    return [
        FaultSpec(first, "kill", {"role": "picker", "down_s": round(down, 3), "new_identity": True}),
        FaultSpec(second, "kill", {"role": "picker", "down_s": round(rng.uniform(0.2, 0.8), 3)}),
    ]


def _worker_crash(rng: random.Random, window_s: float, backends: Backends) -> list[FaultSpec]:
    first = rng.uniform(3.0, 3.5)
    return [
        FaultSpec(first, "kill-busy-worker", {"down_s": round(rng.uniform(0.5, 1.5), 3)}),
        FaultSpec(first + rng.uniform(4.5, 5.5), "kill-busy-worker", {"down_s": round(rng.uniform(0.5, 1.5), 3)}),
    ]


def _leader_loss(rng: random.Random, window_s: float, backends: Backends) -> list[FaultSpec]:
    first = rng.uniform(2.0, 3.0)
    second = first + rng.uniform(4.5, 5.5)
    # The second time a picker dies while there is no leader: only a newly elected leader can move its shards.
    return [
        FaultSpec(first, "kill-leader", {"down_s": round(rng.uniform(0.5, 1.5), 3)}),
        FaultSpec(second, "kill-leader", {"down_s": round(rng.uniform(0.5, 1.5), 3)}),
        FaultSpec(
            second + 0.3, "kill", {"role": "picker", "down_s": round(LEASE_TTL_S + 2.0, 3), "new_identity": True}
        ),
    ]


def _frozen_picker(rng: random.Random, window_s: float, backends: Backends) -> list[FaultSpec]:
    first = rng.uniform(3.0, 3.5)
    second = first + rng.uniform(5.5, 6.5)
    # Planned exactly at burst due times (see runner): the picker is likely frozen in the middle of a dispatch.
    return [
        FaultSpec(
            at,
            "freeze",
            {"role": "picker", "burst": True, "frozen_s": round(rng.uniform(LEASE_TTL_S + 1.0, LEASE_TTL_S + 1.5), 3)},
        )
        for at in (first, second)
    ]


def _frozen_picker_long(rng: random.Random, window_s: float, backends: Backends) -> list[FaultSpec]:
    # Frozen for four lease TTLs (issue 10: an @every 2s job had a 10.5 s gap after a picker was frozen for 8 s):
    # its shards must move within about a TTL and keep firing while it sleeps, and come back when it wakes.
    return [FaultSpec(rng.uniform(3.0, 3.5), "freeze", {"role": "picker", "frozen_s": round(4 * LEASE_TTL_S, 3)})]


def _etcd_restart(rng: random.Random, window_s: float, backends: Backends) -> list[FaultSpec]:
    first = rng.uniform(2.5, 3.5)
    second = first + rng.uniform(5.0, 6.0)
    return [
        FaultSpec(first, "etcd-restart", {"hard": True, "down_s": round(rng.uniform(0.5, 1.5), 3)}),
        FaultSpec(second, "etcd-restart", {"hard": False, "down_s": round(rng.uniform(0.2, 0.8), 3)}),
    ]


# (kind, weight, params factory) for the mixed scenario.
_MIXED: list[tuple[str, float, Callable[[random.Random], dict[str, object]]]] = [
    ("kill", 10, lambda r: {"down_s": round(r.uniform(0.2, 3.0), 3), "new_identity": r.random() < 0.3}),
    (
        "kill",
        8,
        lambda r: {
            "role": "picker",
            "down_s": round(r.uniform(0.2, LEASE_TTL_S + 2.0), 3),
            "new_identity": r.random() < 0.5,
        },
    ),
    ("kill-leader", 6, lambda r: {"down_s": round(r.uniform(0.3, 2.0), 3)}),
    ("kill-busy-worker", 8, lambda r: {"down_s": round(r.uniform(0.3, 2.0), 3)}),
    (
        "freeze",
        8,
        lambda r: {
            "role": "picker",
            "burst": r.random() < 0.5,
            "frozen_s": round(r.uniform(LEASE_TTL_S + 0.5, LEASE_TTL_S + 2.5), 3),
        },
    ),
    ("freeze", 3, lambda r: {"role": "worker", "frozen_s": round(r.uniform(1.0, VISIBILITY_TIMEOUT_S + 2.0), 3)}),
    ("freeze", 2, lambda r: {"role": "coordinator", "frozen_s": round(r.uniform(1.0, LEASE_TTL_S + 2.0), 3)}),
    ("etcd-restart", 5, lambda r: {"hard": r.random() < 0.5, "down_s": round(r.uniform(0.2, 1.5), 3)}),
    ("moto-pause", 3, lambda r: {"paused_s": round(r.uniform(0.5, 2.5), 3)}),
    ("moto-restart", 2, lambda r: {"down_s": round(r.uniform(0.2, 1.0), 3)}),
]


def _mixed(rng: random.Random, window_s: float, backends: Backends) -> list[FaultSpec]:
    options = [o for o in _MIXED if backends == "distributed" or o[0] not in BACKEND_KINDS]
    count = max(5, LONG_MIN_FAULTS if window_s >= LONG_WINDOW_S else int(window_s / 3))
    start, end = 2.0, window_s - 2.0
    times = sorted(rng.uniform(start, end) for _ in range(count))
    weights = [o[1] for o in options]
    plan = []
    for at in times:
        kind, _, params = rng.choices(options, weights)[0]
        plan.append(FaultSpec(round(at, 3), kind, params(rng)))
    return plan


SCENARIOS: dict[str, Scenario] = {
    s.name: s
    for s in [
        Scenario(
            "picker-failover",
            "SIGKILL a picker: once restarted only after its lease expired (shards fail over "
            "to the others, then rebalance when it rejoins as a new node), once restarted at once (same node id).",
            Shape(coordinators=2, pickers=3, workers=2),
            14.0,
            _picker_failover,
        ),
        Scenario(
            "worker-crash-mid-run",
            "SIGKILL a worker while it runs long HTTP and cmd: jobs (at-least-once and "
            "at-most-once): at-least-once runs run again after the visibility timeout, at-most-once never twice.",
            Shape(coordinators=2, pickers=2, workers=3),
            12.0,
            _worker_crash,
        ),
        Scenario(
            "coordinator-leader-loss",
            "SIGKILL the leading coordinator; the second time a picker dies right "
            "after, so its shards only move once a new leader is elected.",
            Shape(coordinators=2, pickers=3, workers=2),
            14.0,
            _leader_loss,
        ),
        Scenario(
            "frozen-picker",
            "SIGSTOP a picker right when a burst of jobs is due, for longer than its lease TTL, "
            "then SIGCONT: its shards fail over; when it wakes it must not dispatch what it no longer owns "
            "twice (at-most-once) and must rejoin.",
            Shape(coordinators=2, pickers=3, workers=2),
            14.0,
            _frozen_picker,
        ),
        Scenario(
            "frozen-picker-long",
            "SIGSTOP a picker for four lease TTLs while recurring jobs run: its shards fail over within about a "
            "TTL and keep firing (no gap beyond interval + TTL + 2 s), then come back when it wakes.",
            Shape(coordinators=2, pickers=3, workers=2),
            16.0,
            _frozen_picker_long,
            recurring=6,
        ),
        Scenario(
            "etcd-restart",
            "Restart the etcd server (once SIGKILL, once SIGTERM): leases, leader election and "
            "shard ownership survive the outage; dispatching pauses and resumes.",
            Shape(coordinators=2, pickers=2, workers=2),
            12.0,
            _etcd_restart,
            needs_distributed=True,
        ),
        Scenario(
            "mixed",
            "Random faults of every kind (process kills, leader kills, busy-worker kills, freezes of "
            "pickers/workers/coordinators, etcd restarts, moto pauses and restarts) on a seeded schedule.",
            Shape(coordinators=2, pickers=3, workers=3),
            16.0,
            _mixed,
            rate_per_s=2.0,
            recurring=6,
        ),
    ]
}


def long_run_times(plan: list[FaultSpec], window_s: float) -> list[float]:
    """When long jobs should be running: at every busy-worker kill."""
    return sorted(f.at_s for f in plan if f.kind == "kill-busy-worker")


def probe_times(plan: list[FaultSpec]) -> list[float]:
    """Picker faults: jobs should fall due all through the failover that follows."""
    return [f.at_s for f in plan if f.params.get("role") == "picker"]


def burst_times(plan: list[FaultSpec]) -> list[float]:
    return [f.at_s for f in plan if f.params.get("burst")]
