"""Deploy the CRM appliance with Ansible: install, upgrade, check for drift, uninstall, status.

The Click commands in ``installer/cli.py`` (``install [--check]``, ``upgrade``,
``uninstall``, ``status``) are thin wrappers over :func:`install`, :func:`upgrade`,
:func:`check`, :func:`uninstall` and :func:`status`; ``docs/install.md`` documents them.

Design (see docs/install.md):

- An install is an ordered list of named steps, each taking the ``InstallContext``.
  Pre-flight steps (``require_root`` .. ``confirm``) change nothing. Then the wheel is
  built from the source tree, the secrets are generated on the first install (files,
  mode 0600, never on a command line), and ``playbooks/site.yml`` runs.
- Exactly one function, :func:`run_playbook`, calls ``ansible_runner.run()``.
  Ansible owns every change on the host; this module prepares the inventory and the
  extra variables and reads the event stream (``installer.progress``).
- ansible-runner puts extra variables on ``ansible-playbook``'s command line when
  ``suppress_env_files=True``: they therefore never hold a secret. The database
  password reaches Ansible through a file lookup inside the playbook.
- Each release is a virtual environment of its own under ``/opt/crm-appliance/releases``
  and ``/opt/crm-appliance/current`` links the running one. Installing a release other
  than the current one is an upgrade; the webapp role's ``switch.yml`` guards it
  (maintenance page, database snapshot, health gate, rollback).
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import glob
import hashlib
import json
import logging
import os
import re
import secrets as secrets_mod
import shutil
import socket
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable
from urllib.parse import urlsplit

from appliance import config as config_mod
from appliance.errors import ApplianceError, ConfigError, DeployError

log = logging.getLogger(__name__)

SOURCE_DIR = Path(__file__).resolve().parent.parent
PLAYBOOK_DIR = SOURCE_DIR / "playbooks"
DEFAULT_INVENTORY = PLAYBOOK_DIR / "inventory" / "local.yml"
#: Where the rendered configuration goes on the host; the services read it.
INSTALLED_CONFIG = config_mod.DEFAULT_PATH
#: The installed program (the webapp role's layout): one virtual environment per release,
#: ``current`` links the running one; the maintenance flag exists while a release switches.
PREFIX = Path("/opt/crm-appliance")
CURRENT_RELEASE = PREFIX / "current"
MAINTENANCE_FLAG = PREFIX / "maintenance"
#: The system user the services run as (the webapp role's webapp_user).
SERVICE_USER = "crm"
#: Secrets of a remote host, kept on the controller (a local install writes them in place).
REMOTE_SECRETS_DIR = Path("/etc/crm-appliance/hosts")
#: Folders that make up the package (setup.py's find_namespace_packages) and so the wheel.
PACKAGE_DIRS = ("appliance", "installer", "sizing", "webapp", "playbooks")
_SKIP_PARTS = {"__pycache__", "build", "dist"}
_SKIP_SUFFIXES = (".pyc", ".pyo", ".pot")
#: The services' names come from the one description in the services role.
SERVICES_DEFAULTS = PLAYBOOK_DIR / "roles" / "services" / "defaults" / "main.yml"
#: Keys the installer owns in appliance.toml, and why.
INSTALLER_OWNED = {
    ("web", "bind"): "set by the installer: gunicorn listens on 127.0.0.1 behind nginx",
    ("web", "trusted_proxies"): "set by the installer: nginx is the one proxy in front",
    ("web", "workers"): "set by the installer from the sizing plan",
    ("web", "threads"): "set by the installer from the sizing plan",
    ("database", "pool_size"): "set by the installer from the sizing plan",
}
SECTION_ORDER = ("appliance", "database", "web", "seats", "attachments", "proxy", "monitor", "backup", "schedule",
                 "diagnostics", "smtp")
DEFAULT_PROFILE = "standard-50"
RUNNER_TIMEOUT_SECONDS = 1800
LOCK_FILE = Path("/run/lock/crm-appliance-install.lock")


# ============================================================================= data


@dataclass
class Target:
    """The one host the inventory names in group ``appliance``."""

    name: str
    inventory: Path
    local: bool


@dataclass
class Release:
    """The wheel built from the source tree; its version carries the source's hash."""

    path: Path
    version: str


@dataclass
class SecretFile:
    label: str
    dest: Path  # on the host
    src: Path  # on the controller (the same file for a local install)
    length: int


@dataclass
class InstallContext:
    """Everything an install, check or uninstall needs; the steps fill in the rest."""

    config_path: Path | None = None
    inventory: Path | None = None
    profile: str = DEFAULT_PROFILE
    seats: int | None = None
    accept_risks: tuple[str, ...] = ()
    yes: bool = False
    confirm: Callable[[str], bool] | None = None
    boss_email: str = "boss@crm.local"
    boss_name: str = "Boss"
    new_boss_link: bool = False
    #: upgrade: skip the base backup taken before the release changes.
    skip_backup: bool = False
    #: Extra variables for the playbook, overriding any it sets (tests and special cases).
    extra_vars: dict[str, Any] = field(default_factory=dict)
    source_dir: Path = SOURCE_DIR
    console: Any = None  # a rich Console; one on stdout by default
    wheel_cache: Path | None = None
    # -- filled in by the steps
    settings: config_mod.Settings | None = None
    config_source: str = ""
    target: Target | None = None
    plan: dict[str, Any] = field(default_factory=dict)
    release: Release | None = None
    secrets: list[SecretFile] = field(default_factory=list)
    #: The release running before this run (local host only; None: not installed or remote).
    previous_version: str | None = None
    notes: list[str] = field(default_factory=list)

    def __post_init__(self):
        if self.console is None:
            from rich.console import Console

            self.console = Console(highlight=False)

    def say(self, text: str) -> None:
        self.console.print(text, highlight=False, markup=False)


@dataclass
class InstallResult:
    host: str
    public_url: str
    version: str
    changed: int
    ok: int
    elapsed_seconds: float
    log_path: Path
    boss: Any = None  # progress.BossSeat
    changed_tasks: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    #: The release that ran before (None on a first install or a remote host).
    previous_version: str | None = None


@dataclass
class Drift:
    task: str
    host: str
    path: str
    diff: str


@dataclass
class DriftReport:
    host: str
    items: list[Drift]
    elapsed_seconds: float
    log_path: Path
    notes: list[str] = field(default_factory=list)

    @property
    def drifted(self) -> bool:
        return bool(self.items)


@dataclass
class UninstallResult:
    host: str
    changed_tasks: list[str]
    kept: list[str]
    elapsed_seconds: float
    log_path: Path


