"""``crm-appliance sla``, ``maintenance`` and ``probe``: thin Click commands over appliance.monitor.

None of them needs the database: the probe ledger and the maintenance windows are files
under ``<data_dir>/monitor/``, so they work while PostgreSQL is down. Register them on the
main group in installer/cli.py with::

    from installer.monitor_commands import register as _register_monitor_commands
    _register_monitor_commands(main)

The commands take the group's context object (``installer.cli.Context``) through
``click.pass_obj`` rather than importing installer.cli, so that the two modules do not
import each other.
"""

from __future__ import annotations

import getpass
import json
import time
import zoneinfo

import click

from installer.clickutil import handle_errors as _handle_errors




def _month(ctx, param, value):
    from appliance import monitor

    if value is None:
        return None
    try:
        return monitor.parse_month(value)
    except monitor.MonitorError as exc:
        raise click.BadParameter(str(exc)) from None


def _minutes(seconds) -> str:
    return f"{float(seconds) / 60:.2f} min"


def _os_user() -> str:
    try:
        return getpass.getuser()
    except Exception:  # no passwd entry in some containers
        return "unknown"


# ----------------------------------------------------------------------------- sla

@click.command()
@click.option("--month", callback=_month, metavar="YYYY-MM",
              help="Calendar month in the appliance's time zone ([web] timezone) [default: this month].")
@click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")
@click.pass_obj
@_handle_errors
def sla(obj, month, as_json) -> None:
    """Availability for a calendar month (R-22): budget, counted downtime, unknown time, compensation."""
    from appliance import monitor

    report = monitor.report_for_month(obj.settings, *(month or (None, None)))
    if as_json:
        click.echo(json.dumps(report.to_dict(), indent=2, ensure_ascii=False))
        return
    _print_report(report, obj.settings)


def _print_report(report, settings) -> None:
    from appliance import monitor

    tz = zoneinfo.ZoneInfo(report.timezone)
    d = report.to_dict()
    so_far = " (month in progress: figures so far)" if report.in_progress else ""
    verdict = {"met": "met", "missed": "MISSED",
               "undetermined": "UNDETERMINED (met as measured, missed if the unknown time was down)"}[report.verdict]
    minimum = settings.monitor.outage_min_minutes
    rows = [
        ("month", f"{report.month} ({report.timezone}), {report.minutes_in_month} minutes{so_far}"),
        ("target", f"{d['target_percent']}% a month"),
        ("budget", _minutes(report.budget_seconds)),
        ("counted downtime", _minutes(report.counted_seconds)),
        ("outages", f"{report.outages_counted} counted, {report.outages_short} ignored (under {minimum} min, "
                    f"{_minutes(report.short_seconds)}), {report.outages_excused} inside maintenance windows"),
        ("unknown", f"{_minutes(report.unknown_seconds)} without probe results (not counted as downtime)"),
        *([("not monitored", f"{_minutes(report.before_seconds)} before the first probe (not yet installed)")]
          if report.before_seconds else []),
        ("maintenance", f"{_minutes(report.window_seconds)} in announced windows (excluded)"),
        ("availability", f"{d['availability_percent']:.4f}% as measured; "
                         f"{d['worst_case_availability_percent']:.4f}% worst case (unknown time as down)"),
        ("left", _minutes(report.budget_left_seconds)),
        ("SLA", verdict),
        ("compensation", f"{_minutes(report.compensation_seconds)}"
                         + (" (service time equal to the counted downtime)" if report.compensation_seconds else "")),
        ("probes", f"{report.probes}, {report.failed_probes} failed"
                   + (f"; {report.malformed_lines} malformed ledger lines skipped" if report.malformed_lines else "")),
    ]
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        click.echo(f"{key:{width}}  {value}")
    if report.outages:
        click.echo("")
        click.echo(f"{'OUTAGE FROM':19}  {'TO':19}  {'MINUTES':>8}  {'OUTSIDE':>8}  {'IN MONTH':>8}  "
                   f"{'STATUS':8}  CAUSE")
        for o in report.outages:
            end = monitor.format_local(o["end"], tz, seconds=True) + (" ongoing" if o["ongoing"] else "")
            click.echo(f"{monitor.format_local(o['start'], tz, seconds=True):19}  {end:19}  {o['minutes']:8.2f}  "
                       f"{o['minutes_outside_windows']:8.2f}  {o['minutes_in_month']:8.2f}  {o['kind']:8}  "
                       f"{o['detail'] or '-'}")
    if report.unknown_periods:
        click.echo("")
        click.echo(f"{'UNKNOWN FROM':19}  {'TO':19}  {'MINUTES':>8}")
        for s, e in report.unknown_periods:
            start, end = monitor.format_local(s, tz, seconds=True), monitor.format_local(e, tz, seconds=True)
            click.echo(f"{start:19}  {end:19}  {(e - s) / 60:8.2f}")
    if report.windows:
        click.echo("")
        _print_windows(report.windows, tz, int(time.time()))


