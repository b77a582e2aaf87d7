"""``crm-appliance``: thin Click commands over plain-Python functions.

Each command parses its flags, calls one library function and renders the result
(a table for people, ``--json`` for scripts). An ``ApplianceError`` becomes one
line on stderr and exit status 1; a usage error exits 2 (Click's own).
"""

from __future__ import annotations

import json
import logging
import platform
import sys
from pathlib import Path

import click

import appliance
from appliance import config as config_mod
from appliance.errors import ApplianceError, SizingError
from appliance.scheduler import CRON_JOBS
from installer.clickutil import handle_errors
from sizing import profiles as sizing_profiles
from sizing.check import CHECK_IDS


def _version_message() -> str:
    where = Path(appliance.__file__).resolve().parent.parent
    return f"crm-appliance {appliance.__version__} from {where} (Python {platform.python_version()})"


class Context:
    """What every command may need, loaded on first use."""

    def __init__(self, config_path: Path):
        self.config_path = config_path
        self._settings = None
        self._db = None

    @property
    def settings(self) -> config_mod.Settings:
        if self._settings is None:
            self._settings = config_mod.load(self.config_path)
        return self._settings

    def database(self):
        """The pool, checked once, with the built-in roles present."""
        if self._db is None:
            from appliance.db import check_connection, open_database

            self._db = open_database(self.settings)
            check_connection(self._db, self.settings)
        return self._db


pass_ctx = click.make_pass_decorator(Context)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--config", "config_path", type=click.Path(dir_okay=False), default=None,
              help=f"Configuration file [default: ${config_mod.ENV_VAR} or {config_mod.DEFAULT_PATH}].")
@click.option("-v", "--verbose", is_flag=True, help="Log what happens, step by step.")
@click.version_option(version=appliance.__version__, message=_version_message(), help="Show the version, install path and Python version.")
@click.pass_context
def main(ctx: click.Context, config_path: str | None, verbose: bool) -> None:
    """Install, run and look after the CRM appliance."""
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    ctx.obj = Context(config_mod.resolve_path(config_path))


# ----------------------------------------------------------------------------- db

@main.group()
def db() -> None:
    """The database schema."""


@db.command("migrate")
@pass_ctx
@handle_errors
def db_migrate(ctx: Context) -> None:
    """Apply pending schema migrations (safe to run twice) and refresh the built-in roles."""
    from appliance.db import migrate
    from webapp.permissions import ensure_builtin_roles

    database = ctx.database()
    applied = migrate(database)
    with database.connection_context():
        ensure_builtin_roles()
    if applied:
        for name in applied:
            click.echo(f"applied {name}")
    else:
        click.echo("the schema is up to date")


@db.command("status")
@click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")
@pass_ctx
@handle_errors
def db_status(ctx: Context, as_json: bool) -> None:
    """List every migration and whether it is applied."""
    from appliance.db import migration_status

    rows = migration_status(ctx.database())
    if as_json:
        click.echo(json.dumps([{"name": n, "applied": a} for n, a in rows], indent=2))
        return
    for name, applied in rows:
        click.echo(f"{'applied' if applied else 'pending':8} {name}")


# ----------------------------------------------------------------------------- serve

@main.command()
@click.option("--bind", default=None, help="host:port to listen on [default: [web] bind].")
@click.option("--workers", type=click.IntRange(1, 256), default=None, help="Worker processes [default: [web] workers].")
@click.option("--threads", type=click.IntRange(1, 256), default=None, help="Threads per worker [default: [web] threads].")
@click.option("--log-file", type=click.Path(dir_okay=False), default=None, help="Access and error log [default: stderr].")
@pass_ctx
@handle_errors
def serve(ctx: Context, bind, workers, threads, log_file) -> None:
    """Run the CRM under gunicorn (gthread workers) in the foreground."""
    from installer.serve import serve as run_server

    overrides = {"bind": bind, "workers": workers, "threads": threads}
    if log_file:
        overrides.update(accesslog=log_file, errorlog=log_file)
    run_server(ctx.settings, **overrides)


# ----------------------------------------------------------------------------- seats

@main.group()
def seats() -> None:
    """Seat users' accounts."""


