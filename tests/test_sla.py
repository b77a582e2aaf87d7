"""SLA arithmetic (R-22), fed plain data: exact numbers for thresholds, month lengths,
boundaries, maintenance windows, gaps in probing and the ledger's torn lines."""

from __future__ import annotations

import datetime as dt
import zoneinfo
from fractions import Fraction

import pytest

from appliance import monitor
from appliance.monitor import Probe, Window

UTC = dt.timezone.utc
SHANGHAI = zoneinfo.ZoneInfo("Asia/Shanghai")
STEP = 30  # the default probe interval


def ts(text: str, tz: dt.tzinfo = UTC) -> int:
    """'2026-06-10 12:00:00' in ``tz`` -> unix seconds."""
    return int(dt.datetime.fromisoformat(text).replace(tzinfo=tz).timestamp())


def probes(lo: int, hi: int, down: list[tuple[int, int]] = (), step: int = STEP,
           skip: list[tuple[int, int]] = ()) -> list[Probe]:
    """A probe every ``step`` s over [lo, hi); failed inside each ``down`` [start, end), with probes
    exactly at each start and end; none inside each ``skip`` (start, end) (open interval)."""
    times = set(range(lo, hi, step)) | {t for pair in down for t in pair if lo <= t < hi}
    times = {t for t in times if not any(s < t < e for s, e in skip)}
    return [Probe(t, not any(s <= t < e for s, e in down)) for t in sorted(times)]


def report(data, year, month, *, windows=(), tz=UTC, now=None, min_minutes=5, target=99.9):
    lo, hi = monitor.month_bounds(year, month, tz)
    return monitor.month_report(data, list(windows), year, month, tz=tz, interval=STEP,
                                min_outage_seconds=min_minutes * 60, target_percent=target,
                                now=hi + 3600 if now is None else now)


def whole_month(year, month, tz=UTC, **kwargs):
    lo, hi = monitor.month_bounds(year, month, tz)
    # A day either side, as report_for_month reads around the month.
    return probes(lo - 86400, hi + 86400, **kwargs)


# ----------------------------------------------------------------------------- the 5-minute threshold

def test_an_outage_of_4_min_59_s_does_not_count():
    start = ts("2026-06-10 12:00:00")
    r = report(whole_month(2026, 6, down=[(start, start + 299)]), 2026, 6)
    assert [(o["start"], o["end"], o["kind"]) for o in r.outages] == [(start, start + 299, "short")]
    assert r.counted_seconds == 0 and r.short_seconds == 299
    assert r.outages_counted == 0 and r.outages_short == 1
    assert r.availability == 1 and r.verdict == "met" and r.compensation_seconds == 0
    assert r.budget_left_seconds == Fraction(2592)


def test_an_outage_of_5_min_0_s_counts_whole():
    start = ts("2026-06-10 12:00:00")
    r = report(whole_month(2026, 6, down=[(start, start + 300)]), 2026, 6)
    assert r.counted_seconds == 300 and r.outages_counted == 1 and r.outages_short == 0
    assert r.availability == 1 - Fraction(300, 30 * 86400)
    assert r.to_dict()["availability_percent"] == 99.9884  # 1 - 5/43200
    assert r.budget_left_seconds == Fraction(2592 - 300)  # 43.2 - 5 = 38.2 minutes
    assert r.to_dict()["budget_left_minutes"] == 38.2
    assert r.verdict == "met" and r.compensation_seconds == 0


def test_the_minimum_is_configurable():
    start = ts("2026-06-10 12:00:00")
    data = whole_month(2026, 6, down=[(start, start + 90)])
    assert report(data, 2026, 6, min_minutes=5).counted_seconds == 0
    assert report(data, 2026, 6, min_minutes=1).counted_seconds == 90
    assert report(data, 2026, 6, min_minutes=0).counted_seconds == 90


def test_outage_runs_from_first_failed_probe_to_first_success():
    lo = ts("2026-06-10 12:00:00")
    # Regular probes: ok at 12:00:00, failed at :30, 13:01:00, 13:01:30, ok at 13:02:00.
    data = [Probe(lo + i * 30, ok) for i, ok in enumerate([True, False, False, False, False, True, True])]
    segments = monitor.build_timeline(data, interval=30, now=lo + 7 * 30)
    assert [(s.start - lo, s.end - lo, s.state) for s in segments] == [
        (0, 30, "up"), (30, 150, "down"), (150, 210, "up")]


