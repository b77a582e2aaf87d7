"""Every error the appliance expects to raise, as one family.

The CLI turns an ``ApplianceError`` into a one-line message and exit status 1;
anything else is a bug and escapes as a traceback.
"""


class ApplianceError(Exception):
    """Base class: a problem the operator can act on, with a message that says how."""


class ConfigError(ApplianceError):
    """The configuration file is missing, unreadable, not TOML, or has a bad key or value."""


class DatabaseError(ApplianceError):
    """The database cannot be reached or a migration cannot be applied."""


class SeatError(ApplianceError):
    """A seat cannot be added, changed or found (duplicate e-mail, unknown role, ...)."""


class SizingError(ApplianceError):
    """A sizing request cannot be met as asked (unknown profile, seats out of range, unknown check id)."""