@seats.command("add")
@click.option("--email", help="The person's e-mail; also the login name.")
@click.option("--name", help="Full name as shown in the CRM.")
@click.option("--role", help="boss, manager, agent (or 老板, 经理, 专员), or a custom role; any case.")
@click.option("--team", default=None, help="Team name (created if new).")
@click.option("--file", "seats_file", type=click.Path(dir_okay=False, path_type=Path),
              help="CSV with a header row email,name,role,team (or 邮箱,姓名,角色,团队), UTF-8 or GBK: "
                   "up to 100 seats, all added or none.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")
@pass_ctx
@handle_errors
def seats_add(ctx: Context, email, name, role, team, seats_file, as_json) -> None:
    """Add one seat (--email, --name, --role) or many (--file), and print their one-time
    set-password links."""
    from appliance import lifecycle
    from appliance import seats as seats_lib
    from webapp import audit
    from webapp.models import database

    if seats_file and (email or name or role or team):
        raise click.UsageError("give either --file or --email/--name/--role, not both")
    lifecycle.refuse_when_read_only(ctx.settings, "seats add")
    if seats_file:
        try:
            data = seats_file.read_bytes()
        except OSError as exc:
            raise click.BadParameter(f"{seats_file}: {exc.strerror}", param_hint="--file") from None
        rows = seats_lib.read_seat_rows(data, str(seats_file))
    elif email and name and role:
        rows = [seats_lib.SeatRow(1, email, name, role, team)]
    else:
        raise click.UsageError("give --email, --name and --role for one seat, or --file for many")
    with ctx.database().connection_context(), database.atomic():  # the seats and their audit rows together
        created = seats_lib.add_seats(ctx.settings, rows)
        for new in created:
            audit.write_row(f"cli:{_os_user()}", "user", new.user.id, "create",
                            {"email": [None, new.user.email], "role": [None, new.user.role.name]})
    if as_json:
        out = [{"id": c.user.id, "email": c.user.email, "link": c.link, "expires_at": c.expires_at.isoformat() + "Z",
                "team": c.user.team.name if c.user.team else None, "new_team": c.new_team}
               for c in created]
        click.echo(json.dumps(out if seats_file else out[0]))
        return
    for c in created:
        click.echo(f"Added {c.user.email} ({c.user.role.name}).")
        _print_link(c.link, c.expires_at)
    if seats_file:
        click.echo(f"Seats added: {len(created)}; "
                   f"in use: {seats_lib.in_use()} of {ctx.settings.seats.licensed} licensed.")
    teams = seats_lib.new_teams(created)
    if teams:
        click.echo(f"New teams created: {', '.join(teams)}.")


def _emails(emails: tuple[str, ...], emails_file: Path | None) -> tuple[list[str], dict[str, int]]:
    """The e-mails named as arguments and in --file, and {e-mail: line} for those in the file."""
    from appliance import seats as seats_lib

    lines: dict[str, int] = {}
    if emails_file:
        try:
            data = emails_file.read_bytes()
        except OSError as exc:
            raise click.BadParameter(f"{emails_file}: {exc.strerror}", param_hint="--file") from None
        lines = seats_lib.read_seat_emails(data, str(emails_file))
    found = list(emails) + list(lines)
    if not found:
        raise click.UsageError("name the seats: e-mails as arguments, or --file with one e-mail per line")
    return found, lines


@seats.command("disable")
@click.argument("emails", nargs=-1)
@click.option("--file", "emails_file", type=click.Path(dir_okay=False, path_type=Path),
              help="One e-mail per line, or a CSV whose first column (or the one headed email or 邮箱) "
                   "is the e-mail; UTF-8 or GBK. A line that is not an e-mail stops the command.")
@click.option("--reason", default="disabled by customer IT", show_default=True, help="Kept with the seat.")
@click.option("--even-the-last-boss", "even_last_boss", is_flag=True,
              help="Also when no other active seat with administration rights remains (a stolen boss "
                   "account); then 'seats reactivate' gives it back to its owner with a new link.")
