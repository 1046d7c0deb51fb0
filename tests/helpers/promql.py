"""Metric names for the dashboard and alert-rule checks: what ``libs.metrics`` exports, what a PromQL uses."""

from __future__ import annotations

import re

from dsched.libs.metrics import OWNED_GAUGES, REGISTRY

# Series Prometheus itself adds to every scrape target.
PROMETHEUS_SERIES = {"up", "scrape_duration_seconds", "scrape_samples_scraped"}

_PROMQL_WORDS = {
    *("by", "without", "on", "ignoring", "group_left", "group_right"),
    *("bool", "and", "or", "unless", "offset", "le", "inf", "nan"),
}


def exposed_metric_names() -> set[str]:
    """The sample names Prometheus sees for every metric of ``libs.metrics``: those registered in ``REGISTRY`` at
    import, and the gauges a service registers when it runs (``OWNED_GAUGES``)."""
    names: set[str] = set()
    families = [*REGISTRY.collect(), *(family for gauge in OWNED_GAUGES for family in gauge.collect())]
    for family in families:
        if family.type == "counter":
            names.add(f"{family.name}_total")
        elif family.type == "histogram":
            names |= {f"{family.name}_bucket", f"{family.name}_sum", f"{family.name}_count"}
        elif family.type == "summary":
            names |= {family.name, f"{family.name}_sum", f"{family.name}_count"}
        else:
            names.add(family.name)
    return names


def metric_names(expr: str) -> set[str]:
    """Identifiers of a PromQL expression that are metric names (not functions, labels or keywords)."""
    stripped = re.sub(r"\{[^}]*\}", "", expr)  # label matchers
    stripped = re.sub(r"\[[^\]]*\]", "", stripped)  # range selectors
    stripped = re.sub(r"\b(by|without|on|ignoring)\s*\([^)]*\)", "", stripped)  # grouping labels
    names = set()
    for match in re.finditer(r"[A-Za-z_:][A-Za-z0-9_:]*", stripped):
        following = stripped[match.end() :].lstrip()
        if following.startswith("(") or match.group().lower() in _PROMQL_WORDS:
            continue
        names.add(match.group())
    return names
