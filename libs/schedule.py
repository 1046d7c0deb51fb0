"""Schedule maths: cron and ``@every`` parsing, next-occurrence search, misfire planning. Pure, no I/O.

Times are integer epoch milliseconds (UTC). Cron expressions are evaluated on the wall clock of the job's
IANA time zone; see docs/semantics-schedule.md for the dialect, DST rules and misfire policies.

DST rules in one place (``f`` below maps a matching local wall-clock time to the instant it fires at):

* every matching wall-clock time fires exactly once;
* a wall-clock time that occurs twice (fall-back) fires at its first occurrence (``fold=0``), so the
  repeated hour does not fire again;
* a wall-clock time that does not exist (spring-forward gap) fires at the transition instant, i.e. the
  first valid instant after the gap; several skipped times collapse into that one firing.

``f`` is non-decreasing in wall-clock time, which is what lets the search work field-wise on the wall
clock and then map the result to an instant.
"""

from __future__ import annotations

import bisect
import math
import re
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta
from functools import lru_cache
from typing import TYPE_CHECKING
from zoneinfo import ZoneInfo

from dsched.libs.limits import MAX_EVERY_S, MAX_INSTANT_MS

if TYPE_CHECKING:
    from dsched.libs.models import Job

__all__ = [
    "CronSchedule",
    "IntervalSchedule",
    "MisfirePlan",
    "Schedule",
    "ScheduleError",
    "next_in_chain",
    "parse_duration",
    "parse_schedule",
    "plan_misfire",
    "upcoming",
]

# A schedule with no occurrence within this many years of the search start is treated as never firing.
# Parse-time checks reject impossible day/month combinations (Feb 30); this only bounds rare-but-valid
# ones such as "Feb 29 that is a Sunday" (up to 40 years apart across 2100).
SEARCH_YEARS = 100
MIN_EVERY_MS = 1000

_ONE_S = timedelta(seconds=1)
_NAIVE_EPOCH = datetime(1970, 1, 1)
# Offset-sampling step when looking for zone transitions; real transitions are weeks apart.
_TRANSITION_SCAN_S = 6 * 3600

_MONTHS = ["JAN", "FEB", "MAR", "APR", "MAY", "JUN", "JUL", "AUG", "SEP", "OCT", "NOV", "DEC"]
_MONTH_NAMES = {name: i + 1 for i, name in enumerate(_MONTHS)}
_DOW_NAMES = {name: i for i, name in enumerate(["SUN", "MON", "TUE", "WED", "THU", "FRI", "SAT"])}
_MONTH_LABELS = {v: k for k, v in _MONTH_NAMES.items()}
_MAX_DAYS = {1: 31, 2: 29, 3: 31, 4: 30, 5: 31, 6: 30, 7: 31, 8: 31, 9: 30, 10: 31, 11: 30, 12: 31}

_MACROS = {
    "@yearly": "0 0 1 1 *",
    "@annually": "0 0 1 1 *",
    "@monthly": "0 0 1 * *",
    "@weekly": "0 0 * * 0",
    "@daily": "0 0 * * *",
    "@midnight": "0 0 * * *",
    "@hourly": "0 * * * *",
}

_DURATION_UNITS = {
    "ns": 1e-9,
    "us": 1e-6,
    "\u00b5s": 1e-6,  # Go accepts both the micro sign and the Greek mu
    "\u03bcs": 1e-6,
    "ms": 1e-3,
    "s": 1.0,
    "m": 60.0,
    "h": 3600.0,
}
_DURATION_PART = re.compile(r"([0-9]*\.?[0-9]*)([^0-9.]+)")
_DIGITS = re.compile(r"[0-9]+")


class ScheduleError(ValueError):
    """An invalid or unsatisfiable schedule. The message is one line, fit for an HTTP 400 detail."""


# --------------------------------------------------------------------------------------------- parsing


