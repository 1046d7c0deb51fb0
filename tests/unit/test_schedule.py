"""Unit tests of libs.schedule: cron dialect, @every, next-occurrence search, DST rules, misfire planning."""

from __future__ import annotations

import time
from datetime import UTC, date, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dsched.libs.schedule import (
    CronSchedule,
    IntervalSchedule,
    MisfirePlan,
    Schedule,
    ScheduleError,
    next_in_chain,
    parse_duration,
    parse_schedule,
    plan_misfire,
    upcoming,
)

MIN = 60_000
HOUR = 3_600_000
DAY = 86_400_000


def utc(y: int, mo: int, d: int, h: int = 0, mi: int = 0, s: int = 0, ms: int = 0) -> int:
    return int(datetime(y, mo, d, h, mi, s, tzinfo=UTC).timestamp()) * 1000 + ms


def local(zone: str, y: int, mo: int, d: int, h: int = 0, mi: int = 0, fold: int = 0) -> int:
    return int(datetime(y, mo, d, h, mi, tzinfo=ZoneInfo(zone), fold=fold).timestamp()) * 1000


def cron(expr: str, tz: str = "UTC") -> CronSchedule:
    s = parse_schedule(expr, tz)
    assert isinstance(s, CronSchedule)
    return s


# ------------------------------------------------------------------------------------------ parsing


@pytest.mark.parametrize(
    ("expr", "field", "values"),
    [
        ("*/15 * * * *", "minute", (0, 15, 30, 45)),
        ("0 9-17 * * *", "hour", tuple(range(9, 18))),
        ("0 0-23/6 * * *", "hour", (0, 6, 12, 18)),
        ("5,10,55 * * * *", "minute", (5, 10, 55)),
        ("10/20 * * * *", "minute", (10, 30, 50)),  # a/n = a-max/n
        ("0 0 1,15,31 * *", "day_of_month", (1, 15, 31)),
        ("0 0 * jan,Mar,DEC *", "month", (1, 3, 12)),
        ("0 0 * FEB-apr *", "month", (2, 3, 4)),
        ("0 0 * * mon-fri", "day_of_week", (1, 2, 3, 4, 5)),
        ("0 0 * * 7", "day_of_week", (0,)),
        ("0 0 * * 0,7", "day_of_week", (0,)),
        ("0 0 * * 5-7", "day_of_week", (0, 5, 6)),
        ("0 0 * * */2", "day_of_week", (0, 2, 4, 6)),
        ("0 0 * * SAT,sun", "day_of_week", (0, 6)),
        ("0 0 ? * MON", "day_of_month", tuple(range(1, 32))),
        ("0 0 1 * ?", "day_of_week", tuple(range(7))),
        ("0 0 1-10/3,20 * *", "day_of_month", (1, 4, 7, 10, 20)),
    ],
)
def test_parse_field_values(expr: str, field: str, values: tuple[int, ...]) -> None:
    assert getattr(cron(expr), field) == values


def test_five_fields_fire_at_second_zero_and_six_fields_lead_with_seconds() -> None:
    five = cron("*/5 * * * *")
    assert five.second == (0,)
    six = cron("*/20 30 * * * *")
    assert six.second == (0, 20, 40)
    assert six.minute == (30,)
    assert six.next_after(utc(2024, 1, 1, 10, 30, 20)) == utc(2024, 1, 1, 10, 30, 40)
    assert six.next_after(utc(2024, 1, 1, 10, 30, 40)) == utc(2024, 1, 1, 11, 30, 0)


def test_star_flags_follow_vixie_first_character_rule() -> None:
    assert cron("0 0 * * MON").dom_star and not cron("0 0 * * MON").dow_star
    assert cron("0 0 ? * MON").dom_star
    assert cron("0 0 */2 * MON").dom_star  # '*/2' starts with '*': Vixie treats it as unrestricted
    assert not cron("0 0 1-31 * MON").dom_star


@pytest.mark.parametrize(
    ("macro", "equivalent"),
    [
        ("@yearly", "0 0 1 1 *"),
        ("@annually", "0 0 1 1 *"),
        ("@monthly", "0 0 1 * *"),
        ("@weekly", "0 0 * * 0"),
        ("@daily", "0 0 * * *"),
        ("@midnight", "0 0 * * *"),
        ("@hourly", "0 * * * *"),
        ("@HOURLY", "0 * * * *"),
    ],
)
def test_macros_equal_their_cron(macro: str, equivalent: str) -> None:
    m, c = cron(macro), cron(equivalent)
    assert m.expr == macro
    start = utc(2023, 12, 30, 13, 7)
    assert upcoming(m, start, 5) == upcoming(c, start, 5)


def test_macro_fire_times() -> None:
    assert cron("@yearly").next_after(utc(2024, 5, 5)) == utc(2025, 1, 1)
    assert cron("@monthly").next_after(utc(2024, 1, 31, 12)) == utc(2024, 2, 1)
    assert cron("@weekly").next_after(utc(2024, 6, 5)) == utc(2024, 6, 9)  # Wed -> Sun
    assert cron("@daily").next_after(utc(2024, 2, 28, 23, 59, 59)) == utc(2024, 2, 29)
    assert cron("@hourly").next_after(utc(2024, 1, 1, 23, 0)) == utc(2024, 1, 2, 0, 0)


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("1s", 1.0),
        ("90s", 90.0),
        ("5m", 300.0),
        ("1h30m", 5400.0),
        ("1.5h", 5400.0),
        ("2h45m30s", 9930.0),
        ("500ms", 0.5),
        ("1500ms", 1.5),
        ("250us", 0.00025),
        ("0", 0.0),
        (".5s", 0.5),
    ],
)
def test_parse_duration(text: str, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["", "5", "2d", "1w", "-1s", "1 h", "h", "1.2.3s", "1h-5m", "s1"])
def test_parse_duration_rejects(text: str) -> None:
    with pytest.raises(ScheduleError):
        parse_duration(text)