# ----------------------------------------------------------------------------- maintenance

@click.group()
def maintenance() -> None:
    """Announced maintenance windows: excluded from the SLA and shown to seat users beforehand."""


@maintenance.command("add")
@click.option("--from", "start", required=True, metavar='"YYYY-MM-DD HH:MM"',
              help="Start, in the appliance's time zone ([web] timezone); not in the past.")
@click.option("--to", "end", required=True, metavar='"YYYY-MM-DD HH:MM"', help="End, in the same time zone.")
@click.option("--reason", required=True, help='Shown to seat users in the banner, e.g. "Upgrade to 1.4".')
@click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")
@click.pass_obj
@_handle_errors
def maintenance_add(obj, start, end, reason, as_json) -> None:
    """Announce a maintenance window; seat users see a banner from [monitor] banner_hours before it."""
    from appliance import monitor

    settings = obj.settings
    window = monitor.add_window(settings, start, end, reason, created_by=f"cli:{_os_user()}")
    if as_json:
        click.echo(json.dumps(window.to_dict(), ensure_ascii=False))
        return
    tz = zoneinfo.ZoneInfo(settings.web.timezone)
    banner = max(window.created_at, window.start - settings.monitor.banner_hours * 3600)
    click.echo(f"Added maintenance window {window.id}: {monitor.format_local(window.start, tz)} to "
               f"{monitor.format_local(window.end, tz)} {tz.key} ({window.reason}).")
    click.echo(f"Seat users see the banner from {monitor.format_local(banner, tz)}; "
               f"downtime inside the window does not count against the SLA.")


@maintenance.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")
@click.pass_obj
@_handle_errors
def maintenance_list(obj, as_json) -> None:
    """All maintenance windows, past ones included, oldest first."""
    from appliance import monitor

    windows = monitor.load_windows(obj.settings)
    now = int(time.time())
    if as_json:
        click.echo(json.dumps([{**w.to_dict(), "state": monitor.window_state(w, now)} for w in windows],
                              indent=2, ensure_ascii=False))
        return
    if not windows:
        click.echo("No maintenance windows; add one with: "
                   "crm-appliance maintenance add --from ... --to ... --reason ...")
        return
    _print_windows(windows, zoneinfo.ZoneInfo(obj.settings.web.timezone), now)


def _print_windows(windows, tz, now: int) -> None:
    from appliance import monitor

    click.echo(f"{'ID':>3}  {'FROM':16}  {'TO':16}  {'STATE':11}  {'ANNOUNCED':16}  REASON ({tz.key})")
    for w in windows:
        announced = monitor.format_local(w.created_at, tz) if w.created_at else "-"
        click.echo(f"{w.id:>3}  {monitor.format_local(w.start, tz):16}  {monitor.format_local(w.end, tz):16}  "
                   f"{monitor.window_state(w, now):11}  {announced:16}  {w.reason}")


@maintenance.command("remove")
@click.argument("window_id", metavar="ID", type=click.IntRange(min=1))
@click.pass_obj
@_handle_errors
def maintenance_remove(obj, window_id) -> None:
    """Remove a maintenance window (its downtime then counts again)."""
    from appliance import monitor

    window = monitor.remove_window(obj.settings, window_id)
    tz = zoneinfo.ZoneInfo(obj.settings.web.timezone)
    click.echo(f"Removed maintenance window {window.id}: {monitor.format_local(window.start, tz)} to "
               f"{monitor.format_local(window.end, tz)} ({window.reason}).")


# ----------------------------------------------------------------------------- probe

@click.command()
@click.option("--url", default=None,
              help="URL to probe [default: [monitor] probe_url, else /healthz through nginx on 127.0.0.1].")
@click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")
@click.option("-q", "--quiet", is_flag=True, help="Print nothing (for cron); the result is in the ledger.")
@click.pass_obj
@_handle_errors
def probe(obj, url, as_json, quiet) -> None:
    """Probe /healthz once and record the result in the SLA ledger (the scheduler does this every
    [monitor] probe_interval_seconds). Exit 0 whenever the result was recorded, up or down."""
    from appliance import monitor

    settings = obj.settings
    shown_url = url or monitor.probe_url(settings)[0]
    result = monitor.probe_once(settings, url=url)
    if quiet:
        return
    if as_json:
        click.echo(json.dumps({"url": shown_url, "t": monitor.iso(result.t), "ok": result.ok, "ms": result.ms,
                               "detail": result.detail}))
        return
    click.echo(f"{'up' if result.ok else 'DOWN'}  {result.detail}  {result.ms} ms  {shown_url}  "
               f"(recorded in {monitor.ledger_path(monitor.monitor_dir(settings), result.t)})")


COMMANDS = (sla, maintenance, probe)


def register(group: click.Group) -> None:
    """Add ``sla``, ``maintenance`` and ``probe`` to the ``crm-appliance`` group."""
    for command in COMMANDS:
        group.add_command(command)
