"""Fair dispatch across tenants: the order in which a picker sends runs that are due together.

Runs go to the work queue in the order the picker sends them and workers take them in that order, so a tenant with
100,000 runs due at one instant would otherwise fill the queue ahead of a tenant with 10. When more runs are due
than one dispatch batch (``DSCHED_PICKER_BATCH``), the picker orders the whole due set by **weighted
round-robin across tenants** (weight ``DSCHED_TENANT_LIMITS[tenant]["weight"]``, default 1): within each priority
level, every tenant in turn gets ``weight`` runs, earliest due first within a tenant. Priority still comes first
(a higher-priority run is never behind a lower one). A batch that fits in one send is ordered the same way.

This makes a queue with FIFO delivery fair (the embedded queue delivers by priority, then in send order; SQS
standard queues deliver roughly in send order). It orders what one picker sends; pickers own disjoint shards and
each orders its own share, so the interleaving holds across pickers too.
"""

from __future__ import annotations

from collections import defaultdict, deque
from collections.abc import Callable, Mapping, Sequence
from typing import TypeVar

T = TypeVar("T")


def fair_order(
    items: Sequence[T],
    tenant_of: Callable[[T], str],
    priority_of: Callable[[T], int],
    weights: Mapping[str, float] | None = None,
) -> list[T]:
    """``items`` (already in due order) reordered: priority descending, then weighted round-robin over tenants
    in order of their first appearance, keeping each tenant's own order. Stable and O(n)."""
    weights = weights or {}
    by_priority: dict[int, dict[str, deque[T]]] = defaultdict(dict)
    for item in items:
        queues = by_priority[priority_of(item)]
        queues.setdefault(tenant_of(item), deque()).append(item)
    ordered: list[T] = []
    for priority in sorted(by_priority, reverse=True):
        queues = by_priority[priority]
        active = deque(queues)
        while active:
            tenant = active.popleft()
            queue = queues[tenant]
            for _ in range(max(1, int(weights.get(tenant, 1)))):
                if not queue:
                    break
                ordered.append(queue.popleft())
            if queue:
                active.append(tenant)
    return ordered
