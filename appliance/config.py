"""The one configuration schema and its one loader.

Only this module parses TOML. Everything else receives a ``Settings`` object.
Every key is declared once, below, with its type, default and limits;
``config.example.toml`` documents the same keys (a test keeps the two in step).

A bad file fails with the file, the key, what was expected and what was found::

    /etc/crm-appliance/appliance.toml: [web] workers: expected an integer from 1 to 256, found "four" (a string)
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import os
import stat
import tomllib
import types
import zoneinfo
import typing
from dataclasses import dataclass, field
from pathlib import Path

from appliance.errors import ConfigError

DEFAULT_PATH = Path("/etc/crm-appliance/appliance.toml")
ENV_VAR = "CRM_APPLIANCE_CONFIG"

_REQUIRED = dataclasses.MISSING


def _key(default=_REQUIRED, *, minimum=None, maximum=None, choices=None, cron=False, doc=""):
    """Declare one key: its default (none means required), limits and one-line meaning.

    ``cron``: the value is a five-field cron expression (minute hour day month weekday).
    """
    meta = {"min": minimum, "max": maximum, "choices": choices, "cron": cron, "doc": doc}
    if default is _REQUIRED:
        return field(metadata=meta)
    return field(default=default, metadata=meta)


@dataclass(frozen=True)
class ApplianceSection:
    data_dir: Path = _key(Path("/var/lib/crm-appliance"), doc="Attachments, backups and state.")
    log_dir: Path = _key(Path("/var/log/crm-appliance"), doc="Install, web and scheduler logs.")


@dataclass(frozen=True)
class DatabaseSection:
    host: str = _key("127.0.0.1", doc="PostgreSQL host; the appliance's own cluster is local.")
    port: int = _key(5432, minimum=1, maximum=65535)
    name: str = _key("crm")
    user: str = _key("crm")
    password_file: Path = _key(
        Path("/etc/crm-appliance/db-password"), doc="File (mode 0600) holding the password."
    )
    pool_size: int = _key(32, minimum=1, maximum=1000, doc="Connections per web process.")
    connect_timeout_seconds: int = _key(5, minimum=1, maximum=300)

    def password(self) -> str:
        return read_secret(self.password_file, "[database] password_file")


@dataclass(frozen=True)
class WebSection:
    public_url: str = _key(doc="The address seat users open, e.g. https://crm.example.lan")
    bind: str = _key("127.0.0.1:8000", doc="host:port gunicorn listens on.")
    workers: int = _key(2, minimum=1, maximum=256)
    threads: int = _key(8, minimum=1, maximum=256)
    secret_key_file: Path = _key(
        Path("/etc/crm-appliance/secret-key"), doc="File (mode 0600) with the session signing key."
    )
    trusted_proxies: int = _key(
        0, minimum=0, maximum=5, doc="Proxies in front (nginx = 1) whose X-Forwarded-For is trusted."
    )
    session_hours: int = _key(12, minimum=1, maximum=24 * 30)
    login_max_failures: int = _key(5, minimum=1, maximum=100, doc="Failed logins before lock-out.")
    login_lockout_minutes: int = _key(15, minimum=1, maximum=24 * 60)
    set_password_link_hours: int = _key(72, minimum=1, maximum=24 * 30)
    default_locale: str = _key("en", choices=("en", "zh"))
    timezone: str = _key("Asia/Shanghai", doc="IANA zone in which seat users read and enter times.")
    page_size: int = _key(50, minimum=10, maximum=500, doc="Rows per list page.")

    def secret_key(self) -> str:
        key = read_secret(self.secret_key_file, "[web] secret_key_file")
        if len(key) < 32:
            raise ConfigError(
                f"{self.secret_key_file}: [web] secret_key_file: expected at least 32 characters, "
                f"found {len(key)}; generate one with: python3 -c 'import secrets; print(secrets.token_urlsafe(48))'"
            )
        return key


@dataclass(frozen=True)
class SeatsSection:
    licensed: int = _key(minimum=1, maximum=100_000, doc="Seats the licence allows.")
    expires: dt.date | None = _key(None, doc="Licence end date (YYYY-MM-DD); none = perpetual.")
    grace_days: int = _key(30, minimum=1, maximum=3650,
                           doc="Days after expiry the data is kept read-only (and exportable) before it is destroyed.")


@dataclass(frozen=True)
class AttachmentsSection:
    per_seat_mb: int = _key(50, minimum=1, maximum=100_000, doc="Quota each seat brings.")
    max_upload_mb: int = _key(25, minimum=1, maximum=10_000)


@dataclass(frozen=True)
class RetentionSection:
    undo_days: int = _key(30, minimum=0, maximum=3650,
                          doc="Days a deleted record can be undone by the boss; then it is destroyed. 0 = destroyed at once.")


@dataclass(frozen=True)
class ProxySection:
    certificate_file: Path | None = _key(
        None, doc="PEM certificate (with its chain) nginx serves; none = a self-signed one made at install.")
    key_file: Path | None = _key(None, doc="The certificate's private key (readable by root only).")
    hsts_max_age: int = _key(31_536_000, minimum=0, maximum=63_072_000,
                             doc="Seconds browsers keep to HTTPS (Strict-Transport-Security); 0 turns it off.")


@dataclass(frozen=True)
class MonitorSection:
    probe_interval_seconds: int = _key(30, minimum=5, maximum=3600, doc="How often the scheduler probes /healthz.")
    probe_timeout_seconds: int = _key(5, minimum=1, maximum=60, doc="A probe not answered in time counts as failed.")
    probe_url: str | None = _key(
        None, doc="URL probed; none = /healthz through nginx on 127.0.0.1, port and host from [web] public_url.")
    outage_min_minutes: int = _key(5, minimum=0, maximum=1440, doc="Shorter outages do not count (R-22).")
    sla_target_percent: float = _key(99.9, minimum=90, maximum=100, doc="Monthly availability promised (R-22).")
    banner_hours: int = _key(24, minimum=0, maximum=24 * 14,
                             doc="Hours before a maintenance window that seat users see its banner.")


@dataclass(frozen=True)
class BackupSection:
    dir: Path = _key(Path("/var/lib/crm-appliance/backups"), doc="One directory per backup, each with its manifest.")
    wal_archive_dir: Path = _key(Path("/var/lib/crm-appliance/wal-archive"),
                                 doc="Encrypted WAL written by PostgreSQL's archive_command (as postgres).")
    key_file: Path = _key(Path("/etc/crm-appliance/backup-key"), doc="File (mode 0600) with the encryption key.")
    wal_key_file: Path = _key(Path("/var/lib/postgresql/crm-appliance-backup-key"),
                              doc="The postgres user's own copy of the key (mode 0600), for archive/restore_command.")
    db_user: str = _key("crm_backup", doc="Role with REPLICATION and pg_read_all_data that takes the backups.")
    db_password_file: Path = _key(Path("/etc/crm-appliance/backup-db-password"),
                                  doc="File (mode 0600) holding that role's password.")
    compression: str = _key("zstd", choices=("zstd", "lz4", "gzip", "none"), doc="Base backup compression.")
    retention_days: int = _key(7, minimum=1, maximum=3650, doc="Days kept; the newest verified backup stays regardless.")
    archive_timeout_seconds: int = _key(60, minimum=10, maximum=60,
                                        doc="PostgreSQL's archive_timeout: at most this much of writes can be lost.")
    cluster: str = _key("15/main", doc="Debian PostgreSQL cluster (version/name) that restore stops, swaps and starts.")


@dataclass(frozen=True)
class ScheduleSection:
    """When the scheduler runs each job (appliance/scheduler.py): one key per job, "none" turns it off.

    Times are in [web] timezone. The uptime probe is not here: it runs every
    [monitor] probe_interval_seconds, the number the SLA arithmetic also reads.
    """

    base_backup: str | None = _key("30 1 * * *", cron=True, doc="Physical base backup (pg_basebackup), daily.")
    logical_dump: str | None = _key("30 2 * * *", cron=True, doc="Logical dump (pg_dump -Fd), readable by stock tools.")
    prune: str | None = _key("0 5 * * *", cron=True, doc="Delete backups and archived WAL past [backup] retention_days.")
    wal_check: str | None = _key("*/5 * * * *", cron=True, doc="Check that WAL archiving keeps up.")
    restore_drill: str | None = _key("0 4 * * 6", cron=True, doc="Restore the latest backup into a scratch cluster and check it.")
    retention: str | None = _key("15 3 * * *", cron=True,
                                 doc="Destroy records deleted longer ago than [retention] undo_days; licence-end notices and destruction.")
    quota_check: str | None = _key("0 * * * *", cron=True, doc="Raise a notice when attachments pass 90% or 100% of the quota.")


@dataclass(frozen=True)
class DiagnosticsSection:
    """The support bundle customer IT sends to the vendor (appliance/diagnostics.py, docs/diagnostics.md)."""

    vendor_public_key_file: Path | None = _key(
        None, doc="The vendor's X25519 public key (PEM) the bundle is encrypted to; none = not encrypted.")
    log_lines: int = _key(2000, minimum=10, maximum=100_000, doc="Last lines of each log that go into the bundle.")


@dataclass(frozen=True)
class SmtpSection:
    """E-mail for notices (a failed backup, later quota warnings): to every active boss seat."""

    host: str | None = _key(None, doc="Mail server; none = no e-mail (notices still show in the web UI).")
    port: int = _key(587, minimum=1, maximum=65535)
    security: str = _key("starttls", choices=("starttls", "tls", "none"),
                         doc="starttls on port 587, tls on 465, none only on a trusted LAN relay.")
    user: str | None = _key(None, doc="Login name; none = the server takes mail without a login.")
    password_file: Path | None = _key(None, doc="File (mode 0600) with the login's password.")
    from_address: str = _key("crm-appliance@localhost", doc="Sender address of the notices.")
    timeout_seconds: int = _key(20, minimum=1, maximum=300)

    def password(self) -> str | None:
        return read_secret(self.password_file, "[smtp] password_file") if self.password_file else None


@dataclass(frozen=True)
class Settings:
    web: WebSection
    seats: SeatsSection
    appliance: ApplianceSection = field(default_factory=ApplianceSection)
    database: DatabaseSection = field(default_factory=DatabaseSection)
    attachments: AttachmentsSection = field(default_factory=AttachmentsSection)
    retention: RetentionSection = field(default_factory=RetentionSection)
    proxy: ProxySection = field(default_factory=ProxySection)
    monitor: MonitorSection = field(default_factory=MonitorSection)
    backup: BackupSection = field(default_factory=BackupSection)
    schedule: ScheduleSection = field(default_factory=ScheduleSection)
    diagnostics: DiagnosticsSection = field(default_factory=DiagnosticsSection)
    smtp: SmtpSection = field(default_factory=SmtpSection)
    source: str = "<defaults>"


SECTIONS: dict[str, type] = {
    f.name: typing.get_type_hints(Settings)[f.name] for f in dataclasses.fields(Settings) if f.name != "source"
}


def resolve_path(cli_value: str | os.PathLike | None = None) -> Path:
    """The config file to read: ``--config``, else ``$CRM_APPLIANCE_CONFIG``, else the default."""
    if cli_value:
        return Path(cli_value)
    if os.environ.get(ENV_VAR):
        return Path(os.environ[ENV_VAR])
    return DEFAULT_PATH


def load(path: str | os.PathLike) -> Settings:
    """Read and validate one TOML file into ``Settings``."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(
            f"{path}: no such configuration file; copy config.example.toml there or pass --config"
        ) from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the configuration file: {exc.strerror}") from None
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: expected UTF-8 text, found a byte that is not ({exc.reason})") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    return from_mapping(data, source=str(path))