@pass_ctx
@handle_errors
def seats_disable(ctx: Context, emails, emails_file, reason, even_last_boss) -> None:
    """Disable up to 100 seats at once: their sessions end at their next request, and each
    frees a licensed seat. A stolen account is stopped this way."""
    from appliance import seats as seats_lib
    from appliance.errors import LastAdminError
    from webapp import audit
    from webapp.models import database

    with ctx.database().connection_context():
        users = seats_lib.find_seats(*_emails(emails, emails_file))
        try:
            with database.atomic():  # the change and its audit rows together
                changed = seats_lib.disable_seats(users, reason, keep_an_admin=not even_last_boss)
                for user in changed:
                    audit.write_row(f"cli:{_os_user()}", "user", user.id, "suspend", {"active": [True, False]})
        except LastAdminError as exc:
            raise LastAdminError(f"{exc}; or, to stop a stolen boss account at once, run this again with "
                                 f"--even-the-last-boss") from None
        in_use = seats_lib.in_use()
        admins_left = seats_lib.active_admins()
    click.echo(f"Seats disabled: {len(changed)} (disabled already: {len(users) - len(changed)}); "
               f"in use: {in_use} of {ctx.settings.seats.licensed} licensed.")
    if not admins_left:
        click.echo("No active seat has administration rights now: nobody can manage the seats on the web until "
                   "one is back ('crm-appliance seats reactivate EMAIL' gives its owner a new link) or added "
                   "('crm-appliance seats add --email ... --name ... --role boss').")


@seats.command("remove")
@click.argument("emails", nargs=-1)
@click.option("--file", "emails_file", type=click.Path(dir_okay=False, path_type=Path),
              help="One e-mail per line, or a CSV whose first column (or the one headed email or 邮箱) "
                   "is the e-mail; UTF-8 or GBK. A line that is not an e-mail stops the command.")
@click.option("--reassign-to", "heir_email", required=True, help="The active seat that takes over their records.")
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
@pass_ctx
@handle_errors
def seats_remove(ctx: Context, emails, emails_file, heir_email, yes) -> None:
    """Remove up to 100 seats: every record they own goes to --reassign-to (audited), and
    they can no longer log in. Their notes and the audit trail keep their names."""
    from appliance import lifecycle
    from appliance import seats as seats_lib

    lifecycle.refuse_when_read_only(ctx.settings, "seats remove")
    with ctx.database().connection_context():
        users = seats_lib.find_seats(*_emails(emails, emails_file))
        heir = seats_lib.find_seats([heir_email])[0]
        if not yes:
            click.confirm(f"Remove {len(users)} seats and hand their records to {heir.email}?", abort=True)
        moved = seats_lib.remove_seats(users, heir, f"cli:{_os_user()}")
        in_use = seats_lib.in_use()
    handed = ", ".join(f"{n} {entity}" for entity, n in moved.items()) or "no records"
    click.echo(f"Seats removed: {len(users)}; handed to {heir.email}: {handed}; "
               f"in use: {in_use} of {ctx.settings.seats.licensed} licensed.")


@seats.command("link")
@click.argument("email")
@pass_ctx
@handle_errors
def seats_link(ctx: Context, email: str) -> None:
    """A new one-time set-password link for an active seat (a forgotten password, an invitation
    that expired); its earlier unused links stop working. The password itself is never shown."""
    from appliance import seats as seats_lib
    from appliance.errors import SeatError
    from webapp import audit
    from webapp.models import database

    with ctx.database().connection_context(), database.atomic():
        [user] = seats_lib.find_seats([email])
        if not user.active:
            raise SeatError(f"{user.email} is not active; 'crm-appliance seats reactivate {user.email}' brings it "
                            f"back with a new link")
        link, expires = seats_lib.issue_link(ctx.settings, user)
        audit.write_row(f"cli:{_os_user()}", "user", user.id, "new_link", {})
    _print_link(link, expires)


@seats.command("reactivate")
@click.argument("email")
@pass_ctx
@handle_errors
def seats_reactivate(ctx: Context, email: str) -> None:
    """Bring a disabled, suspended or removed seat back; it takes a licensed seat. Its old
    password stops working and it gets a new one-time link (a removed seat comes back without
    the records it handed over). Also after the licence's end: it is about who may log in."""
    from appliance import seats as seats_lib
    from webapp import audit
    from webapp.models import database

    with ctx.database().connection_context(), database.atomic():
        [user] = seats_lib.find_seats([email])
        had_password = bool(user.password_hash)
        new = seats_lib.reactivate(ctx.settings, user)
        audit.write_row(f"cli:{_os_user()}", "user", user.id, "reactivate",
                        {"active": [False, True], "password_set": [had_password, False]})
    click.echo(f"{user.email} is active again; its old password no longer works.")
    _print_link(new.link, new.expires_at)