def parse_duration(s: str) -> float:
    """Parse a Go-style duration (``90s``, ``1h30m``, ``1.5h``, ``500ms``) into seconds.

    Units: ``ns``, ``us``/``µs``, ``ms``, ``s``, ``m``, ``h``; numbers may be decimal; a bare ``0`` is
    zero. No sign, no spaces and no day unit (``2d``): a "day" is ambiguous across DST, use cron.
    """
    text = s.strip()
    if text == "0":
        return 0.0
    if not text:
        raise ScheduleError("empty duration")
    total = 0.0
    pos = 0
    while pos < len(text):
        m = _DURATION_PART.match(text, pos)
        if m is None or m.group(1) in ("", "."):
            raise ScheduleError(f"invalid duration {s!r} (expected e.g. 90s, 1h30m, 1.5h)")
        unit = m.group(2)
        if unit not in _DURATION_UNITS:
            raise ScheduleError(f"invalid duration {s!r}: unknown unit {unit!r} (use ns, us, ms, s, m, h)")
        total += float(m.group(1)) * _DURATION_UNITS[unit]
        pos = m.end()
    if not math.isfinite(total):
        raise ScheduleError(f"invalid duration {s!r}: too large")
    return total


def _load_zone(name: str) -> ZoneInfo:
    try:
        return ZoneInfo(name)
    except (ValueError, KeyError, OSError):  # bad key, not found, or a directory such as "America"
        raise ScheduleError(f"unknown time zone {name!r} (want an IANA name, e.g. Europe/Berlin)") from None


def _parse_value(text: str, label: str, lo: int, hi: int, names: dict[str, int] | None) -> int:
    if names is not None and text.upper() in names:
        return names[text.upper()]
    if not _DIGITS.fullmatch(text):
        raise ScheduleError(f"{label}: invalid value {text!r}")
    value = int(text)
    if not lo <= value <= hi:
        raise ScheduleError(f"{label}: value {value} out of range {lo}-{hi}")
    return value


def _parse_field(text: str, label: str, lo: int, hi: int, names: dict[str, int] | None) -> tuple[int, ...]:
    """Expand one cron field into its sorted values. ``a/n`` means ``a-<max>/n``."""
    is_dow = label == "day-of-week"
    star_hi = 6 if is_dow else hi  # day-of-week 7 is an alias of 0; '*' must not add it twice
    values: set[int] = set()
    for part in text.split(","):
        if not part:
            raise ScheduleError(f"{label}: empty list item in {text!r}")
        rng, slash, step_text = part.partition("/")
        step = 1
        if slash:
            if not _DIGITS.fullmatch(step_text) or int(step_text) == 0:
                raise ScheduleError(f"{label}: invalid step {step_text!r} in {part!r} (need an integer >= 1)")
            step = int(step_text)
        if rng in ("*", "?"):
            start, end = lo, star_hi
        elif "-" in rng:
            a, _, b = rng.partition("-")
            start = _parse_value(a, label, lo, hi, names)
            end = _parse_value(b, label, lo, hi, names)
            if start > end:
                raise ScheduleError(f"{label}: range {rng!r} is reversed (start must not exceed end)")
        else:
            start = _parse_value(rng, label, lo, hi, names)
            end = star_hi if slash else start
        values.update(range(start, end + 1, step))
    if is_dow and 7 in values:
        values.discard(7)
        values.add(0)
    return tuple(sorted(values))


def parse_schedule(expr: str, timezone: str = "UTC") -> Schedule:
    """Parse ``expr`` (cron, macro or ``@every``) for ``timezone`` (IANA). Raises :class:`ScheduleError`.

    Cron: 5 fields ``minute hour day-of-month month day-of-week`` or 6 with a leading ``second`` field;
    ``*``, ``?`` (same as ``*``), ``a-b``, ``a,b``, ``*/n``, ``a-b/n``, ``a/n`` (= ``a-max/n``), names
    JAN-DEC and SUN-SAT (any case), day-of-week 0-7 with 0 and 7 both Sunday. Day rule (Vixie cron): if
    day-of-month or day-of-week starts with ``*`` or ``?`` a day must match both fields, otherwise it
    must match either. Macros: ``@yearly``/``@annually``, ``@monthly``, ``@weekly``,
    ``@daily``/``@midnight``, ``@hourly``. ``@every <duration>`` (>= 1 s): see :class:`IntervalSchedule`.
    Parsed schedules are cached (they are immutable).
    """
    return _parse_cached(expr, timezone)