# ============================================================================= pre-flight: no changes


def require_root(ctx: InstallContext) -> None:
    if os.geteuid() != 0:
        import getpass

        raise DeployError(f"expected to run as root, found user {getpass.getuser()}: run it again with sudo")


def load_settings(ctx: InstallContext) -> None:
    """The configuration to install: --config, else the installed one, else defaults for this host."""
    source = ctx.config_path
    if source is None and INSTALLED_CONFIG.exists():
        source = INSTALLED_CONFIG
    if source is not None:
        settings = config_mod.load(source)  # ConfigError: one line naming file, key, expected, found
        ctx.config_source = str(source)
    else:
        settings = config_mod.from_mapping(
            {"web": {"public_url": f"https://{_host_name()}"}, "seats": {"licensed": _profile_seats(ctx.profile)}},
            source="<installer defaults>")
        ctx.config_source = "<installer defaults>"
        ctx.notes.append(f"no configuration at {INSTALLED_CONFIG}: installing the defaults "
                         f"(public_url {settings.web.public_url}); see config.example.toml")
    ctx.settings, notes = adopt_settings(settings)
    ctx.notes.extend(notes)


def adopt_settings(settings: config_mod.Settings) -> tuple[config_mod.Settings, list[str]]:
    """The settings with what the installer owns: gunicorn on 127.0.0.1 behind nginx, HTTPS.

    Returns the adjusted settings and one note per value changed.
    """
    notes: list[str] = []
    web, db = settings.web, settings.database
    where = settings.source
    if db.host not in ("127.0.0.1", "localhost", "::1"):
        raise ConfigError(f"{where}: [database] host: expected 127.0.0.1 (the appliance's own cluster), "
                          f"found {db.host!r}")
    host, _, port = web.bind.rpartition(":")
    if not port.isdigit():
        raise ConfigError(f'{where}: [web] bind: expected host:port such as "127.0.0.1:8000", found "{web.bind}"')
    changes: dict[str, Any] = {}
    if host != "127.0.0.1":
        changes["bind"] = f"127.0.0.1:{port}"
    if web.trusted_proxies != 1:
        changes["trusted_proxies"] = 1
    url = urlsplit(web.public_url)
    if not url.hostname:
        raise ConfigError(f'{where}: [web] public_url: expected a URL such as "https://crm.example.lan", '
                          f'found "{web.public_url}"')
    if url.scheme != "https" or url.port == int(port):
        keep_port = url.port if url.port not in (None, 80, 443, int(port)) else None
        netloc = url.hostname if keep_port is None else f"{url.hostname}:{keep_port}"
        changes["public_url"] = f"https://{netloc}{url.path.rstrip('/')}"
    for key, value in changes.items():
        notes.append(f"[web] {key}: {getattr(web, key)!r} -> {value!r} (nginx serves HTTPS in front of gunicorn)")
    if changes:
        settings = dataclasses.replace(settings, web=dataclasses.replace(web, **changes))
    return settings, notes


def load_inventory(ctx: InstallContext) -> None:
    """The one host in group ``appliance``; whether Ansible reaches it locally."""
    path = Path(ctx.inventory) if ctx.inventory else DEFAULT_INVENTORY
    try:
        with open(path, "rb"):
            pass
    except OSError as exc:
        raise DeployError(f"{path}: cannot read the inventory file: {exc.strerror}") from None
    from ansible.inventory.manager import InventoryManager
    from ansible.parsing.dataloader import DataLoader
    from ansible.vars.manager import VariableManager

    loader = DataLoader()
    inventory = InventoryManager(loader=loader, sources=[str(path)])
    hosts = inventory.get_hosts("appliance")
    if len(hosts) != 1:
        found = ", ".join(h.name for h in hosts) or "none"
        raise DeployError(f"{path}: expected exactly one host in group \"appliance\", found {found}; "
                          f"see playbooks/inventory/local.yml for the layout")
    host = hosts[0]
    hostvars = VariableManager(loader=loader, inventory=inventory).get_vars(host=host)
    connection = hostvars.get("ansible_connection")
    local = connection == "local" or (connection is None and host.name in ("localhost", "127.0.0.1")
                                      and "ansible_host" not in hostvars)
    ctx.target = Target(name=host.name, inventory=path.resolve(), local=local)


def check_reachable(ctx: InstallContext) -> None:
    """A remote host must answer over ssh before anything is built or generated for it."""
    if ctx.target.local:
        return
    run_playbook(ctx, "ping.yml", {}, kind="reach")


def plan_host(ctx: InstallContext) -> None:
    """Preflight against the profile (refusing on FAIL), then the sizing plan.

    Uses ``sizing`` (host facts, profiles, preflight checks, plan). For a remote host the
    facts of this controller say nothing, so the plan is made for the profile's nominal
    hardware and the host's own checks are the playbook's (OS, root, ports).
    """
    from sizing import check as sizing_check
    from sizing import host as sizing_host
    from sizing import plan as sizing_plan
    from sizing import profiles as sizing_profiles

    settings = ctx.settings
    profile = sizing_profiles.get(ctx.profile)  # SizingError: unknown profile
    seats = ctx.seats if ctx.seats is not None else min(settings.seats.licensed, profile.max_seats)
    if ctx.seats is None and settings.seats.licensed > profile.max_seats:
        ctx.notes.append(f"planned for {seats} concurrent seats, the most profile {profile.name} carries, "
                         f"of the {settings.seats.licensed} licensed")
    if not profile.production:
        ctx.notes.append(f"profile {profile.name}: {profile.summary}")
    if ctx.target is not None and ctx.target.local:
        facts = sizing_host.gather(settings.appliance.data_dir)
        result = sizing_check.preflight(facts, profile, seats, ctx.accept_risks)
        for verdict in result.verdicts:
            if verdict.status in ("WARN", "ACCEPTED"):
                ctx.notes.append(f"preflight {verdict.status} {verdict.check}: {verdict.remedy or verdict.found}")
        if not result.ok:
            first = result.failed[0]
            others = ", ".join(v.check for v in result.failed[1:])
            more = f" (also failing: {others})" if others else ""
            raise DeployError(f"preflight failed for profile {profile.name}: {first.check}: {first.remedy}{more}; "
                              f"nothing was changed. See crm-appliance preflight --profile {profile.name}, "
                              f"or accept the risk with --accept-risk {first.check}")
        plan = sizing_plan.plan_for(profile, seats, facts)
    else:
        plan = sizing_plan.make_plan(seats, sizing_plan.Resources.of_profile(profile))
        ctx.notes.append(f"remote host: planned for profile {profile.name}'s nominal hardware")
    ctx.notes.extend(f"plan: {w}" for w in plan.warnings)
    ctx.plan = {
        "postgresql": plan.postgresql_conf(),
        "workers": plan.gunicorn_workers,
        "threads": plan.gunicorn_threads,
        "pool_size": plan.db_pool_size,
        "nginx_workers": plan.nginx_worker_processes,
        "seats": seats,
        # What the data may take in the plan's first year, for status to compare against.
        "disk_budget_bytes": plan.disk.data_bytes,
    }
    _apply_plan(ctx)


