"""Quick start: the CRM on this host against Debian's local PostgreSQL, without Ansible.

A stop-gap until the Ansible installer (``crm-appliance install``) lands: an
ordered list of idempotent steps, each a function taking an explicit
``QuickstartContext``. Running it twice changes nothing the second time except
starting the web server if it is not running.
"""

from __future__ import annotations

import glob
import os
import pwd
import secrets
import shutil
import socket
import subprocess
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from appliance import config as config_mod
from appliance.errors import ApplianceError

SERVICE_USER = "crm"
ETC = Path("/etc/crm-appliance")
RUN_DIR = Path("/run/crm-appliance")
PIDFILE = RUN_DIR / "web.pid"


@dataclass
class QuickstartContext:
    config_path: Path
    boss_email: str
    boss_name: str
    port: int
    say: Callable[[str], None]
    settings: config_mod.Settings | None = None
    boss_link: str | None = None
    notes: list[str] = field(default_factory=list)


def _run(cmd: list[str], **kwargs) -> subprocess.CompletedProcess:
    result = subprocess.run(cmd, capture_output=True, text=True, cwd="/", **kwargs)
    if result.returncode != 0:
        raise ApplianceError(f"{' '.join(cmd[:3])} ... failed (exit {result.returncode}): "
                             f"{(result.stderr or result.stdout).strip()[-500:]}")
    return result


def _psql(sql: str, database: str = "postgres") -> str:
    """Run SQL as the postgres superuser; the SQL goes on stdin, so a password in it never shows in ps."""
    return _run(["runuser", "-u", "postgres", "--", "psql", "-X", "-q", "-At", "-v", "ON_ERROR_STOP=1",
                 "-d", database, "-f", "-"], input=sql).stdout.strip()


def check_root(ctx: QuickstartContext) -> None:
    if os.geteuid() != 0:
        raise ApplianceError("quickstart changes the host: run it as root")


def ensure_service_user(ctx: QuickstartContext) -> None:
    try:
        pwd.getpwnam(SERVICE_USER)
        ctx.say(f"System user {SERVICE_USER} exists, kept.")
    except KeyError:
        _run(["useradd", "--system", "--home-dir", "/var/lib/crm-appliance", "--shell", "/usr/sbin/nologin",
              SERVICE_USER])
        ctx.say(f"Created system user {SERVICE_USER}.")