def _print_link(link: str, expires) -> None:
    click.echo(f"One-time set-password link, valid until {expires:%Y-%m-%d %H:%M} UTC:")
    click.echo(link)


@seats.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")
@pass_ctx
@handle_errors
def seats_list(ctx: Context, as_json: bool) -> None:
    """All seats with role, team and state."""
    from appliance import seats as seats_lib

    with ctx.database().connection_context():
        rows = seats_lib.list_seats()
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    active = sum(1 for r in rows if r["active"])
    click.echo(f"{active} of {ctx.settings.seats.licensed} licensed seats in use")
    width = max([len(r["email"]) for r in rows] + [5])
    click.echo(f"{'EMAIL':{width}}  {'ROLE':8}  {'TEAM':12}  STATE")
    for r in rows:
        state = ("removed" if r["removed"] else "suspended") if not r["active"] else (
            "active" if r["password_set"] else "invited")
        click.echo(f"{r['email']:{width}}  {r['role']:8}  {(r['team'] or '-'):12}  {state}")


def _os_user() -> str:
    import getpass

    try:
        return getpass.getuser()
    except Exception:  # no passwd entry in some containers
        return "unknown"


# ----------------------------------------------------------------------------- preflight and plan

def _profile_option(func):
    return click.option("--profile", "profile_name", type=click.Choice(sizing_profiles.names()),
                        default=sizing_profiles.DEFAULT_PROFILE, show_default=True,
                        help="Sizing profile; see docs/sizing.md (eval is not for production).")(func)


def _seats_option(func):
    return click.option("--seats", type=int, default=None,
                        help="Concurrent seats to size for [default: the profile's maximum].")(func)


def _sizing_args(profile_name: str, seats: int | None):
    """The profile and a seat count it can carry; a bad count is a usage error (exit 2)."""
    profile = sizing_profiles.get(profile_name)
    try:
        return profile, sizing_profiles.validate_seats(profile, profile.max_seats if seats is None else seats)
    except SizingError as exc:
        raise click.BadParameter(str(exc), param_hint="'--seats'") from None


def _default_data_dir(ctx: Context) -> Path:
    """The configured data directory, or the schema's default before any config exists."""
    try:
        return ctx.settings.appliance.data_dir
    except ApplianceError:
        return config_mod.ApplianceSection().data_dir


_VERDICT_STYLE = {"PASS": "green", "WARN": "yellow", "FAIL": "bold red", "ACCEPTED": "magenta"}


@main.command()
@_profile_option
@_seats_option
@click.option("--data-dir", type=click.Path(file_okay=False), default=None,
              help="Where the appliance keeps its data [default: the config's [appliance] data_dir, "
                   "else /var/lib/crm-appliance].")
@click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")
@click.option("--accept-risk", "accepted", multiple=True, metavar="CHECK",
              type=click.Choice(CHECK_IDS),
              help=f"Accept a failing check (repeatable): it shows as ACCEPTED and no longer blocks. "
                   f"CHECK is one of: {', '.join(CHECK_IDS)}.")
@pass_ctx
@handle_errors
def preflight(ctx: Context, profile_name, seats, data_dir, as_json, accepted) -> None:
    """Check this host against a sizing profile, changing nothing. Exit 1 if a check fails."""
    from sizing import check, host

    profile, seats = _sizing_args(profile_name, seats)
    data_dir = Path(data_dir) if data_dir else _default_data_dir(ctx)
    facts = host.gather(data_dir)
    result = check.preflight(facts, profile, seats, accepted)
    if as_json:
        import dataclasses

        click.echo(json.dumps({"profile": result.profile, "seats": result.seats, "ok": result.ok,
                               "accepted": list(result.accepted),
                               "verdicts": [dataclasses.asdict(v) for v in result.verdicts],
                               "facts": dataclasses.asdict(facts)}, indent=2, default=str))
    else:
        note = "" if profile.production else " (NOT for production)"
        click.echo(f"Preflight: profile {profile.name}{note}, {seats} seats, data in {data_dir}")
        _render_table(["CHECK", "REQUIRED", "FOUND", "VERDICT", "REMEDY"],
                      [(v.check, v.required, v.found, v.status, v.remedy) for v in result.verdicts])
    if not result.ok:
        failed = ", ".join(v.check for v in result.failed)
        raise click.ClickException(f"preflight failed for profile {profile.name}: {failed}; fix them, "
                                   f"or take the risk with --accept-risk CHECK")