def _apply_plan(ctx: InstallContext) -> None:
    """Write the plan's gunicorn and pool numbers into the settings (installer-owned keys)."""
    s = ctx.settings
    web = dataclasses.replace(s.web, workers=ctx.plan["workers"], threads=ctx.plan["threads"])
    database = dataclasses.replace(s.database, pool_size=ctx.plan["pool_size"])
    for (section, key), new in ((("web", "workers"), web.workers), (("web", "threads"), web.threads),
                                (("database", "pool_size"), database.pool_size)):
        old = getattr(getattr(s, section), key)
        if old != new:
            ctx.notes.append(f"[{section}] {key}: {old} -> {new} (sizing plan)")
    ctx.settings = dataclasses.replace(s, web=web, database=database)


def confirm(ctx: InstallContext, question: str) -> None:
    if ctx.yes:
        return
    if ctx.confirm is None:
        raise DeployError(f"{question.rstrip('?')}: pass --yes to confirm; nothing was changed")
    if not ctx.confirm(question):
        raise DeployError("cancelled; nothing was changed")


def confirm_install(ctx: InstallContext) -> None:
    confirm(ctx, f"Install the CRM appliance on {ctx.target.name}: Debian's PostgreSQL, nginx and supervisor, "
                 f"services on ports 80 and 443, profile {ctx.profile}?")


def installed_release(current: Path = CURRENT_RELEASE) -> str | None:
    """The version of the release ``current`` links to on this host, or None."""
    try:
        return Path(os.readlink(current)).name
    except OSError:
        return None


def find_running_release(ctx: InstallContext) -> None:
    """Note the release running on this host; installing another one is an upgrade."""
    if ctx.target.local:
        ctx.previous_version = installed_release()


def require_installed(ctx: InstallContext) -> None:
    """An upgrade needs an installed appliance to upgrade."""
    find_running_release(ctx)
    if ctx.target.local and ctx.previous_version is None:
        raise DeployError(f"no release is installed on {ctx.target.name} ({CURRENT_RELEASE} is missing): "
                          f"run crm-appliance install first; nothing was changed")


def confirm_upgrade(ctx: InstallContext) -> None:
    previous = ctx.previous_version or "the running release"
    confirm(ctx, f"Upgrade the CRM appliance on {ctx.target.name} from {previous} to {ctx.release.version}? "
                 f"Seat users see a maintenance page while the release switches (usually under a minute); "
                 f"if the new release fails, the previous one comes back with the database as it was.")


def note_upgrade(ctx: InstallContext) -> None:
    if ctx.previous_version and ctx.previous_version != ctx.release.version:
        ctx.notes.append(f"upgraded from {ctx.previous_version}: the maintenance page showed while the release "
                         f"switched; a database snapshot was the rollback point")


# ============================================================================= the release wheel


def source_files(source_dir: Path) -> list[Path]:
    """setup.py and every file of the packages, as the wheel ships them."""
    files = [source_dir / "setup.py"]
    for folder in PACKAGE_DIRS:
        for path in sorted((source_dir / folder).rglob("*")):
            rel = path.relative_to(source_dir)
            if (path.is_file() and not _SKIP_PARTS.intersection(rel.parts) and not path.name.endswith(_SKIP_SUFFIXES)
                    and not any(p.endswith(".egg-info") for p in rel.parts)):
                files.append(path)
    return files


def source_fingerprint(source_dir: Path) -> str:
    """12 hex digits of SHA-256 over the package files' names and contents."""
    digest = hashlib.sha256()
    for path in source_files(source_dir):
        digest.update(str(path.relative_to(source_dir)).encode() + b"\0")
        digest.update(path.read_bytes() + b"\0")
    return digest.hexdigest()[:12]


def base_version(source_dir: Path) -> str:
    match = re.search(r'^__version__\s*=\s*"([^"]+)"', (source_dir / "appliance" / "__init__.py").read_text(), re.M)
    if not match:
        raise DeployError(f"{source_dir}/appliance/__init__.py: expected __version__ = \"x.y.z\", found none")
    return match.group(1).split("+")[0]


def build_release(ctx: InstallContext) -> None:
    """The wheel of this source tree, version ``x.y.z+src.<hash>``; built once, then cached.

    The hash makes a re-install of the same source a no-op (the playbook finds that
    version installed) and any change to the source a new version.
    """
    source = ctx.source_dir
    if not (source / "setup.py").exists():
        raise DeployError(f"{source}: expected the appliance's source tree (with setup.py), found none; "
                          f"run install from the unpacked release")
    version = f"{base_version(source)}+src.{source_fingerprint(source)}"
    cache = ctx.wheel_cache or _cache_dir()
    wheel = cache / f"crm_appliance-{version}-py3-none-any.whl"
    if not wheel.exists():
        ctx.say(f"Building the release wheel {wheel.name} ...")
        _build_wheel(source, version, wheel)
        for old in sorted(cache.glob("crm_appliance-*.whl"), key=lambda p: p.stat().st_mtime)[:-3]:
            old.unlink(missing_ok=True)
    ctx.release = Release(path=wheel, version=version)


def _build_wheel(source: Path, version: str, wheel: Path) -> None:
    wheel.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="crm-appliance-wheel-") as tmp:
        tree, out = Path(tmp) / "src", Path(tmp) / "out"
        for path in source_files(source):
            dest = tree / path.relative_to(source)
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, dest)
        init = tree / "appliance" / "__init__.py"
        init.write_text(re.sub(r'^__version__\s*=\s*"[^"]*"', f'__version__ = "{version}"', init.read_text(),
                               flags=re.M))
        # --use-pep517: build in an isolated environment with setuptools and wheel from the index.
        result = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--use-pep517",
                                 "--disable-pip-version-check", "--quiet", "--wheel-dir", str(out), str(tree)],
                                capture_output=True, text=True, cwd=tmp)
        built = list(out.glob("*.whl"))
        if result.returncode != 0 or len(built) != 1:
            last = (result.stderr or result.stdout).strip().splitlines()[-1:] or ["no wheel"]
            raise DeployError(f"building the release wheel failed: {last[0]}; check that PyPI is reachable "
                              f"(pip fetches setuptools to build)")
        tmp_wheel = wheel.with_suffix(".tmp")
        shutil.copy2(built[0], tmp_wheel)
        os.replace(tmp_wheel, wheel)