# ----------------------------------------------------------------------------- month lengths

@pytest.mark.parametrize("year,month,days,budget_minutes", [
    (2026, 2, 28, Fraction("40.32")),
    (2028, 2, 29, Fraction("41.76")),
    (2026, 4, 30, Fraction("43.2")),
    (2026, 1, 31, Fraction("44.64")),
])
def test_budget_is_exact_for_28_29_30_and_31_day_months(year, month, days, budget_minutes):
    start = ts(f"{year}-{month:02d}-15 03:00:00")
    r = report(whole_month(year, month, down=[(start, start + 1800)]), year, month)
    assert r.minutes_in_month == days * 1440
    assert r.budget_seconds == budget_minutes * 60
    assert r.to_dict()["budget_minutes"] == float(budget_minutes)
    assert r.counted_seconds == 1800
    assert r.availability == 1 - Fraction(1800, days * 86400)
    assert r.budget_left_seconds == budget_minutes * 60 - 1800
    assert r.unknown_seconds == 0 and r.worst_case_seconds == 1800
    assert r.probes == days * 2880 and r.failed_probes == 60


def test_a_month_with_a_clock_change_has_its_real_length():
    berlin = zoneinfo.ZoneInfo("Europe/Berlin")
    r = report(whole_month(2026, 3, tz=berlin), 2026, 3, tz=berlin)
    assert r.minutes_in_month == 31 * 1440 - 60  # the clocks skip an hour on 29 March
    assert r.budget_seconds == Fraction("44.58") * 60


def test_exactly_the_budget_is_met_one_second_more_is_missed_and_compensated():
    start = ts("2026-06-10 12:00:00")
    met = report(whole_month(2026, 6, down=[(start, start + 2592)]), 2026, 6)
    assert met.counted_seconds == 2592 and met.availability == Fraction(999, 1000)
    assert met.verdict == "met" and met.compensation_seconds == 0 and met.budget_left_seconds == 0
    missed = report(whole_month(2026, 6, down=[(start, start + 2593)]), 2026, 6)
    assert missed.verdict == "missed"
    assert missed.compensation_seconds == 2593  # equal to the counted downtime, not just the excess
    assert missed.budget_left_seconds == 0


def test_compensation_counts_every_counted_outage_but_not_the_short_ones():
    day = ts("2026-06-10 00:00:00")
    down = [(day + 3600, day + 3600 + 1500), (day + 7200, day + 7200 + 1500), (day + 9000, day + 9000 + 240)]
    r = report(whole_month(2026, 6, down=down), 2026, 6)
    assert (r.outages_counted, r.outages_short) == (2, 1)
    assert r.counted_seconds == 3000 and r.short_seconds == 240
    assert r.verdict == "missed" and r.compensation_seconds == 3000
    assert r.to_dict()["compensation_minutes"] == 50.0


# ----------------------------------------------------------------------------- month boundaries

def test_an_outage_across_a_month_boundary_is_judged_whole_and_split():
    # 6 minutes: 3 in January, 3 in February. Each part alone is under 5 minutes; the outage is not.
    start, end = ts("2026-01-31 23:57:00"), ts("2026-02-01 00:03:00")
    data = probes(ts("2026-01-01 00:00:00"), ts("2026-03-01 00:00:00"), down=[(start, end)])
    jan, feb = report(data, 2026, 1), report(data, 2026, 2)
    assert jan.counted_seconds == 180 and feb.counted_seconds == 180
    assert jan.outages[0]["minutes"] == 6.0 and jan.outages[0]["minutes_in_month"] == 3.0
    assert feb.outages[0]["kind"] == "counted" and feb.outages[0]["start"] == start


def test_a_short_outage_across_a_boundary_counts_in_neither_month():
    start, end = ts("2026-01-31 23:58:00"), ts("2026-02-01 00:02:00")
    data = probes(ts("2026-01-01 00:00:00"), ts("2026-03-01 00:00:00"), down=[(start, end)])
    assert report(data, 2026, 1).counted_seconds == 0 == report(data, 2026, 2).counted_seconds
    assert report(data, 2026, 1).short_seconds == 120 == report(data, 2026, 2).short_seconds


