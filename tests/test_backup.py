"""Backups against a real PostgreSQL cluster with real WAL archiving, real files, real keys.

The module's cluster runs with ``archive_mode = on`` and our own ``wal-push`` as
``archive_command`` (as the postgres user, with its own copy of the key), exactly the
command line ``archive_command_line`` gives the installer. Backups are taken by a
``crm_backup`` role with REPLICATION and pg_read_all_data over TCP with a password, like
the scheduler will. ``BackupEnv`` is shared with tests/test_restore.py.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import click
import peewee
import pytest
from click.testing import CliRunner

from appliance import backup, config, encryption
from appliance.errors import BackupError, BackupIntegrityError
from tests.pgcluster import Cluster, start_cluster

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root: pg_createcluster and the postgres user")

NEEDLE = "needle-" + secrets.token_hex(8)  # a value that must never appear in plaintext on the backup disk


def _toml(data: dict) -> str:
    out = []
    for section, values in data.items():
        out.append(f"[{section}]")
        for key, value in values.items():
            out.append(f"{key} = {json.dumps(value) if isinstance(value, str) else value}")
    return "\n".join(out) + "\n"


@dataclass
class BackupEnv:
    """A throwaway cluster archiving its WAL, with the appliance's settings pointing at it."""

    cluster: Cluster
    settings: config.Settings
    mapping: dict
    base: Path
    config_path: Path

    @property
    def key(self) -> encryption.BackupKey:
        return encryption.load_key(self.settings.backup.key_file)

    def sql(self, sql: str, database: str = "crm_test") -> str:
        return self.cluster.psql(sql, database=database).strip()

    def switch_wal(self) -> str:
        """Close the current WAL segment and wait until the archive has it."""
        # pg_switch_wal() returns the end of the segment it closed; pg_walfile_name of that end
        # names the closed segment (or, when nothing was written, the last one already closed).
        name = self.sql("SELECT pg_walfile_name(pg_switch_wal())")
        target = self.settings.backup.wal_archive_dir / (name + backup.ARCHIVE_SUFFIX)
        deadline = time.monotonic() + 60
        while not target.exists():
            assert time.monotonic() < deadline, f"{name} was not archived"
            time.sleep(0.1)
        return name

    def with_backup(self, **overrides) -> config.Settings:
        data = json.loads(json.dumps(self.mapping))
        data["backup"].update({k: str(v) if isinstance(v, Path) else v for k, v in overrides.items()})
        return config.from_mapping(data, source="<test settings>")

    def close(self) -> None:
        self.cluster.stop_and_remove()
        shutil.rmtree(self.base, ignore_errors=True)


def make_backup_env(archive_timeout: int = 60) -> BackupEnv:
    base = Path(tempfile.mkdtemp(prefix="crm-backup-test-"))
    os.chmod(base, 0o755)  # the postgres user must reach its key copy and the archive
    etc = base / "etc"
    etc.mkdir(mode=0o700)
    key_text = secrets.token_urlsafe(32)
    config.write_secret(etc / "backup-key", key_text)
    pg_home = base / "pg"
    pg_home.mkdir(mode=0o700)
    config.write_secret(pg_home / "backup-key", key_text)  # the postgres user's own copy
    archive = base / "wal-archive"
    archive.mkdir(mode=0o700)
    for path in (pg_home, pg_home / "backup-key", archive):
        shutil.chown(path, "postgres", "postgres")
    mapping = {
        "appliance": {"data_dir": str(base / "data"), "log_dir": str(base / "log")},
        "database": {"host": "127.0.0.1", "port": 1, "name": "crm_test", "user": "crm",
                     "password_file": str(etc / "db-password")},
        "web": {"public_url": "http://127.0.0.1:5000", "secret_key_file": str(etc / "secret-key")},
        "seats": {"licensed": 50},
        "backup": {"dir": str(base / "backups"), "wal_archive_dir": str(archive),
                   "key_file": str(etc / "backup-key"), "wal_key_file": str(pg_home / "backup-key"),
                   "db_user": "crm_backup", "db_password_file": str(etc / "backup-db-password")},
    }
    provisional = config.from_mapping(mapping)
    cluster = start_cluster({
        "archive_mode": "on", "archive_command": backup.archive_command_line(provisional),
        "archive_timeout": str(archive_timeout), "full_page_writes": "on", "wal_level": "replica",
    })
    mapping["database"]["port"] = cluster.port
    mapping["backup"]["cluster"] = f"{cluster.version}/{cluster.name}"
    config.write_secret(etc / "db-password", cluster.create_app_database("crm_test", "crm"))
    config.write_secret(etc / "secret-key", secrets.token_urlsafe(48))
    backup_password = secrets.token_urlsafe(24)
    cluster.psql(f"CREATE ROLE crm_backup LOGIN REPLICATION PASSWORD '{backup_password}' IN ROLE pg_read_all_data")
    # Functions are per database: the grant goes where the backup connects, the CRM database.
    cluster.psql("GRANT EXECUTE ON FUNCTION pg_create_restore_point(text) TO crm_backup", database="crm_test")
    config.write_secret(etc / "backup-db-password", backup_password)
    settings = config.from_mapping(mapping, source="<test settings>")
    config_path = base / "appliance.toml"
    config_path.write_text(_toml(mapping))
    # The appliance's schema, by the appliance's own migration runner (a private connection:
    # the models' global binding is left alone).
    from appliance.db import migrate

    db = peewee.PostgresqlDatabase("crm_test", host="127.0.0.1", port=cluster.port, user="crm",
                                   password=(etc / "db-password").read_text().strip())
    migrate(db)
    db.close()
    cluster.psql("CREATE TABLE probe (id serial PRIMARY KEY, label text NOT NULL, "
                 "at timestamptz NOT NULL DEFAULT clock_timestamp()); ALTER TABLE probe OWNER TO crm",
                 database="crm_test")
    return BackupEnv(cluster=cluster, settings=settings, mapping=mapping, base=base, config_path=config_path)


