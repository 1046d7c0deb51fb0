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


AGGREGATIONS = {"sum", "min", "max", "avg", "count", "group", "stddev", "stdvar", "topk", "bottomk", "quantile"}
# Functions a series passes through on its way to an aggregation (they keep one result per input series).
_PER_SERIES = {"", "rate", "irate", "increase", "delta", "idelta", "deriv", "abs", "clamp_min", "clamp_max"}


def enclosing_aggregations(expr: str, metric: str) -> list[str | None]:
    """For each use of ``metric`` in ``expr``: the aggregation operator whose argument it is (through
    per-series functions such as ``rate`` and plain parentheses), or None when it is used per series."""
    stripped = re.sub(r"\{[^}]*\}", "", expr)
    stripped = re.sub(r"\[[^\]]*\]", "", stripped)
    stripped = re.sub(r"\b(by|without)\s*\([^)]*\)", "", stripped)
    found: list[str | None] = []
    for match in re.finditer(rf"(?<![A-Za-z0-9_:]){re.escape(metric)}(?![A-Za-z0-9_:])", stripped):
        depth, aggregation = 0, None
        for i in range(match.start() - 1, -1, -1):
            if stripped[i] == ")":
                depth += 1
            elif stripped[i] == "(":
                if depth:
                    depth -= 1
                    continue
                word = re.search(r"([A-Za-z_]*)\s*$", stripped[:i])
                name = word.group(1) if word else ""
                if name in AGGREGATIONS:
                    aggregation = name
                    break
                if name not in _PER_SERIES:
                    break
        found.append(aggregation)
    return found