def test_months_follow_the_appliance_time_zone():
    # Midnight 1 February in Shanghai is 16:00 UTC on 31 January.
    start, end = ts("2026-01-31 23:50:00", SHANGHAI), ts("2026-02-01 00:20:00", SHANGHAI)
    data = probes(ts("2026-01-01 00:00:00"), ts("2026-03-01 00:00:00"), down=[(start, end)])
    jan, feb = report(data, 2026, 1, tz=SHANGHAI), report(data, 2026, 2, tz=SHANGHAI)
    assert jan.start == ts("2026-01-01 00:00:00", SHANGHAI) and jan.end == ts("2026-01-31 16:00:00")
    assert (jan.counted_seconds, feb.counted_seconds) == (600, 1200)


# ----------------------------------------------------------------------------- maintenance windows

def win(start: str, end: str, wid: int = 1) -> Window:
    return Window(wid, ts(start), ts(end), "Upgrade")


def test_the_overlap_with_a_maintenance_window_is_subtracted():
    # Down 01:57 to 03:03 around a 02:00-03:00 window: 6 minutes outside it count.
    down = [(ts("2026-06-10 01:57:00"), ts("2026-06-10 03:03:00"))]
    r = report(whole_month(2026, 6, down=down), 2026, 6, windows=[win("2026-06-10 02:00", "2026-06-10 03:00")])
    assert r.counted_seconds == 360 and r.excused_seconds == 3600 and r.window_seconds == 3600
    assert r.outages[0]["minutes"] == 66.0 and r.outages[0]["minutes_outside_windows"] == 6.0
    assert r.outages[0]["kind"] == "counted"
    states = [(s.start, s.end, s.state) for s in r.segments if s.state != "up"]
    assert states == [(ts("2026-06-10 01:57:00"), ts("2026-06-10 02:00:00"), "down"),
                      (ts("2026-06-10 02:00:00"), ts("2026-06-10 03:00:00"), "excused"),
                      (ts("2026-06-10 03:00:00"), ts("2026-06-10 03:03:00"), "down")]


def test_an_overrun_under_the_minimum_does_not_count():
    down = [(ts("2026-06-10 02:00:00"), ts("2026-06-10 03:04:59"))]
    r = report(whole_month(2026, 6, down=down), 2026, 6, windows=[win("2026-06-10 02:00", "2026-06-10 03:00")])
    assert r.counted_seconds == 0 and r.short_seconds == 299 and r.outages[0]["kind"] == "short"
    down = [(ts("2026-06-10 02:00:00"), ts("2026-06-10 03:05:00"))]
    r = report(whole_month(2026, 6, down=down), 2026, 6, windows=[win("2026-06-10 02:00", "2026-06-10 03:00")])
    assert r.counted_seconds == 300


def test_downtime_inside_a_window_is_excused_and_overlapping_windows_count_once():
    down = [(ts("2026-06-10 02:10:00"), ts("2026-06-10 03:20:00"))]
    windows = [win("2026-06-10 02:00", "2026-06-10 03:00", 1), win("2026-06-10 02:30", "2026-06-10 03:30", 2)]
    r = report(whole_month(2026, 6, down=down), 2026, 6, windows=windows)
    assert r.counted_seconds == 0 and r.outages_excused == 1 and r.excused_seconds == 4200
    assert r.window_seconds == 5400
    assert r.availability == 1 and r.verdict == "met"


def test_a_window_across_the_month_boundary_excuses_both_sides():
    down = [(ts("2026-06-30 23:00:00"), ts("2026-07-01 01:00:00"))]
    windows = [win("2026-06-30 23:30", "2026-07-01 00:30")]
    data = probes(ts("2026-06-01 00:00:00"), ts("2026-08-01 00:00:00"), down=down)
    june, july = report(data, 2026, 6, windows=windows), report(data, 2026, 7, windows=windows)
    assert (june.counted_seconds, june.excused_seconds, june.window_seconds) == (1800, 1800, 1800)
    assert (july.counted_seconds, july.excused_seconds, july.window_seconds) == (1800, 1800, 1800)


# ----------------------------------------------------------------------------- gaps in probing

def test_a_gap_of_three_intervals_is_known_a_longer_one_is_unknown():
    t = ts("2026-06-10 12:00:00")
    known = monitor.build_timeline([Probe(t, True), Probe(t + 90, True)], interval=30, now=t + 100)
    assert [(s.start - t, s.end - t, s.state) for s in known] == [(0, 100, "up")]
    gap = monitor.build_timeline([Probe(t, True), Probe(t + 91, True)], interval=30, now=t + 100)
    assert [(s.start - t, s.end - t, s.state) for s in gap] == [(0, 91, "unknown"), (91, 100, "up")]