@pytest.fixture
def pg_tmp():
    """A directory the postgres user can reach (pytest's own tmp_path is root's only)."""
    path = Path(tempfile.mkdtemp(prefix="crm-pg-tmp-"))
    os.chmod(path, 0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def give_to_postgres(path: Path) -> None:
    for dirpath, _, names in os.walk(path):
        shutil.chown(dirpath, "postgres", "postgres")
        for name in names:
            shutil.chown(os.path.join(dirpath, name), "postgres", "postgres")


@pytest.fixture(scope="module")
def env():
    environment = make_backup_env()
    try:
        yield environment
    finally:
        environment.close()


def _attachments(env: BackupEnv, count: int = 3) -> dict[str, bytes]:
    """Content-addressed files as issue 6 will store them: attachments/ab/<sha256>."""

    root = backup.attachments_dir(env.settings)
    files = {}
    for i in range(count):
        data = os.urandom(1000 + i) + NEEDLE.encode()
        digest = hashlib.sha256(data).hexdigest()
        path = root / digest[:2] / digest
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        files[f"{digest[:2]}/{digest}"] = data
    return files


# ============================================================================= encryption


def test_stream_encryption_round_trip_and_detects_every_change(tmp_path):
    import io

    key = encryption.key_from_text(secrets.token_urlsafe(32), tmp_path / "k")
    size = 3 * 4096 + 17
    data = os.urandom(size)
    out = io.BytesIO()
    writer = encryption.EncryptingWriter(out, key, chunk_size=4096)
    writer.write(data)
    writer.close()
    blob = out.getvalue()
    assert b"".join(encryption.decrypt_chunks(io.BytesIO(blob), key, "f")) == data
    sealed = 4096 + encryption.TAG_SIZE
    header = encryption.HEADER.size
    changes = {
        "flipped byte": blob[:100] + bytes([blob[100] ^ 1]) + blob[101:],
        "cut at a chunk boundary": blob[:header + 2 * sealed],
        "cut mid-chunk": blob[:-5],
        "extended": blob + blob[header:header + sealed],
        "chunks swapped": blob[:header] + blob[header + sealed:header + 2 * sealed] + blob[header:header + sealed]
        + blob[header + 2 * sealed:],
        "header edited": blob[:10] + bytes([blob[10] ^ 1]) + blob[11:],
    }
    for what, changed in changes.items():
        with pytest.raises(BackupIntegrityError):
            b"".join(encryption.decrypt_chunks(io.BytesIO(changed), key, "f"))
        assert changed != blob, what
    other = encryption.key_from_text(secrets.token_urlsafe(32), tmp_path / "other")
    with pytest.raises(BackupIntegrityError, match="use the key file that was in place"):
        b"".join(encryption.decrypt_chunks(io.BytesIO(blob), other, "f"))


def test_stream_encryption_is_the_same_whatever_the_write_sizes(tmp_path):
    """Writes that straddle, fill or span chunks (bytes, bytearray, memoryview) give the same
    chunks: full ones, then a last one of 1 to chunk_size bytes; so decrypt reads them all."""
    import io
    import random

    key = encryption.key_from_text(secrets.token_urlsafe(32), tmp_path / "k")
    rng = random.Random(4)
    for size in (0, 1, 4095, 4096, 4097, 3 * 4096, 3 * 4096 + 17):
        data = os.urandom(size)
        for sizes in ([size], [4096] * 4, [1, 4095, 4096, 4097], [rng.randint(0, 9000) for _ in range(8)]):
            out, pos = io.BytesIO(), 0
            writer = encryption.EncryptingWriter(out, key, chunk_size=4096)
            for step, kind in zip(sizes + [size], [bytes, bytearray, memoryview] * 5):
                assert writer.write(kind(data[pos:pos + step])) == len(data[pos:pos + step])
                pos += step
            writer.close()
            blob = out.getvalue()
            assert b"".join(encryption.decrypt_chunks(io.BytesIO(blob), key, "f")) == data
            assert len(blob) == encryption.HEADER.size + size + max(1, -(-size // 4096)) * encryption.TAG_SIZE
            assert writer.stored_sha256.hexdigest() == hashlib.sha256(blob).hexdigest()
            assert writer.plain_size == writer.tell() == size and writer.stored_size == len(blob)


def test_writeback_starts_the_disk_writes_of_everything_written(tmp_path, monkeypatch):
    """Every WRITEBACK_BYTES the kernel is asked, successfully, to start writing the range just
    written, so the closing fsync finds little left; the file's content is untouched."""
    calls = []
    real = backup._Writeback(open(os.devnull, "wb"))._sync_file_range

    def recording(fd, offset, nbytes, flags):
        calls.append((offset, nbytes, flags, real(fd, offset, nbytes, flags)))
        return calls[-1][-1]

    monkeypatch.setattr(backup._Writeback, "_sync_file_range", staticmethod(recording))
    data = os.urandom(3 * backup._Writeback.WRITEBACK_BYTES + 12345)
    with open(tmp_path / "f", "wb") as fh:
        out = backup._Writeback(fh)
        for pos in range(0, len(data), 1000003):  # writes that do not line up with the ranges
            assert out.write(data[pos:pos + 1000003]) == len(data[pos:pos + 1000003])
        out.flush()
    assert (tmp_path / "f").read_bytes() == data
    assert len(calls) >= 2 and all(c[3] == 0 for c in calls), calls  # 0: the kernel took each range
    assert calls[0][0] == 0 and all(a[0] + a[1] == b[0] for a, b in zip(calls, calls[1:]))
    assert all(c[1] >= backup._Writeback.WRITEBACK_BYTES and c[2] == backup._Writeback.SYNC_FILE_RANGE_WRITE
               for c in calls)
    assert len(data) - (calls[-1][0] + calls[-1][1]) < backup._Writeback.WRITEBACK_BYTES


def test_dump_encryption_follows_closed_files_and_redoes_what_changed_after(tmp_path):
    """The logical backup encrypts pg_dump's files as they grow and seals each when closed; finish()
    completes the ones still open, and encrypts again whatever changed after it was sealed."""
    key = encryption.key_from_text(secrets.token_urlsafe(32), tmp_path / "k")
    plain, dest = tmp_path / "plain", tmp_path / "dump"
    plain.mkdir()
    dest.mkdir()
    encrypting = backup._DumpEncryption(plain, dest, key)

    def decrypted(name: str) -> bytes:
        with open(dest / f"{name}.enc", "rb") as fh:
            return b"".join(encryption.decrypt_chunks(fh, key, name))

    closed = os.urandom(3 * 1024**2 + 5)
    (plain / "3001.dat.gz").write_bytes(closed)
    deadline = time.monotonic() + 30
    while "3001.dat.gz" not in encrypting._done:  # encrypted on the thread, before finish()
        assert time.monotonic() < deadline, "the closed file was not encrypted"
        time.sleep(0.05)
    assert decrypted("3001.dat.gz") == closed
    (plain / "3002.dat.gz").write_bytes(b"first part ")
    while "3002.dat.gz" not in encrypting._done:
        assert time.monotonic() < deadline, "the second file was not encrypted"
        time.sleep(0.05)
    growing = open(plain / "3003.dat.gz", "wb", buffering=0)
    growing.write(b"followed ")
    while "3003.dat.gz" not in encrypting._open or encrypting._open["3003.dat.gz"][2].plain_size == 0:
        assert time.monotonic() < deadline, "the growing file was not followed"
        time.sleep(0.05)
    growing.write(b"while it grows")
    (plain / "toc.dat").write_bytes(b"table of contents")
    with growing, open(plain / "3002.dat.gz", "ab", buffering=0) as sealed_then_appended:
        sealed_then_appended.write(b"and what came after")  # no close event before finish()
        entries = encrypting.finish()
    assert [e["path"] for e in entries] == ["dump/3001.dat.gz.enc", "dump/3002.dat.gz.enc", "dump/3003.dat.gz.enc",
                                            "dump/toc.dat.enc"]
    assert decrypted("3002.dat.gz") == b"first part and what came after"
    assert decrypted("3003.dat.gz") == b"followed while it grows"
    assert decrypted("toc.dat") == b"table of contents"
    assert entries[1]["plain_size"] == len(b"first part and what came after")
    assert entries[0]["plain_size"] == len(closed)
    assert not plain.exists()


def test_key_rules(tmp_path):
    path = tmp_path / "key"
    with pytest.raises(BackupError, match="does not exist"):
        encryption.load_key(path)
    config.write_secret(path, "short")
    with pytest.raises(BackupError, match="at least 32 characters"):
        encryption.load_key(path)
    config.write_secret(path, secrets.token_urlsafe(32))
    os.chmod(path, 0o640)
    with pytest.raises(BackupError, match="expected mode 0600"):
        encryption.load_key(path)
    os.chmod(path, 0o600)
    key = encryption.load_key(path)
    text = path.read_text().strip()
    assert len(key.fingerprint) == 64 and text not in key.fingerprint
    assert key.fingerprint != hashlib.sha256(text.encode()).hexdigest()  # not a plain hash of the key


# ============================================================================= WAL archive


def test_archive_command_encrypts_every_wal_file(env):
    env.sql(f"INSERT INTO probe (label) VALUES ('{NEEDLE}')")
    name = env.switch_wal()
    archived = env.settings.backup.wal_archive_dir / (name + backup.ARCHIVE_SUFFIX)
    raw = archived.read_bytes()
    assert raw.startswith(encryption.MAGIC) and NEEDLE.encode() not in raw
    assert oct(archived.stat().st_mode & 0o777) == "0o640"
    plain = env.base / "fetched"
    assert backup.wal_fetch(name, plain, env.settings.backup.wal_archive_dir, env.settings.backup.key_file)
    assert NEEDLE.encode() in plain.read_bytes(), "the fetched segment holds the row: the test is not vacuous"
    assert plain.stat().st_size == 16 * 1024**2
    assert not backup.wal_fetch("0000000100000000000000FF", env.base / "absent", env.settings.backup.wal_archive_dir,
                                env.settings.backup.key_file)


def test_wal_push_is_idempotent_and_never_overwrites(env, tmp_path):
    segment = tmp_path / "000000990000000000000001"
    segment.write_bytes(os.urandom(4096))
    args = (env.settings.backup.wal_archive_dir, env.settings.backup.key_file)
    try:
        assert backup.wal_push(segment, segment.name, *args) == "archived"
        assert backup.wal_push(segment, segment.name, *args) == "already archived"
        segment.write_bytes(os.urandom(4096))
        with pytest.raises(BackupError, match="different content; refusing to overwrite"):
            backup.wal_push(segment, segment.name, *args)
    finally:
        (env.settings.backup.wal_archive_dir / (segment.name + backup.ARCHIVE_SUFFIX)).unlink(missing_ok=True)


def test_wal_fetch_exit_status_stops_recovery_on_damage(env, tmp_path):
    """Missing: exit 1 (end of archive). Damaged or wrong key: exit 126, which aborts recovery."""
    name = env.switch_wal()
    archive = env.settings.backup.wal_archive_dir
    argv = [sys.executable, "-m", "installer.backup_commands", "wal-fetch", "--archive-dir", str(archive)]
    ok = subprocess.run(argv + ["--key-file", str(env.settings.backup.key_file), name, str(tmp_path / "a")],
                        capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    missing = subprocess.run(argv + ["--key-file", str(env.settings.backup.key_file), "0000000100000000000000FE",
                                     str(tmp_path / "b")], capture_output=True, text=True)
    assert missing.returncode == 1
    wrong = tmp_path / "wrong-key"
    config.write_secret(wrong, secrets.token_urlsafe(32))
    bad = subprocess.run(argv + ["--key-file", str(wrong), name, str(tmp_path / "c")], capture_output=True, text=True)
    assert bad.returncode == 126 and "use the key file that was in place" in bad.stderr
    assert not (tmp_path / "c").exists()


# ============================================================================= base backups


def test_base_backup_manifest_and_catalogue(env):
    files = _attachments(env)
    env.sql(f"INSERT INTO probe (label) VALUES ('{NEEDLE}')")
    steps = []
    info = backup.take_backup(env.settings, "base", progress=steps.append)
    assert info.state == "unverified" and info.kind == "base" and info.size_bytes > 0
    assert any("pg_basebackup" in s for s in steps)
    manifest = json.loads((info.path / backup.MANIFEST).read_text())
    assert manifest["format"] == backup.FORMAT_VERSION and manifest["id"] == info.id
    assert manifest["appliance_version"] == __import__("appliance").__version__
    from appliance.db import MIGRATIONS_DIR

    known = sorted(p.stem for p in MIGRATIONS_DIR.glob("[0-9]*.py"))
    assert manifest["schema"] == {"level": int(known[-1][:4]), "migrations": known} and known[0] == "0001_initial"
    assert manifest["postgresql"]["version_num"] // 10000 == int(env.cluster.version)
    assert manifest["start"]["lsn"] and manifest["stop"]["lsn"]
    assert backup.lsn_to_int(manifest["start"]["lsn"]) <= backup.lsn_to_int(manifest["stop"]["lsn"])
    assert manifest["started_at"] < manifest["stopped_at"]
    assert manifest["encryption"]["key_fingerprint"] == env.key.fingerprint
    assert env.settings.backup.key_file.read_text().strip() not in json.dumps(manifest)
    assert manifest["attachments"]["files"] == len(files)
    paths = {f["path"] for f in manifest["files"]}
    assert "base.tar.zst.enc" in paths and backup.ATTACHMENTS_FILE in paths
    assert f"wal/{manifest['start']['wal']}{backup.ARCHIVE_SUFFIX}" in paths
    for entry in manifest["files"]:
        stored = (info.path / entry["path"]).read_bytes()
        assert len(stored) == entry["size"] and stored.startswith(encryption.MAGIC)
        assert hashlib.sha256(stored).hexdigest() == entry["sha256"]
        assert NEEDLE.encode() not in stored
    assert oct(info.path.stat().st_mode & 0o777) == "0o700"
    listed = backup.list_backups(env.settings)
    assert info.id in [b.id for b in listed]
    result = backup.verify(env.settings, info.id)
    assert result.files == len(manifest["files"]) and result.plain_bytes > result.files
    again = backup.get_backup(env.settings, info.id)
    assert again.state == "verified" and again.verified_at is not None


def test_decrypt_gives_what_stock_tools_read(env, tmp_path):
    info = backup.take_backup(env.settings, "base")
    out = tmp_path / "plain"
    result = backup.decrypt(env.settings, info.id, out)
    assert (out / "base.tar.zst").exists() and (out / "attachments.tar").exists() and (out / "manifest.json").exists()
    manifest = json.loads((out / "manifest.json").read_text())
    entry = next(f for f in manifest["files"] if f["path"] == "base.tar.zst.enc")
    assert (out / "base.tar.zst").stat().st_size == entry["plain_size"] and "plain_sha256" not in entry
    listing = subprocess.run(["tar", "--zstd", "-tf", str(out / "base.tar.zst")], capture_output=True, text=True,
                             check=True).stdout.split()
    assert "PG_VERSION" in listing and "global/pg_control" in listing and "backup_label" in listing
    assert (out / "wal" / manifest["start"]["wal"]).stat().st_size == 16 * 1024**2
    assert result.wal_files >= 1
    attachments = subprocess.run(["tar", "-tf", str(out / "attachments.tar")], capture_output=True, text=True,
                                 check=True).stdout.split()
    assert len(attachments) == manifest["attachments"]["files"] >= 3
    with pytest.raises(BackupError, match="not empty"):
        backup.decrypt(env.settings, info.id, out)


def test_a_format_1_backup_is_still_checked_against_its_plaintext_checksums(env, tmp_path):
    """Format 1 manifests also recorded each file's SHA-256 after decryption: verify and decrypt
    still check it, so a backup taken before format 2 loses none of its checks."""
    info = backup.take_backup(env.settings, "logical")
    manifest = backup.read_manifest(info.path, env.key)
    for entry in manifest["files"]:
        with open(info.path / entry["path"], "rb") as fh:
            entry["plain_sha256"] = hashlib.sha256(b"".join(encryption.decrypt_chunks(fh, env.key, "f"))).hexdigest()
    manifest["format"] = 1
    backup._write_manifest(info.path, manifest, env.key)
    backup.verify(env.settings, info.id)
    backup.decrypt(env.settings, info.id, tmp_path / "intact")
    entry = next(f for f in manifest["files"] if f["path"] == backup.ATTACHMENTS_FILE)
    entry["plain_sha256"] = hashlib.sha256(b"something else").hexdigest()
    backup._write_manifest(info.path, manifest, env.key)  # signed again: only the checksum is wrong
    with pytest.raises(BackupIntegrityError, match="decrypted content differs from the manifest"):
        backup.verify(env.settings, info.id)
    with pytest.raises(BackupIntegrityError, match="decrypted content differs from the manifest"):
        backup.decrypt(env.settings, info.id, tmp_path / "damaged")


@pytest.mark.parametrize("compression", ["lz4", "gzip", "none"])
def test_every_compression_is_read_back_with_its_tar_options(env, tmp_path, compression):
    """The server compresses (zstd above); restore's tar reads each kind back with the options COMPRESSION names."""
    settings = env.with_backup(compression=compression)
    info = backup.take_backup(settings, "base")
    out = tmp_path / "plain"
    backup.decrypt(settings, info.id, out, with_archive=False)
    _, suffix, tar_options = backup.COMPRESSION[compression]
    listing = subprocess.run(["tar", *tar_options, "-tf", str(out / f"base.tar{suffix}")], capture_output=True,
                             text=True, check=True).stdout.split()
    assert "PG_VERSION" in listing and "global/pg_control" in listing
    shutil.rmtree(info.path)


def test_logical_dump_restores_with_pg_restore(env, pg_tmp):
    env.sql("INSERT INTO probe (label) SELECT 'logical-' || g FROM generate_series(1, 500) g")
    expected = env.sql("SELECT count(*), md5(string_agg(label, ',' ORDER BY id)) FROM probe")
    info = backup.take_backup(env.settings, "logical")
    assert info.kind == "logical"
    manifest = json.loads((info.path / backup.MANIFEST).read_text())
    assert any(f["path"] == "dump/toc.dat.enc" for f in manifest["files"])
    assert not (info.path / ".plain-dump").exists()
    for entry in manifest["files"]:
        assert NEEDLE.encode() not in (info.path / entry["path"]).read_bytes()
    backup.verify(env.settings, info.id)
    out = pg_tmp / "plain"
    backup.decrypt(env.settings, info.id, out)
    give_to_postgres(out)
    env.cluster.psql("CREATE DATABASE from_dump")
    subprocess.run(["runuser", "-u", "postgres", "--", f"/usr/lib/postgresql/{env.cluster.version}/bin/pg_restore",
                    "-h", str(env.cluster.socket_dir), "-p", str(env.cluster.port), "-d", "from_dump", "--no-owner",
                    str(out / "dump")], check=True, capture_output=True, cwd="/")
    assert env.sql("SELECT count(*), md5(string_agg(label, ',' ORDER BY id)) FROM probe", "from_dump") == expected
    assert "CREATE ROLE crm" in (out / "globals.sql").read_text()


def test_emergency_procedure_with_stock_tools_only(env, pg_tmp):
    """docs/backup.md: decrypt, then tar, cp and pg_ctl bring the data back."""
    info = backup.take_backup(env.settings, "base")
    env.sql("INSERT INTO probe (label) VALUES ('after-emergency-backup')")
    env.switch_wal()
    work = pg_tmp
    if True:
        backup.decrypt(env.settings, info.id, work / "plain")
        data = work / "data"
        data.mkdir(mode=0o700)
        (work / "run").mkdir()
        for path in (work / "plain", data, work / "run"):
            give_to_postgres(path)
        run_dir = work / "run"
        bindir = f"/usr/lib/postgresql/{env.cluster.version}/bin"
        as_pg = ["runuser", "-u", "postgres", "--"]

        def run(argv: list[str]) -> None:
            done = subprocess.run(as_pg + argv, capture_output=True, text=True, cwd="/")
            log = (work / "run" / "log").read_text()[-1500:] if (work / "run" / "log").exists() else ""
            assert done.returncode == 0, f"{argv[0]}: {done.stderr} {log}"
        run(["tar", "--zstd", "-xf", str(work / "plain" / "base.tar.zst"), "-C", str(data)])
        port = str(__import__("tests.pgcluster", fromlist=["free_port"]).free_port())
        # Debian keeps postgresql.conf in /etc: a rescue host needs a minimal one.
        minimums = json.loads((work / "plain" / "manifest.json").read_text())["postgresql"]["recovery_minimums"]
        assert minimums["max_connections"] == "200"  # the test cluster's, above the default 100
        (data / "postgresql.conf").write_text(
            "".join(f"{name} = {value}\n" for name, value in minimums.items()) +
            f"port = {port}\nlisten_addresses = ''\nunix_socket_directories = '{run_dir}'\n"
            f"restore_command = 'cp {work}/plain/wal/%f \"%p\"'\nrecovery_target_action = 'promote'\n")
        (data / "pg_hba.conf").write_text("local all all peer\n")
        (data / "pg_ident.conf").write_text("")
        (data / "recovery.signal").touch()
        for name in ("postgresql.conf", "pg_hba.conf", "pg_ident.conf", "recovery.signal"):
            shutil.chown(data / name, "postgres", "postgres")
        run([f"{bindir}/pg_ctl", "-D", str(data), "-l", str(run_dir / "log"), "-w", "start"])
        try:
            deadline = time.monotonic() + 60
            while True:
                out = subprocess.run(as_pg + [f"{bindir}/psql", "-h", str(run_dir), "-p", port, "-d", "crm_test", "-Atc",
                                              "SELECT pg_is_in_recovery(), count(*) FROM probe WHERE label = "
                                              "'after-emergency-backup'"], capture_output=True, text=True, cwd="/")
                if out.stdout.strip() == "f|1":
                    break
                assert time.monotonic() < deadline, out.stdout + out.stderr + (run_dir / "log").read_text()[-2000:]
                time.sleep(0.3)
        finally:
            subprocess.run(as_pg + [f"{bindir}/pg_ctl", "-D", str(data), "-m", "immediate", "stop"],
                           capture_output=True, cwd="/")


# ============================================================================= faults


def _flip(path: Path, offset: int) -> None:
    with open(path, "r+b") as fh:
        fh.seek(offset)
        byte = fh.read(1)
        fh.seek(offset)
        fh.write(bytes([byte[0] ^ 0x40]))


def _tamper_manifest(path: Path) -> None:
    manifest = json.loads((path / backup.MANIFEST).read_text())
    manifest["database_bytes"] += 1
    (path / backup.MANIFEST).write_text(json.dumps(manifest))


FAULTS = {
    "flipped byte in the base tar": (lambda p: _flip(p / "base.tar.zst.enc", (p / "base.tar.zst.enc").stat().st_size // 2),
                                     "fails authentication"),
    "flipped byte in an attachment": (lambda p: _flip(p / backup.ATTACHMENTS_FILE, 600), "fails authentication"),
    "truncated file": (lambda p: os.truncate(p / "base.tar.zst.enc", (p / "base.tar.zst.enc").stat().st_size - 100),
                       "fails authentication"),
    "truncated at a chunk boundary": (lambda p: os.truncate(p / "base.tar.zst.enc", encryption.HEADER.size
                                                            + encryption.CHUNK_SIZE + encryption.TAG_SIZE),
                                      "fails authentication"),
    "missing file": (lambda p: next((p / "wal").iterdir()).unlink(), "listed in the manifest but missing"),
    "extra file": (lambda p: (p / "wal" / "000000010000000000000099.gz.enc").write_bytes(b"x"), "not in the manifest"),
    "missing manifest": (lambda p: (p / backup.MANIFEST).unlink(), "the manifest is missing"),
    "tampered manifest": (_tamper_manifest, "the manifest was changed after the backup was written"),
}


@pytest.mark.parametrize("fault", list(FAULTS))
def test_every_damage_fails_verify_with_a_clear_error(env, fault):
    info = backup.take_backup(env.settings, "base")
    assert (info.path / "base.tar.zst.enc").stat().st_size > encryption.CHUNK_SIZE * 1.5, \
        "the base tar must span chunks for the chunk-boundary fault to mean anything"
    backup.verify(env.settings, info.id)  # intact first: the fault is what breaks it
    damage, message = FAULTS[fault]
    damage(info.path)
    with pytest.raises(BackupIntegrityError, match=message):
        backup.verify(env.settings, info.id)
    state = backup.get_backup(env.settings, info.id).state
    assert state == ("damaged" if fault == "missing manifest" else "failed")
    shutil.rmtree(info.path)


def test_wrong_key_is_named(env, tmp_path):
    info = backup.get_backup(env.settings, "latest", kind="base")
    other = tmp_path / "other-key"
    config.write_secret(other, secrets.token_urlsafe(32))
    wrong = env.with_backup(key_file=other)
    with pytest.raises(BackupIntegrityError, match=r"fingerprint is [0-9a-f]{16}, but .*other-key holds the key"):
        backup.verify(wrong, info.id)
    with pytest.raises(BackupIntegrityError, match="use the key file that was in place"):
        backup.decrypt(wrong, info.id, tmp_path / "out")
    backup.verify(env.settings, info.id)  # the right key still reads it


def test_free_space_is_checked_before_starting(env, tmp_path):
    mount = tmp_path / "small"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(mount)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here")
    try:
        small = env.with_backup(dir=mount / "backups")
        with pytest.raises(BackupError, match=r"not enough free space in .*small/backups for a base backup: "
                                              r"expected up to .* found .* free"):
            backup.take_backup(small, "base")
        assert os.listdir(mount / "backups") == []
    finally:
        subprocess.run(["umount", str(mount)], check=True)


def test_disk_filling_up_during_a_backup_leaves_nothing(env, tmp_path):
    mount = tmp_path / "full"
    mount.mkdir()
    facts = backup._server_facts(backup._connection(env.settings))
    size = facts["database_bytes"] + backup._tree_bytes(backup.attachments_dir(env.settings)) + backup.SPACE_MARGIN
    size_mb = size // 1024**2 + 2
    if subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_mb}m", "tmpfs", str(mount)],
                      capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here")
    big = backup.attachments_dir(env.settings) / "zz" / "big-upload"
    try:
        settings = env.with_backup(dir=mount / "backups")

        def grow(message: str) -> None:
            if message == "attachments":  # an upload arrives while the backup runs
                big.parent.mkdir(parents=True, exist_ok=True)
                with open(big, "wb") as fh:
                    for _ in range(size_mb + 4):
                        fh.write(os.urandom(1024**2))

        with pytest.raises(BackupError, match="filled up during backup .*the partial backup was removed"):
            backup.take_backup(settings, "base", progress=grow)
        assert os.listdir(mount / "backups") == [] and backup.list_backups(settings) == []
    finally:
        subprocess.run(["umount", str(mount)], check=True)
        shutil.rmtree(big.parent, ignore_errors=True)


def test_a_failing_pg_dump_leaves_nothing(env, tmp_path, monkeypatch):
    """pg_dump dies part-way (here a stand-in that writes one file and fails): its error, and no
    partial backup, plaintext or encrypting thread left behind."""
    import threading

    bindir = tmp_path / "bin"
    bindir.mkdir()
    (bindir / "pg_dump").write_text('#!/bin/sh\nfor arg; do out=$arg; done\n'  # -f DIR comes last
                                    'head -c 3000000 /dev/urandom > "$out/4001.dat.gz"\n'
                                    'echo "pg_dump: error: server closed the connection unexpectedly" >&2\nexit 1\n')
    (bindir / "pg_dump").chmod(0o755)
    monkeypatch.setattr(backup, "pg_bin", lambda version: bindir)
    with pytest.raises(BackupError, match="pg_dump failed with exit status 1: .*server closed the connection"):
        backup.take_backup(env.settings, "logical")
    assert not [p for p in env.settings.backup.dir.iterdir() if p.name.startswith(backup.PARTIAL_PREFIX)]
    assert not [t for t in threading.enumerate() if t.name == "dump-encryption"]


def test_a_killed_backup_is_never_listed_and_prune_clears_it(env):
    before = [b.id for b in backup.list_backups(env.settings)]
    script = ("import sys; from appliance import backup, config; "
              "backup.take_backup(config.load(sys.argv[1]), 'base')")
    proc = subprocess.Popen([sys.executable, "-c", script, str(env.config_path)], cwd=Path(__file__).parent.parent)
    root = env.settings.backup.dir
    deadline = time.monotonic() + 30
    partial = []
    while not partial:
        partial = [p for p in root.iterdir() if p.name.startswith(backup.PARTIAL_PREFIX)]
        assert proc.poll() is None and time.monotonic() < deadline, "the backup ended before it could be killed"
        time.sleep(0.01)
    time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert partial[0].exists(), "killed mid-way: the partial directory is still there"
    assert [b.id for b in backup.list_backups(env.settings)] == before
    assert backup.get_backup(env.settings, "latest").id == before[-1]
    assert any(p.name.startswith(".pgpass-") for p in partial[0].iterdir()), "its password file stayed inside"
    result = backup.prune(env.settings)
    assert result.partial_removed == [partial[0].name] and not partial[0].exists()


def test_another_run_holding_the_lock_is_refused(env):
    with backup.catalogue_lock(env.settings.backup.dir, exclusive=True):
        script = ("import sys; from appliance import backup, config\n"
                  "try:\n    backup.take_backup(config.load(sys.argv[1]), 'base')\n"
                  "except backup.BackupError as e:\n    print(e); sys.exit(3)")
        out = subprocess.run([sys.executable, "-c", script, str(env.config_path)], capture_output=True, text=True,
                             cwd=Path(__file__).parent.parent)
    assert out.returncode == 3 and "another backup, prune or restore is running" in out.stdout


def test_base_backup_needs_archiving(tmp_path, pg_cluster, secrets_dir):
    """The session cluster does not archive WAL: a base backup is refused with what to set."""
    from tests.conftest import make_settings

    password = secrets.token_urlsafe(24)
    pg_cluster.psql("DROP ROLE IF EXISTS crm_backup_noarch")
    pg_cluster.psql(f"CREATE ROLE crm_backup_noarch LOGIN REPLICATION PASSWORD '{password}' IN ROLE pg_read_all_data")
    config.write_secret(tmp_path / "pw", password)
    config.write_secret(tmp_path / "key", secrets.token_urlsafe(32))
    pg_cluster.psql("SELECT 1")
    settings = make_settings(pg_cluster, secrets_dir, database={"name": "postgres"},
                             backup={"dir": str(tmp_path / "b"), "key_file": str(tmp_path / "key"),
                                     "db_user": "crm_backup_noarch", "db_password_file": str(tmp_path / "pw")})
    with pytest.raises(BackupError, match="archive_mode is off: a base backup needs continuous WAL archiving"):
        backup.take_backup(settings, "base")
    assert backup.list_backups(settings) == []


def test_bad_input_is_one_clear_error(env, tmp_path):
    with pytest.raises(BackupError, match="no backup 'nope' in .*the newest are"):
        backup.verify(env.settings, "nope")
    with pytest.raises(BackupError, match="unknown backup kind 'cold'"):
        backup.take_backup(env.settings, "cold")
    missing = env.with_backup(key_file=tmp_path / "absent-key")
    with pytest.raises(BackupError, match="absent-key.*does not exist"):
        backup.take_backup(missing, "base")
    config.write_secret(tmp_path / "bad-pw", "not the password")
    with pytest.raises(BackupError, match="cannot connect to PostgreSQL .* as 'crm_backup'.*REPLICATION"):
        backup.take_backup(env.with_backup(db_password_file=tmp_path / "bad-pw"), "base")


# ============================================================================= retention


def test_retention_keeps_the_newest_verified_backup_and_prunes_wal(env):
    for info in backup.list_backups(env.settings):  # start from a known catalogue
        shutil.rmtree(info.path)
    a = backup.take_backup(env.settings, "base")
    env.switch_wal()
    b = backup.take_backup(env.settings, "base")
    env.switch_wal()
    c = backup.take_backup(env.settings, "base")
    logical = backup.take_backup(env.settings, "logical")
    backup.verify(env.settings, a.id)
    backup.verify(env.settings, b.id)
    # c is the newest but fails its verification: b is the newest verified backup
    _flip(c.path / backup.ATTACHMENTS_FILE, 100)
    with pytest.raises(BackupIntegrityError):
        backup.verify(env.settings, c.id)
    archive = env.settings.backup.wal_archive_dir
    manifests = {x.id: backup.read_manifest(x.path) for x in (a, b)}
    a_start = archive / (manifests[a.id]["start"]["wal"] + backup.ARCHIVE_SUFFIX)
    b_start = archive / (manifests[b.id]["start"]["wal"] + backup.ARCHIVE_SUFFIX)
    assert a_start.exists() and b_start.exists() and a_start != b_start

    within = backup.prune(env.settings)
    assert within.deleted == [] and a.path.exists()

    later = c.started_at + dt.timedelta(days=env.settings.backup.retention_days, hours=1)
    result = backup.prune(env.settings, now=later)
    assert result.deleted == [a.id]
    assert set(result.kept) == {b.id, c.id, logical.id}
    assert b.path.exists() and c.path.exists() and not a.path.exists()
    assert not a_start.exists() and b_start.exists() and result.wal_deleted >= 1
    assert result.wal_kept_from == manifests[b.id]["start"]["wal"]
    backup.verify(env.settings, b.id)  # what is kept is still whole


# ============================================================================= the commands


def _cli():
    from installer.backup_commands import COMMANDS
    from installer.cli import Context

    @click.group()
    @click.option("--config", "config_path")
    @click.pass_context
    def main(ctx, config_path):
        ctx.obj = Context(Path(config_path))

    for command in COMMANDS:
        main.add_command(command)
    return main


def test_commands(env, tmp_path):
    main, cfg = _cli(), ["--config", str(env.config_path)]
    taken = CliRunner().invoke(main, cfg + ["backup", "--kind", "logical", "--json"])
    assert taken.exit_code == 0, taken.output
    backup_id = json.loads(taken.stdout)["id"]
    listed = CliRunner().invoke(main, cfg + ["backups", "--json"])
    assert backup_id in [b["id"] for b in json.loads(listed.stdout)]
    table = CliRunner().invoke(main, cfg + ["backups"])
    assert "ID" in table.output and backup_id in table.output and "unverified" in table.output
    verified = CliRunner().invoke(main, cfg + ["backup", "verify", backup_id])
    assert verified.exit_code == 0 and "is intact" in verified.output
    _flip(env.settings.backup.dir / backup_id / backup.ATTACHMENTS_FILE, 200)
    damaged = CliRunner().invoke(main, cfg + ["backup", "verify", backup_id])
    assert damaged.exit_code == 1 and "fails authentication" in damaged.output and "Traceback" not in damaged.output
    unknown = CliRunner().invoke(main, cfg + ["backup", "decrypt", "nope", "--output", str(tmp_path / "x")])
    assert unknown.exit_code == 1 and "no backup 'nope'" in unknown.output
    refused = CliRunner().invoke(main, cfg + ["restore", "latest"], input="")
    assert refused.exit_code == 1 and "confirm on a terminal or pass --yes" in refused.output
    bad_time = CliRunner().invoke(main, cfg + ["restore", "--to", "yesterday", "--yes"])
    assert bad_time.exit_code == 2 and "YYYY-MM-DD HH:MM:SS" in bad_time.output
    shutil.rmtree(env.settings.backup.dir / backup_id)
    base = CliRunner().invoke(main, cfg + ["backup"])
    assert base.exit_code == 0 and "backup " in base.stdout and "pg_basebackup" in base.stderr
    base_id = base.stdout.split()[1].rstrip(":")
    env.switch_wal()  # the archive must hold the backup's restore point
    drilled = CliRunner().invoke(main, cfg + ["backup", "drill", base_id, "--json"])
    assert drilled.exit_code == 0, drilled.output
    assert json.loads(drilled.stdout)["tables"]["public.probe"][0] == json.loads(drilled.stdout)["tables"]["public.probe"][1]
    pruned = CliRunner().invoke(main, cfg + ["backup", "prune"])
    assert pruned.exit_code == 0 and pruned.stdout.startswith("deleted 0 backups")