@pytest.mark.parametrize(
    ("expr", "interval_ms"),
    [("@every 1s", 1000), ("@every 90s", 90_000), ("@every 1h30m", 5_400_000), ("@EVERY 1500ms", 1500)],
)
def test_every_parses(expr: str, interval_ms: int) -> None:
    s = parse_schedule(expr, "Europe/Berlin")
    assert isinstance(s, IntervalSchedule)
    assert s.interval_ms == interval_ms
    assert (s.expr, s.timezone) == (expr, "Europe/Berlin")


def test_every_is_anchored_to_the_previous_occurrence_not_the_epoch() -> None:
    s = parse_schedule("@every 1m")
    t0 = utc(2024, 1, 1, 10, 0, 7, 250)
    assert s.next_after(t0) == t0 + MIN
    assert upcoming(s, t0, 3) == [t0 + MIN, t0 + 2 * MIN, t0 + 3 * MIN]


@pytest.mark.parametrize(
    ("expr", "tz", "message"),
    [
        ("* * * *", "UTC", "must have 5 fields"),
        ("* * * * * * *", "UTC", "got 7"),
        ("", "UTC", "empty schedule"),
        ("60 * * * *", "UTC", "minute: value 60 out of range 0-59"),
        ("* 24 * * *", "UTC", "hour: value 24 out of range 0-23"),
        ("0 0 0 * *", "UTC", "day-of-month: value 0 out of range 1-31"),
        ("0 0 32 * *", "UTC", "day-of-month: value 32 out of range"),
        ("0 0 * 13 *", "UTC", "month: value 13 out of range 1-12"),
        ("0 0 * * 8", "UTC", "day-of-week: value 8 out of range 0-7"),
        ("60 * * * * *", "UTC", "second: value 60"),
        ("*/0 * * * *", "UTC", "minute: invalid step '0'"),
        ("*/x * * * *", "UTC", "invalid step 'x'"),
        ("*/ * * * *", "UTC", "invalid step ''"),
        ("30-10 * * * *", "UTC", "range '30-10' is reversed"),
        ("0 0 * * FRI-MON", "UTC", "reversed"),
        ("0 0 * * FOO", "UTC", "day-of-week: invalid value 'FOO'"),
        ("JAN * * * *", "UTC", "minute: invalid value 'JAN'"),
        ("0 0 * MON *", "UTC", "month: invalid value 'MON'"),
        ("1,,2 * * * *", "UTC", "empty list item"),
        ("1- * * * *", "UTC", "minute: invalid value ''"),
        ("*-5 * * * *", "UTC", "invalid value '*'"),
        ("-1 * * * *", "UTC", "invalid value ''"),
        ("1.5 * * * *", "UTC", "invalid value '1.5'"),
        ("0 0 30 2 *", "UTC", "day-of-month 30 never occurs in month FEB"),
        ("0 0 31 4,6,9,11 *", "UTC", "never occurs"),
        ("0 0 30,31 FEB *", "UTC", "never fires"),
        ("@reboot", "UTC", "unknown schedule macro '@reboot'"),
        ("@daily 5", "UTC", "unknown schedule macro"),
        ("@every", "UTC", "@every takes exactly one duration"),
        ("@every 1h 30m", "UTC", "exactly one duration"),
        ("@every 500ms", "UTC", "below the minimum of 1s"),
        ("@every 0", "UTC", "below the minimum"),
        ("@every 2d", "UTC", "unknown unit 'd'"),
        ("@every soon", "UTC", "invalid duration"),
        ("* * * * *", "Mars/Olympus_Mons", "unknown time zone 'Mars/Olympus_Mons'"),
        ("* * * * *", "", "unknown time zone"),
        ("* * * * *", "America", "unknown time zone"),  # a directory of the tz database
        ("* * * * *", "../etc/passwd", "unknown time zone"),
        ("@every 1m", "Nowhere/Land", "unknown time zone"),
    ],
)
def test_invalid_expressions_explain_in_one_line(expr: str, tz: str, message: str) -> None:
    with pytest.raises(ScheduleError) as err:
        parse_schedule(expr, tz)
    text = str(err.value)
    assert message in text
    assert "\n" not in text


def test_schedule_error_is_a_value_error() -> None:
    assert issubclass(ScheduleError, ValueError)


def test_feb_29_and_dow_or_rule_are_not_impossible() -> None:
    cron("0 0 29 2 *")
    cron("0 0 30 2 MON")  # either field may match: every Monday in February
    cron("0 0 31 * *")  # months with 31 days exist


def test_schedule_attributes() -> None:
    s = parse_schedule("0 9 * * MON-FRI", "Europe/Berlin")
    assert isinstance(s, Schedule)
    assert (s.expr, s.timezone) == ("0 9 * * MON-FRI", "Europe/Berlin")