def _render_table(headers: list[str], rows: list[tuple[str, ...]]) -> None:
    """A rich table on a terminal; plain aligned columns otherwise (logs, pipes, tests)."""
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    console = Console()
    if console.is_terminal:
        table = Table(*headers)
        for row in rows:  # Text, not markup: a found value may contain brackets
            table.add_row(*(Text(cell, style=_VERDICT_STYLE.get(cell, "") if i == 3 else "")
                            for i, cell in enumerate(row)))
        console.print(table)
        return
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers[:-1])]
    for row in [tuple(headers), *rows]:
        click.echo(("  ".join(f"{cell:{w}}" for cell, w in zip(row, widths)) + "  " + row[-1]).rstrip())


@main.command()
@_profile_option
@_seats_option
@click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")
@pass_ctx
@handle_errors
def plan(ctx: Context, profile_name, seats, as_json) -> None:
    """The tuning install applies on this host: workers, PostgreSQL memory, disk budget."""
    from sizing import host
    from sizing.plan import plan_for

    profile, seats = _sizing_args(profile_name, seats)
    facts = host.gather(_default_data_dir(ctx))
    result = plan_for(profile, seats, facts)
    if as_json:
        import dataclasses

        data = dataclasses.asdict(result)
        data.update(request_slots=result.request_slots, postgresql_conf=result.postgresql_conf())
        data["disk"].update(total_bytes=result.disk.total_bytes, data_bytes=result.disk.data_bytes,
                            fits=result.disk.fits)
        click.echo(json.dumps(data, indent=2))
    else:
        _render_plan(result, facts)
    if not result.disk.fits:
        raise click.ClickException(f"the year-one disk budget of {result.disk.total_bytes / 1000**3:.1f} GB does not fit "
                                   f"the {result.disk.usable_bytes / 1000**3:.1f} GB usable: give the data directory a larger disk")


def _render_plan(plan, facts) -> None:
    gb, r, d = 1000**3, plan.resources, plan.disk
    click.echo(f"Plan for {plan.seats} seats on this host: {r.cores} cores, "
               f"{r.memory_bytes / 1024**3:.1f} GiB memory, {d.disk_bytes / gb:.1f} GB disk at {facts.disk_mount}")
    click.echo(f"gunicorn    workers {plan.gunicorn_workers}, threads {plan.gunicorn_threads} "
               f"({plan.request_slots} requests at once); database pool {plan.db_pool_size} per worker")
    click.echo("postgresql  " + ", ".join(f"{k} = {v}" for k, v in plan.postgresql_conf().items()))
    click.echo(f"nginx       worker_processes {plan.nginx_worker_processes}")
    click.echo(f"disk        year one: database {d.database_bytes / gb:.1f} GB, WAL {d.wal_bytes / gb:.1f} GB, "
               f"attachments {d.attachments_bytes / gb:.1f} GB, backups {d.backups_bytes / gb:.1f} GB, "
               f"system {d.system_bytes / gb:.1f} GB = {d.total_bytes / gb:.1f} GB "
               f"of {d.usable_bytes / gb:.1f} GB usable; room for {d.years_that_fit:.0f} years of growth")
    for warning in plan.warnings:
        click.echo(f"WARNING: {warning}")


# ----------------------------------------------------------------------------- install, uninstall, status

def _install_context(ctx: Context, config, inventory, **kwargs):
    from installer import deploy

    return deploy.InstallContext(config_path=Path(config) if config else _existing_config(ctx),
                                 inventory=Path(inventory) if inventory else None,
                                 confirm=lambda question: click.confirm(question, default=False), **kwargs)


def _existing_config(ctx: Context) -> Path | None:
    """The group's --config (or the default path) when the file exists; None lets install use defaults."""
    return ctx.config_path if ctx.config_path.exists() else None


_inventory_option = click.option("--inventory", type=click.Path(dir_okay=False, exists=True), default=None,
                                 help="Ansible inventory naming one host in group 'appliance' [default: this host].")


_install_config_option = click.option(
    "--config", "config", type=click.Path(dir_okay=False, exists=True), default=None,
    help="Configuration to install [default: the group's --config when it exists, else defaults].")
