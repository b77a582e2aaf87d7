"""``crm-appliance diagnostics``: thin Click commands over appliance.diagnostics.

``crm-appliance diagnostics [--output F] [--preview [--show PATH]] [--json]`` builds the
support bundle (customer IT's side); ``diagnostics keygen`` and ``diagnostics decrypt``
are vendor support's side. Register them on the main group in installer/cli.py with::

    from installer.diagnostics_commands import register as _register_diagnostics_commands
    _register_diagnostics_commands(main)

The commands take the group's context object (``installer.cli.Context``) through
``click.pass_obj`` rather than importing installer.cli, so that the two modules do not
import each other. keygen and decrypt never read the configuration: the vendor has none.
"""

from __future__ import annotations

import json
from pathlib import Path

import click

from installer.clickutil import handle_errors as _handle_errors




@click.group(invoke_without_command=True)
@click.option("--output", "-o", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="File to write [default: crm-diagnostics-<host>-<time>.tar.gz (.enc when encrypted) here].")
@click.option("--preview", is_flag=True,
              help="Build it in memory and print the manifest and a summary; write nothing.")
@click.option("--show", "show", metavar="PATH", default=None,
              help="With --preview: print this file of the bundle in full (e.g. logs/web.log).")
@click.option("--log-lines", type=click.IntRange(10, 100_000), default=None,
              help="Last lines of each log [default: [diagnostics] log_lines].")
@click.option("--json", "as_json", is_flag=True, help="Print the manifest as JSON for scripts.")
@click.pass_context
@_handle_errors
def diagnostics(ctx: click.Context, output, preview, show, log_lines, as_json) -> None:
    """Build the support bundle for vendor support: facts, versions, health, scrubbed logs.

    Never customer records, names, e-mail addresses, phone numbers, attachments, passwords
    or keys (docs/diagnostics.md). Review it first with --preview.
    """
    if ctx.invoked_subcommand is not None:
        return
    from appliance import diagnostics as diag

    if show and not preview:
        raise click.BadParameter("only with --preview (the written bundle may be encrypted)", param_hint="--show")
    if preview and output:
        raise click.BadParameter("--preview writes nothing; leave out --output", param_hint="--output")
    result = diag.build_bundle(ctx.obj.settings, output, preview=preview, log_lines=log_lines)
    if show:
        click.echo(result.file(show).decode("utf-8", errors="replace"), nl=False)
        return
    if as_json:
        click.echo(json.dumps({**result.manifest, "output": str(result.output) if result.output else None,
                               "archive_bytes": result.archive_bytes}, indent=2, ensure_ascii=False))
        return
    for line in result.summary():
        click.echo(line)


@diagnostics.command("keygen")
@click.option("--private-key", type=click.Path(dir_okay=False, path_type=Path), required=True,
              help="Where to write the private key (mode 0600): it stays with vendor support.")
@click.option("--public-key", type=click.Path(dir_okay=False, path_type=Path), required=True,
              help="Where to write the public key: customer IT names it in [diagnostics] vendor_public_key_file.")
@_handle_errors
def keygen(private_key: Path, public_key: Path) -> None:
    """Vendor side: make the X25519 key pair bundles are encrypted to."""
    from appliance import diagnostics as diag

    fingerprint = diag.generate_vendor_keys(private_key, public_key)
    click.echo(f"Wrote {private_key} (keep it secret) and {public_key} (send it to customers); "
               f"key id {fingerprint}.")


@diagnostics.command("decrypt")
@click.argument("bundle", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--key", "key", type=click.Path(exists=True, dir_okay=False, path_type=Path), required=True,
              help="The vendor's private key (from diagnostics keygen).")
@click.option("--output", "-o", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="The .tar.gz to write [default: BUNDLE without .enc].")
@_handle_errors
def decrypt(bundle: Path, key: Path, output: Path | None) -> None:
    """Vendor side: decrypt an encrypted bundle into its .tar.gz."""
    from appliance import diagnostics as diag

    written = diag.decrypt_bundle(bundle, key, output)
    click.echo(f"Decrypted {bundle} into {written}; start with manifest.json inside it.")


COMMANDS = (diagnostics,)


def register(group: click.Group) -> None:
    """Add ``diagnostics`` (with ``keygen`` and ``decrypt``) to the ``crm-appliance`` group."""
    for command in COMMANDS:
        group.add_command(command)