def _cache_dir() -> Path:
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "crm-appliance" / "wheels"


# ============================================================================= secrets


def secret_files(settings: config_mod.Settings, target: Target) -> list[SecretFile]:
    specs = (("database password", settings.database.password_file, 32),
             ("session key", settings.web.secret_key_file, 48),
             ("backup encryption key", settings.backup.key_file, 32),
             ("backup role's database password", settings.backup.db_password_file, 32))
    out = []
    for label, dest, length in specs:
        src = dest if target.local else REMOTE_SECRETS_DIR / target.name / dest.name
        out.append(SecretFile(label=label, dest=Path(dest), src=Path(src), length=length))
    return out


def ensure_secrets(ctx: InstallContext) -> None:
    """Generate each missing secret once (mode 0600 from its first byte); keep existing ones."""
    ctx.secrets = secret_files(ctx.settings, ctx.target)
    for secret in ctx.secrets:
        if secret.src.exists():
            continue
        secret.src.parent.mkdir(parents=True, exist_ok=True)
        config_mod.write_secret(secret.src, secrets_mod.token_urlsafe(secret.length))
        ctx.notes.append(f"generated the {secret.label} in {secret.src} (mode 0600)")


def require_secrets(ctx: InstallContext) -> None:
    """Check mode generates nothing: the secrets must be there already."""
    ctx.secrets = secret_files(ctx.settings, ctx.target)
    missing = [s for s in ctx.secrets if not s.src.exists()]
    if missing:
        raise DeployError(f"{missing[0].src}: the {missing[0].label} does not exist, so the appliance is not "
                          f"installed; run install first")


# ============================================================================= extra variables




def config_sections(settings: config_mod.Settings) -> list[dict[str, Any]]:
    """Every section and key of the schema with its value and meaning, for appliance.toml.j2."""
    schema = config_mod.schema_keys()
    names = sorted(schema, key=lambda n: SECTION_ORDER.index(n) if n in SECTION_ORDER else len(SECTION_ORDER))
    sections = []
    for name in names:
        values = getattr(settings, name)
        keys = []
        for key, spec in schema[name].items():
            doc = spec.metadata.get("doc", "")
            owned = INSTALLER_OWNED.get((name, key))
            if owned:
                doc = f"{doc.rstrip('.')}; {owned}." if doc else owned[0].upper() + owned[1:] + "."
            keys.append({"name": key, "value": config_mod.toml_value(getattr(values, key)), "doc": doc})
        sections.append({"name": name, "keys": keys})
    return sections


def archiving_settings(settings: config_mod.Settings) -> dict[str, Any]:
    """postgresql.conf settings for continuous WAL archiving into [backup] wal_archive_dir.

    The archive command runs the current release's Python as postgres; at most
    ``archive_timeout`` seconds of writes wait for their segment to be archived.
    """
    from appliance import backup

    python = str(CURRENT_RELEASE / "bin" / "python")
    return {"archive_mode": "on", "archive_timeout": settings.backup.archive_timeout_seconds,
            "archive_command": backup.archive_command_line(settings, python=python)}


def render_extra_vars(ctx: InstallContext) -> dict[str, Any]:
    """The playbook's extra variables. No secret among them: they go on a command line."""
    s = ctx.settings
    web_port = int(s.web.bind.rpartition(":")[2])
    url = urlsplit(s.web.public_url)
    db_secret = next(x for x in ctx.secrets if x.label == "database password")
    backup_secret = next(x for x in ctx.secrets if x.label == "backup role's database password")
    extra = {
        "appliance_ports": [
            {"port": 80, "owners": ["nginx"], "purpose": "HTTP for nginx"},
            {"port": url.port or 443, "owners": ["nginx"], "purpose": "HTTPS for nginx"},
            {"port": s.database.port, "owners": ["postgres"], "purpose": "PostgreSQL"},
            {"port": web_port, "owners": ["crm-appliance", "gunicorn"], "purpose": "the CRM's gunicorn"},
        ],
        "appliance_db_name": s.database.name,
        "appliance_db_user": s.database.user,
        "appliance_db_password_source": str(db_secret.src),
        "postgresql_port": s.database.port,
        "appliance_backup_db_user": s.backup.db_user,
        "appliance_backup_db_password_source": str(backup_secret.src),
        "postgresql_settings": {**(ctx.plan.get("postgresql") or {}), **archiving_settings(s)},
        "webapp_wheel_file": str(ctx.release.path) if ctx.release else "",
        "webapp_package_version": ctx.release.version if ctx.release else "",
        "webapp_config_file": str(INSTALLED_CONFIG),
        "webapp_config_sections": config_sections(s),
        "webapp_data_dir": str(s.appliance.data_dir),
        "webapp_backup_dir": str(s.backup.dir),
        "webapp_wal_archive_dir": str(s.backup.wal_archive_dir),
        "webapp_backup_key_file": str(s.backup.key_file),
        "webapp_wal_key_file": str(s.backup.wal_key_file),
        "webapp_log_dir": str(s.appliance.log_dir),
        "webapp_secret_files": [{"dest": str(x.dest), "src": str(x.src)} for x in ctx.secrets],
        "webapp_boss_email": ctx.boss_email,
        "webapp_boss_name": ctx.boss_name,
        "webapp_boss_new_link": ctx.new_boss_link,
        "webapp_bind": f"127.0.0.1:{web_port}",
        "services_web_port": web_port,
        "proxy_server_name": url.hostname,
        "proxy_https_port": url.port or 443,
        "proxy_upstream": f"127.0.0.1:{web_port}",
        "proxy_client_max_body_size_mb": s.attachments.max_upload_mb + 1,
        "proxy_worker_processes": ctx.plan.get("nginx_workers", "auto"),
        "proxy_certificate_file": str(s.proxy.certificate_file or ""),
        "proxy_key_file": str(s.proxy.key_file or ""),
        "proxy_hsts_max_age": s.proxy.hsts_max_age,
    }
    extra.update(ctx.extra_vars)
    return extra


# ============================================================================= the one Ansible wrapper


@contextlib.contextmanager
def _one_at_a_time():
    """Two installs (or an install and an uninstall) at once would fight over the host."""
    import fcntl

    LOCK_FILE.parent.mkdir(parents=True, exist_ok=True)
    with open(LOCK_FILE, "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise DeployError(f"another crm-appliance install, check or uninstall is running (lock {LOCK_FILE}); "
                              f"wait for it to finish") from None
        yield