_plan_seats_option = click.option(
    "--seats", type=click.IntRange(min=1), default=None,
    help="Concurrent seats to plan for [default: the licensed seats, at most the profile's].")
_accept_risk_option = click.option(
    "--accept-risk", "accepted", multiple=True, metavar="CHECK", type=click.Choice(CHECK_IDS),
    help="Accept a failing preflight check (repeatable); it is logged and shown by status.")


@main.command()
@_install_config_option
@_inventory_option
@_profile_option
@_plan_seats_option
@_accept_risk_option
@click.option("--check", "check_only", is_flag=True,
              help="Change nothing: report what differs from the installed state (drift). Exit 3 on drift.")
@click.option("--yes", is_flag=True, help="Do not ask before changing the host.")
@click.option("--new-boss-link", is_flag=True, help="Issue a new one-time link for a boss who has no password yet.")
@click.option("--no-backup", "skip_backup", is_flag=True,
              help="When another release runs: do not take a base backup with it first (taken by default).")
@pass_ctx
@handle_errors
def install(ctx: Context, config, inventory, profile_name, seats, accepted, check_only, yes, new_boss_link,
            skip_backup) -> None:
    """Check the host, then deploy (or update) the appliance with Ansible. Safe to run again.

    When another release runs, this is an upgrade: a backup first, then the guarded switch."""
    from installer import deploy, progress

    ictx = _install_context(ctx, config, inventory, profile=profile_name, seats=seats,
                            accept_risks=tuple(accepted), yes=yes, new_boss_link=new_boss_link,
                            skip_backup=skip_backup)
    if check_only:
        report = deploy.check(ictx)
        progress.print_drift(ictx.console, report)
        if report.drifted:
            sys.exit(3)
        return
    progress.print_install(ictx.console, deploy.install(ictx))


@main.command()
@_install_config_option
@_inventory_option
@_profile_option
@_plan_seats_option
@_accept_risk_option
@click.option("--no-backup", "skip_backup", is_flag=True,
              help="Do not take a base backup with the running release first (it is taken by default).")
@click.option("--yes", is_flag=True, help="Do not ask before upgrading.")
@pass_ctx
@handle_errors
def upgrade(ctx: Context, config, inventory, profile_name, seats, accepted, skip_backup, yes) -> None:
    """Back up, then switch the installed appliance to this release: maintenance page, migrate,
    health gate, and roll back to the previous release if anything fails."""
    from installer import deploy, progress

    ictx = _install_context(ctx, config, inventory, profile=profile_name, seats=seats,
                            accept_risks=tuple(accepted), yes=yes, skip_backup=skip_backup)
    progress.print_install(ictx.console, deploy.upgrade(ictx))


@main.command()
@_inventory_option
@click.option("--purge-data", is_flag=True,
              help="Also destroy the data: the database, the data directory, the configuration and secrets.")
@click.option("--yes", is_flag=True, help="Do not ask before changing the host.")
@pass_ctx
@handle_errors
def uninstall(ctx: Context, inventory, purge_data, yes) -> None:
    """Stop the services and remove the program; the database, data and /etc/crm-appliance stay
    unless --purge-data."""
    from installer import deploy, progress

    ictx = _install_context(ctx, None, inventory, yes=yes)
    progress.print_uninstall(ictx.console, deploy.uninstall(ictx, purge_data=purge_data))


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")
@pass_ctx
@handle_errors
def status(ctx: Context, as_json: bool) -> None:
    """What runs on this host and how it answers (read-only)."""
    from installer import deploy, progress

    ictx = _install_context(ctx, str(ctx.config_path), None)
    result = deploy.status(ictx)
    if as_json:
        click.echo(json.dumps(result, indent=2, default=str))
    else:
        progress.print_status(ictx.console, result)


# ----------------------------------------------------------------------------- demo data


@main.command("demo-data")
@click.option("--seats", type=click.IntRange(1, 10_000), default=50, show_default=True, help="Demo seats to create.")
@click.option("--years", type=click.FloatRange(0, 20, min_open=True), default=3, show_default=True,
              help="Years of history the records spread over.")
@click.option("--scale", type=click.FloatRange(0, 100, min_open=True), default=1, show_default=True,
              help="Multiplies every count (1: 50k accounts, 200k contacts, ... for 50 seats and 3 years).")