# ------------------------------------------------------------------------------------------ next_after


def test_next_after_is_strictly_after_and_whole_seconds() -> None:
    s = cron("*/15 * * * *")
    assert s.next_after(utc(2024, 1, 1, 10, 0)) == utc(2024, 1, 1, 10, 15)
    assert s.next_after(utc(2024, 1, 1, 10, 0) - 1) == utc(2024, 1, 1, 10, 0)
    assert s.next_after(utc(2024, 1, 1, 10, 0, ms=500)) == utc(2024, 1, 1, 10, 15)
    assert s.next_after(utc(2024, 1, 1, 10, 14, 59, 999)) == utc(2024, 1, 1, 10, 15)
    assert all(t % 1000 == 0 for t in upcoming(cron("* * * * * *"), 1_700_000_000_123, 5))


@pytest.mark.parametrize(
    ("expr", "after", "expected"),
    [
        (
            "0 0 31 * *",
            utc(2024, 1, 31),
            [utc(2024, 3, 31), utc(2024, 5, 31), utc(2024, 7, 31), utc(2024, 8, 31)],
        ),
        ("59 23 31 12 *", utc(2024, 6, 1), [utc(2024, 12, 31, 23, 59), utc(2025, 12, 31, 23, 59)]),
        ("0 0 1 1 *", utc(2024, 12, 31, 23, 59, 59), [utc(2025, 1, 1), utc(2026, 1, 1)]),
        ("0 12 29 2 *", utc(2024, 3, 1), [utc(2028, 2, 29, 12), utc(2032, 2, 29, 12)]),
        ("0 12 29 2 *", utc(2096, 3, 1), [utc(2104, 2, 29, 12)]),  # 2100 is not a leap year
        ("0 0 28-31 2 *", utc(2023, 1, 1), [utc(2023, 2, 28), utc(2024, 2, 28), utc(2024, 2, 29)]),
        ("0 0 30 * *", utc(2024, 1, 31), [utc(2024, 3, 30)]),  # skips February
        ("0 0 * * *", utc(2024, 2, 28, 12), [utc(2024, 2, 29), utc(2024, 3, 1)]),
        ("30 6 * 2 MON", utc(2024, 2, 26, 7), [utc(2025, 2, 3, 6, 30)]),  # next February Monday
        ("*/30 * * * * *", utc(2023, 12, 31, 23, 59, 45), [utc(2024, 1, 1), utc(2024, 1, 1, 0, 0, 30)]),
    ],
)
def test_next_after_across_month_and_year_ends(expr: str, after: int, expected: list[int]) -> None:
    assert upcoming(cron(expr), after, len(expected)) == expected


def test_dom_and_dow_both_restricted_match_either() -> None:
    # Friday the 13th in cron is "every 13th and every Friday".
    s = cron("0 0 13 * FRI")
    got = [datetime.fromtimestamp(t / 1000, UTC).date() for t in upcoming(s, utc(2024, 9, 1), 6)]
    assert got == [
        date(2024, 9, 6),
        date(2024, 9, 13),  # a Friday and the 13th: once
        date(2024, 9, 20),
        date(2024, 9, 27),
        date(2024, 10, 4),
        date(2024, 10, 11),
    ]
    assert utc(2024, 10, 13) in upcoming(s, utc(2024, 10, 12), 1)  # a Sunday, matched by day-of-month


def test_dom_or_dow_star_means_both_must_match() -> None:
    assert upcoming(cron("0 0 * * MON"), utc(2024, 1, 1), 2) == [utc(2024, 1, 8), utc(2024, 1, 15)]
    assert upcoming(cron("0 0 1 * ?"), utc(2024, 1, 1), 2) == [utc(2024, 2, 1), utc(2024, 3, 1)]
    # Vixie quirk: '*/2' counts as unrestricted, so this is "odd days that are Mondays".
    got = upcoming(cron("0 0 */2 * MON"), utc(2024, 1, 1), 3)
    assert got == [utc(2024, 1, 15), utc(2024, 1, 29), utc(2024, 2, 5)]


def test_sunday_is_0_and_7() -> None:
    assert upcoming(cron("0 0 * * 0"), utc(2024, 6, 1), 3) == upcoming(cron("0 0 * * 7"), utc(2024, 6, 1), 3)
    assert cron("0 0 * * 7").next_after(utc(2024, 6, 1)) == utc(2024, 6, 2)


def test_rare_but_valid_schedule_found_decades_later() -> None:
    # Feb 29 that is a Sunday ('*/7' = {0} but starts with '*', so both fields must match).
    s = cron("0 0 29 2 */7")
    assert s.next_after(utc(2021, 1, 1)) == utc(2032, 2, 29)
    assert s.next_after(utc(2032, 3, 1)) == utc(2060, 2, 29)


def test_upcoming() -> None:
    s = cron("0 9 * * MON-FRI", "Europe/Berlin")
    got = upcoming(s, utc(2024, 1, 5, 12), 3)  # Friday afternoon
    assert got == [utc(2024, 1, 8, 8), utc(2024, 1, 9, 8), utc(2024, 1, 10, 8)]
    assert upcoming(s, 0, 0) == []
    with pytest.raises(ValueError):
        upcoming(s, 0, -1)