def run_playbook(ctx: InstallContext, playbook: str, extra_vars: dict[str, Any], *, kind: str,
                 check: bool = False):
    """Run one playbook through ``ansible_runner.run``; return (record, log path) or raise DeployError.

    The only caller of ansible-runner. Its private data dir is a temporary directory
    (mode 0700, removed afterwards); ``suppress_env_files`` keeps it from writing the
    extra variables into it; the virtual environment's ``bin`` comes first on PATH
    because ansible-runner starts ``ansible-playbook`` from PATH.
    """
    import ansible_runner

    from installer.progress import EventHandler, count_tasks, open_log

    bin_dir = Path(sys.executable).parent
    if not (bin_dir / "ansible-playbook").exists():
        raise DeployError(f"expected ansible-playbook next to {sys.executable}, found none; "
                          f"run: {bin_dir / 'pip'} install -e .")
    log_dir = ctx.settings.appliance.log_dir if ctx.settings else Path("/var/log/crm-appliance")
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    log_path = log_dir / f"{kind}-{stamp}.log"
    env = {
        "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '/usr/sbin:/usr/bin:/sbin:/bin')}",
        "ANSIBLE_CONFIG": str(PLAYBOOK_DIR / "ansible.cfg"),
        "ANSIBLE_NOCOLOR": "1",
        "ANSIBLE_RETRY_FILES_ENABLED": "0",
        "LANG": "C.UTF-8",
        "LC_ALL": "C.UTF-8",
        "PYTHONDONTWRITEBYTECODE": "1",
    }
    total = count_tasks(PLAYBOOK_DIR / playbook)
    with contextlib.ExitStack() as stack:
        stack.enter_context(_one_at_a_time())
        log_file = stack.enter_context(open_log(log_path))
        handler = stack.enter_context(EventHandler(total, ctx.console, log_file, check=check))
        private_dir = stack.enter_context(tempfile.TemporaryDirectory(prefix="crm-appliance-ansible-"))
        log_file.write(json.dumps({"event": "crm_appliance_start", "kind": kind, "playbook": playbook,
                                   "check": check, "host": ctx.target.name if ctx.target else None,
                                   "profile": ctx.profile, "accepted_risks": list(ctx.accept_risks),
                                   "plan": ctx.plan,
                                   "notes": ctx.notes, "extra_vars": extra_vars,
                                   "created": dt.datetime.now(dt.timezone.utc).isoformat()}, default=str) + "\n")
        runner = ansible_runner.run(
            private_data_dir=private_dir,
            project_dir=str(PLAYBOOK_DIR),
            playbook=str(PLAYBOOK_DIR / playbook),
            inventory=str(ctx.target.inventory),
            extravars=extra_vars,
            envvars=env,
            cmdline="--check --diff" if check else None,
            suppress_env_files=True,
            quiet=True,
            event_handler=handler,
            timeout=RUNNER_TIMEOUT_SECONDS,
        )
        record = handler.record
        log_file.write(json.dumps({"event": "crm_appliance_end", "status": runner.status, "rc": runner.rc,
                                   "created": dt.datetime.now(dt.timezone.utc).isoformat()}) + "\n")
    if runner.status != "successful" or runner.rc != 0 or record.failure is not None:
        raise deploy_error(record, runner.status, runner.rc, log_path, kind)
    return record, log_path


# -- error mapping

_HINTS: tuple[tuple[Callable[[Any], bool], str], ...] = (
    (lambda f: f.status == "unreachable",
     "check that the host is up and that ssh to it works without a prompt (ssh-copy-id; the inventory's "
     "ansible_host and ansible_user)"),
    (lambda f: f.action.endswith("crm_port_check"), "ss -ltnp on the host lists what listens where"),
    (lambda f: f.action.endswith("apt"),
     "check that the Debian mirrors are reachable (apt-get update) and that no other apt or dpkg runs"),
    (lambda f: f.action.endswith("pip"),
     "check that PyPI is reachable from the host: the virtual environment downloads the CRM's dependencies"),
    (lambda f: "answers through nginx" in f.task,
     "the CRM did not answer: see /var/log/crm-appliance/crm-appliance-web.log and /var/log/nginx/error.log "
     "on the host"),
    (lambda f: f.role == "proxy", "see /var/log/nginx/error.log and run nginx -t on the host"),
    (lambda f: f.role == "postgresql", "see /var/log/postgresql/ on the host"),
    (lambda f: f.role in ("services", "webapp"),
     "see /var/log/crm-appliance/crm-appliance-web.log and supervisord.log on the host"),
)


def hint_for(failure) -> str:
    for matches, hint in _HINTS:
        if matches(failure):
            return hint
    return "fix the cause and run install again: it picks up where it stopped"


def deploy_error(record, status: str, rc: int | None, log_path: Path, kind: str = "install") -> DeployError:
    """One line: what failed, where, the message, a hint and the log."""
    failure = record.failure
    if failure is not None:
        hint = hint_for(failure)
        if failure.status == "unreachable":
            message = f"{failure.host} is unreachable: {failure.message or 'no message'}"
        elif record.rollback:  # a release switch failed; the rescue says what it put back
            message = f"{failure.host}: {record.rollback}"
        else:
            message = f"{kind} failed at task {failure.task!r} on {failure.host}: {failure.message or 'no message'}"
        message = f"{message}; hint: {hint}; full log: {log_path}"
        return DeployError(message, task=failure.title, host=failure.host, detail=failure.message, hint=hint,
                           log_path=log_path)
    if status == "timeout":
        detail = f"Ansible did not finish within {RUNNER_TIMEOUT_SECONDS} s"
    else:
        detail = record.errors[-1] if record.errors else f"ansible-playbook ended with status {status}, rc {rc}"
    return DeployError(f"{kind} failed: {detail}; full log: {log_path}", detail=detail, log_path=log_path)


# ============================================================================= the operations


def install(ctx: InstallContext) -> InstallResult:
    """Install or update the appliance; safe to run again (a second run changes nothing).

    When another release runs already, this is an upgrade, guarded as :func:`upgrade` is
    (with the backup first).
    """
    started = time.monotonic()
    for step in (require_root, load_settings, load_inventory, check_reachable, find_running_release, plan_host,
                 confirm_install, build_release, backup_if_upgrading, ensure_secrets):
        step(ctx)
    return _deploy(ctx, started, kind="install")


def backup_if_upgrading(ctx: InstallContext) -> None:
    if ctx.previous_version and ctx.previous_version != ctx.release.version:
        backup_before_upgrade(ctx)