@click.option("--seed", type=int, default=1, show_default=True, help="Same seed, same data set.")
@click.option("--password-file", type=click.Path(dir_okay=False, exists=True), default=None,
              help="File holding the password every demo seat gets (for load tests); default: no password.")
@click.option("--force", is_flag=True, help="Add demo data even though the database holds records already.")
@click.option("--attachments", is_flag=True,
              help="Also write attachment files on accounts: 2.5 GB at scale 1 (at most 95% of the quota).")
@pass_ctx
@handle_errors
def demo_data(ctx: Context, seats, years, scale, seed, password_file, force, attachments) -> None:
    """Fill the database with a realistic, deterministic demo data set (never for real data)."""
    from appliance import demo_data as demo
    from appliance.lifecycle import refuse_when_read_only
    from appliance.seats import hash_password

    refuse_when_read_only(ctx.settings, "demo-data")
    password_hash = hash_password(Path(password_file).read_text().strip()) if password_file else None
    result = demo.generate(ctx.settings, seats=seats, years=years, scale=scale, seed=seed, force=force,
                           password_hash=password_hash, attachments=attachments, progress=lambda what: click.echo(f"... {what}", err=True))
    click.echo(str(result))


@main.command("export")
@click.option("--output", "-o", type=click.Path(dir_okay=False, path_type=Path), required=True,
              help="The ZIP file to write (mode 0600; never overwritten).")
@pass_ctx
@handle_errors
def export(ctx: Context, output: Path) -> None:
    """Export all the customer's data: every module, notes, seats, the audit and login logs,
    as CSV in one ZIP file with a manifest (the data file promised after termination)."""
    from appliance import attachments
    from appliance import export as export_mod
    from webapp import audit

    export_mod.check_output(output)  # a refused file name is no export: not audited
    with ctx.database().connection_context():
        # Written first, as for the web's exports: a run stopped halfway has still copied data.
        audit.write_row(f"cli:{_os_user()}", "export", 0, "export_all", {"file": [None, str(output.absolute())]})
    result = export_mod.export_all(output, progress=lambda what: click.echo(f"... {what}", err=True),
                                   attachments_dir=attachments.store_dir(ctx.settings))
    click.echo(f"Exported {result.rows:,} rows in {len(result.files)} files and {result.attachments:,} attachment "
               f"files to {result.path} ({result.bytes / 1e6:.1f} MB, {result.seconds:.1f} s); manifest.json lists "
               f"each file with its rows and SHA-256. It holds customer data: keep it safe.")
    for lost in result.missing:
        click.echo(f"warning: attachment {lost['path']} not exported: {lost['reason']}", err=True)


# ----------------------------------------------------------------------------- deletion and the licence


@main.command()
@click.option("--all", "everything", is_flag=True, help="Destroy all customer data (required: purge has no other scope).")
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")
@pass_ctx
@handle_errors
def purge(ctx: Context, everything: bool, yes: bool, as_json: bool) -> None:
    """Destroy all customer data for good: records, notes, attachments (files overwritten), the
    audit and login logs, the company profile, announcements, exports and imports. Seats and
    roles stay. Prints which backups still hold the data and when retention removes them."""
    from appliance import lifecycle

    if not everything:
        raise click.UsageError("purge destroys all customer data and needs --all; a single deleted record is "
                               "destroyed on Administration -> Deleted items")
    if not yes:
        click.confirm("Destroy ALL customer data on this appliance for good? Export it first "
                      "(crm-appliance export) if anyone may need it", abort=True)
    with ctx.database().connection_context():
        report = lifecycle.purge_all(ctx.settings, f"cli:{_os_user()}")
    click.echo(json.dumps(report.to_json(), indent=2) if as_json else str(report))


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")
@pass_ctx
@handle_errors
def licence(ctx: Context, as_json: bool) -> None:
    """The licence: seats, expiry, state, and the dates the CRM turns read-only and the data is destroyed."""
    from appliance import lifecycle

    with ctx.database().connection_context():
        status = lifecycle.licence_status(ctx.settings)
    if as_json:
        click.echo(json.dumps(status, indent=2))
        return
    click.echo(f"seats:      {status['seats_in_use']} of {status['seats']} licensed in use")
    if status["expires"] is None:
        click.echo("expires:    never (perpetual licence)")
    else:
        click.echo(f"expires:    {status['expires']} (the last licensed day; {status['days_to_expiry']} days from today)")
        click.echo(f"state:      {status['state']}" + (" (read-only)" if status["read_only"] else ""))
        click.echo(f"read-only:  from the day after the expiry, for {status['grace_days']} days")
        click.echo(f"destroyed:  {status['destroy_on']} (all customer data, by the retention job)")
    if status["purged"]:
        click.echo(f"purged:     {status['purged']['at']} (licence that expired {status['purged']['expires']})")


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")
@pass_ctx
@handle_errors
def deleted(ctx: Context, as_json: bool) -> None:
    """Deleted records and attachments that can still be brought back, newest first."""
    from appliance import lifecycle

    with ctx.database().connection_context():
        items = lifecycle.deleted_items(ctx.settings)
    if as_json:
        click.echo(json.dumps([i.to_json() for i in items], indent=2))
        return
    if not items:
        click.echo("nothing deleted is waiting")
    for i in items:
        click.echo(f"{i.entity:<12} {i.id:>8}  deleted {i.deleted_at:%Y-%m-%d %H:%M} by {i.deleted_by or '-'}, "
                   f"destroyed after {i.destroy_after:%Y-%m-%d %H:%M} UTC  {i.title}")


