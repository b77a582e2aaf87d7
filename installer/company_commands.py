"""``crm-appliance announce``: customer IT posts, lists and withdraws the banner every seat
sees (R-2, R-13), as the boss does under Administration -> Announcements.

Unlike the web app's writes, posting and withdrawing stay possible while the licence is in its
grace period or ended (R-16): customer IT may announce the end to every seat.

Thin Click commands over webapp.company. Registered on the main group in installer/cli.py;
they take the group's context object through ``click.pass_obj``.
"""

from __future__ import annotations

import datetime as dt
import getpass
import json
import zoneinfo

import click

from installer.clickutil import handle_errors as _handle_errors


def _utc(text: str, tz: zoneinfo.ZoneInfo, what: str) -> dt.datetime:
    """A local "YYYY-MM-DD HH:MM" as naive UTC, as the announcement table keeps times."""
    from appliance import monitor

    try:
        seconds = monitor.parse_local(text, tz, what)
    except monitor.MonitorError as exc:
        raise click.BadParameter(str(exc).replace("maintenance window ", "")) from None
    return dt.datetime.fromtimestamp(seconds, dt.timezone.utc).replace(tzinfo=None)


def _user() -> str:
    try:
        return f"cli:{getpass.getuser()}"
    except Exception:  # no passwd entry in some containers
        return "cli:unknown"


@click.group(invoke_without_command=True)
@click.pass_context
def announce(click_ctx: click.Context) -> None:
    """Banners shown to every seat: post one, list them, withdraw one."""
    if click_ctx.invoked_subcommand is None:
        click.echo(click_ctx.get_help())


@announce.command("post")
@click.argument("message")
@click.option("--from", "start", metavar='"YYYY-MM-DD HH:MM"', default=None,
              help="When the banner appears, in [web] timezone [default: now].")
@click.option("--to", "end", required=True, metavar='"YYYY-MM-DD HH:MM"', help="When it disappears.")
@click.option("--email/--no-email", default=True, show_default=True,
              help="Also mail it to every active seat (when [smtp] is set up).")
@click.pass_obj
@_handle_errors
def announce_post(obj, message, start, end, email) -> None:
    """Post MESSAGE as a banner, e.g. "Upgrade on Saturday 22:00-23:00; save your work before"."""
    from webapp import company
    from webapp.models import utcnow

    settings = obj.settings
    tz = zoneinfo.ZoneInfo(settings.web.timezone)
    starts = _utc(start, tz, '"--from"') if start else utcnow().replace(second=0, microsecond=0)
    ends = _utc(end, tz, '"--to"')
    obj.database()
    row = company.post_announcement(settings, _user(), message, starts, ends, email, wait=True)
    local = lambda at: at.replace(tzinfo=dt.timezone.utc).astimezone(tz).strftime("%Y-%m-%d %H:%M")  # noqa: E731
    mailed = ("mailed to every active seat" if row.emailed_at else
              "not mailed (see the log)" if email and settings.smtp.host else "not mailed")
    click.echo(f"Announcement {row.id} shown from {local(row.starts_at)} to {local(row.ends_at)} {tz.key}; {mailed}.")


@announce.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")
@click.pass_obj
@_handle_errors
def announce_list(obj, as_json) -> None:
    """Every announcement, newest first."""
    from webapp.models import Announcement

    obj.database()
    rows = [{"id": a.id, "message": a.message, "starts_at": a.starts_at.isoformat() + "Z",
             "ends_at": a.ends_at.isoformat() + "Z", "created_by": a.created_by,
             "emailed_at": a.emailed_at.isoformat() + "Z" if a.emailed_at else None,
             "withdrawn_at": a.withdrawn_at.isoformat() + "Z" if a.withdrawn_at else None}
            for a in Announcement.select().order_by(Announcement.id.desc())]
    if as_json:
        click.echo(json.dumps(rows, indent=2, ensure_ascii=False))
        return
    if not rows:
        click.echo('No announcements; post one with: crm-appliance announce post "..." --to "YYYY-MM-DD HH:MM"')
    for r in rows:
        state = " (withdrawn)" if r["withdrawn_at"] else ""
        click.echo(f"{r['id']:>4}  {r['starts_at']} .. {r['ends_at']}  {r['created_by']}{state}  {r['message']}")


@announce.command("withdraw")
@click.argument("announcement_id", type=click.IntRange(1, 2**31 - 1))
@click.pass_obj
@_handle_errors
def announce_withdraw(obj, announcement_id) -> None:
    """Take a banner down before its end."""
    from webapp import company

    obj.database()
    row = company.withdraw_announcement(_user(), announcement_id)
    click.echo(f"Announcement {row.id} withdrawn.")


def register(main: click.Group) -> None:
    main.add_command(announce)