def upgrade(ctx: InstallContext) -> InstallResult:
    """Switch the installed appliance to the release of this source tree.

    The new release is built beside the running one, which keeps serving meanwhile. Then
    the playbook shows the maintenance page, stops the services, snapshots the database,
    migrates, switches ``current``, starts the services and waits for /healthz; on any
    failure it puts the previous release, its configuration and the database back. The
    maintenance page is off at the end either way.

    Before all that, the running release takes a base backup as the service user (unless
    ``skip_backup``); a failed backup stops the upgrade before anything changed. The
    database snapshot inside the switch is the quick way back; the backup the thorough one.
    """
    started = time.monotonic()
    for step in (require_root, load_settings, load_inventory, check_reachable, require_installed, plan_host,
                 build_release):
        step(ctx)
    if ctx.previous_version == ctx.release.version:
        ctx.notes.append(f"{ctx.release.version} is the release running already: nothing to upgrade "
                         f"(crm-appliance install applies configuration changes)")
        return InstallResult(host=ctx.target.name, public_url=ctx.settings.web.public_url,
                             version=ctx.release.version, changed=0, ok=0,
                             elapsed_seconds=time.monotonic() - started, log_path=Path(os.devnull),
                             notes=ctx.notes, previous_version=ctx.previous_version)
    for step in (confirm_upgrade, backup_before_upgrade, ensure_secrets):
        step(ctx)
    return _deploy(ctx, started, kind="upgrade")


def _deploy(ctx: InstallContext, started: float, kind: str) -> InstallResult:
    record, log_path = run_playbook(ctx, "site.yml", render_extra_vars(ctx), kind=kind)
    note_upgrade(ctx)
    return InstallResult(
        host=ctx.target.name, public_url=ctx.settings.web.public_url, version=ctx.release.version,
        changed=record.total("changed"), ok=record.total("ok"), elapsed_seconds=time.monotonic() - started,
        log_path=log_path, boss=record.boss, changed_tasks=[r.title for r in record.changed], notes=ctx.notes,
        previous_version=ctx.previous_version)


def check(ctx: InstallContext) -> DriftReport:
    """Run the install in check and diff mode: what differs from the intended state (R-3)."""
    started = time.monotonic()
    for step in (require_root, load_settings, load_inventory, check_reachable, plan_host, build_release,
                 require_secrets):
        step(ctx)
    record, log_path = run_playbook(ctx, "site.yml", render_extra_vars(ctx), kind="check", check=True)
    items = [Drift(task=r.title, host=r.host, path=r.path, diff=r.diff) for r in record.changed]
    return DriftReport(host=ctx.target.name, items=items, elapsed_seconds=time.monotonic() - started,
                       log_path=log_path, notes=ctx.notes)


def uninstall(ctx: InstallContext, purge_data: bool = False) -> UninstallResult:
    """Stop everything the installer started and remove its program files; keep the data
    unless ``purge_data``, which also drops the database and removes the data, the
    configuration with the secrets and the service user (the logs stay)."""
    started = time.monotonic()
    require_root(ctx)
    try:
        load_settings(ctx)
    except ConfigError as exc:  # a broken config must not block the uninstall
        ctx.notes.append(f"{exc}; using the default paths")
        ctx.settings = None
    load_inventory(ctx)
    check_reachable(ctx)
    data_dir = ctx.settings.appliance.data_dir if ctx.settings else Path("/var/lib/crm-appliance")
    log_dir = ctx.settings.appliance.log_dir if ctx.settings else Path("/var/log/crm-appliance")
    if purge_data:
        confirm(ctx, f"Uninstall the CRM appliance from {ctx.target.name} AND DESTROY ITS DATA: the database, "
                     f"{data_dir} and {INSTALLED_CONFIG.parent} (configuration and secrets)? This cannot be undone.")
    else:
        confirm(ctx, f"Uninstall the CRM appliance from {ctx.target.name} (services stopped, program removed; "
                     f"the database, the data and {INSTALLED_CONFIG.parent} stay)?")
    extra = {"webapp_data_dir": str(data_dir), "webapp_log_dir": str(log_dir), "appliance_purge_data": purge_data,
             **ctx.extra_vars}
    if ctx.settings:
        extra.update(appliance_db_name=ctx.settings.database.name, appliance_db_user=ctx.settings.database.user,
                     postgresql_port=ctx.settings.database.port)
    record, log_path = run_playbook(ctx, "uninstall.yml", extra, kind="uninstall")
    kept = [str(log_dir), "Debian's packages (postgresql, nginx, supervisor)"]
    if not purge_data:
        kept[:0] = ["the PostgreSQL cluster's data (database and role)", str(data_dir),
                    f"{INSTALLED_CONFIG.parent} (configuration, secrets, TLS certificate)", "the crm system user"]
    return UninstallResult(host=ctx.target.name, changed_tasks=[r.title for r in record.changed], kept=kept,
                           elapsed_seconds=time.monotonic() - started, log_path=log_path)


def status(ctx: InstallContext) -> dict[str, Any]:
    """What runs on this host and how it answers; read-only, local host only."""
    try:
        settings = config_mod.load(ctx.config_path or INSTALLED_CONFIG)
        config_error = None
    except ApplianceError as exc:
        settings, config_error = None, str(exc)
    prefix = CURRENT_RELEASE
    services = []
    manager = "systemd" if Path("/run/systemd/system").exists() else "supervisord"
    for service in _services_list():
        if not service.get("enabled", True):
            services.append({"name": service["name"], "state": "disabled", "note": service.get("note", "")})
            continue
        services.append({"name": service["name"], "state": _service_state(service["name"], manager)})
    https_port = urlsplit(settings.web.public_url).port or 443 if settings else 443
    out: dict[str, Any] = {
        "host": _host_name(),
        "version": _installed_version(prefix),
        "releases": sorted(p.name for p in (PREFIX / "releases").glob("*") if p.is_dir()),
        "maintenance": _maintenance(),
        "service_manager": manager,
        "services": services,
        "nginx": "running" if _pid_alive(Path("/run/nginx.pid")) else "stopped",
        "postgresql": _postgresql_state(settings),
        "health": _health(f"https://127.0.0.1:{https_port}/healthz"),
        "schema": _schema(prefix),
        "config": str(ctx.config_path or INSTALLED_CONFIG),
        "config_error": config_error,
        "accepted_risks": _accepted_risks(settings),
        "disk": _disk(settings),
        "last_install_log": _last_log(settings, "install"),
        "availability": _availability(settings),
        "last_backups": _last_backups(settings),
    }
    return out