@main.command()
@click.argument("entity")
@click.argument("record_id", type=click.IntRange(1, 2**31 - 1))
@pass_ctx
@handle_errors
def undelete(ctx: Context, entity: str, record_id: int) -> None:
    """Bring back a deleted item (ENTITY: account, contact, lead, opportunity, ticket, activity or
    attachment; ID as listed by crm-appliance deleted)."""
    from appliance import lifecycle

    lifecycle.refuse_when_read_only(ctx.settings, "undelete")
    with ctx.database().connection_context():
        title = lifecycle.undo(ctx.settings, f"cli:{_os_user()}", entity, record_id)
    click.echo(f"{entity} {record_id} ({title}) is back")


# ----------------------------------------------------------------------------- scheduler


@main.group(invoke_without_command=True)
@pass_ctx
@click.pass_context
@handle_errors
def scheduler(click_ctx: click.Context, ctx: Context) -> None:
    """Run the scheduler daemon in the foreground (the installer runs it as a service).

    It runs the jobs of the [schedule] config section and the uptime probe; SIGHUP reloads
    the configuration, SIGTERM stops it after the running jobs."""
    if click_ctx.invoked_subcommand is not None:
        return
    from appliance import scheduler as scheduler_mod

    logging.getLogger().setLevel(logging.INFO)
    scheduler_mod.run(lambda: config_mod.load(ctx.config_path))


@scheduler.command("run")
@click.argument("job", type=click.Choice(sorted(CRON_JOBS)))
@pass_ctx
@handle_errors
def scheduler_run(ctx: Context, job: str) -> None:
    """Run one job now, recorded in the job history like a scheduled run; exit 1 if it fails."""
    from appliance import scheduler as scheduler_mod

    result = scheduler_mod.run_job(ctx.settings, job)
    click.echo(f"{result.job}: {result.outcome} in {result.seconds:.1f} s: {result.message}")
    if result.outcome != "ok":
        sys.exit(1)


@scheduler.command("history")
@click.option("--limit", type=click.IntRange(1, 10_000), default=30, show_default=True, help="Runs to show.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")
@pass_ctx
@handle_errors
def scheduler_history(ctx: Context, limit: int, as_json: bool) -> None:
    """The latest job runs, newest first."""
    from appliance import scheduler as scheduler_mod

    rows = scheduler_mod.history(ctx.settings, limit)
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    for row in rows:
        click.echo(f"{row['started_at']}  {row['job']:<14} {row['outcome']:<8} {row['message']}")


# Commands of their own modules: the SLA ledger and maintenance windows.
from installer.monitor_commands import register as _register_monitor_commands  # noqa: E402

_register_monitor_commands(main)

# Backups and restores, and the WAL commands PostgreSQL runs.
from installer.backup_commands import COMMANDS as _BACKUP_COMMANDS  # noqa: E402

for _command in _BACKUP_COMMANDS:
    main.add_command(_command)

# The diagnostics bundle for vendor support.
from installer.diagnostics_commands import register as _register_diagnostics_commands  # noqa: E402

_register_diagnostics_commands(main)

# Announcements to every seat.
from installer.company_commands import register as _register_company_commands  # noqa: E402

_register_company_commands(main)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