@lru_cache(maxsize=4096)
def _parse_cached(expr: str, timezone: str) -> Schedule:
    tz = _load_zone(timezone)
    text = expr.strip()
    if not text:
        raise ScheduleError("empty schedule expression")
    if text.startswith("@"):
        tokens = text.split()
        keyword = tokens[0].lower()
        if keyword == "@every":
            if len(tokens) != 2:
                raise ScheduleError("@every takes exactly one duration, e.g. '@every 1h30m'")
            seconds = parse_duration(tokens[1])
            interval_ms = round(seconds * 1000)
            if interval_ms < MIN_EVERY_MS:
                raise ScheduleError(f"@every interval {tokens[1]!r} is below the minimum of 1s")
            if interval_ms > MAX_EVERY_S * 1000:
                raise ScheduleError(f"@every interval {tokens[1]!r} is above the maximum of {MAX_EVERY_S // 86_400}d")
            return IntervalSchedule(expr=expr, timezone=timezone, interval_ms=interval_ms)
        if keyword not in _MACROS or len(tokens) != 1:
            supported = ", ".join([*_MACROS, "@every"])
            raise ScheduleError(f"unknown schedule macro {tokens[0]!r} (supported: {supported})")
        fields = _MACROS[keyword].split()
    else:
        fields = text.split()
    if len(fields) == 5:
        fields = ["0", *fields]
    elif len(fields) != 6:
        raise ScheduleError(
            f"cron expression must have 5 fields (minute hour day-of-month month day-of-week) "
            f"or 6 with a leading seconds field, got {len(fields)}"
        )
    sec_f, min_f, hour_f, dom_f, mon_f, dow_f = fields
    cron = CronSchedule(
        expr=expr,
        timezone=timezone,
        second=_parse_field(sec_f, "second", 0, 59, None),
        minute=_parse_field(min_f, "minute", 0, 59, None),
        hour=_parse_field(hour_f, "hour", 0, 23, None),
        day_of_month=_parse_field(dom_f, "day-of-month", 1, 31, None),
        month=_parse_field(mon_f, "month", 1, 12, _MONTH_NAMES),
        day_of_week=_parse_field(dow_f, "day-of-week", 0, 7, _DOW_NAMES),
        dom_star=dom_f[0] in "*?",
        dow_star=dow_f[0] in "*?",
        tz=tz,
    )
    cron.check_satisfiable()
    return cron


# --------------------------------------------------------------------------------------------- schedules


class Schedule(ABC):
    """A parsed schedule. ``expr`` and ``timezone`` are as given to :func:`parse_schedule`."""

    expr: str
    timezone: str

    @abstractmethod
    def next_after(self, after_ms: int) -> int:
        """The first occurrence strictly after ``after_ms`` (epoch ms, UTC)."""


@dataclass(frozen=True)
class IntervalSchedule(Schedule):
    """``@every <duration>``: anchored to the previous occurrence, not to the epoch or the clock.

    ``next_after(t) == t + interval_ms``: callers pass the occurrence that just fired, so a job created
    at 10:00:07 with ``@every 1m`` fires at 10:01:07, 10:02:07, ... The time zone is irrelevant (kept
    for uniformity). Millisecond resolution.
    """

    expr: str
    timezone: str
    interval_ms: int

    def next_after(self, after_ms: int) -> int:
        next_ms = after_ms + self.interval_ms
        if next_ms > MAX_INSTANT_MS:
            raise ScheduleError(f"schedule {self.expr!r} has no occurrence before year 10000")
        return next_ms