def test_gaps_in_probing_are_unknown_not_up():
    skip = [(ts("2026-06-10 10:00:00"), ts("2026-06-10 12:00:00"))]
    r = report(whole_month(2026, 6, skip=skip), 2026, 6)
    assert r.unknown_periods == ((ts("2026-06-10 10:00:00"), ts("2026-06-10 12:00:00")),)
    assert r.unknown_seconds == 7200 and r.counted_seconds == 0
    assert r.availability == 1  # as measured: unknown is not counted as downtime ...
    assert r.worst_case_seconds == 7200  # ... but the worst case counts it
    assert r.worst_case_availability == 1 - Fraction(7200, 30 * 86400)
    assert r.verdict == "undetermined"  # 120 minutes unknown > the 43.2-minute budget
    assert r.compensation_seconds == 0


def test_a_short_gap_is_unknown_but_below_the_minimum_even_in_the_worst_case():
    skip = [(ts("2026-06-10 10:00:00"), ts("2026-06-10 10:04:00"))]
    r = report(whole_month(2026, 6, skip=skip), 2026, 6)
    assert r.unknown_seconds == 240 and r.worst_case_seconds == 0 and r.verdict == "met"


def test_unknown_time_next_to_an_outage_joins_it_in_the_worst_case_only():
    # Failing from 10:00 to 10:03, then no probes until a success at 11:00 (the host went off?).
    fail, last_fail, back = ts("2026-06-10 10:00:00"), ts("2026-06-10 10:03:00"), ts("2026-06-10 11:00:00")
    lo, hi = monitor.month_bounds(2026, 6, UTC)
    data = [p for p in probes(lo - 86400, hi + 86400) if not fail <= p.t < back]
    data += [Probe(t, False) for t in range(fail, last_fail + 1, 30)] + [Probe(back, True)]
    r = report(data, 2026, 6)
    assert [(o["start"], o["end"], o["kind"]) for o in r.outages] == [(fail, last_fail, "short")]
    assert r.unknown_periods == ((last_fail, back),)
    assert r.counted_seconds == 0 and r.worst_case_seconds == back - fail == 3600
    assert r.verdict == "undetermined"


def test_a_month_without_any_probe_is_all_unknown():
    r = report([], 2026, 6)
    assert r.unknown_seconds == 30 * 86400 and r.probes == 0
    assert r.availability == 1 and r.worst_case_availability == 0 and r.verdict == "undetermined"


def test_time_before_the_first_probe_ever_is_not_unknown():
    # Installed on 15 June at 12:00: the first half of the month was not watched, and not owed either.
    first = ts("2026-06-15 12:00:00")
    lo, hi = monitor.month_bounds(2026, 6, UTC)
    data = probes(first, hi + 86400)
    r = report(data, 2026, 6)
    assert r.unknown_seconds == first - lo and r.verdict == "undetermined"  # without knowing when monitoring began
    lo, hi = monitor.month_bounds(2026, 6, UTC)
    r = monitor.month_report(data, [], 2026, 6, tz=UTC, interval=STEP, min_outage_seconds=300, target_percent=99.9,
                             now=hi + 3600, monitored_from=first)
    assert r.unknown_seconds == 0 and r.before_seconds == first - lo == 14 * 86400 + 43200
    assert r.verdict == "met" and r.budget_seconds == 2592  # a part month is budgeted as a whole one (003 §1.2)
    assert r.segments[0] == monitor.Segment(lo, first, "before") and r.segments[1].state == "up"
    # A month wholly before monitoring began.
    may = monitor.month_report(data, [], 2026, 5, tz=UTC, interval=STEP, min_outage_seconds=300, target_percent=99.9,
                               now=hi + 3600, monitored_from=first)
    assert may.unknown_seconds == 0 and may.before_seconds == 31 * 86400 and may.verdict == "met"


def test_unknown_time_inside_a_window_is_not_reported_as_unknown():
    skip = [(ts("2026-06-10 02:00:00"), ts("2026-06-10 04:00:00"))]
    r = report(whole_month(2026, 6, skip=skip), 2026, 6, windows=[win("2026-06-10 02:00", "2026-06-10 03:00")])
    assert r.unknown_seconds == 3600 and r.worst_case_seconds == 3600


