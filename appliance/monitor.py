"""Uptime probe, SLA ledger and maintenance windows (R-22, R-2; issue 5).

Everything lives in files under ``<data_dir>/monitor/``, not in the database: the ledger
must go on recording while PostgreSQL is down, and the CLI, the web app and the
diagnostics bundle must all read it without a database.

``probes-YYYY-MM.log``
    The ledger: one line per probe, one file per UTC month, append-only::

        1767225600 1 12 200
        1767225630 0 5003 timeout

    unix seconds (UTC), 1 = usable / 0 = not, latency in ms, detail (the HTTP status and
    the failing checks of /healthz, or timeout, refused, tls, dns, reset, error). A line is
    written with one ``write`` and fsynced; a last line without its newline (a torn write)
    is ignored on reading, and the next append ends it with ``#`` (skipped too) first.

``maintenance.json``
    Announced maintenance windows, in UTC, replaced atomically (temp file + rename).

The arithmetic (``build_timeline``, ``find_outages``, ``month_report``) is pure: plain data
in, a report out. How it counts is explained, with a worked example, in docs/sla.md:

- a probe's result stands for the time until the next probe; when the next probe comes
  more than ``GAP_FACTOR`` intervals later, the whole gap is *unknown*;
- an outage runs from its first failed probe to the first successful probe after it;
- time inside maintenance windows is excused; an outage counts when its time outside
  windows is at least ``[monitor] outage_min_minutes``, and then all of that time counts,
  split between calendar months (in ``[web] timezone``) where it crosses a boundary;
- unknown time is reported separately and is not counted as downtime; the worst case
  (unknown counted as down, under the same rules) is reported next to the measurement.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import errno
import fcntl
import http.client
import json
import logging
import os
import re
import socket
import ssl
import tempfile
import time
import urllib.error
import urllib.request
import zoneinfo
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import NamedTuple
from urllib.parse import urlsplit

from appliance.config import Settings
from appliance.errors import ApplianceError
from appliance.files import fsync_dir

log = logging.getLogger(__name__)

MONITOR_DIR = "monitor"
WINDOWS_FILE = "maintenance.json"
LEDGER_PATTERN = re.compile(r"^probes-(\d{4})-(\d{2})\.log$")
# Ends a torn last line before the next append; a line holding it is skipped on reading.
TORN_MARK = b"#"
# A gap between probes longer than this many intervals is time nobody watched.
GAP_FACTOR = 3
# /healthz may answer 503 for a low disk or a stale scheduler heartbeat while seat users
# can still work: the service counts as usable when these two checks pass.
SERVING_CHECKS = ("web", "database")
# A window longer than this is almost surely a typo (a year off), and would hide outages.
MAX_WINDOW_SECONDS = 7 * 24 * 3600
MAX_REASON = 200
# An announcement may start in the minute it is made, not before.
PAST_TOLERANCE_SECONDS = 60

UP, DOWN, UNKNOWN = "up", "down", "unknown"
# What an outage is: it counts, it is under the minimum, or it lies wholly inside maintenance windows.
COUNTED, SHORT, EXCUSED = "counted", "short", "excused"
# The month's timeline for people (SlaReport.segments) adds: time before the first probe ever
# (the appliance was not installed yet) and time to come.
BEFORE, FUTURE = "before", "future"


class MonitorError(ApplianceError):
    """The ledger or the maintenance windows cannot be read or written, or a window or month is invalid."""


# ============================================================================= plain data


class Probe(NamedTuple):
    """One probe result: ``t`` in unix seconds (UTC), ``ok`` = seat users could use the service.

    A tuple, not a dataclass: a month's report reads some 270,000 of them.
    """

    t: int
    ok: bool
    ms: int = 0
    detail: str = ""

    def line(self) -> str:
        return f"{self.t} {1 if self.ok else 0} {self.ms} {self.detail or '-'}\n"


@dataclass(frozen=True)
class Window:
    """An announced maintenance window [start, end) in unix seconds (UTC)."""

    id: int
    start: int
    end: int
    reason: str
    created_at: int = 0
    created_by: str = ""

    def to_dict(self) -> dict:
        return {"id": self.id, "start": iso(self.start), "end": iso(self.end), "reason": self.reason,
                "created_at": iso(self.created_at), "created_by": self.created_by}


@dataclass(frozen=True)
class Segment:
    """[start, end) in one state: up, down or unknown (``detail``: the first failed probe's)."""

    start: int
    end: int
    state: str
    detail: str = ""

    @property
    def seconds(self) -> int:
        return self.end - self.start


@dataclass(frozen=True)
class Outage:
    """A run of down time [start, end); ``kind`` is counted, short or excused."""

    start: int
    end: int
    excused_seconds: int  # inside maintenance windows
    kind: str
    ongoing: bool = False
    detail: str = ""

    @property
    def seconds(self) -> int:
        return self.end - self.start

    @property
    def outside_seconds(self) -> int:
        return self.seconds - self.excused_seconds


@dataclass(frozen=True)
class SlaReport:
    """One calendar month's availability; all durations in seconds (minutes in ``to_dict``)."""

    month: str
    timezone: str
    start: int
    end: int
    now: int
    target_percent: Fraction
    budget_seconds: Fraction
    counted_seconds: int
    short_seconds: int
    excused_seconds: int
    unknown_seconds: int
    window_seconds: int
    worst_case_seconds: int
    probes: int
    failed_probes: int
    outages: tuple[dict, ...]
    unknown_periods: tuple[tuple[int, int], ...]
    windows: tuple[Window, ...]
    segments: tuple[Segment, ...]
    malformed_lines: int = 0
    before_seconds: int = 0  # before the first probe ever: neither up, down nor unknown

    @property
    def month_seconds(self) -> int:
        return self.end - self.start

    @property
    def minutes_in_month(self) -> int:
        return self.month_seconds // 60

    @property
    def in_progress(self) -> bool:
        return self.start <= self.now < self.end

    @property
    def outages_counted(self) -> int:
        return sum(1 for o in self.outages if o["kind"] == COUNTED)

    @property
    def outages_short(self) -> int:
        return sum(1 for o in self.outages if o["kind"] == SHORT)

    @property
    def outages_excused(self) -> int:
        return sum(1 for o in self.outages if o["kind"] == EXCUSED)

    @property
    def availability(self) -> Fraction:
        """As measured: 1 - counted downtime / the month (unknown time not counted)."""
        return 1 - Fraction(self.counted_seconds, self.month_seconds)

    @property
    def worst_case_availability(self) -> Fraction:
        """Unknown time counted as down, under the same rules."""
        return 1 - Fraction(self.worst_case_seconds, self.month_seconds)

    @property
    def budget_left_seconds(self) -> Fraction:
        return max(Fraction(0), self.budget_seconds - self.counted_seconds)

    @property
    def verdict(self) -> str:
        """met, missed, or undetermined (met as measured, missed if the unknown time was down)."""
        if self.counted_seconds > self.budget_seconds:
            return "missed"
        if self.worst_case_seconds > self.budget_seconds:
            return "undetermined"
        return "met"

    @property
    def compensation_seconds(self) -> int:
        """003 §13.2: a missed SLA is made good with time equal to the lost (counted) time."""
        return self.counted_seconds if self.verdict == "missed" else 0

    def to_dict(self) -> dict:
        m = _minutes
        return {
            "month": self.month, "timezone": self.timezone, "start": iso(self.start), "end": iso(self.end),
            "in_progress": self.in_progress, "minutes_in_month": self.minutes_in_month,
            "target_percent": float(self.target_percent), "budget_minutes": m(self.budget_seconds),
            "counted_downtime_minutes": m(self.counted_seconds), "counted_downtime_seconds": self.counted_seconds,
            "outages_counted": self.outages_counted, "outages_short": self.outages_short,
            "outages_excused": self.outages_excused, "short_downtime_minutes": m(self.short_seconds),
            "excused_downtime_minutes": m(self.excused_seconds), "unknown_minutes": m(self.unknown_seconds),
            "before_monitoring_minutes": m(self.before_seconds),
            "maintenance_minutes": m(self.window_seconds),
            "availability_percent": _percent(self.availability),
            "worst_case_downtime_minutes": m(self.worst_case_seconds),
            "worst_case_availability_percent": _percent(self.worst_case_availability),
            "budget_left_minutes": m(self.budget_left_seconds), "verdict": self.verdict,
            "compensation_minutes": m(self.compensation_seconds),
            "probes": self.probes, "failed_probes": self.failed_probes, "malformed_lines": self.malformed_lines,
            "outages": [{**o, "start": iso(o["start"]), "end": iso(o["end"])} for o in self.outages],
            "unknown_periods": [{"start": iso(s), "end": iso(e), "minutes": m(e - s)} for s, e in self.unknown_periods],
            "maintenance_windows": [w.to_dict() for w in self.windows],
        }


def _minutes(seconds) -> float:
    return round(float(Fraction(seconds) / 60), 3)


def _percent(ratio: Fraction) -> float:
    return round(float(ratio * 100), 4)


def iso(t: int) -> str:
    return dt.datetime.fromtimestamp(t, dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _parse_iso(text: str) -> int:
    return int(dt.datetime.strptime(text, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=dt.timezone.utc).timestamp())


# ============================================================================= pure arithmetic


def month_bounds(year: int, month: int, tz: dt.tzinfo) -> tuple[int, int]:
    """[start, end) of a calendar month in ``tz`` as unix seconds (DST-aware: real elapsed time)."""
    start = dt.datetime(year, month, 1, tzinfo=tz)
    end = dt.datetime(year + (month == 12), month % 12 + 1, 1, tzinfo=tz)
    return int(start.timestamp()), int(end.timestamp())


def budget_seconds(month_seconds: int, target_percent) -> Fraction:
    """Allowed downtime: (100 - target) % of the month, exactly (43.2 min for 30 days at 99.9)."""
    return (100 - Fraction(str(target_percent))) / 100 * month_seconds


def build_timeline(probes: Iterable[Probe], *, interval: int, now: int, since: int | None = None,
                   gap_factor: int = GAP_FACTOR) -> list[Segment]:
    """Cover [min(since, first probe), now) with up, down and unknown segments.

    A probe's state holds until the next probe (or ``now``) when that comes within
    ``gap_factor * interval`` seconds; a longer gap is unknown as a whole. Time before the
    first probe is unknown. Probes at or after ``now`` are ignored.
    """
    limit = gap_factor * interval
    ordered = sorted(p for p in probes if p.t < now)  # at one instant, a success sorts last and wins
    if not ordered:
        return [Segment(since, now, UNKNOWN)] if since is not None and since < now else []
    segments: list[Segment] = []
    # The run being built: (start, end, state, detail); a segment is made only when the state changes.
    run: tuple[int, int, str, str] | None = None
    if since is not None and since < ordered[0].t:
        run = (since, ordered[0].t, UNKNOWN, "")
    following = [p.t for p in ordered[1:]] + [now]
    for probe, next_t in zip(ordered, following):
        if next_t <= probe.t:
            continue
        if next_t - probe.t > limit:
            state = UNKNOWN
        else:
            state = UP if probe.ok else DOWN
        if run is not None and run[2] == state and run[1] == probe.t:
            run = (run[0], next_t, state, run[3])
            continue
        if run is not None:
            segments.append(Segment(*run))
        run = (probe.t, next_t, state, probe.detail if state == DOWN else "")
    if run is not None:
        segments.append(Segment(*run))
    return segments


def merge_windows(windows: Iterable[Window]) -> list[tuple[int, int]]:
    """The union of the windows as sorted, disjoint [start, end) pairs (overlaps count once)."""
    merged: list[list[int]] = []
    for start, end in sorted((w.start, w.end) for w in windows if w.end > w.start):
        if merged and start <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([start, end])
    return [(s, e) for s, e in merged]


def covered(start: int, end: int, union: Sequence[tuple[int, int]]) -> int:
    """Seconds of [start, end) inside the merged windows."""
    return sum(max(0, min(end, e) - max(start, s)) for s, e in union)


def _pieces(start: int, end: int, union: Sequence[tuple[int, int]]) -> Iterator[tuple[int, int, bool]]:
    """[start, end) cut into (from, to, inside a window) pieces, in order."""
    cursor = start
    for s, e in union:
        s, e = max(s, start), min(e, end)
        if s >= e:
            continue
        if s > cursor:
            yield cursor, s, False
        yield s, e, True
        cursor = e
    if cursor < end:
        yield cursor, end, False


def find_outages(segments: Sequence[Segment], union: Sequence[tuple[int, int]], min_seconds: int,
                 down_states: frozenset[str] = frozenset({DOWN})) -> list[Outage]:
    """Maximal runs of ``down_states``; each is counted, short (under the minimum) or excused.

    The minimum applies to the run's time *outside* maintenance windows: an upgrade that
    overruns its window by 3 minutes is a 3-minute outage, not a 63-minute one.
    """
    outages: list[Outage] = []
    end_of_time = segments[-1].end if segments else 0

    def close(run: list[Segment]) -> None:
        start, end = run[0].start, run[-1].end
        excused = covered(start, end, union)
        outside = end - start - excused
        kind = EXCUSED if outside == 0 else COUNTED if outside >= min_seconds else SHORT
        outages.append(Outage(start, end, excused, kind, ongoing=end == end_of_time and run[-1].state == DOWN,
                              detail=next((s.detail for s in run if s.detail), "")))

    run: list[Segment] = []
    for seg in segments:
        if seg.state in down_states and run and run[-1].end == seg.start:
            run.append(seg)
            continue
        if run:
            close(run)
        run = [seg] if seg.state in down_states else []
    if run:
        close(run)
    return outages


def _in_month(outage: Outage, lo: int, hi: int, union) -> int:
    """The outage's seconds inside [lo, hi) and outside maintenance windows."""
    s, e = max(outage.start, lo), min(outage.end, hi)
    return 0 if s >= e else (e - s) - covered(s, e, union)


def month_report(probes: Sequence[Probe], windows: Sequence[Window], year: int, month: int, *,
                 tz: dt.tzinfo, interval: int, min_outage_seconds: int, target_percent, now: int,
                 gap_factor: int = GAP_FACTOR, malformed_lines: int = 0,
                 monitored_from: int | None = None) -> SlaReport:
    """The month's availability from the probes and windows (pass probes from around the month
    too: an outage crossing a boundary is judged whole, then split between the months).

    ``monitored_from`` is the first probe ever recorded: time before it (the appliance was not
    installed yet) is reported apart, not as unknown. None: all time without probes is unknown.
    """
    lo, hi = month_bounds(year, month, tz)
    since = lo if monitored_from is None else min(max(lo, monitored_from), hi)
    union = merge_windows(windows)
    segments = build_timeline(probes, interval=interval, now=max(now, since), since=since, gap_factor=gap_factor)
    measured = find_outages(segments, union, min_outage_seconds)
    worst = find_outages(segments, union, min_outage_seconds, frozenset({DOWN, UNKNOWN}))

    by_kind = {COUNTED: 0, SHORT: 0}
    outages = []
    for o in measured:
        if o.end <= lo or o.start >= hi:
            continue
        share = _in_month(o, lo, hi, union)
        if o.kind in by_kind:
            by_kind[o.kind] += share
        outages.append({"start": o.start, "end": o.end, "minutes": _minutes(o.seconds),
                        "minutes_outside_windows": _minutes(o.outside_seconds),
                        "minutes_in_month": _minutes(share), "seconds_in_month": share, "kind": o.kind,
                        "ongoing": o.ongoing, "detail": o.detail})
    excused = sum(covered(max(o.start, lo), min(o.end, hi), union) for o in measured if o.end > lo and o.start < hi)
    worst_seconds = sum(_in_month(o, lo, hi, union) for o in worst if o.kind == COUNTED)

    unknown_periods, unknown_seconds = [], 0
    for seg in segments:
        s, e = max(seg.start, lo), min(seg.end, hi)
        if seg.state == UNKNOWN and s < e:
            unknown_periods.append((s, e))
            unknown_seconds += (e - s) - covered(s, e, union)

    in_month = [p for p in probes if lo <= p.t < hi and p.t <= now]
    return SlaReport(
        month=f"{year:04d}-{month:02d}", timezone=str(getattr(tz, "key", tz)), start=lo, end=hi, now=now,
        target_percent=Fraction(str(target_percent)), budget_seconds=budget_seconds(hi - lo, target_percent),
        counted_seconds=by_kind[COUNTED], short_seconds=by_kind[SHORT], excused_seconds=excused,
        unknown_seconds=unknown_seconds, window_seconds=covered(lo, hi, union), worst_case_seconds=worst_seconds,
        probes=len(in_month), failed_probes=sum(1 for p in in_month if not p.ok), outages=tuple(outages),
        unknown_periods=tuple(unknown_periods),
        windows=tuple(w for w in sorted(windows, key=lambda w: (w.start, w.id)) if w.end > lo and w.start < hi),
        segments=tuple(_display_segments(segments, measured, union, lo, hi, now, since)),
        malformed_lines=malformed_lines, before_seconds=max(0, min(since, max(now, lo)) - lo))


def _display_segments(segments, outages, union, lo, hi, now, since) -> Iterator[Segment]:
    """The month's timeline for people: before (monitoring began), up, down (counted), short,
    excused (down inside a window), unknown, future."""
    if since > lo and now > lo:
        yield Segment(lo, min(since, now), BEFORE)
    shown = {COUNTED: DOWN, SHORT: SHORT, EXCUSED: EXCUSED}
    kinds = {(o.start, o.end): shown[o.kind] for o in outages}
    for seg in segments:
        s, e = max(seg.start, lo), min(seg.end, hi)
        if s >= e:
            continue
        if seg.state != DOWN:
            yield Segment(s, e, seg.state)
            continue
        kind = kinds.get((seg.start, seg.end), DOWN)
        for a, b, inside in _pieces(s, e, union):
            yield Segment(a, b, EXCUSED if inside else kind, seg.detail)
    if now < hi:
        yield Segment(max(now, since, lo), hi, FUTURE)


def announced(windows: Iterable[Window], now: int, hours: int) -> list[tuple[Window, bool]]:
    """Windows to show in the banner: (window, in progress), in progress or starting within ``hours``."""
    shown = [(w, w.start <= now) for w in windows if w.end > now and w.start - hours * 3600 <= now]
    return sorted(shown, key=lambda item: (item[0].start, item[0].id))


# ============================================================================= months


def parse_month(text: str) -> tuple[int, int]:
    """``YYYY-MM`` -> (year, month)."""
    match = re.fullmatch(r"(\d{4})-(\d{2})", (text or "").strip())
    if not match or not 1 <= int(match.group(2)) <= 12 or int(match.group(1)) < 1970:
        raise MonitorError(f'month: expected YYYY-MM such as 2026-02, found "{text}"')
    return int(match.group(1)), int(match.group(2))


def current_month(tz: dt.tzinfo, now: float | None = None) -> tuple[int, int]:
    local = dt.datetime.fromtimestamp(time.time() if now is None else now, tz)
    return local.year, local.month


def shift_month(year: int, month: int, by: int) -> tuple[int, int]:
    index = year * 12 + (month - 1) + by
    return index // 12, index % 12 + 1


# ============================================================================= files


def monitor_dir(settings: Settings) -> Path:
    return settings.appliance.data_dir / MONITOR_DIR


def ledger_path(directory: Path, t: int) -> Path:
    return directory / f"probes-{dt.datetime.fromtimestamp(t, dt.timezone.utc):%Y-%m}.log"


def _ensure_dir(directory: Path, data_dir: Path) -> None:
    try:
        if not directory.is_dir():
            directory.mkdir(parents=True, exist_ok=True)
            _adopt(directory, data_dir)
    except OSError as exc:
        raise MonitorError(f"{directory}: cannot create the monitor directory: {exc.strerror}; "
                           f"check that [appliance] data_dir exists and is writable") from None


def _adopt(path: Path, data_dir: Path) -> None:
    """Give files that root creates (``crm-appliance probe`` from root's cron) to the data
    directory's owner, so that the scheduler, running as that user, can still append."""
    if os.geteuid() != 0:
        return
    with contextlib.suppress(OSError):
        owner = data_dir.stat()
        st = path.stat()
        if (st.st_uid, st.st_gid) != (owner.st_uid, owner.st_gid):
            os.chown(path, owner.st_uid, owner.st_gid)


def append_probe(directory: Path, probe: Probe, data_dir: Path | None = None) -> Path:
    """Append one line to the month's ledger and fsync it; returns the file."""
    data_dir = data_dir or directory.parent
    _ensure_dir(directory, data_dir)
    path = ledger_path(directory, probe.t)
    data = probe.line().encode("ascii")
    try:
        created = not path.exists()
        fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)  # two probers (scheduler and cron) write whole lines in turn
            size = os.fstat(fd).st_size
            if size and os.pread(fd, 1, size - 1) != b"\n":
                # After a torn write: end the fragment with the torn mark, so it stays ignored.
                data = TORN_MARK + b"\n" + data
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        if created:
            _adopt(path, data_dir)
            _fsync_dir(directory)
    except OSError as exc:
        raise MonitorError(f"{path}: cannot append to the probe ledger: {exc.strerror}") from None
    return path


def _fsync_dir(directory: Path) -> None:
    with contextlib.suppress(OSError):  # best effort: the ledger line itself is already flushed
        fsync_dir(directory)


def parse_ledger(data: bytes) -> tuple[list[Probe], int]:
    """(probes, malformed lines) from a ledger file's bytes. A last line without its newline is
    skipped (torn, or still being written); a line ended with the torn mark is skipped and counted."""
    lines = data.split(b"\n")
    lines.pop()  # either b"" after the final newline, or a torn fragment
    probes, malformed = [], 0
    for line in lines:
        if TORN_MARK in line:
            malformed += 1
            continue
        parts = line.split()
        try:
            if len(parts) < 3 or parts[1] not in (b"0", b"1"):
                raise ValueError
            probes.append(Probe(int(parts[0]), parts[1] == b"1", int(parts[2]),
                                parts[3].decode("ascii", "replace") if len(parts) > 3 else ""))
        except ValueError:
            malformed += 1
    return probes, malformed


def read_ledger(directory: Path, lo: int, hi: int) -> tuple[list[Probe], int]:
    """Probes with lo <= t < hi from the monthly files that can hold them, and the malformed line count."""
    probes, malformed = [], 0
    year, month = _utc_month(lo)
    last = _utc_month(max(lo, hi - 1))
    while (year, month) <= last:
        path = directory / f"probes-{year:04d}-{month:02d}.log"
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            data = b""
        except OSError as exc:
            raise MonitorError(f"{path}: cannot read the probe ledger: {exc.strerror}") from None
        found, bad = parse_ledger(data)
        probes.extend(p for p in found if lo <= p.t < hi)
        malformed += bad
        year, month = shift_month(year, month, 1)
    return probes, malformed


def _utc_month(t: int) -> tuple[int, int]:
    d = dt.datetime.fromtimestamp(t, dt.timezone.utc)
    return d.year, d.month


def ledger_files(settings: Settings) -> list[Path]:
    """Every monthly ledger file, oldest first (for the diagnostics bundle)."""
    directory = monitor_dir(settings)
    if not directory.is_dir():
        return []
    return sorted(p for p in directory.iterdir() if LEDGER_PATTERN.match(p.name))


# ============================================================================= probing


def probe_url(settings: Settings) -> tuple[str, str | None]:
    """(URL, Host header) to probe: ``[monitor] probe_url``, else /healthz through nginx on
    127.0.0.1 with the scheme, port and host name of ``[web] public_url`` (what seat users reach)."""
    if settings.monitor.probe_url:
        return settings.monitor.probe_url, None
    public = urlsplit(settings.web.public_url)
    scheme = public.scheme or "https"
    port = public.port or (443 if scheme == "https" else 80)
    default_port = (scheme == "https" and port == 443) or (scheme == "http" and port == 80)
    netloc = "127.0.0.1" if default_port else f"127.0.0.1:{port}"
    return f"{scheme}://{netloc}{public.path.rstrip('/')}/healthz", public.netloc or None


def classify(status: int, body: bytes) -> tuple[bool, str]:
    """(usable, detail) from /healthz's answer.

    200 is up. 503 is up when /healthz says the web and the database checks pass (only the
    disk or the scheduler is unwell: seat users can still work); otherwise down.
    """
    if status == 200:
        return True, "200"
    if status != 503:
        return False, str(status)
    try:
        checks = json.loads(body)["checks"]
        failing = sorted(name for name, check in checks.items() if not check.get("ok"))
        serving = all(checks[name]["ok"] is True for name in SERVING_CHECKS)
    except (ValueError, KeyError, TypeError, AttributeError):
        return False, "503"
    return serving, "503:" + ",".join(re.sub(r"[^a-z0-9_]", "", n.lower())[:20] for n in failing)


def _error_detail(exc: BaseException) -> str:
    reason = exc.reason if isinstance(exc, urllib.error.URLError) else exc
    if isinstance(reason, (TimeoutError, socket.timeout)):
        return "timeout"
    if isinstance(reason, ConnectionRefusedError):
        return "refused"
    if isinstance(reason, ssl.SSLError):
        return "tls"
    if isinstance(reason, socket.gaierror):
        return "dns"
    if isinstance(reason, (ConnectionResetError, http.client.RemoteDisconnected)):
        return "reset"
    if isinstance(reason, OSError) and reason.errno in (errno.EHOSTUNREACH, errno.ENETUNREACH):
        return "unreachable"
    return "error"


def check(url: str, *, timeout: float, host: str | None = None) -> tuple[bool, int, str]:
    """GET ``url`` once: (usable, latency ms, detail). Never raises for a failed request."""
    import appliance

    if urlsplit(url).scheme not in ("http", "https"):
        raise MonitorError(f'[monitor] probe_url: expected an http:// or https:// URL, found "{url}"')
    context = ssl.create_default_context()
    # The appliance's own (often self-signed) certificate on 127.0.0.1: availability, not trust, is measured.
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    # No proxy from the environment: the probe must reach this host, not a corporate proxy.
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}),
                                         urllib.request.HTTPSHandler(context=context))
    headers = {"User-Agent": f"crm-appliance-probe/{appliance.__version__}", "Accept": "application/json"}
    if host:
        headers["Host"] = host
    started = time.perf_counter()
    try:
        with opener.open(urllib.request.Request(url, headers=headers), timeout=timeout) as resp:
            status, body = resp.status, resp.read(65536)
    except urllib.error.HTTPError as exc:
        status = exc.code
        try:
            body = exc.read(65536)
        except (OSError, http.client.HTTPException):
            body = b""
    except (OSError, http.client.HTTPException, ValueError) as exc:
        # Failures show how long they took too (a timeout shows the timeout).
        return False, round((time.perf_counter() - started) * 1000), _error_detail(exc)
    ok, detail = classify(status, body)
    return ok, round((time.perf_counter() - started) * 1000), detail


