"""Availability for the boss (R-22) and the maintenance banner for everyone (R-2).

``/admin/sla`` shows a calendar month's figures from ``appliance.monitor`` and a timeline of
outages, unknown periods and maintenance windows, one bar per day. Like the rest of the
administration area it answers 404 to a seat without administration rights.

The banner is injected into every page of a logged-in seat while a maintenance window is
under way or starts within ``[monitor] banner_hours``. It reads the windows file, not the
database, so it keeps working while PostgreSQL is down.
"""

from __future__ import annotations

import datetime as dt
import logging
import time
import zoneinfo

from flask import Blueprint, abort, current_app, g, render_template, request
from flask_babel import gettext as _

from appliance import monitor
from webapp import permissions
from webapp.i18n import lazy_gettext as _l

log = logging.getLogger(__name__)

bp = Blueprint("sla", __name__, url_prefix="/admin")

STATE_LABELS = {
    "before": _l("Before monitoring began"),
    "up": _l("Up"),
    "down": _l("Down (counted)"),
    "short": _l("Down, shorter than the minimum (not counted)"),
    "excused": _l("Down during maintenance (not counted)"),
    "unknown": _l("Unknown: no probe results"),
    "future": _l("Not yet"),
}
KIND_LABELS = {
    "counted": _l("Counted"),
    "short": _l("Too short to count"),
    "excused": _l("During maintenance"),
}
VERDICT_LABELS = {
    "met": _l("Met"),
    "missed": _l("Missed"),
    "undetermined": _l("Undetermined: met as measured, missed if the unknown time was down"),
}
WINDOW_STATES = {"upcoming": _l("Upcoming"), "in progress": _l("In progress"), "past": _l("Past")}
# Segments this narrow (minutes of a day's bar) are widened so that a short outage stays visible.
MIN_MARK_MINUTES = 3


def _settings():
    return current_app.extensions["crm_settings"]


def _utc(t: int) -> dt.datetime:
    return dt.datetime.fromtimestamp(t, dt.timezone.utc)


@bp.before_request
def _admins_only():
    """:raise 404: the seat has no administration rights (the page is not there for it)."""
    permissions.require_admin(g.user)


@bp.route("/sla")
def sla():
    """The month's availability, budget, compensation and timeline; ``?month=YYYY-MM``.

    :raise 400: the month is malformed.
    """
    settings = _settings()
    tz = zoneinfo.ZoneInfo(settings.web.timezone)
    now = int(time.time())
    this_month = monitor.current_month(tz, now)
    raw = (request.args.get("month") or "").strip()
    try:
        year, month = monitor.parse_month(raw) if raw else this_month
    except monitor.MonitorError:
        abort(400, _("A month is written like 2026-01."))
    view = {"month": f"{year:04d}-{month:02d}", "prev_month": "%04d-%02d" % monitor.shift_month(year, month, -1),
            "next_month": None, "report": None, "error": None, "state_labels": STATE_LABELS,
            "kind_labels": KIND_LABELS, "verdict_labels": VERDICT_LABELS, "window_states": WINDOW_STATES,
            "minimum": settings.monitor.outage_min_minutes}
    if monitor.shift_month(year, month, 1) <= this_month:
        view["next_month"] = "%04d-%02d" % monitor.shift_month(year, month, 1)
    try:
        report = monitor.report_for_month(settings, year, month, now=now)
    except monitor.MonitorError as exc:  # an unreadable ledger or windows file: say which, keep the page
        log.warning("SLA page: %s", exc)
        view["error"] = str(exc)
        return render_template("admin/sla.html", **view)
    view.update(report=report, figures=report.to_dict(), days=_day_rows(report, tz),
                outages=[{**o, "start": _utc(o["start"]), "end": _utc(o["end"])} for o in report.outages],
                unknown=[(_utc(s), _utc(e), (e - s) / 60) for s, e in report.unknown_periods],
                windows=_window_rows(report, now))
    return render_template("admin/sla.html", **view)


def _window_rows(report: monitor.SlaReport, now: int) -> list[dict]:
    return [{"id": w.id, "start": _utc(w.start), "end": _utc(w.end), "reason": w.reason,
             "announced": _utc(w.created_at) if w.created_at else None, "state": monitor.window_state(w, now)}
            for w in report.windows]


def _day_rows(report: monitor.SlaReport, tz: dt.tzinfo) -> list[dict]:
    """One bar per local day: segments and windows as (x, width) in minutes of that day."""
    union = monitor.merge_windows(report.windows)
    rows = []
    day = dt.datetime.fromtimestamp(report.start, tz).date()
    while True:
        lo = int(dt.datetime.combine(day, dt.time.min, tz).timestamp())
        if lo >= report.end:
            break
        nxt = day + dt.timedelta(days=1)
        hi = int(dt.datetime.combine(nxt, dt.time.min, tz).timestamp())
        marks = []
        for seg in report.segments:
            s, e = max(seg.start, lo), min(seg.end, hi)
            if s < e:
                marks.append(_mark(seg.state, s, e, lo, hi))
        bands = [_mark("window", max(s, lo), min(e, hi), lo, hi) for s, e in union if s < hi and e > lo]
        rows.append({"date": day, "width": (hi - lo) // 60, "marks": marks, "windows": bands})
        day = nxt
    return rows


def _mark(state: str, s: int, e: int, lo: int, hi: int) -> dict:
    x, width = (s - lo) / 60, (e - s) / 60
    if state not in ("up", "future") and width < MIN_MARK_MINUTES:
        width = MIN_MARK_MINUTES
        x = min(x, (hi - lo) / 60 - width)
    return {"state": state, "x": round(x, 2), "w": round(width, 2), "start": _utc(s), "end": _utc(e)}


@bp.app_context_processor
def maintenance_banner() -> dict:
    """``maintenance_notices``: windows to announce to a logged-in seat, as (window, in progress)."""
    if getattr(g, "user", None) is None:
        return {}
    settings = _settings()
    try:
        windows = monitor.load_windows_cached(settings)
    except monitor.MonitorError as exc:  # never break a page for the banner
        log.warning("maintenance banner: %s", exc)
        return {}
    notices = monitor.announced(windows, int(time.time()), settings.monitor.banner_hours)
    return {"maintenance_notices": [{"start": _utc(w.start), "end": _utc(w.end), "reason": w.reason,
                                     "in_progress": running} for w, running in notices]}