def ensure_cluster(ctx: QuickstartContext) -> None:
    """Debian's 'main' cluster of the newest installed PostgreSQL, running."""
    versions = sorted(Path(p).parent.parent.name for p in glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"))
    if not versions:
        raise ApplianceError("PostgreSQL is not installed; run: apt-get install -y postgresql")
    version = versions[-1]
    if not Path(f"/etc/postgresql/{version}/main").exists():
        _run(["pg_createcluster", version, "main"])
        ctx.say(f"Created PostgreSQL {version} cluster 'main'.")
    status = subprocess.run(["pg_ctlcluster", version, "main", "status"], capture_output=True, cwd="/")
    if status.returncode != 0:
        _run(["pg_ctlcluster", version, "main", "start"])
        ctx.say(f"Started PostgreSQL {version}/main.")
    else:
        ctx.say(f"PostgreSQL {version}/main is running.")
    port_line = _psql("SHOW port")
    ctx.notes.append(f"postgresql {version} on port {port_line}")


def ensure_secrets(ctx: QuickstartContext) -> None:
    """The database password and the session key, generated once, mode 0600, owned by the service."""
    ETC.mkdir(mode=0o755, exist_ok=True)
    for name, make in (("db-password", lambda: secrets.token_urlsafe(32)),
                       ("secret-key", lambda: secrets.token_urlsafe(48))):
        path = ETC / name
        if path.exists():
            ctx.say(f"{path} exists, kept.")
        else:
            config_mod.write_secret(path, make())
            ctx.say(f"Generated {path} (mode 0600).")
        shutil.chown(path, SERVICE_USER, SERVICE_USER)
        os.chmod(path, 0o600)


def ensure_config(ctx: QuickstartContext) -> None:
    if ctx.config_path.exists():
        ctx.say(f"{ctx.config_path} exists, kept.")
    else:
        host = socket.getfqdn() or "localhost"
        text = (
            "# Written by crm-appliance quickstart; every key is documented in config.example.toml.\n"
            "[web]\n"
            f'public_url = "http://{host}:{ctx.port}"\n'
            f'bind = "0.0.0.0:{ctx.port}"\n\n'
            "[seats]\nlicensed = 50\n"
        )
        tmp = ctx.config_path.with_suffix(".tmp")
        tmp.write_text(text)
        os.chmod(tmp, 0o644)
        os.replace(tmp, ctx.config_path)
        ctx.say(f"Wrote {ctx.config_path}.")
    ctx.settings = config_mod.load(ctx.config_path)
    for folder in (ctx.settings.appliance.data_dir, ctx.settings.appliance.log_dir):
        folder.mkdir(parents=True, exist_ok=True)
        shutil.chown(folder, SERVICE_USER, SERVICE_USER)


def ensure_database(ctx: QuickstartContext) -> None:
    cfg = ctx.settings.database
    password = cfg.password()
    exists = _psql(f"SELECT 1 FROM pg_roles WHERE rolname = '{cfg.user}'")
    verb = "ALTER" if exists else "CREATE"
    _psql(f"{verb} ROLE \"{cfg.user}\" LOGIN PASSWORD '{password}'")
    if not _psql(f"SELECT 1 FROM pg_database WHERE datname = '{cfg.name}'"):
        _psql(f'CREATE DATABASE "{cfg.name}" OWNER "{cfg.user}"')
        ctx.say(f"Created database {cfg.name}.")
    else:
        ctx.say(f"Database {cfg.name} exists, kept.")


def ensure_schema(ctx: QuickstartContext) -> None:
    from appliance.db import check_connection, migrate, open_database
    from webapp.permissions import ensure_builtin_roles

    db = open_database(ctx.settings)
    check_connection(db, ctx.settings)
    applied = migrate(db)
    with db.connection_context():
        ensure_builtin_roles()
    ctx.say(f"Applied migrations: {', '.join(applied)}." if applied else "Database schema is up to date.")


def ensure_boss(ctx: QuickstartContext) -> None:
    from appliance import seats
    from webapp.models import Role, User, database

    with database.connection_context():
        boss = User.select().join(Role).where(Role.is_admin, User.active).first()
        if boss is None:
            created = seats.add_seat(ctx.settings, ctx.boss_email, ctx.boss_name, "boss")
            ctx.boss_link = created.link
            ctx.say(f"Created the boss seat {created.user.email}.")
        elif not boss.password_hash:
            ctx.boss_link, _ = seats.issue_link(ctx.settings, boss)
            ctx.say(f"The boss seat {boss.email} has no password yet: issued a new link.")
        else:
            ctx.say(f"The boss seat {boss.email} exists, kept.")


def _web_pid() -> int | None:
    try:
        pid = int(PIDFILE.read_text().strip())
        os.kill(pid, 0)
        return pid
    except (OSError, ValueError):
        return None


def ensure_web(ctx: QuickstartContext) -> None:
    """gunicorn in the background as the service user, then wait until the login page answers."""
    pid = _web_pid()
    if pid:
        ctx.say(f"The web server runs (pid {pid}), kept.")
    else:
        venv_bin = Path(shutil.which("crm-appliance") or "crm-appliance")
        log = ctx.settings.appliance.log_dir / "web.log"
        RUN_DIR.mkdir(exist_ok=True)
        shutil.chown(RUN_DIR, SERVICE_USER, SERVICE_USER)
        # The whole server, master included, runs as the service user.
        subprocess.Popen(
            ["runuser", "-u", SERVICE_USER, "--", str(venv_bin), "--config", str(ctx.config_path), "serve",
             "--daemon", "--pidfile", str(PIDFILE), "--log-file", str(log)],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd="/",
            start_new_session=True)
        ctx.say(f"Started the web server; its log is {log}.")
    url = f"http://127.0.0.1:{ctx.port}/auth/login"
    deadline = time.monotonic() + 60
    while True:
        try:
            with urllib.request.urlopen(url, timeout=5) as resp:
                if resp.status == 200:
                    break
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise ApplianceError(f"the web server did not answer on {url} within 60 s; "
                                 f"see {ctx.settings.appliance.log_dir / 'web.log'}")
        time.sleep(1)
    ctx.say(f"The CRM answers on {url}.")


STEPS = (check_root, ensure_service_user, ensure_cluster, ensure_secrets, ensure_config, ensure_database,
         ensure_schema, ensure_boss, ensure_web)


def quickstart(ctx: QuickstartContext) -> QuickstartContext:
    for step in STEPS:
        step(ctx)
    return ctx