def from_mapping(data: dict, source: str = "<mapping>") -> Settings:
    """Validate a parsed mapping (as TOML gives it) into ``Settings``."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a table of sections, found {_describe(data)}")
    unknown = sorted(set(data) - set(SECTIONS))
    if unknown:
        raise ConfigError(
            f"{source}: [{unknown[0]}]: unknown section; expected one of: {', '.join(sorted(SECTIONS))}"
        )
    sections = {}
    for name, cls in SECTIONS.items():
        table = data.get(name, {})
        if not isinstance(table, dict):
            raise ConfigError(f"{source}: [{name}]: expected a table, found {_describe(table)}")
        sections[name] = _build_section(cls, name, table, source)
    proxy = sections["proxy"]
    if (proxy.certificate_file is None) != (proxy.key_file is None):
        given, missing = ("certificate_file", "key_file") if proxy.key_file is None else ("key_file", "certificate_file")
        raise ConfigError(f"{source}: [proxy] {missing}: required with {given}, but missing; "
                          f"expected both files, or neither for a self-signed certificate")
    return Settings(source=source, **sections)


def toml_value(value) -> str:
    """A value of ``Settings`` as a TOML literal this loader reads back (the installer renders
    appliance.toml with it; the diagnostics bundle shows the settings in force with it)."""
    if value is None:
        return '"none"'
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, dt.date):
        return value.isoformat()
    if isinstance(value, (str, Path)):
        return json.dumps(str(value), ensure_ascii=False).replace("\x7f", "\\u007f")
    raise TypeError(f"no TOML form for {value!r}")


def _build_section(cls, section: str, table: dict, source: str):
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(table) - set(fields))
    if unknown:
        raise ConfigError(
            f"{source}: [{section}] {unknown[0]}: unknown key; expected one of: {', '.join(fields)}"
        )
    values = {}
    for name, f in fields.items():
        where = f"{source}: [{section}] {name}"
        if name not in table:
            if f.default is _REQUIRED and f.default_factory is _REQUIRED:
                raise ConfigError(f"{where}: required, but missing; expected {_expected(hints[name], f)}")
            continue
        values[name] = _convert(table[name], hints[name], f, where)
    return cls(**values)


def _unwrap_optional(hint):
    """(inner type, whether None is allowed) for ``X | None``; (hint, False) otherwise."""
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        return [a for a in typing.get_args(hint) if a is not type(None)][0], True
    return hint, False


def _convert(value, declared, f: dataclasses.Field, where: str):
    hint, optional = _unwrap_optional(declared)
    if optional and value in ("", "none"):
        return None
    meta = f.metadata
    bad = ConfigError(f"{where}: expected {_expected(declared, f)}, found {_describe(value)}")
    if hint is bool:
        if not isinstance(value, bool):
            raise bad
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad
        if (meta["min"] is not None and value < meta["min"]) or (meta["max"] is not None and value > meta["max"]):
            raise bad
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:  # TOML allows nan
            raise bad
        if (meta["min"] is not None and value < meta["min"]) or (meta["max"] is not None and value > meta["max"]):
            raise bad
        return float(value)
    if hint in (str, Path):
        if not isinstance(value, str) or not value.strip():
            raise bad
        if meta["choices"] and value not in meta["choices"]:
            raise bad
        if f.name == "timezone" and not _is_zone(value):
            raise ConfigError(f'{where}: expected an IANA time zone such as "Asia/Shanghai", found {_describe(value)}')
        if meta["cron"]:
            problem = _cron_problem(value)
            if problem:
                raise ConfigError(f"{where}: expected {_expected(declared, f)}, found {_describe(value)}: {problem}")
        return Path(value) if hint is Path else value
    if hint is dt.date:
        if isinstance(value, dt.date) and not isinstance(value, dt.datetime):
            return value
        if isinstance(value, str):
            try:
                return dt.date.fromisoformat(value)
            except ValueError:
                raise bad from None
        raise bad
    raise TypeError(f"unsupported config type {hint!r} at {where}")  # a bug in the schema


_WEEKDAYS = ("sun", "mon", "tue", "wed", "thu", "fri", "sat")


def _cron_weekdays(field: str) -> str:
    """A standard cron weekday field (0 or 7 = Sunday, names too, ranges, lists, steps) as
    the explicit list of day names APScheduler reads the same way."""
    days: set[int] = set()
    for part in field.lower().split(","):
        base, _, step = part.partition("/")
        if base == "*":
            first, last = 0, 6
        else:
            ends = base.split("-")
            if len(ends) > 2 or not all(ends):
                raise ValueError(f"weekday {part!r}: expected a day, a range such as 1-5, or *")
            numbers = []
            for end in ends:
                if end in _WEEKDAYS:
                    numbers.append(_WEEKDAYS.index(end))
                elif end.isdigit() and int(end) <= 7:
                    numbers.append(int(end))
                else:
                    raise ValueError(f"weekday {end!r}: expected 0-7 (0 and 7 are Sunday) or sun-sat")
            first, last = numbers[0], numbers[-1]
            if len(numbers) == 1 and step:
                last = 7
        if step and (not step.isdigit() or int(step) == 0):
            raise ValueError(f"weekday {part!r}: expected a step of 1 or more after /")
        if first > last:
            raise ValueError(f"weekday {part!r}: the range runs backwards")
        days.update(day % 7 for day in range(first, last + 1, int(step or 1)))
    return ",".join(_WEEKDAYS[day] for day in sorted(days))


def cron_trigger(expression: str, timezone: str = "UTC"):
    """An APScheduler ``CronTrigger`` for a standard five-field cron expression.

    APScheduler 3 numbers weekdays from Monday = 0, cron from Sunday = 0 (and 7): a
    customer's "0 4 * * 6" means Saturday, so the weekday field is spelled out as names.
    Raises ValueError for a bad expression.
    """
    from apscheduler.triggers.cron import CronTrigger

    fields = expression.split()
    if len(fields) != 5:
        raise ValueError(f"{len(fields)} fields instead of 5")
    minute, hour, day, month, weekday = fields
    return CronTrigger(minute=minute, hour=hour, day=day, month=month,
                       day_of_week=None if weekday == "*" else _cron_weekdays(weekday), timezone=timezone)


def _cron_problem(expression: str) -> str | None:
    """Why ``expression`` is not a five-field cron expression, or None."""
    try:
        cron_trigger(expression)
    except ValueError as exc:
        return str(exc)
    return None


def _is_zone(name: str) -> bool:
    try:
        zoneinfo.ZoneInfo(name)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError):
        return False
    return True


def _expected(hint, f: dataclasses.Field) -> str:
    meta = f.metadata
    hint, optional = _unwrap_optional(hint)
    if hint is int:
        text = "an integer"
        if meta["min"] is not None and meta["max"] is not None:
            text += f" from {meta['min']} to {meta['max']}"
        elif meta["min"] is not None:
            text += f" of at least {meta['min']}"
    elif hint is float:
        text = "a number"
        if meta["min"] is not None and meta["max"] is not None:
            text += f" from {meta['min']} to {meta['max']}"
    elif hint is bool:
        text = "true or false"
    elif hint is dt.date:
        text = "a date like 2027-12-31"
    elif hint is Path:
        text = "a file or directory path"
    elif meta["cron"]:
        text = 'a cron expression such as "30 1 * * *" (minute hour day month weekday)'
    elif meta["choices"]:
        text = "one of " + ", ".join(f'"{c}"' for c in meta["choices"])
    else:
        text = "a non-empty string"
    return text + (' (or "none")' if optional else "")


def _describe(value) -> str:
    kinds = {bool: "a boolean", int: "an integer", float: "a number", str: "a string",
             list: "an array", dict: "a table", dt.date: "a date", dt.datetime: "a date-time"}
    kind = kinds.get(type(value), type(value).__name__)
    shown = repr(value) if not isinstance(value, str) else f'"{value}"'
    if len(shown) > 60:
        shown = shown[:57] + "..."
    return f"{shown} ({kind})"


def read_secret(path: Path, key: str) -> str:
    """Read a secret file, refusing one that other users could read."""
    try:
        st = path.stat()
        text = path.read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        raise ConfigError(f"{path}: {key}: the secret file does not exist; the installer creates it") from None
    except OSError as exc:
        raise ConfigError(f"{path}: {key}: cannot read the secret file: {exc.strerror}") from None
    if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise ConfigError(
            f"{path}: {key}: expected mode 0600 (owner only), found {stat.S_IMODE(st.st_mode):04o}; "
            f"run: chmod 600 {path}"
        )
    if not text:
        raise ConfigError(f"{path}: {key}: the secret file is empty")
    return text


def write_secret(path: Path, value: str) -> None:
    """Write a secret with mode 0600 from its first byte: temp file, then rename into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        fh.write(value + "\n")
    os.replace(tmp, path)


def schema_keys() -> dict[str, dict[str, dataclasses.Field]]:
    """Every section and key of the schema (used by the example-file test and docs)."""
    return {name: {f.name: f for f in dataclasses.fields(cls)} for name, cls in SECTIONS.items()}
