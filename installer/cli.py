"""``crm-appliance``: thin Click commands over plain-Python functions.

Each command parses its flags, calls one library function and renders the result
(a table for people, ``--json`` for scripts). An ``ApplianceError`` becomes one
line on stderr and exit status 1; a usage error exits 2 (Click's own).
"""

from __future__ import annotations

import functools
import json
import logging
import platform
import sys
from pathlib import Path

import click

import appliance
from appliance import config as config_mod
from appliance.errors import ApplianceError


def _version_message() -> str:
    where = Path(appliance.__file__).resolve().parent.parent
    return f"crm-appliance {appliance.__version__} from {where} (Python {platform.python_version()})"


def handle_errors(func):
    """Turn the appliance's expected errors into a clean message and exit 1."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        try:
            return func(*args, **kwargs)
        except ApplianceError as exc:
            raise click.ClickException(str(exc)) from None

    return wrapper


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
@click.option("--daemon", is_flag=True, help="Detach into the background (used by quickstart).")
@click.option("--pidfile", type=click.Path(dir_okay=False), default=None, help="Write the master's pid here.")
@click.option("--log-file", type=click.Path(dir_okay=False), default=None, help="Access and error log [default: stderr].")
@pass_ctx
@handle_errors
def serve(ctx: Context, bind, workers, threads, daemon, pidfile, log_file) -> None:
    """Run the CRM under gunicorn (gthread workers) in the foreground."""
    from installer.serve import serve as run_server

    overrides = {"bind": bind, "workers": workers, "threads": threads, "daemon": daemon or None,
                 "pidfile": pidfile}
    if log_file:
        overrides.update(accesslog=log_file, errorlog=log_file)
    run_server(ctx.settings, **overrides)


# ----------------------------------------------------------------------------- seats

@main.group()
def seats() -> None:
    """Seat users' accounts."""


@seats.command("add")
@click.option("--email", required=True, help="The person's e-mail; also the login name.")
@click.option("--name", required=True, help="Full name as shown in the CRM.")
@click.option("--role", required=True, help="boss, manager, agent, or a custom role.")
@click.option("--team", default=None, help="Team name (created if new).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")
@pass_ctx
@handle_errors
def seats_add(ctx: Context, email, name, role, team, as_json) -> None:
    """Add one seat and print its one-time set-password link."""
    from appliance import seats as seats_lib
    from webapp import audit

    database = ctx.database()
    with database.connection_context():
        created = seats_lib.add_seat(ctx.settings, email, name, role, team)
        audit.write_row(f"cli:{_os_user()}", "user", created.user.id, "create",
                        {"email": [None, created.user.email], "role": [None, role]})
    if as_json:
        click.echo(json.dumps({"id": created.user.id, "email": created.user.email, "link": created.link,
                               "expires_at": created.expires_at.isoformat() + "Z"}))
        return
    click.echo(f"Added {created.user.email} ({role}).")
    click.echo(f"One-time set-password link, valid until {created.expires_at:%Y-%m-%d %H:%M} UTC:")
    click.echo(created.link)


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
        state = "active" if r["active"] and r["password_set"] else ("invited" if r["active"] else "suspended")
        click.echo(f"{r['email']:{width}}  {r['role']:8}  {(r['team'] or '-'):12}  {state}")


def _os_user() -> str:
    import getpass

    try:
        return getpass.getuser()
    except Exception:  # no passwd entry in some containers
        return "unknown"


# ----------------------------------------------------------------------------- quickstart

@main.command()
@click.option("--boss-email", default="boss@crm.local", show_default=True, help="Login of the first boss seat.")
@click.option("--boss-name", default="Boss", show_default=True, help="Name of the first boss seat.")
@click.option("--port", type=click.IntRange(1, 65535), default=8000, show_default=True, help="Web port.")
@pass_ctx
@handle_errors
def quickstart(ctx: Context, boss_email: str, boss_name: str, port: int) -> None:
    """Set up and start the CRM on this host with local PostgreSQL (until `install` lands)."""
    from installer.quickstart import QuickstartContext
    from installer.quickstart import quickstart as run_quickstart

    result = run_quickstart(QuickstartContext(config_path=ctx.config_path, boss_email=boss_email,
                                              boss_name=boss_name, port=port, say=click.echo))
    click.echo("")
    click.echo(f"The CRM runs at {result.settings.web.public_url}")
    if result.boss_link:
        click.echo(f"Open this one-time link to set the password of {boss_email}:")
        click.echo(result.boss_link)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
