"""Click commands for backups and restores: thin wrappers over ``appliance.backup`` and
``appliance.restore``.

Registered on ``crm-appliance`` by ``installer/cli.py`` (``main.add_command``): ``backup``
(with ``verify``, ``decrypt``, ``drill`` and ``prune``), ``backups``, ``restore``, ``wal-push`` and
``wal-fetch``. The two WAL commands also run on their own, without the rest of the CLI, as
PostgreSQL's ``archive_command`` and ``restore_command`` (see
``appliance.backup.archive_command_line``)::

    /opt/crm-appliance/current/bin/python -m installer.backup_commands wal-push --archive-dir A --key-file K %p %f

They take no configuration file (the postgres user cannot read it), only their two paths.
"""

from __future__ import annotations

import datetime as dt
import json
import sys
import zoneinfo

import click

from appliance.errors import ApplianceError, BackupIntegrityError
from installer.clickutil import handle_errors as _handle_errors

# PostgreSQL aborts recovery when restore_command exits above 125; any lower status means
# "not archived" and would end recovery early, promoting at the wrong point.
WAL_FETCH_FATAL = 126




def _settings(obj):
    """The group's Context (installer.cli.Context) loads the configuration on first use."""
    return obj.settings


def _echo_json(data) -> None:
    click.echo(json.dumps(data, indent=2, default=str))