def probe_once(settings: Settings, url: str | None = None) -> Probe:
    """Probe /healthz once and append the result to the ledger; what the scheduler runs every
    ``[monitor] probe_interval_seconds``. ``url`` overrides the configured or derived URL."""
    host = None
    if url is None:
        url, host = probe_url(settings)
    mon = settings.monitor
    # A probe must end before the next is due, or the scheduler skips runs and leaves gaps.
    timeout = max(1, min(mon.probe_timeout_seconds, mon.probe_interval_seconds - 1))
    t = int(time.time())
    ok, ms, detail = check(url, timeout=timeout, host=host)
    probe = Probe(t, ok, ms, detail)
    append_probe(monitor_dir(settings), probe, settings.appliance.data_dir)
    if not ok:
        log.warning("uptime probe of %s failed: %s after %d ms", url, detail, ms)
    return probe


# ============================================================================= maintenance windows


def windows_path(settings: Settings) -> Path:
    return monitor_dir(settings) / WINDOWS_FILE


def _decode_windows(path: Path, raw: bytes) -> list[Window]:
    try:
        data = json.loads(raw)
        return [Window(int(w["id"]), _parse_iso(w["start"]), _parse_iso(w["end"]), str(w["reason"]),
                       _parse_iso(w["created_at"]) if w.get("created_at") else 0, str(w.get("created_by", "")))
                for w in data["windows"]]
    except (ValueError, KeyError, TypeError) as exc:
        raise MonitorError(f"{path}: not a valid maintenance window file ({type(exc).__name__}: {exc}); "
                           f"fix or remove it, then add the windows again with crm-appliance maintenance add") from None


