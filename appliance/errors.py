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


class LastAdminError(SeatError):
    """Stopping this seat would leave no active seat with administration rights."""


class SizingError(ApplianceError):
    """A sizing request cannot be met as asked (unknown profile, seats out of range, unknown check id)."""


class DeployError(ApplianceError):
    """Deploying with Ansible failed: names the failed task, its message and a hint.

    Raised by ``installer.deploy`` for a bad inventory, an unreachable host, a failed
    task, or an install that cannot start (not root, no wheel, no Ansible).
    """

    def __init__(self, message: str, *, task: str | None = None, host: str | None = None,
                 detail: str | None = None, hint: str | None = None, log_path=None):
        super().__init__(message)
        self.task = task
        self.host = host
        self.detail = detail
        self.hint = hint
        self.log_path = log_path


class BackupError(ApplianceError):
    """A backup cannot be taken, found, listed, verified, decrypted or pruned.

    Raised by ``appliance.backup`` for a missing key, too little free space, a failed
    ``pg_basebackup``/``pg_dump``, an unknown backup id, or another run holding the lock.
    """


class BackupIntegrityError(BackupError):
    """A stored backup or WAL file is not what was written: a checksum differs, a file is
    missing, extra, truncated or altered, the manifest was changed, or the key is not the
    one the file was encrypted with. Nothing may be restored from it."""


class RestoreError(ApplianceError):
    """A restore cannot start (incompatible backup, target outside the recoverable window,
    no backup) or failed part-way; in the latter case the previous data is back in place."""


class ExportError(ApplianceError):
    """The whole-data export could not be written; nothing was left behind."""