# ============================================================================= the running appliance (local host)
#
# A restore (crm-appliance restore) and the backup before an upgrade act on the running
# appliance, not on its installed state: they stop and start its services and raise the
# maintenance page, as `gitlab-ctl stop` would, without going through Ansible.


def installed() -> bool:
    """Whether this host runs an installed appliance (a current release)."""
    return installed_release() is not None


def set_maintenance(on: bool, reason: str = "", **details: str) -> None:
    """nginx shows the maintenance page while the flag file exists (the proxy role's site)."""
    if not on:
        MAINTENANCE_FLAG.unlink(missing_ok=True)
        return
    body = {"reason": reason, **details, "since": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}
    tmp = MAINTENANCE_FLAG.with_suffix(".tmp")
    tmp.write_text(json.dumps(body) + "\n")
    tmp.chmod(0o644)
    os.replace(tmp, MAINTENANCE_FLAG)


def control_services(action: str) -> None:
    """Stop or start the appliance's enabled services (web, scheduler) under their manager."""
    if action not in ("stop", "start"):
        raise ValueError(f"action: expected stop or start, found {action!r}")
    names = [s["name"] for s in _services_list() if s.get("enabled", True)]
    if Path("/run/systemd/system").exists():
        cmd = ["systemctl", action, *names]
    else:
        cmd = [str(CURRENT_RELEASE / "bin" / "supervisorctl"), "--configuration", "/etc/crm-appliance/supervisord.conf",
               action, *names]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd="/")
    out = (result.stdout + result.stderr).strip()
    # supervisorctl's exit status is not reliable across versions: read its lines. Starting
    # what runs, or stopping what is stopped, is what was asked for.
    errors = [line for line in out.splitlines()
              if "ERROR" in line and "already started" not in line and "not running" not in line]
    if (result.returncode != 0 and Path("/run/systemd/system").exists()) or errors:
        raise DeployError(f"could not {action} the services ({' '.join(names)}): {out or result.returncode}; "
                          f"see /var/log/crm-appliance/supervisord.log")


def wait_healthy(settings: config_mod.Settings, timeout: float = 60) -> dict[str, Any]:
    """Wait until gunicorn's /healthz answers 200; raise DeployError with its last answer otherwise."""
    url = f"http://{settings.web.bind}/healthz"
    deadline = time.monotonic() + timeout
    while True:
        answer = _health(url)
        if answer.get("ok"):
            return answer
        if time.monotonic() > deadline:
            raise DeployError(f"{url} did not answer 200 within {timeout:.0f} s: "
                              f"{answer.get('checks') or answer.get('error') or answer.get('status')}")
        time.sleep(1)


def migrate_with_current_release(settings: config_mod.Settings) -> str:
    """``crm-appliance db migrate`` with the running release (a restored database may be older)."""
    result = subprocess.run([str(CURRENT_RELEASE / "bin" / "crm-appliance"), "--config", settings.source, "db",
                             "migrate"], capture_output=True, text=True, timeout=1800, cwd="/")
    if result.returncode != 0:
        raise DeployError(f"migrating the restored database failed: {(result.stderr or result.stdout).strip()}")
    return result.stdout.strip()


def restore_hooks(settings: config_mod.Settings, say: Callable[[str], None] = lambda text: None):
    """What a restore does around the swap on an installed appliance: maintenance page on and
    services stopped before it; after the restored cluster starts, migrate, start the services
    and pass the health gate (a failure there rolls the restore back); after a rollback, the
    services start on the previous data. The caller turns the maintenance page off at the end."""
    from appliance.restore import RestoreHooks

    def before_swap():
        set_maintenance(True, "restore")
        say("maintenance page on; stopping the web app and the scheduler")
        control_services("stop")

    def after_start():
        say(migrate_with_current_release(settings))
        control_services("start")
        wait_healthy(settings)
        say("the web app answers /healthz")

    def after_rollback():
        control_services("start")

    return RestoreHooks(before_swap=before_swap, after_start=after_start, after_rollback=after_rollback)


def backup_before_upgrade(ctx: InstallContext) -> None:
    """A base backup with the running release, as the service user, before the release changes.

    Releases before the backup subsystem have no ``backup`` command: then the note says so and
    the database snapshot inside the switch remains the only rollback point.
    """
    if not ctx.target.local or ctx.skip_backup:
        if ctx.skip_backup:
            ctx.notes.append("no backup before the upgrade (--no-backup)")
        return
    exe = CURRENT_RELEASE / "bin" / "crm-appliance"
    probe = subprocess.run([str(exe), "backup", "--help"], capture_output=True, text=True, cwd="/")
    if probe.returncode != 0:
        ctx.notes.append(f"no backup before the upgrade: release {ctx.previous_version} has no backup command")
        return
    start_stopped_cluster(ctx)
    ctx.say("Taking a base backup with the running release before the upgrade ...")
    result = subprocess.run(["runuser", "-u", SERVICE_USER, "--", str(exe), "--config", str(INSTALLED_CONFIG), "backup",
                             "--json"], capture_output=True, text=True, cwd="/", timeout=6 * 3600)
    if result.returncode != 0:
        last = (result.stderr or result.stdout).strip().splitlines()[-1:] or ["no message"]
        raise DeployError(f"the backup before the upgrade failed: {last[0]}; nothing was changed. Fix it, or "
                          f"upgrade without it: crm-appliance upgrade --no-backup")
    info = json.loads(result.stdout)
    ctx.notes.append(f"backup {info.get('id')} taken before the upgrade")


# ============================================================================= small helpers


def _host_name() -> str:
    name = socket.getfqdn() or socket.gethostname()
    return name if name and name != "localhost.localdomain" else "localhost"


def _profile_seats(profile: str) -> int:
    from sizing import profiles

    return profiles.get(profile).max_seats


def _services_list() -> list[dict[str, Any]]:
    import yaml

    return yaml.safe_load(SERVICES_DEFAULTS.read_text())["services_list"]


def _service_state(name: str, manager: str) -> str:
    if manager == "systemd":
        cmd = ["systemctl", "is-active", name]
    else:
        cmd = [str(CURRENT_RELEASE / "bin" / "supervisorctl"), "--configuration", "/etc/crm-appliance/supervisord.conf",
               "status", name]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=10, cwd="/").stdout.split()
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    if manager == "systemd":
        return out[0] if out else "unknown"
    return out[1].lower() if len(out) > 1 and out[0] == name else "stopped"


def _pid_alive(pidfile: Path) -> bool:
    try:
        os.kill(int(pidfile.read_text().strip()), 0)
        return True
    except (OSError, ValueError):
        return False