def test_timezone_shifts_cron() -> None:
    after = utc(2024, 7, 1)
    assert cron("0 9 * * *", "UTC").next_after(after) == utc(2024, 7, 1, 9)
    assert cron("0 9 * * *", "Europe/Berlin").next_after(after) == utc(2024, 7, 1, 7)
    assert cron("0 9 * * *", "America/New_York").next_after(after) == utc(2024, 7, 1, 13)
    assert cron("0 9 * * *", "Asia/Kolkata").next_after(after) == utc(2024, 7, 1, 3, 30)


def test_next_in_chain_keeps_every_anchored_to_the_chain() -> None:
    every = parse_schedule("@every 1h")
    anchor = utc(2024, 1, 1, 10, 0, 7)
    assert next_in_chain(every, anchor, anchor) == anchor + HOUR
    assert next_in_chain(every, anchor, anchor - DAY) == anchor + HOUR
    assert next_in_chain(every, anchor, anchor + 30 * MIN) == anchor + HOUR
    assert next_in_chain(every, anchor, anchor + HOUR - 1) == anchor + HOUR
    assert next_in_chain(every, anchor, anchor + HOUR) == anchor + 2 * HOUR
    assert next_in_chain(every, anchor, anchor + 365 * DAY + 1) == anchor + (365 * 24 + 1) * HOUR
    c = cron("0 * * * *")
    assert next_in_chain(c, anchor, anchor - DAY) == utc(2024, 1, 1, 11)
    assert next_in_chain(c, anchor, utc(2024, 1, 2, 5, 30)) == utc(2024, 1, 2, 6)


# -------------------------------------------------------------------------------------- DST behaviour


@pytest.mark.parametrize(
    ("zone", "expr", "after", "expected"),
    [
        # America/New_York 2024-03-10: 02:00 EST -> 03:00 EDT (07:00Z). 02:30 does not exist: fires at 03:00.
        (
            "America/New_York",
            "30 2 * * *",
            utc(2024, 3, 9, 12),
            [utc(2024, 3, 10, 7), utc(2024, 3, 11, 6, 30)],
        ),
        # Several skipped times collapse into one firing at the transition instant.
        (
            "America/New_York",
            "0,30 2 * * *",
            utc(2024, 3, 9, 12),
            [utc(2024, 3, 10, 7), utc(2024, 3, 11, 6), utc(2024, 3, 11, 6, 30)],
        ),
        # 03:00 itself exists and is that same instant: one firing, not two.
        (
            "America/New_York",
            "30 2,3 * * *",
            utc(2024, 3, 10, 5),
            [utc(2024, 3, 10, 7), utc(2024, 3, 10, 7, 30)],
        ),
        (
            "America/New_York",
            "*/15 * * * *",
            utc(2024, 3, 10, 6, 30),
            [utc(2024, 3, 10, 6, 45), utc(2024, 3, 10, 7), utc(2024, 3, 10, 7, 15)],
        ),
        # 2024-11-03: 02:00 EDT -> 01:00 EST (06:00Z). 01:30 occurs twice: fires once, at the first (EDT).
        (
            "America/New_York",
            "30 1 * * *",
            utc(2024, 11, 2, 12),
            [utc(2024, 11, 3, 5, 30), utc(2024, 11, 4, 6, 30)],
        ),
        # Hourly cron: the repeated hour (06:00Z = 01:00 EST) does not fire again.
        (
            "America/New_York",
            "0 * * * *",
            utc(2024, 11, 3, 4),
            [utc(2024, 11, 3, 5), utc(2024, 11, 3, 7), utc(2024, 11, 3, 8)],
        ),
        # Europe/Berlin 2024-03-31: 02:00 CET -> 03:00 CEST (01:00Z).
        (
            "Europe/Berlin",
            "30 2 * * *",
            utc(2024, 3, 30, 12),
            [utc(2024, 3, 31, 1), utc(2024, 4, 1, 0, 30)],
        ),
        # 2024-10-27: 03:00 CEST -> 02:00 CET (01:00Z). 02:30 fires at 02:30 CEST only.
        (
            "Europe/Berlin",
            "30 2 * * *",
            utc(2024, 10, 26, 12),
            [utc(2024, 10, 27, 0, 30), utc(2024, 10, 28, 1, 30)],
        ),
        (
            "Europe/Berlin",
            "*/20 * * * *",
            utc(2024, 10, 27, 0, 30),
            [utc(2024, 10, 27, 0, 40), utc(2024, 10, 27, 2), utc(2024, 10, 27, 2, 20)],
        ),
        # Australia/Sydney 2024-10-06: 02:00 AEST -> 03:00 AEDT (2024-10-05 16:00Z).
        (
            "Australia/Sydney",
            "30 2 * * *",
            utc(2024, 10, 5, 0),
            [utc(2024, 10, 5, 16), utc(2024, 10, 6, 15, 30)],
        ),
        # 2024-04-07: 03:00 AEDT -> 02:00 AEST (2024-04-06 16:00Z). 02:30 fires at 02:30 AEDT.
        (
            "Australia/Sydney",
            "30 2 * * *",
            utc(2024, 4, 6, 0),
            [utc(2024, 4, 6, 15, 30), utc(2024, 4, 7, 16, 30)],
        ),
        # Australia/Lord_Howe shifts by 30 minutes: 2024-10-06 02:00 +10:30 -> 02:30 +11 (2024-10-05 15:30Z).
        (
            "Australia/Lord_Howe",
            "15 2 * * *",
            utc(2024, 10, 5, 0),
            [utc(2024, 10, 5, 15, 30), utc(2024, 10, 6, 15, 15)],
        ),
    ],
)
def test_dst_transitions(zone: str, expr: str, after: int, expected: list[int]) -> None:
    assert upcoming(cron(expr, zone), after, len(expected)) == expected