# ----------------------------------------------------------------------------- a month in progress

def test_a_month_in_progress_counts_until_now_and_an_ongoing_outage():
    lo, hi = monitor.month_bounds(2026, 6, UTC)
    now = ts("2026-06-10 12:10:00")
    data = probes(lo - 86400, now, down=[(ts("2026-06-10 12:00:00"), now + 1)])
    r = report(data, 2026, 6, now=now)
    assert r.in_progress and r.unknown_seconds == 0
    assert r.counted_seconds == 600 and r.outages[0]["ongoing"] is True
    assert r.segments[-1] == monitor.Segment(now, hi, "future")


def test_a_future_month_is_all_future_and_not_unknown():
    r = report([], 2026, 7, now=ts("2026-06-10 12:00:00"))
    assert r.unknown_seconds == 0 and r.availability == 1 and r.verdict == "met"
    assert [(s.state, s.end - s.start) for s in r.segments] == [("future", 31 * 86400)]


# ----------------------------------------------------------------------------- the ledger

def test_a_torn_last_line_is_ignored():
    data = b"1781092800 1 12 200\n1781092830 0 5003 timeout\n1781092860 1 1"
    found, malformed = monitor.parse_ledger(data)
    assert found == [Probe(1781092800, True, 12, "200"), Probe(1781092830, False, 5003, "timeout")]
    assert malformed == 0


def test_malformed_lines_are_skipped_and_counted():
    data = b"1781092800 1 12 200\ngarbage\n1781092830 2 5 x\n\n1781092860 0 7 refused\n"
    found, malformed = monitor.parse_ledger(data)
    assert [p.t for p in found] == [1781092800, 1781092860] and malformed == 3


def test_appending_after_a_torn_line_keeps_the_fragment_out(tmp_path):
    directory = tmp_path / "monitor"
    directory.mkdir()
    t = ts("2026-06-10 12:00:00")
    path = directory / "probes-2026-06.log"
    path.write_bytes(f"{t} 1 12 200\n{t + 30} 1 1".encode())  # the second write was cut off
    monitor.append_probe(directory, Probe(t + 60, False, 5003, "timeout"))
    assert path.read_bytes() == f"{t} 1 12 200\n{t + 30} 1 1#\n{t + 60} 0 5003 timeout\n".encode()
    found, malformed = monitor.read_ledger(directory, t - 1, t + 3600)
    assert found == [Probe(t, True, 12, "200"), Probe(t + 60, False, 5003, "timeout")] and malformed == 1


def test_probes_go_to_one_file_per_utc_month(tmp_path):
    directory = tmp_path / "monitor"
    for t in (ts("2026-06-30 23:59:59"), ts("2026-07-01 00:00:00")):
        monitor.append_probe(directory, Probe(t, True, 3, "200"))
    assert sorted(p.name for p in directory.iterdir()) == ["probes-2026-06.log", "probes-2026-07.log"]
    found, _ = monitor.read_ledger(directory, ts("2026-06-01 00:00:00"), ts("2026-08-01 00:00:00"))
    assert [p.t for p in found] == [ts("2026-06-30 23:59:59"), ts("2026-07-01 00:00:00")]


# ----------------------------------------------------------------------------- small helpers

def test_announced_windows_for_the_banner():
    now = ts("2026-06-10 12:00:00")
    soon, later = Window(1, now + 3600, now + 7200, "a"), Window(2, now + 30 * 3600, now + 31 * 3600, "b")
    running, past = Window(3, now - 60, now + 60, "c"), Window(4, now - 7200, now - 3600, "d")
    assert monitor.announced([soon, later, running, past], now, 24) == [(running, True), (soon, False)]
    assert monitor.announced([soon], now, 0) == []


@pytest.mark.parametrize("text", ["2026-13", "26-01", "2026-1", "", "June"])
def test_bad_months_are_refused(text):
    with pytest.raises(monitor.MonitorError, match="expected YYYY-MM such as 2026-02"):
        monitor.parse_month(text)


def test_month_arithmetic():
    assert monitor.parse_month("2026-02") == (2026, 2)
    assert monitor.shift_month(2026, 1, -1) == (2025, 12) and monitor.shift_month(2026, 12, 1) == (2027, 1)