@dataclass(frozen=True)
class CronSchedule(Schedule):
    """A cron expression evaluated on the wall clock of ``timezone``. Fields hold the sorted allowed values
    (day-of-week 0 = Sunday). ``dom_star``/``dow_star``: the field text started with ``*`` or ``?``.

    Occurrences are whole seconds. DST: see the module docstring.
    """

    expr: str
    timezone: str
    second: tuple[int, ...]
    minute: tuple[int, ...]
    hour: tuple[int, ...]
    day_of_month: tuple[int, ...]
    month: tuple[int, ...]
    day_of_week: tuple[int, ...]
    dom_star: bool
    dow_star: bool
    tz: ZoneInfo = field(repr=False, compare=False)
    _sets: tuple[frozenset[int], ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        sets = tuple(
            frozenset(v) for v in (self.second, self.minute, self.hour, self.day_of_month, self.month, self.day_of_week)
        )
        object.__setattr__(self, "_sets", sets)

    # ---- public API

    def next_after(self, after_ms: int) -> int:
        """The first occurrence strictly after ``after_ms``; ScheduleError if none within SEARCH_YEARS."""
        try:
            start = self._wall_upto(after_ms // 1000) + _ONE_S
        except (OverflowError, ValueError, OSError):
            raise ScheduleError(f"time {after_ms} ms is outside the supported range") from None
        wall = self._next_wall(start)
        if wall is None:
            raise ScheduleError(f"schedule {self.expr!r} has no occurrence within {SEARCH_YEARS} years")
        return self._instant(wall) * 1000

    def last_at_or_before(self, at_ms: int) -> int | None:
        """The last occurrence at or before ``at_ms``, or None if none within SEARCH_YEARS before it."""
        try:
            wall = self._prev_wall(self._wall_upto(at_ms // 1000))
        except (OverflowError, ValueError, OSError):
            return None
        return None if wall is None else self._instant(wall) * 1000

    def count_between(self, after_ms: int, until_ms: int) -> int:
        """Number of occurrences ``t`` with ``after_ms < t <= until_ms``, computed without enumerating them.

        Counts matching wall-clock times per day arithmetically, then removes the duplicates that
        spring-forward gaps collapse into one firing.
        """
        a, b = after_ms // 1000, until_ms // 1000
        if b <= a:
            return 0
        w_lo = self._wall_upto(a) + _ONE_S
        w_hi = self._wall_upto(b)
        if w_lo > w_hi:
            return 0
        n = self._count_wall(w_lo, w_hi)
        for t, old, new in self._transitions(a, b):
            if new > old:  # gap: every matching wall time in [gap start, gap end] fires once, at t
                lo = max(_naive(t + old), w_lo)
                hi = min(_naive(t + new), w_hi)
                if lo <= hi:
                    n -= max(0, self._count_wall(lo, hi) - 1)
        return n

    def check_satisfiable(self) -> None:
        """Raise ScheduleError when no calendar day can ever match (e.g. ``0 0 30 2 *``)."""
        if not (self.dom_star or self.dow_star):
            return  # either field may match, and every month has every weekday
        # Both fields must match: over the 400-year Gregorian cycle every (month, day) that exists falls
        # on every weekday, so only the month/day-of-month pairing can be impossible.
        if any(d <= _MAX_DAYS[m] for m in self.month for d in self.day_of_month):
            return
        months = ",".join(_MONTH_LABELS[m] for m in self.month)
        days = ",".join(str(d) for d in self.day_of_month)
        raise ScheduleError(f"day-of-month {days} never occurs in month {months}: the schedule never fires")

    # ---- wall clock <-> instant

    def _offset_at(self, t: int) -> int:
        return _offset_s(datetime.fromtimestamp(t, self.tz))

    def _transition(self, a: int, b: int) -> int:
        """First second in (a, b] with b's UTC offset; assumes one offset change in between."""
        target = self._offset_at(b)
        lo, hi = a, b
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if self._offset_at(mid) == target:
                hi = mid
            else:
                lo = mid
        return hi

    def _transitions(self, a: int, b: int) -> Iterator[tuple[int, int, int]]:
        """(instant, old offset, new offset) of each offset change in (a, b], seconds."""
        t, off = a, self._offset_at(a)
        while t < b:
            t2 = min(t + _TRANSITION_SCAN_S, b)
            off2 = self._offset_at(t2)
            if off2 != off:
                yield self._transition(t, t2), off, off2
            t, off = t2, off2

    def _instant(self, wall: datetime) -> int:
        """Epoch seconds at which the matching wall time ``wall`` fires (the DST rules)."""
        first = wall.replace(tzinfo=self.tz)
        second = wall.replace(tzinfo=self.tz, fold=1)
        base = (wall - _NAIVE_EPOCH) // _ONE_S
        x0 = base - _offset_s(first)
        x1 = base - _offset_s(second)
        if x0 <= x1:
            return x0  # unique, or ambiguous: fold=0 is the first occurrence
        # In a gap fold=0 uses the pre-transition offset, landing after the transition: fire at it.
        return self._transition(x1, x0)

    def _wall_upto(self, x: int) -> datetime:
        """The latest wall time whose firing instant is <= x (epoch seconds)."""
        loc = datetime.fromtimestamp(x, self.tz)
        wall = loc.replace(tzinfo=None)
        if loc.fold:
            # x is in the repeated hour after a fall-back: every wall time of that hour already fired at
            # its first occurrence (<= x), so the bound is the end of the repeated hour.
            old_s, new_s = _offset_s(loc.replace(fold=0)), _offset_s(loc)
            t = self._transition(x - (old_s - new_s), x)
            wall = _naive(t + old_s) - _ONE_S
        return wall

    # ---- field-wise search on the wall clock

    def _day_matches(self, y: int, mo: int, d: int) -> bool:
        dom_ok = d in self._sets[3]
        dow_ok = (date(y, mo, d).weekday() + 1) % 7 in self._sets[5]
        if self.dom_star or self.dow_star:
            return dom_ok and dow_ok
        return dom_ok or dow_ok

    def _next_wall(self, start: datetime) -> datetime | None:
        """The first matching wall time >= start (None past the search bound)."""
        months, hours, minutes, seconds = self.month, self.hour, self.minute, self.second
        y, mo, d, h, mi, s = start.year, start.month, start.day, start.hour, start.minute, start.second
        limit = min(y + SEARCH_YEARS, 9999)
        while True:
            if y > limit:
                return None
            if mo not in self._sets[4]:
                i = bisect.bisect_left(months, mo)
                if i == len(months):
                    y, mo = y + 1, months[0]
                else:
                    mo = months[i]
                d, h, mi, s = 1, 0, 0, 0
                continue
            dim = _days_in_month(y, mo)
            dd = d
            while dd <= dim and not self._day_matches(y, mo, dd):
                dd += 1
            if dd > dim:
                y, mo = (y + 1, 1) if mo == 12 else (y, mo + 1)
                d, h, mi, s = 1, 0, 0, 0
                continue
            if dd != d:
                d, h, mi, s = dd, 0, 0, 0
            i = bisect.bisect_left(hours, h)
            if i == len(hours):
                d, h, mi, s = d + 1, 0, 0, 0
                continue
            if hours[i] != h:
                h, mi, s = hours[i], 0, 0
            i = bisect.bisect_left(minutes, mi)
            if i == len(minutes):
                h, mi, s = h + 1, 0, 0
                continue
            if minutes[i] != mi:
                mi, s = minutes[i], 0
            i = bisect.bisect_left(seconds, s)
            if i == len(seconds):
                mi, s = mi + 1, 0
                continue
            return datetime(y, mo, d, h, mi, seconds[i])

    def _prev_wall(self, start: datetime) -> datetime | None:
        """The last matching wall time <= start (None past the search bound). Mirror of _next_wall."""
        months, hours, minutes, seconds = self.month, self.hour, self.minute, self.second
        y, mo, d, h, mi, s = start.year, start.month, start.day, start.hour, start.minute, start.second
        limit = max(y - SEARCH_YEARS, 1)
        while True:
            if y < limit:
                return None
            if mo not in self._sets[4]:
                i = bisect.bisect_right(months, mo)
                if i == 0:
                    y, mo = y - 1, months[-1]
                else:
                    mo = months[i - 1]
                d, h, mi, s = 31, 23, 59, 59
                continue
            dd = min(d, _days_in_month(y, mo))
            while dd >= 1 and not self._day_matches(y, mo, dd):
                dd -= 1
            if dd < 1:
                y, mo = (y - 1, 12) if mo == 1 else (y, mo - 1)
                d, h, mi, s = 31, 23, 59, 59
                continue
            if dd != d:
                d, h, mi, s = dd, 23, 59, 59
            i = bisect.bisect_right(hours, h)
            if i == 0:
                d, h, mi, s = d - 1, 23, 59, 59
                continue
            if hours[i - 1] != h:
                h, mi, s = hours[i - 1], 59, 59
            i = bisect.bisect_right(minutes, mi)
            if i == 0:
                h, mi, s = h - 1, 59, 59
                continue
            if minutes[i - 1] != mi:
                mi, s = minutes[i - 1], 59
            i = bisect.bisect_right(seconds, s)
            if i == 0:
                mi, s = mi - 1, 59
                continue
            return datetime(y, mo, d, h, mi, seconds[i - 1])

    def _count_time_le(self, t: int) -> int:
        """Matching (hour, minute, second) combinations at or before second-of-day ``t``."""
        if t < 0:
            return 0
        h, rem = divmod(t, 3600)
        mi, s = divmod(rem, 60)
        n_min, n_sec = len(self.minute), len(self.second)
        n = bisect.bisect_left(self.hour, h) * n_min * n_sec
        if h in self._sets[2]:
            n += bisect.bisect_left(self.minute, mi) * n_sec
            if mi in self._sets[1]:
                n += bisect.bisect_right(self.second, s)
        return n

    def _count_wall(self, lo: datetime, hi: datetime) -> int:
        """Matching wall times in [lo, hi], each counted once."""
        per_day = len(self.hour) * len(self.minute) * len(self.second)
        first, last = lo.date(), hi.date()
        day = first
        n = 0
        while day <= last:
            if day.month not in self._sets[4]:
                day = date(day.year + 1, 1, 1) if day.month == 12 else date(day.year, day.month + 1, 1)
                continue
            if self._day_matches(day.year, day.month, day.day):
                t_lo = _second_of_day(lo) if day == first else 0
                t_hi = _second_of_day(hi) if day == last else 86399
                if t_lo == 0 and t_hi == 86399:
                    n += per_day
                else:
                    n += self._count_time_le(t_hi) - self._count_time_le(t_lo - 1)
            day += timedelta(days=1)
        return n


def _offset_s(moment: datetime) -> int:
    """The UTC offset of the aware ``moment``, in seconds (a ZoneInfo always gives one)."""
    offset = moment.utcoffset()
    if offset is None:
        raise ScheduleError(f"time zone {moment.tzinfo!r} gives no UTC offset for {moment.isoformat()}")
    return int(offset.total_seconds())


def _naive(epoch_s: int) -> datetime:
    return _NAIVE_EPOCH + timedelta(seconds=epoch_s)


def _second_of_day(w: datetime) -> int:
    return w.hour * 3600 + w.minute * 60 + w.second


def _days_in_month(y: int, mo: int) -> int:
    if mo == 2:
        return 29 if (y % 4 == 0 and (y % 100 != 0 or y % 400 == 0)) else 28
    return _MAX_DAYS[mo]


def upcoming(schedule: Schedule, after_ms: int, n: int) -> list[int]:
    """The next ``n`` occurrences strictly after ``after_ms``, in order (each from the previous one); fewer
    when the schedule ends before year 10000."""
    if n < 0:
        raise ValueError("n must be >= 0")
    out: list[int] = []
    t = after_ms
    for _ in range(n):
        try:
            t = schedule.next_after(t)
        except ScheduleError:
            break
        out.append(t)
    return out


def next_in_chain(schedule: Schedule, anchor_ms: int, after_ms: int) -> int:
    """The first occurrence strictly after ``max(anchor_ms, after_ms)`` of the sequence ``anchor_ms``,
    ``next_after(anchor_ms)``, ... (``anchor_ms``: an occurrence already dispatched).

    Only ``@every`` depends on the anchor (its occurrences are anchor + k * interval, computed without
    iterating); for cron this is ``next_after(max(anchor_ms, after_ms))``. Use it for "when does this job
    fire next" after a gap, where ``next_after(now)`` would re-anchor an ``@every`` job at ``now``.
    """
    if isinstance(schedule, IntervalSchedule):
        steps = max(1, (after_ms - anchor_ms) // schedule.interval_ms + 1)
        return schedule.next_after(anchor_ms + (steps - 1) * schedule.interval_ms)
    return schedule.next_after(max(anchor_ms, after_ms))


def first_undispatched(job: Job) -> int | None:
    """The first occurrence of ``job`` not yet handed to the work queue — the one rule for "what comes next"
    (the picker's chain, where a changed or resumed job continues, the next fire time users see).

    ``next_fire_ms`` until that occurrence was dispatched; after it, for a recurring job, the occurrence after
    the last dispatched one (possibly already late: the picker's misfire policy decides); None for a one-off
    job already dispatched, or a schedule that has ended or no longer parses.
    """
    if job.dispatched_through_ms < job.next_fire_ms:
        return job.next_fire_ms
    if not job.cron_schedule:
        return None
    try:
        return parse_schedule(job.cron_schedule, job.timezone).next_after(job.dispatched_through_ms)
    except ScheduleError:
        return None


# --------------------------------------------------------------------------------------------- misfires


@dataclass(frozen=True)
class MisfirePlan:
    """What to do with the occurrences of a recurring job that fell due by ``now``.

    ``fire``: occurrence times to run now, oldest first. ``skipped``: (occurrence time, reason), oldest
    first, at most ``cap`` entries plus one summary entry ``(last skipped, "misfire: N more occurrences
    skipped")``. ``next_ms``: the first occurrence strictly after now, to store as the next entry.
    """

    fire: list[int]
    skipped: list[tuple[int, str]]
    next_ms: int


REASON_OVER_CAP = "misfire: over cap"
REASON_COALESCED = "misfire: coalesced (fire_once)"
REASON_LATE = "misfire: later than max_lateness_s"


class _Occurrences(ABC):
    """The considered occurrences: ``scheduled_ms`` and every later occurrence <= now. Bounds inclusive."""

    @abstractmethod
    def count(self, lo: int, hi: int) -> int: ...

    @abstractmethod
    def take(self, lo: int, hi: int, n: int) -> list[int]: ...

    @abstractmethod
    def last(self, lo: int, hi: int) -> int:
        """The last occurrence in [lo, hi], which holds at least one (``count(lo, hi) > 0``)."""

    @abstractmethod
    def next_after_now(self) -> int: ...


class _IntervalOccurrences(_Occurrences):
    """scheduled + k * interval for k = 0..K: pure arithmetic, however long the gap."""

    def __init__(self, scheduled: int, interval: int, now: int) -> None:
        self.s, self.i = scheduled, interval
        self.k_max = (now - scheduled) // interval

    def _ks(self, lo: int, hi: int) -> tuple[int, int]:
        k_lo = max(0, -((self.s - lo) // self.i))  # ceil((lo - s) / i)
        k_hi = min(self.k_max, (hi - self.s) // self.i)
        return k_lo, k_hi

    def count(self, lo: int, hi: int) -> int:
        k_lo, k_hi = self._ks(lo, hi)
        return max(0, k_hi - k_lo + 1)

    def take(self, lo: int, hi: int, n: int) -> list[int]:
        k_lo, k_hi = self._ks(lo, hi)
        return [self.s + k * self.i for k in range(k_lo, min(k_hi + 1, k_lo + n))]

    def last(self, lo: int, hi: int) -> int:
        k_lo, k_hi = self._ks(lo, hi)
        if k_hi < k_lo:
            raise ValueError(f"no occurrence in [{lo}, {hi}] ms")
        return self.s + k_hi * self.i

    def next_after_now(self) -> int:
        return self.s + (self.k_max + 1) * self.i


class _CronOccurrences(_Occurrences):
    """scheduled (whether or not it matches the cron) plus the cron occurrences in (scheduled, now]."""

    def __init__(self, cron: CronSchedule, scheduled: int, now: int) -> None:
        self.cron, self.s, self.now = cron, scheduled, now

    def _clamp(self, lo: int, hi: int) -> tuple[int, int]:
        return max(lo, self.s), min(hi, self.now)

    def count(self, lo: int, hi: int) -> int:
        lo, hi = self._clamp(lo, hi)
        if lo > hi:
            return 0
        return int(lo == self.s) + self.cron.count_between(max(lo - 1, self.s), hi)

    def take(self, lo: int, hi: int, n: int) -> list[int]:
        lo, hi = self._clamp(lo, hi)
        out: list[int] = []
        if lo > hi or n <= 0:
            return out
        if lo == self.s:
            out.append(self.s)
        t = max(lo - 1, self.s)
        while len(out) < n:
            t = self.cron.next_after(t)
            if t > hi:
                break
            out.append(t)
        return out

    def last(self, lo: int, hi: int) -> int:
        lo, hi = self._clamp(lo, hi)
        if lo > hi:
            raise ValueError(f"no occurrence in [{lo}, {hi}] ms")
        p = self.cron.last_at_or_before(hi)
        if p is not None and p > self.s and p >= lo:
            return p
        if lo == self.s:
            return self.s
        # count_between is arithmetic, last_at_or_before searches at most SEARCH_YEARS back
        raise ScheduleError(f"schedule {self.cron.expr!r}: no occurrence found in [{lo}, {hi}] ms")

    def next_after_now(self) -> int:
        return self.cron.next_after(self.now)


def plan_misfire(
    schedule: Schedule, scheduled_ms: int, now_ms: int, policy: str, max_lateness_ms: int, cap: int = 1000
) -> MisfirePlan:
    """Decide which occurrences to fire when the due occurrence ``scheduled_ms`` is processed at ``now_ms``.

    Considered occurrences: ``scheduled_ms`` and every later occurrence <= now (``now`` is raised to
    ``scheduled_ms`` if the clock is behind it). An occurrence is late when ``now - occ > max_lateness_ms``.

    * ``fire_all``: fire every considered occurrence.
    * ``fire_once``: if none is late fire all considered (normally just ``scheduled_ms``); otherwise
      fire only the most recent and skip the rest as coalesced.
    * ``skip``: fire those not late; skip the late ones.

    Whatever the policy at most ``cap`` occurrences fire (the oldest); the excess is skipped "over cap".
    Work is bounded by ``cap``, not by the gap: ``@every`` uses arithmetic and cron counts occurrences
    without enumerating them.
    """
    if cap < 1:
        raise ValueError("cap must be >= 1")
    if max_lateness_ms < 0:
        raise ValueError("max_lateness_ms must be >= 0")
    now = max(now_ms, scheduled_ms)
    occ: _Occurrences
    if isinstance(schedule, IntervalSchedule):
        occ = _IntervalOccurrences(scheduled_ms, schedule.interval_ms, now)
    elif isinstance(schedule, CronSchedule):
        occ = _CronOccurrences(schedule, scheduled_ms, now)
    else:
        raise TypeError(f"unsupported schedule type {type(schedule).__name__}")

    earliest_on_time = now - max_lateness_ms
    skip_groups: list[tuple[int, int, str]] = []  # (lo, hi, reason), chronological
    fire_lo = scheduled_ms
    if policy == "fire_all":
        pass
    elif policy == "fire_once":
        if scheduled_ms < earliest_on_time:
            latest = occ.last(scheduled_ms, now)  # scheduled_ms itself is considered: never empty
            skip_groups.append((scheduled_ms, latest - 1, REASON_COALESCED))
            fire_lo = latest
    elif policy == "skip":
        skip_groups.append((scheduled_ms, earliest_on_time - 1, REASON_LATE))
        fire_lo = max(scheduled_ms, earliest_on_time)
    else:
        raise ValueError(f"unknown misfire policy {policy!r}")

    fire = occ.take(fire_lo, now, cap)
    if len(fire) == cap:
        skip_groups.append((fire[-1] + 1, now, REASON_OVER_CAP))

    skipped: list[tuple[int, str]] = []
    total = 0
    last_group: tuple[int, int] | None = None
    for lo, hi, reason in skip_groups:
        group_n = occ.count(lo, hi)
        if group_n == 0:
            continue
        total += group_n
        last_group = (lo, hi)
        room = cap - len(skipped)
        if room > 0:
            skipped.extend((t, reason) for t in occ.take(lo, hi, room))
    if last_group is not None and total > len(skipped):  # total > 0: some group was not empty
        # Groups are chronological, so the overall last skipped occurrence ends the last non-empty group.
        last_skipped = occ.last(*last_group)
        skipped.append((last_skipped, f"misfire: {total - len(skipped)} more occurrences skipped"))
    return MisfirePlan(fire=fire, skipped=skipped, next_ms=occ.next_after_now())