def _cluster_on_port(port: int) -> tuple[str, str, str] | None:
    """(version, name, "online"/"down") of this host's Debian cluster on ``port``; None if none.

    Raises OSError when PostgreSQL's packages are not installed.
    """
    result = subprocess.run(["pg_lsclusters", "--no-header"], capture_output=True, text=True, timeout=10, cwd="/")
    for line in result.stdout.splitlines():
        parts = line.split()
        if len(parts) >= 4 and parts[2] == str(port):
            return parts[0], parts[1], parts[3]
    return None


def _postgresql_state(settings) -> str:
    port = settings.database.port if settings else 5432
    try:
        cluster = _cluster_on_port(port)
    except OSError:
        return "not installed"
    return f"{cluster[0]}/{cluster[1]} {cluster[2]}" if cluster else f"no cluster on port {port}"


def start_stopped_cluster(ctx: InstallContext) -> None:
    """Start the appliance's PostgreSQL cluster if it is installed but down (a host restarted
    without its services, or stopped by hand): the backup before an upgrade needs it, and the
    playbook would start it anyway."""
    port = ctx.settings.database.port
    try:
        cluster = _cluster_on_port(port)
    except OSError:
        return
    if cluster is None or cluster[2] == "online":
        return
    version, name, _ = cluster
    ctx.say(f"Starting PostgreSQL {version}/{name} on port {port}, which was down ...")
    result = subprocess.run(["pg_ctlcluster", version, name, "start"], capture_output=True, text=True, cwd="/",
                            timeout=120)
    if result.returncode != 0:
        last = (result.stderr or result.stdout).strip().splitlines()[-1:] or ["no message"]
        raise DeployError(f"PostgreSQL {version}/{name} is down and did not start: {last[0]}; see "
                          f"/var/log/postgresql/postgresql-{version}-{name}.log; nothing was changed")
    ctx.notes.append(f"PostgreSQL {version}/{name} was down: started it for the backup before the upgrade")


def _health(url: str) -> dict[str, Any]:
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE  # our own self-signed certificate, on 127.0.0.1
    started = time.monotonic()
    try:
        with urllib.request.urlopen(url, timeout=5, context=context) as resp:
            code, body = resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        code, body = exc.code, exc.read()
    except (OSError, urllib.error.URLError) as exc:
        return {"url": url, "ok": False, "error": str(getattr(exc, "reason", exc))}
    health = {"url": url, "ok": code == 200, "status": code, "ms": round((time.monotonic() - started) * 1000)}
    try:  # /healthz says which part is unwell
        health["checks"] = json.loads(body)["checks"]
    except (ValueError, KeyError, TypeError):
        pass
    return health


def _last_backups(settings) -> dict[str, Any] | None:
    """The newest backup of each kind (crm-appliance backups lists them all)."""
    if settings is None:
        return None
    from appliance import backup

    try:
        listed = backup.list_backups(settings)
    except (ApplianceError, OSError) as exc:  # e.g. the backup directory is not readable by this user
        return {"error": str(exc)}
    newest: dict[str, Any] = {}
    for info in sorted(listed, key=lambda b: b.started_at or dt.datetime.min.replace(tzinfo=dt.timezone.utc)):
        newest[info.kind] = {"id": info.id, "state": info.state, "size_bytes": info.size_bytes,
                             "started_at": info.started_at.isoformat() if info.started_at else None}
    return newest


def _availability(settings) -> dict[str, Any] | None:
    """This month's figures from the SLA ledger (crm-appliance sla has the whole report)."""
    if settings is None:
        return None
    from appliance import monitor

    try:
        report = monitor.report_for_month(settings).to_dict()
    except ApplianceError as exc:
        return {"error": str(exc)}
    keys = ("month", "probes", "availability_percent", "counted_downtime_minutes", "budget_minutes",
            "budget_left_minutes", "unknown_minutes", "verdict")
    return {key: report[key] for key in keys}


def _maintenance() -> dict[str, Any] | None:
    """The maintenance flag's content while a release switch runs (or an interrupted one left it)."""
    try:
        return json.loads(MAINTENANCE_FLAG.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {"reason": "unknown"}


def _installed_version(prefix: Path) -> str | None:
    found = glob.glob(str(prefix / "lib" / "python3*" / "site-packages" / "crm_appliance-*.dist-info"))
    return Path(found[0]).name[len("crm_appliance-"):-len(".dist-info")] if found else None


def _schema(prefix: Path) -> dict[str, Any]:
    exe = prefix / "bin" / "crm-appliance"
    if not exe.exists():
        return {"error": "not installed"}
    result = subprocess.run([str(exe), "--config", str(INSTALLED_CONFIG), "db", "status", "--json"],
                            capture_output=True, text=True, timeout=60, cwd="/")
    if result.returncode != 0:
        return {"error": (result.stderr.strip().splitlines() or ["unknown"])[-1]}
    rows = json.loads(result.stdout)
    return {"applied": [r["name"] for r in rows if r["applied"]],
            "pending": [r["name"] for r in rows if not r["applied"]]}


def _disk(settings) -> dict[str, Any]:
    """Use of the data directory's disk, against the disk budget of the last install's plan."""
    data_dir = settings.appliance.data_dir if settings else Path("/var/lib/crm-appliance")
    if not data_dir.exists():
        return {"data_dir": str(data_dir), "error": "missing"}
    usage = shutil.disk_usage(data_dir)
    used = sum(p.stat().st_size for p in data_dir.rglob("*") if p.is_file() and not p.is_symlink())
    disk = {"data_dir": str(data_dir), "data_bytes": used, "disk_total_bytes": usage.total,
            "disk_free_bytes": usage.free}
    budget = (_last_install_start(settings).get("plan") or {}).get("disk_budget_bytes")
    if budget:
        disk.update(plan_budget_bytes=budget, plan_budget_used=round(used / budget, 4),
                    free_covers_budget=usage.free >= budget - used)
    return disk


def _last_log(settings, kind: str) -> str | None:
    log_dir = settings.appliance.log_dir if settings else Path("/var/log/crm-appliance")
    logs = sorted(log_dir.glob(f"{kind}-*.log"))
    return str(logs[-1]) if logs else None


def _last_install_start(settings) -> dict[str, Any]:
    """The first record of the last install log: profile, plan, accepted risks."""
    path = _last_log(settings, "install")
    if not path:
        return {}
    try:
        with open(path, encoding="utf-8") as handle:
            return json.loads(handle.readline() or "{}")
    except (OSError, ValueError):
        return {}


def _accepted_risks(settings) -> list[str]:
    """The accepted risks of the last install, from its log."""
    return list(_last_install_start(settings).get("accepted_risks") or [])