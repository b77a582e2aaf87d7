"""A throwaway PostgreSQL cluster on a free 127.0.0.1 port, for tests and benchmarks.

As root it uses Debian's ``pg_createcluster``/``pg_ctlcluster`` (``initdb`` refuses
root); as another user it runs ``initdb`` and ``pg_ctl`` directly. The app role
logs in over TCP with a scram password, as in production.
"""

from __future__ import annotations

import glob
import os
import secrets
import shutil
import socket
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _quote(value: str) -> str:
    """A postgresql.conf string literal (quotes inside are doubled)."""
    return "'" + str(value).replace("'", "''") + "'"


def _pg_bin() -> Path:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"))
    if not found:
        raise RuntimeError("PostgreSQL server binaries not found; run: apt-get install -y postgresql")
    return Path(found[-1]).parent


@dataclass
class Cluster:
    port: int
    socket_dir: Path
    version: str
    name: str
    base: Path
    as_root: bool

    def psql(self, sql: str, database: str = "postgres") -> str:
        """Run SQL as the cluster's superuser through the local socket."""
        cmd = ["psql", "-X", "-q", "-v", "ON_ERROR_STOP=1", "-At",
               "-h", str(self.socket_dir), "-p", str(self.port), "-U", "postgres", "-d", database, "-c", sql]
        if self.as_root:
            cmd = ["runuser", "-u", "postgres", "--"] + cmd
        return subprocess.run(cmd, check=True, capture_output=True, text=True, cwd="/").stdout

    def create_app_database(self, name: str, user: str) -> str:
        """A login role with a random password owning a new database; returns the password."""
        password = secrets.token_urlsafe(24)
        self.psql(f"CREATE ROLE \"{user}\" LOGIN PASSWORD '{password}'")
        self.psql(f'CREATE DATABASE "{name}" OWNER "{user}"')
        return password

    def stop_and_remove(self) -> None:
        if self.as_root:
            subprocess.run(["pg_dropcluster", "--stop", self.version, self.name],
                           capture_output=True, cwd="/")
            # pg_dropcluster leaves conf.d behind when it held our test.conf.
            shutil.rmtree(Path("/etc/postgresql") / self.version / self.name, ignore_errors=True)
        else:
            subprocess.run([str(_pg_bin() / "pg_ctl"), "-D", str(self.base / "data"), "-m", "immediate",
                            "stop"], capture_output=True)
        shutil.rmtree(self.base, ignore_errors=True)


def start_cluster(extra_settings: dict[str, str] | None = None) -> Cluster:
    """Start a cluster; ``extra_settings`` (e.g. archive_mode) override the test defaults."""
    port = free_port()
    bindir = _pg_bin()
    version = bindir.parent.name
    base = Path(tempfile.mkdtemp(prefix="crm-pg-"))
    socket_dir = base / "run"
    socket_dir.mkdir()
    settings = {
        "listen_addresses": "127.0.0.1",
        "unix_socket_directories": str(socket_dir),
        # Speed over durability: this data is thrown away after the run.
        "fsync": "off", "synchronous_commit": "off", "full_page_writes": "off",
        "max_connections": "200", "shared_buffers": "128MB",
    }
    settings.update(extra_settings or {})
    as_root = os.geteuid() == 0
    if as_root:
        name = f"crmtest{port}"
        os.chmod(base, 0o755)
        # pg_ctlcluster writes its pid file here; /run may have been emptied by a reboot.
        run_dir = Path("/var/run/postgresql")
        run_dir.mkdir(mode=0o2775, exist_ok=True)
        shutil.chown(run_dir, "postgres", "postgres")
        shutil.chown(socket_dir, "postgres", "postgres")
        cmd = ["pg_createcluster", version, name, "-p", str(port), "-d", str(base / "data"),
               "-s", str(socket_dir), "--", "--auth-local=peer", "--auth-host=scram-sha-256",
               "--encoding=UTF8", "--locale=C.UTF-8"]
        subprocess.run(cmd, check=True, capture_output=True, cwd="/")
        # Debian's postgresql.conf includes conf.d/, read after the main file.
        conf = Path("/etc/postgresql") / version / name / "conf.d" / "test.conf"
        conf.write_text("".join(f"{k} = {_quote(v)}\n" for k, v in settings.items()))
        subprocess.run(["pg_ctlcluster", version, name, "start"], check=True, capture_output=True, cwd="/")
    else:
        name = "local"
        data = base / "data"
        subprocess.run([str(bindir / "initdb"), "-D", str(data), "-U", "postgres", "--auth-local=trust",
                        "--auth-host=scram-sha-256", "--encoding=UTF8", "--locale=C.UTF-8"],
                       check=True, capture_output=True)
        with open(data / "postgresql.conf", "a") as conf:
            conf.write(f"port = {port}\n")
            for key, value in settings.items():
                conf.write(f"{key} = {_quote(value)}\n")
        subprocess.run([str(bindir / "pg_ctl"), "-D", str(data), "-l", str(base / "log"), "-w", "start"],
                       check=True, capture_output=True)
    return Cluster(port=port, socket_dir=socket_dir, version=version, name=name, base=base,
                   as_root=as_root)