def load_windows(settings: Settings) -> list[Window]:
    """The announced maintenance windows, oldest first; none when the file does not exist yet."""
    path = windows_path(settings)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return []
    except OSError as exc:
        raise MonitorError(f"{path}: cannot read the maintenance windows: {exc.strerror}") from None
    return sorted(_decode_windows(path, raw), key=lambda w: (w.start, w.id))


_cache: dict[Path, tuple[tuple[int, int, int], list[Window]]] = {}


def load_windows_cached(settings: Settings) -> list[Window]:
    """``load_windows``, re-read only when the file changed (the web banner asks on every page)."""
    path = windows_path(settings)
    try:
        st = path.stat()
    except FileNotFoundError:
        return []
    except OSError as exc:
        raise MonitorError(f"{path}: cannot read the maintenance windows: {exc.strerror}") from None
    stamp = (st.st_ino, st.st_mtime_ns, st.st_size)  # every save is a rename: a new inode
    hit = _cache.get(path)
    if hit is None or hit[0] != stamp:
        hit = (stamp, load_windows(settings))
        _cache[path] = hit
    return hit[1]


@contextlib.contextmanager
def _windows_lock(settings: Settings):
    directory = monitor_dir(settings)
    _ensure_dir(directory, settings.appliance.data_dir)
    lock = directory / "maintenance.lock"
    try:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        raise MonitorError(f"{lock}: cannot lock the maintenance windows: {exc.strerror}") from None
    _adopt(lock, settings.appliance.data_dir)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _save_windows(settings: Settings, windows: Sequence[Window]) -> None:
    path = windows_path(settings)
    text = json.dumps({"format": 1, "windows": [w.to_dict() for w in windows]}, indent=2, ensure_ascii=False)
    try:
        fd, tmp = tempfile.mkstemp(prefix=".maintenance-", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                fh.write(text + "\n")
                fh.flush()
                os.fsync(fh.fileno())
            os.chmod(tmp, 0o644)  # the web app reads it under its own user
            _adopt(Path(tmp), settings.appliance.data_dir)
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        _fsync_dir(path.parent)
    except OSError as exc:
        raise MonitorError(f"{path}: cannot write the maintenance windows: {exc.strerror}") from None


def parse_local(text: str, tz: zoneinfo.ZoneInfo, what: str) -> int:
    """``YYYY-MM-DD HH:MM`` in ``tz`` -> unix seconds; refuses times that the clock skips (DST)."""
    raw = (text or "").strip()
    try:
        naive = dt.datetime.strptime(raw.replace("T", " "), "%Y-%m-%d %H:%M")
    except ValueError:
        raise MonitorError(f'maintenance window {what}: expected a local time like "2026-03-01 22:00" '
                           f'({tz.key}), found "{text}"') from None
    local = naive.replace(tzinfo=tz)
    t = int(local.timestamp())
    if dt.datetime.fromtimestamp(t, tz).replace(tzinfo=None) != naive:
        raise MonitorError(f"maintenance window {what}: {raw} does not exist in {tz.key} (the clocks skip it); "
                           f"choose another time")
    return t


def format_local(t: int, tz: dt.tzinfo, seconds: bool = False) -> str:
    return dt.datetime.fromtimestamp(t, tz).strftime("%Y-%m-%d %H:%M:%S" if seconds else "%Y-%m-%d %H:%M")


def add_window(settings: Settings, start: str, end: str, reason: str, *, created_by: str = "",
               now: int | None = None) -> Window:
    """Announce a window from ``start`` to ``end`` (local ``YYYY-MM-DD HH:MM``, [web] timezone)."""
    tz = zoneinfo.ZoneInfo(settings.web.timezone)
    now = int(time.time()) if now is None else now
    lo, hi = parse_local(start, tz, '"from"'), parse_local(end, tz, '"to"')
    reason = " ".join((reason or "").split())  # one line: it is shown in a banner
    if hi <= lo:
        raise MonitorError(f'maintenance window: "to" ({format_local(hi, tz)}) must be after "from" '
                           f'({format_local(lo, tz)})')
    if lo < now - PAST_TOLERANCE_SECONDS:
        raise MonitorError(f'maintenance window: "from" ({format_local(lo, tz)} {tz.key}) is in the past; '
                           f"a window is announced before it starts and cannot excuse downtime that already "
                           f"happened (now: {format_local(now, tz)})")
    if hi - lo > MAX_WINDOW_SECONDS:
        raise MonitorError(f"maintenance window: expected at most {MAX_WINDOW_SECONDS // 86400} days, "
                           f"found {(hi - lo) / 86400:.1f} days; check the dates")
    if not reason:
        raise MonitorError('maintenance window: the reason is empty; say what is done, e.g. "Upgrade to 1.4"')
    if len(reason) > MAX_REASON:
        raise MonitorError(f"maintenance window: expected a reason of at most {MAX_REASON} characters, "
                           f"found {len(reason)}")
    with _windows_lock(settings):
        windows = load_windows(settings)
        window = Window(max((w.id for w in windows), default=0) + 1, lo, hi, reason, now, created_by)
        _save_windows(settings, [*windows, window])
    return window


def remove_window(settings: Settings, window_id: int) -> Window:
    with _windows_lock(settings):
        windows = load_windows(settings)
        found = next((w for w in windows if w.id == window_id), None)
        if found is None:
            known = ", ".join(str(w.id) for w in windows) or "none"
            raise MonitorError(f"no maintenance window {window_id} (windows: {known}); "
                               f"see crm-appliance maintenance list")
        _save_windows(settings, [w for w in windows if w.id != window_id])
    return found


def window_state(window: Window, now: int) -> str:
    return "past" if window.end <= now else "in progress" if window.start <= now else "upcoming"


# ============================================================================= the report


def report_for_month(settings: Settings, year: int | None = None, month: int | None = None, *,
                     now: int | None = None) -> SlaReport:
    """The SLA report for a calendar month (default: this one) from the ledger and the windows."""
    tz = zoneinfo.ZoneInfo(settings.web.timezone)
    now = int(time.time()) if now is None else now
    if year is None or month is None:
        year, month = current_month(tz, now)
    lo, hi = month_bounds(year, month, tz)
    # An outage crossing a month boundary is judged whole: read a month either side.
    probes, malformed = read_ledger(monitor_dir(settings), lo - 31 * 86400, hi + 31 * 86400)
    mon = settings.monitor
    return month_report(probes, load_windows(settings), year, month, tz=tz, interval=mon.probe_interval_seconds,
                        min_outage_seconds=mon.outage_min_minutes * 60, target_percent=mon.sla_target_percent,
                        now=now, malformed_lines=malformed, monitored_from=first_probe_time(settings))


def first_probe_time(settings: Settings) -> int | None:
    """When the first probe still in the ledger was taken; None when there is none."""
    for path in ledger_files(settings):
        try:
            with path.open("rb") as fh:
                found, _ = parse_ledger(fh.read(4096))
        except OSError as exc:
            raise MonitorError(f"{path}: cannot read the probe ledger: {exc.strerror}") from None
        if found:
            return min(p.t for p in found)
    return None