def test_dst_examples_in_local_terms() -> None:
    ny = cron("30 2 * * *", "America/New_York")
    assert ny.next_after(local("America/New_York", 2024, 3, 9, 3)) == local("America/New_York", 2024, 3, 10, 3)
    fb = cron("30 1 * * *", "America/New_York")
    first = local("America/New_York", 2024, 11, 3, 1, 30, fold=0)
    second = local("America/New_York", 2024, 11, 3, 1, 30, fold=1)
    assert second - first == HOUR
    assert fb.next_after(first - 1) == first
    assert fb.next_after(first) == local("America/New_York", 2024, 11, 4, 1, 30)


def test_next_after_from_inside_the_repeated_hour() -> None:
    s = cron("*/15 * * * *", "America/New_York")
    # 06:10Z is 01:10 EST, the second pass: 01:15..01:45 already fired in the first pass (EDT).
    assert s.next_after(utc(2024, 11, 3, 6, 10)) == utc(2024, 11, 3, 7)
    # 05:10Z is 01:10 EDT, the first pass: the rest of the hour still fires.
    assert s.next_after(utc(2024, 11, 3, 5, 10)) == utc(2024, 11, 3, 5, 15)
    secs = cron("* * * * * *", "America/New_York")
    assert secs.next_after(utc(2024, 11, 3, 6, 59, 58)) == utc(2024, 11, 3, 7)


def test_count_between_over_dst_day() -> None:
    every_second = cron("* * * * * *", "Europe/Berlin")
    # Spring-forward day: 23 hours of instants, and every instant has a wall time that matches.
    assert every_second.count_between(utc(2024, 3, 30, 23), utc(2024, 3, 31, 22)) == 23 * 3600
    # Fall-back day: 25 hours of instants, but the repeated hour's wall times already fired once.
    assert every_second.count_between(utc(2024, 10, 26, 22), utc(2024, 10, 27, 23)) == 24 * 3600
    quarter = cron("*/15 * * * *", "America/New_York")
    assert quarter.count_between(utc(2024, 3, 10, 6, 30), utc(2024, 3, 10, 7, 30)) == 4
    assert quarter.count_between(utc(2024, 11, 3, 5), utc(2024, 11, 3, 7, 30)) == 6


# Brute-force oracle for the DST rule: a matching wall time W fires at the first instant at which the local
# clock reads W or later. Walk the instants minute by minute; an instant fires when some matching wall
# minute lies between the highest wall time seen before it (exclusive) and its own wall time (inclusive).
TRANSITIONS = [
    ("America/New_York", utc(2024, 3, 10, 7)),
    ("America/New_York", utc(2024, 11, 3, 6)),
    ("Europe/Berlin", utc(2024, 3, 31, 1)),
    ("Europe/Berlin", utc(2024, 10, 27, 1)),
    ("Australia/Sydney", utc(2024, 4, 6, 16)),
    ("Australia/Sydney", utc(2024, 10, 5, 16)),
    ("Australia/Lord_Howe", utc(2024, 10, 5, 15, 30)),
    ("Australia/Lord_Howe", utc(2024, 4, 6, 15)),
    ("America/Santiago", utc(2024, 9, 8, 4)),  # 24:00 -> 01:00: the gap straddles midnight
    ("America/Santiago", utc(2024, 4, 7, 3)),
    ("Pacific/Apia", utc(2011, 12, 30, 10)),  # skipped a whole calendar day
]


