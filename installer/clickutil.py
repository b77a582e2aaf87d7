"""What every ``crm-appliance`` command module shares (cli, backup, monitor, diagnostics)."""

from __future__ import annotations

import functools

import click

from appliance.errors import ApplianceError


def handle_errors(func):
    """The appliance's expected errors become one line on stderr and exit status 1.

    Anything else escapes as a traceback: it is a bug, and the traceback is what finds it.
    """

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        try:
            return func(*args, **kwargs)
        except ApplianceError as exc:
            raise click.ClickException(str(exc)) from None

    return wrapper