def _when(value: dt.datetime | None) -> str:
    return value.astimezone(dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%SZ") if value else "-"


def _progress(message: str) -> None:
    click.echo(message, err=True)


# ----------------------------------------------------------------------------- backup


@click.group(invoke_without_command=True)
@click.option("--kind", type=click.Choice(["base", "logical"]), default="base", show_default=True,
              help="base: pg_basebackup plus archived WAL (point-in-time restore); logical: pg_dump -Fd.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")
@click.pass_context
@_handle_errors
def backup(ctx: click.Context, kind: str, as_json: bool) -> None:
    """Take a backup now (or verify, decrypt or prune with a subcommand)."""
    if ctx.invoked_subcommand is not None:
        return
    from appliance.backup import take_backup

    info = take_backup(_settings(ctx.obj), kind, progress=None if as_json else _progress)
    if as_json:
        _echo_json(info.to_json())
        return
    click.echo(f"backup {info.id}: {info.kind}, {info.size_bytes / 1e6:.1f} MB in {info.duration_seconds:.1f} s, "
               f"in {info.path}")


@backup.command("verify")
@click.argument("backup_id", default="latest")
@click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")
@click.pass_obj
@_handle_errors
def backup_verify(obj, backup_id: str, as_json: bool) -> None:
    """Re-check every checksum of BACKUP_ID (default: latest) and decrypt every byte, writing nothing."""
    from appliance.backup import verify

    result = verify(_settings(obj), backup_id)
    if as_json:
        _echo_json(result.__dict__)
        return
    click.echo(f"backup {result.backup_id} is intact: {result.files} files, {result.stored_bytes / 1e6:.1f} MB "
               f"checked and decrypted in {result.seconds:.1f} s")


@backup.command("decrypt")
@click.argument("backup_id")
@click.option("--output", required=True, type=click.Path(file_okay=False),
              help="New or empty directory for the plaintext (keep it private: it is the customer's data).")
@click.option("--no-archive", is_flag=True, help="Base backups: leave out the archived WAL after the backup.")
@click.pass_obj
@_handle_errors
def backup_decrypt(obj, backup_id: str, output: str, no_archive: bool) -> None:
    """Decrypt BACKUP_ID into a directory for stock PostgreSQL tools (docs/backup.md, emergency)."""
    from appliance.backup import decrypt

    result = decrypt(_settings(obj), backup_id, output, with_archive=not no_archive)
    click.echo(f"backup {result.backup_id} decrypted into {result.output}: {len(result.files)} files, "
               f"{result.wal_files} WAL files; see docs/backup.md for the stock-tools procedure")


@backup.command("drill")
@click.argument("backup_id", default="latest")
@click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")
@click.pass_obj
@_handle_errors
def backup_drill(obj, backup_id: str, as_json: bool) -> None:
    """Restore BACKUP_ID (default: latest base) into a scratch server, run pg_amcheck and compare
    row counts with the manifest; the running cluster is not touched."""
    from appliance.restore import drill

    result = drill(_settings(obj), backup_id, progress=None if as_json else _progress)
    if as_json:
        _echo_json(result.to_json())
        return
    click.echo(str(result))


@backup.command("prune")
@click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")
@click.pass_obj
@_handle_errors
def backup_prune(obj, as_json: bool) -> None:
    """Apply retention ([backup] retention_days): old backups and the WAL no kept backup needs."""
    from appliance.backup import prune

    result = prune(_settings(obj))
    if as_json:
        _echo_json(result.__dict__)
        return
    click.echo(str(result))


# ----------------------------------------------------------------------------- backups


@click.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")
@click.pass_obj
@_handle_errors
def backups(obj, as_json: bool) -> None:
    """The backup catalogue: id, kind, time, size, duration, last verified, state."""
    from appliance.backup import list_backups

    rows = list_backups(_settings(obj))
    if as_json:
        _echo_json([r.to_json() for r in rows])
        return
    if not rows:
        click.echo(f"no backups in {_settings(obj).backup.dir}")
        return
    table = [("ID", "KIND", "STARTED (UTC)", "SIZE", "DURATION", "VERIFIED (UTC)", "STATE")]
    for r in rows:
        table.append((r.id, r.kind, _when(r.started_at), f"{r.size_bytes / 1e6:.1f} MB",
                      f"{r.duration_seconds:.1f} s" if r.duration_seconds is not None else "-",
                      _when(r.verified_at), r.state))
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    for row in table:
        click.echo("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())


# ----------------------------------------------------------------------------- restore


def _parse_target(value: str | None, zone: str) -> dt.datetime | None:
    """ "YYYY-MM-DD HH:MM:SS" in the appliance's time zone, or with an explicit offset."""
    if value is None:
        return None
    try:
        when = dt.datetime.fromisoformat(value.strip())
    except ValueError:
        raise click.BadParameter(f'expected "YYYY-MM-DD HH:MM:SS", found {value!r}', param_hint="'--to'") from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=zoneinfo.ZoneInfo(zone))
    return when


@click.command()
@click.argument("backup_id", default="latest")
@click.option("--to", "target", default=None, metavar='"YYYY-MM-DD HH:MM:SS"',
              help="Point in time to recover to, in [web] timezone unless an offset is given "
                   "[default: the end of the WAL archive].")
@click.option("--yes", is_flag=True, help="Do not ask before replacing the database.")
@click.option("--json", "as_json", is_flag=True, help="Print the result (steps, times, RTO) as JSON.")
@click.pass_obj
@_handle_errors
def restore(obj, backup_id: str, target: str | None, yes: bool, as_json: bool) -> None:
    """Restore BACKUP_ID (default: latest) and replay WAL to --to or to the end; prints each step's time."""
    from appliance import restore as restore_mod

    settings = _settings(obj)
    when = _parse_target(target, settings.web.timezone)
    if not yes:
        if not sys.stdin.isatty():
            raise click.ClickException("restore replaces the database: confirm on a terminal or pass --yes")
        point = f"to {when.isoformat()}" if when else "to the end of the WAL archive"
        click.confirm(f"Replace the database of cluster {settings.backup.cluster} with backup {backup_id} {point}? "
                      f"The current data is kept beside it.", abort=True)
    say = (lambda text: None) if as_json else _progress
    hooks = None
    from installer import deploy

    if deploy.installed():
        # The installed appliance: maintenance page and services stopped around the swap, then
        # migrations and the health gate; the page goes off whatever happens.
        hooks = deploy.restore_hooks(settings, say)
    try:
        result = restore_mod.restore(settings, backup_id, target_time=when, hooks=hooks, progress=say)
    finally:
        if hooks is not None:
            try:
                deploy.control_services("start")  # a no-op when they run; back up when a step stopped them
            except ApplianceError as exc:
                click.echo(f"warning: {exc}", err=True)
            finally:
                deploy.set_maintenance(False)
    if as_json:
        _echo_json(result.to_json())
        return
    for line in result.summary():
        click.echo(line)
    if result.previous_data_dir:
        click.echo(f"the previous data directory is kept in {result.previous_data_dir}; remove it once satisfied")


# ----------------------------------------------------------------------------- WAL archive


@click.command("wal-push")
@click.option("--archive-dir", required=True, type=click.Path(file_okay=False), help="[backup] wal_archive_dir.")
@click.option("--key-file", required=True, type=click.Path(dir_okay=False),
              help="The postgres user's copy of the backup key (mode 0600).")
@click.argument("wal_path")
@click.argument("wal_name")
def wal_push(archive_dir: str, key_file: str, wal_path: str, wal_name: str) -> None:
    """archive_command: compress, encrypt and store WAL_PATH as WAL_NAME (%p %f). Exit 1 on failure
    (PostgreSQL retries)."""
    from appliance.backup import wal_push as push

    try:
        push(wal_path, wal_name, archive_dir, key_file)
    except (ApplianceError, OSError) as exc:
        click.echo(f"crm-appliance wal-push {wal_name}: {exc}", err=True)
        sys.exit(1)


@click.command("wal-fetch")
@click.option("--archive-dir", required=True, type=click.Path(file_okay=False), help="[backup] wal_archive_dir.")
@click.option("--key-file", required=True, type=click.Path(dir_okay=False),
              help="The postgres user's copy of the backup key (mode 0600).")
@click.argument("wal_name")
@click.argument("dest")
def wal_fetch(archive_dir: str, key_file: str, wal_name: str, dest: str) -> None:
    """restore_command: decrypt WAL_NAME from the archive into DEST (%f %p). Exit 1 when it is not
    archived (the end of the archive), 126 when it is damaged or the key is wrong (recovery stops)."""
    from appliance.backup import wal_fetch as fetch

    try:
        found = fetch(wal_name, dest, archive_dir, key_file)
    except (ApplianceError, OSError) as exc:
        kind = "damaged" if isinstance(exc, BackupIntegrityError) else "failed"
        click.echo(f"crm-appliance wal-fetch {wal_name} {kind}: {exc}", err=True)
        sys.exit(WAL_FETCH_FATAL)
    if not found:
        sys.exit(1)


# ----------------------------------------------------------------------------- on its own


@click.group()
def archive_main() -> None:
    """The WAL commands alone, for archive_command and restore_command."""


archive_main.add_command(wal_push)
archive_main.add_command(wal_fetch)

COMMANDS = (backup, backups, restore, wal_push, wal_fetch)

if __name__ == "__main__":
    archive_main()