def oracle_fires(expr: str, zone: str, start_ms: int, end_ms: int) -> list[int]:
    s = cron(expr, zone)
    tz = ZoneInfo(zone)

    def matches(w: datetime) -> bool:
        dow = (w.weekday() + 1) % 7
        return (
            w.minute in s.minute
            and w.hour in s.hour
            and w.month in s.month
            and w.day in s.day_of_month
            and dow in s.day_of_week
        )

    def wall_at(x: int) -> datetime:
        return datetime.fromtimestamp(x, tz).replace(tzinfo=None)

    # The highest wall time reached so far (start may be inside a repeated hour).
    seen = max(wall_at(x) for x in range(start_ms // 1000 - 4 * 3600, start_ms // 1000 + 1, 60))
    out: list[int] = []
    for x in range(start_ms // 1000 + 60, end_ms // 1000 + 1, 60):
        wall = wall_at(x)
        if wall > seen:
            w = seen + timedelta(minutes=1)
            while w <= wall:
                if matches(w):
                    out.append(x * 1000)
                    break
                w += timedelta(minutes=1)
            seen = wall
    return out


def fires_between(s: Schedule, start_ms: int, end_ms: int) -> list[int]:
    out: list[int] = []
    t = s.next_after(start_ms)
    while t <= end_ms:
        out.append(t)
        t = s.next_after(t)
    return out


minute_fields = st.sampled_from(["*", "*/15", "*/7", "0", "30", "0,30", "5-25/10", "59", "1,2,3"])
hour_fields = st.sampled_from(["*", "0", "1", "2", "3", "0-4", "1,2", "*/2", "2-3", "23", "22-23"])


@settings(max_examples=150, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    transition=st.sampled_from(TRANSITIONS),
    minute=minute_fields,
    hour=hour_fields,
    offset_min=st.integers(-30 * 60, 6 * 60),
)
def test_dst_rule_matches_brute_force_oracle(
    transition: tuple[str, int], minute: str, hour: str, offset_min: int
) -> None:
    zone, t = transition
    expr = f"{minute} {hour} * * *"
    start = t + offset_min * MIN
    end = start + 2 * DAY
    expected = oracle_fires(expr, zone, start, end)
    s = cron(expr, zone)
    assert fires_between(s, start, end) == expected
    assert s.count_between(start, end) == len(expected)
    if expected:
        assert s.last_at_or_before(end) == expected[-1]
        assert s.last_at_or_before(expected[0]) == expected[0]
        assert s.last_at_or_before(expected[0] - 1) is not None
        assert s.last_at_or_before(expected[0] - 1) < expected[0]  # type: ignore[operator]


@st.composite
def cron_fields(draw: st.DrawFn) -> tuple[str, tuple[set[int], ...], bool, bool]:
    """A random 5-field cron expression plus the value sets and star flags an independent matcher uses."""
    specs = [(0, 59, 59), (0, 23, 23), (1, 31, 31), (1, 12, 12), (0, 7, 6)]
    texts: list[str] = []
    sets: list[set[int]] = []
    for lo, hi, star_hi in specs:
        kind = draw(st.sampled_from(["star", "step", "range", "list", "rangestep"]))
        if kind == "star":
            text, values = "*", set(range(lo, star_hi + 1))
        elif kind == "step":
            n = draw(st.integers(1, hi))
            text, values = f"*/{n}", set(range(lo, star_hi + 1, n))
        elif kind == "list":
            picked = draw(st.lists(st.integers(lo, hi), min_size=1, max_size=4, unique=True))
            text, values = ",".join(map(str, picked)), set(picked)
        else:
            a = draw(st.integers(lo, hi))
            b = draw(st.integers(a, hi))
            n = draw(st.integers(1, 5)) if kind == "rangestep" else 1
            text = f"{a}-{b}" + (f"/{n}" if kind == "rangestep" else "")
            values = set(range(a, b + 1, n))
        texts.append(text)
        sets.append({0 if (hi == 7 and v == 7) else v for v in values})
    return " ".join(texts), tuple(sets), texts[2].startswith("*"), texts[4].startswith("*")


def brute_next_utc(sets: tuple[set[int], ...], dom_star: bool, dow_star: bool, after_ms: int) -> int | None:
    minutes, hours, doms, months, dows = sets
    start = datetime.fromtimestamp(after_ms // MIN * 60, UTC) + timedelta(minutes=1)
    day = start.date()
    for _ in range(366 * 30):
        dom_ok, dow_ok = day.day in doms, (day.weekday() + 1) % 7 in dows
        day_ok = (dom_ok and dow_ok) if (dom_star or dow_star) else (dom_ok or dow_ok)
        if day.month in months and day_ok:
            for h in sorted(hours):
                for m in sorted(minutes):
                    t = datetime(day.year, day.month, day.day, h, m, tzinfo=UTC)
                    if t >= start:
                        return int(t.timestamp()) * 1000
        day += timedelta(days=1)
    return None


@settings(max_examples=300, deadline=None, database=None)
@given(fields=cron_fields(), after=st.integers(utc(1990, 1, 1), utc(2090, 1, 1)))
def test_next_after_matches_brute_force_in_utc(
    fields: tuple[str, tuple[set[int], ...], bool, bool], after: int
) -> None:
    expr, sets, dom_star, dow_star = fields
    try:
        s = cron(expr)
    except ScheduleError as e:
        assert "never" in str(e)
        assert brute_next_utc(sets, dom_star, dow_star, after) is None
        return
    expected = brute_next_utc(sets, dom_star, dow_star, after)
    assert expected is not None
    got = s.next_after(after)
    assert got == expected
    # Consistency of the inverse searches.
    assert s.last_at_or_before(got) == got
    assert s.count_between(after, got) == 1
    assert s.count_between(after, got - 1) == 0


# -------------------------------------------------------------------------------------- misfire planning


def test_fire_all_fires_every_missed_occurrence() -> None:
    s = parse_schedule("@every 1m")
    t0 = utc(2024, 1, 1, 10)
    plan = plan_misfire(s, t0, t0 + 5 * MIN + 30_000, "fire_all", 0)
    assert plan == MisfirePlan(fire=[t0 + k * MIN for k in range(6)], skipped=[], next_ms=t0 + 6 * MIN)


def test_fire_all_over_cap_skips_the_excess() -> None:
    s = parse_schedule("@every 1m")
    t0 = utc(2024, 1, 1, 10)
    plan = plan_misfire(s, t0, t0 + 5 * MIN, "fire_all", 0, cap=4)
    assert plan.fire == [t0, t0 + MIN, t0 + 2 * MIN, t0 + 3 * MIN]
    assert plan.skipped == [(t0 + 4 * MIN, "misfire: over cap"), (t0 + 5 * MIN, "misfire: over cap")]
    assert plan.next_ms == t0 + 6 * MIN


def test_fire_once_on_time_fires_just_the_occurrence() -> None:
    s = cron("*/5 * * * *")
    t0 = utc(2024, 1, 1, 10)
    plan = plan_misfire(s, t0, t0 + 200, "fire_once", 1000)
    assert plan == MisfirePlan(fire=[t0], skipped=[], next_ms=t0 + 5 * MIN)
    # Exactly max_lateness late is not late.
    plan = plan_misfire(s, t0, t0 + 1000, "fire_once", 1000)
    assert plan.fire == [t0]


def test_fire_once_not_late_fires_all_considered() -> None:
    s = cron("*/5 * * * *")
    t0 = utc(2024, 1, 1, 10)
    plan = plan_misfire(s, t0, t0 + 11 * MIN, "fire_once", 11 * MIN)
    assert plan.fire == [t0, t0 + 5 * MIN, t0 + 10 * MIN]
    assert plan.skipped == []


def test_fire_once_late_coalesces_into_the_most_recent() -> None:
    s = cron("*/5 * * * *")
    t0 = utc(2024, 1, 1, 10)
    plan = plan_misfire(s, t0, t0 + 17 * MIN, "fire_once", 60_000)
    assert plan.fire == [t0 + 15 * MIN]
    reason = "misfire: coalesced (fire_once)"
    assert plan.skipped == [(t0, reason), (t0 + 5 * MIN, reason), (t0 + 10 * MIN, reason)]
    assert plan.next_ms == t0 + 20 * MIN
    # Late but nothing else due: the one occurrence still fires.
    plan = plan_misfire(s, t0, t0 + 3 * MIN, "fire_once", 0)
    assert plan == MisfirePlan(fire=[t0], skipped=[], next_ms=t0 + 5 * MIN)


def test_skip_fires_only_the_occurrences_within_max_lateness() -> None:
    s = parse_schedule("@every 10s")
    t0 = utc(2024, 1, 1, 10)
    now = t0 + 60_000
    plan = plan_misfire(s, t0, now, "skip", 25_000)
    late = "misfire: later than max_lateness_s"
    assert plan.skipped == [(t0, late), (t0 + 10_000, late), (t0 + 20_000, late), (t0 + 30_000, late)]
    assert plan.fire == [t0 + 40_000, t0 + 50_000, t0 + 60_000]  # now - 35 s is late, now - 25 s is not
    assert plan.next_ms == t0 + 70_000


def test_skip_everything_late_fires_nothing() -> None:
    s = cron("0 * * * *")
    t0 = utc(2024, 1, 1, 10)
    plan = plan_misfire(s, t0, t0 + 30 * MIN, "skip", 60_000)
    assert plan == MisfirePlan(
        fire=[], skipped=[(t0, "misfire: later than max_lateness_s")], next_ms=utc(2024, 1, 1, 11)
    )


def test_skip_with_over_cap_and_late_keeps_chronological_order() -> None:
    s = parse_schedule("@every 1s")
    t0 = 1_000_000
    plan = plan_misfire(s, t0, t0 + 9000, "skip", 5000, cap=3)
    late, over = "misfire: later than max_lateness_s", "misfire: over cap"
    assert plan.fire == [t0 + 4000, t0 + 5000, t0 + 6000]
    assert plan.skipped == [
        (t0, late),
        (t0 + 1000, late),
        (t0 + 2000, late),
        (t0 + 9000, "misfire: 4 more occurrences skipped"),  # t0+3000 (late), t0+7000..9000 (over cap)
    ]
    assert over not in [r for _, r in plan.skipped]


def test_scheduled_occurrence_off_the_cron_grid_is_still_considered() -> None:
    s = cron("0 * * * *")
    t0 = utc(2024, 1, 1, 10, 17)  # e.g. the job's first fire time chosen at submission
    plan = plan_misfire(s, t0, utc(2024, 1, 1, 12, 5), "fire_all", 0)
    assert plan.fire == [t0, utc(2024, 1, 1, 11), utc(2024, 1, 1, 12)]
    assert plan.next_ms == utc(2024, 1, 1, 13)


def test_clock_behind_scheduled_time_fires_the_occurrence() -> None:
    s = parse_schedule("@every 1m")
    t0 = utc(2024, 1, 1, 10)
    for policy in ("fire_all", "fire_once", "skip"):
        assert plan_misfire(s, t0, t0 - 50, policy, 0) == MisfirePlan(fire=[t0], skipped=[], next_ms=t0 + MIN)


def test_plan_misfire_rejects_bad_arguments() -> None:
    s = parse_schedule("@every 1m")
    with pytest.raises(ValueError, match="unknown misfire policy"):
        plan_misfire(s, 0, 0, "fire_twice", 0)
    with pytest.raises(ValueError):
        plan_misfire(s, 0, 0, "skip", 0, cap=0)
    with pytest.raises(ValueError):
        plan_misfire(s, 0, 0, "skip", -1)


@pytest.mark.parametrize("policy", ["fire_all", "fire_once", "skip"])
def test_huge_gap_every_second_after_a_day_down_is_fast_and_capped(policy: str) -> None:
    s = parse_schedule("@every 1s")
    t0 = utc(2024, 1, 1)
    now = t0 + DAY
    started = time.perf_counter()
    plan = plan_misfire(s, t0, now, policy, 60_000, cap=1000)
    assert time.perf_counter() - started < 0.5
    total = DAY // 1000 + 1
    assert plan.next_ms == now + 1000
    assert len(plan.skipped) <= 1001
    summary_t, summary = plan.skipped[-1]
    assert summary.startswith("misfire: ") and summary.endswith(" more occurrences skipped")
    more = int(summary.split()[1])
    assert len(plan.fire) + len(plan.skipped) - 1 + more == total
    if policy == "fire_all":
        assert plan.fire == [t0 + k * 1000 for k in range(1000)]
        assert summary_t == now
    elif policy == "fire_once":
        assert plan.fire == [now]
        assert summary_t == now - 1000
        assert plan.skipped[0] == (t0, "misfire: coalesced (fire_once)")
    else:
        assert plan.fire == [now - 60_000 + k * 1000 for k in range(61)]
        assert summary_t == now - 61_000
        assert plan.skipped[999] == (t0 + 999_000, "misfire: later than max_lateness_s")


@pytest.mark.parametrize(
    ("expr", "zone", "start", "end", "per_occurrence_ms"),
    [
        ("* * * * * *", "UTC", utc(2024, 1, 1), utc(2024, 1, 2), 1000),
        ("*/5 * * * *", "UTC", utc(2020, 1, 1), utc(2025, 1, 1), 5 * MIN),
        ("0 * * * *", "Asia/Tokyo", utc(2015, 1, 1), utc(2025, 1, 1), HOUR),
    ],
)
def test_huge_gap_cron_is_fast_and_counted_exactly(
    expr: str, zone: str, start: int, end: int, per_occurrence_ms: int
) -> None:
    s = cron(expr, zone)
    started = time.perf_counter()
    plan = plan_misfire(s, start, end, "fire_all", 0, cap=1000)
    assert time.perf_counter() - started < 1.0
    total = (end - start) // per_occurrence_ms + 1
    more = int(plan.skipped[-1][1].split()[1])
    assert len(plan.fire) == 1000 and len(plan.skipped) == 1001
    assert 1000 + 1000 + more == total
    assert plan.skipped[-1][0] == end
    assert plan.next_ms == end + per_occurrence_ms


def test_huge_gap_cron_over_dst_counts_fall_back_hours_once() -> None:
    s = cron("* * * * * *", "Europe/Berlin")
    start, end = utc(2014, 3, 30), utc(2024, 4, 1)
    started = time.perf_counter()
    plan = plan_misfire(s, start, end, "fire_once", 0)
    assert time.perf_counter() - started < 1.0
    assert plan.fire == [end]
    more = int(plan.skipped[-1][1].split()[1])
    fall_backs = 10  # October 2014 .. October 2023: each repeated hour fires once, not twice
    assert 1 + 1000 + more == (end - start) // 1000 + 1 - fall_backs * 3600


def materialised(schedule: Schedule, start: int, now: int) -> list[int]:
    out = [start]
    t = schedule.next_after(start)
    while t <= now:
        out.append(t)
        t = schedule.next_after(t)
    return out


@settings(max_examples=200, deadline=None, database=None)
@given(
    expr=st.sampled_from(["*/10 * * * *", "0 */2 * * *", "30 1,2 * * *", "@every 7m", "@every 45s", "0 2 * * *"]),
    zone=st.sampled_from(["UTC", "America/New_York", "Europe/Berlin", "Australia/Lord_Howe"]),
    start=st.sampled_from([utc(2024, 3, 10, 5), utc(2024, 11, 3, 4, 50), utc(2024, 3, 30, 23, 10)]),
    gap_min=st.integers(0, 600),
    lateness_min=st.integers(0, 120),
    policy=st.sampled_from(["fire_all", "fire_once", "skip"]),
    cap=st.integers(1, 8),
)
def test_plan_matches_reference_implementation(
    expr: str, zone: str, start: int, gap_min: int, lateness_min: int, policy: str, cap: int
) -> None:
    s = parse_schedule(expr, zone)
    now = start + gap_min * MIN + 123
    lateness = lateness_min * MIN
    considered = materialised(s, start, now)
    late = [o for o in considered if now - o > lateness]
    # Reference: straightforward list processing over the materialised occurrences.
    if policy == "fire_all":
        to_fire, skipped = considered, []
    elif policy == "fire_once":
        if late:
            to_fire = considered[-1:]
            skipped = [(o, "misfire: coalesced (fire_once)") for o in considered[:-1]]
        else:
            to_fire, skipped = considered, []
    else:
        to_fire = [o for o in considered if o not in late]
        skipped = [(o, "misfire: later than max_lateness_s") for o in late]
    skipped = sorted(skipped + [(o, "misfire: over cap") for o in to_fire[cap:]])
    to_fire = to_fire[:cap]
    if len(skipped) > cap:
        skipped = [
            *skipped[:cap],
            (skipped[-1][0], f"misfire: {len(skipped) - cap} more occurrences skipped"),
        ]
    plan = plan_misfire(s, start, now, policy, lateness, cap=cap)
    assert plan.fire == to_fire
    assert plan.skipped == skipped
    assert plan.next_ms == s.next_after(considered[-1])
    assert plan.next_ms > now
