"""Backups of the appliance: base backups with continuous WAL archiving, logical dumps, a catalogue.

Two kinds of backup, each a directory ``<[backup] dir>/<id>/`` with a signed ``manifest.json``:

``base``
    ``pg_basebackup`` of the whole cluster (tar format, compressed by the server,
    streamed through our encryption: no plaintext on disk), the WAL segments from the
    backup's start to its stop (copied from the archive, so the backup is consistent on its
    own), and the attachments. With the WAL archive it can be restored to any point in time
    after its stop.
``logical``
    ``pg_dump -Fd`` of the CRM database plus ``pg_dumpall --globals-only``, readable by stock
    ``pg_restore`` after ``decrypt``. Each file of the dump is encrypted while ``pg_dump``
    writes it.

PostgreSQL's ``archive_command`` calls ``wal_push`` (as the postgres user, with its own copy
of the key) and ``restore_command`` calls ``wal_fetch``; both go through
``installer/backup_commands.py`` (``python -m installer.backup_commands wal-push ...``), whose
exact lines ``archive_command_line`` and ``restore_command_line`` give.

A backup is written under ``.partial-<id>`` and renamed to ``<id>`` only when complete and
fsynced, so a partial backup is never listed. The manifest records the format, the appliance
and schema versions, PostgreSQL's version, the start and stop LSN and time, every file's size
and SHA-256 as stored and its size decrypted, and the key's fingerprint; an HMAC under the key
seals it.
See docs/backup.md.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import ctypes
import datetime as dt
import errno
import fcntl
import hashlib
import hmac
import json
import logging
import os
import queue
import re
import select
import shlex
import shutil
import struct
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import BinaryIO, Callable, Iterable, Iterator

import appliance
from appliance import encryption
from appliance.config import Settings, read_secret
from appliance.encryption import BackupKey
from appliance.errors import ApplianceError, BackupError, BackupIntegrityError
from appliance.files import fsync_dir

log = logging.getLogger(__name__)

# 2: files no longer carry plain_sha256 (GCM's tags prove the plaintext); format 1 is still read.
FORMAT_VERSION = 2
KINDS = ("base", "logical")
MANIFEST = "manifest.json"
STATUS = "status.json"
PARTIAL_PREFIX = ".partial-"
ATTACHMENTS_FILE = "attachments.tar.enc"
ARCHIVE_SUFFIX = ".gz.enc"
RESTORE_HISTORY = "restore-history.jsonl"
TOOL_APPLICATION_NAME = "crm-appliance-backup"  # pg_basebackup's and pg_dump's, in pg_stat_activity
# pg_basebackup's --compress value, the file suffix, and GNU tar's option to read it back.
# The server compresses: only compressed bytes cross the socket and pg_basebackup passes them
# through, where client-side compression sent the whole cluster over the socket and
# compressed it on one thread in pg_basebackup (bench/backup_speed.py: about a third less CPU
# for the whole backup, and the server's zstd workers compress in parallel).
COMPRESSION = {
    "zstd": ("server-zstd:level=1,workers={jobs}", ".zst", ["--zstd"]),
    "lz4": ("server-lz4", ".lz4", ["--use-compress-program=lz4"]),
    "gzip": ("server-gzip:1", ".gz", ["--gzip"]),
    "none": ("none", "", []),
}
# Room kept on top of the expected size: manifests, WAL copies, file system slack.
SPACE_MARGIN = 64 * 1024**2
BACKUP_ID = re.compile(r"^\d{8}T\d{6}Z-(base|logical)(-\d+)?$")
WAL_SEGMENT = re.compile(r"^[0-9A-F]{24}$")
HISTORY = re.compile(r"^([0-9A-F]{8})\.history$")
# Settings a server that replays the backup's WAL must have at least as high as the source.
RECOVERY_MINIMUMS = ("max_connections", "max_locks_per_transaction", "max_prepared_transactions",
                     "max_wal_senders", "max_worker_processes")
# How long to wait for the server to have archived the WAL a base backup needs.
WAL_WAIT_SECONDS = 120

Progress = Callable[[str], None]


# ============================================================================= records


@dataclass(frozen=True)
class BackupInfo:
    """One entry of the catalogue."""

    id: str
    kind: str
    path: Path
    state: str  # unverified, verified, failed (last verify), damaged (no manifest), incompatible (newer format)
    started_at: dt.datetime | None = None
    stopped_at: dt.datetime | None = None
    size_bytes: int = 0
    duration_seconds: float | None = None
    verified_at: dt.datetime | None = None
    error: str | None = None
    appliance_version: str | None = None

    def to_json(self) -> dict:
        data = asdict(self)
        data["path"] = str(self.path)
        for name in ("started_at", "stopped_at", "verified_at"):
            data[name] = _iso(getattr(self, name)) if getattr(self, name) else None
        return data


@dataclass(frozen=True)
class VerifyResult:
    backup_id: str
    files: int
    stored_bytes: int
    plain_bytes: int
    seconds: float


@dataclass(frozen=True)
class PruneResult:
    deleted: list[str]
    kept: list[str]
    partial_removed: list[str]
    wal_deleted: int
    wal_bytes: int
    wal_kept_from: str | None  # the first WAL segment still needed, None when WAL was not pruned

    def __str__(self) -> str:
        return (f"deleted {len(self.deleted)} backups ({', '.join(self.deleted) or 'none'}), kept {len(self.kept)}; "
                f"deleted {self.wal_deleted} WAL files ({_size(self.wal_bytes)})"
                + (f"; removed {len(self.partial_removed)} partial backups" if self.partial_removed else ""))


@dataclass(frozen=True)
class DecryptResult:
    backup_id: str
    output: Path
    files: list[str]
    wal_files: int


# ============================================================================= small helpers


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def _iso(value: dt.datetime) -> str:
    return value.astimezone(dt.timezone.utc).isoformat().replace("+00:00", "Z")


def _parse_time(text: str | None) -> dt.datetime | None:
    return dt.datetime.fromisoformat(text.replace("Z", "+00:00")) if text else None


def _size(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"



def _write_json_atomic(path: Path, data: dict) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(data, fh, indent=2, sort_keys=True)
        fh.write("\n")
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def _ensure_dir(path: Path, what: str) -> Path:
    try:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as exc:
        raise BackupError(f"{path}: cannot create the {what}: {exc.strerror}; check [backup] in the "
                          f"configuration and the directory's owner") from None
    return path


@contextlib.contextmanager
def catalogue_lock(root: Path, exclusive: bool) -> Iterator[None]:
    """One backup, prune or restore at a time (verify and decrypt may share). Not re-entrant."""
    fd = os.open(root, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB)
        except BlockingIOError:
            raise BackupError(f"{root}: another backup, prune or restore is running (it holds the lock on "
                              f"this directory); try again when it has finished") from None
        yield
    finally:
        os.close(fd)


def _chown_like(path: Path, model: Path) -> None:
    """Give root-made files the backup directory's owner, so the scheduler's user can prune them."""
    if os.geteuid() != 0:
        return
    st = model.stat()
    if st.st_uid == 0 and st.st_gid == 0:
        return
    for dirpath, dirnames, filenames in os.walk(path):
        os.chown(dirpath, st.st_uid, st.st_gid)
        for name in filenames:
            os.chown(os.path.join(dirpath, name), st.st_uid, st.st_gid)


def _tree_bytes(path: Path) -> int:
    total = 0
    for dirpath, _, filenames in os.walk(path):
        for name in filenames:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(dirpath, name)).st_size
    return total


def attachments_dir(settings: Settings) -> Path:
    """Where issue 6 keeps attachment files: content-addressed, immutable."""
    return settings.appliance.data_dir / "attachments"


# ============================================================================= WAL names


def lsn_to_int(lsn: str) -> int:
    hi, lo = lsn.split("/")
    return (int(hi, 16) << 32) | int(lo, 16)


def segment_of(name: str, segment_size: int) -> tuple[int, int]:
    """(timeline, segment number) of a WAL file name such as 000000010000000000000003."""
    per_id = 0x100000000 // segment_size
    return int(name[:8], 16), int(name[8:16], 16) * per_id + int(name[16:24], 16)


def segment_name(timeline: int, segno: int, segment_size: int) -> str:
    per_id = 0x100000000 // segment_size
    return f"{timeline:08X}{segno // per_id:08X}{segno % per_id:08X}"


def _archive_files(archive_dir: Path) -> dict[str, Path]:
    """WAL name -> archived file, for every complete file in the archive."""
    try:
        entries = list(os.scandir(archive_dir))
    except FileNotFoundError:
        return {}
    return {e.name[: -len(ARCHIVE_SUFFIX)]: Path(e.path) for e in entries
            if e.name.endswith(ARCHIVE_SUFFIX) and not e.name.startswith(".")}


# ============================================================================= WAL archive: push and fetch


def wal_push(wal_path: str | os.PathLike, wal_name: str, archive_dir: str | os.PathLike,
             key_file: str | os.PathLike) -> str:
    """Archive one WAL file (PostgreSQL's ``archive_command``): gzip, encrypt, fsync, rename.

    Returns "archived", or "already archived" when PostgreSQL sends again a file it archived
    before a crash (same content). A different file under the same name is refused: the
    archive may belong to another cluster.
    """
    key = encryption.load_key(key_file, "--key-file")
    archive_dir, wal_path = Path(archive_dir), Path(wal_path)
    if "/" in wal_name or wal_name.startswith("."):
        raise BackupError(f"{wal_name!r}: not a WAL file name")
    if not archive_dir.is_dir():
        raise BackupError(f"{archive_dir}: the WAL archive directory does not exist; the installer creates it "
                          f"(owner postgres); check [backup] wal_archive_dir")
    dest = archive_dir / (wal_name + ARCHIVE_SUFFIX)
    if dest.exists():
        with open(wal_path, "rb") as fh:
            ours = _sha256_stream(fh)
        if _archived_sha256(dest, key) == ours:
            return "already archived"
        raise BackupError(f"{dest}: already in the archive with different content; refusing to overwrite it. "
                          f"Is [backup] wal_archive_dir shared with another cluster?")
    tmp = archive_dir / f".{wal_name}.{os.getpid()}.tmp"
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
        with os.fdopen(fd, "wb") as out, open(wal_path, "rb") as src:
            os.fchmod(out.fileno(), 0o640)  # the backup user (group) reads it; umask must not narrow it
            writer = encryption.EncryptingWriter(out, key)
            gz = zlib.compressobj(1, zlib.DEFLATED, 31)
            while block := src.read(encryption.CHUNK_SIZE):
                writer.write(gz.compress(block))
            writer.write(gz.flush())
            writer.close()
            out.flush()
            os.fsync(out.fileno())
        os.rename(tmp, dest)
        fsync_dir(archive_dir)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    return "archived"


def _sha256_stream(fh: BinaryIO) -> str:
    digest = hashlib.sha256()
    while block := fh.read(encryption.CHUNK_SIZE):
        digest.update(block)
    return digest.hexdigest()


def _gunzip_chunks(chunks: Iterable[bytes], name: str) -> Iterator[bytes]:
    gz = zlib.decompressobj(31)
    for chunk in chunks:
        try:
            out = gz.decompress(chunk)
        except zlib.error as exc:
            raise BackupIntegrityError(f"{name}: not valid gzip after decryption ({exc})") from None
        if out:
            yield out
    if not gz.eof:
        raise BackupIntegrityError(f"{name}: the compressed stream ends early")


def _archived_chunks(path: Path, key: BackupKey) -> Iterator[bytes]:
    with open(path, "rb") as fh:
        yield from _gunzip_chunks(encryption.decrypt_chunks(fh, key, str(path)), str(path))


def _archived_sha256(path: Path, key: BackupKey) -> str:
    digest = hashlib.sha256()
    for chunk in _archived_chunks(path, key):
        digest.update(chunk)
    return digest.hexdigest()


def wal_fetch(wal_name: str, dest: str | os.PathLike, archive_dir: str | os.PathLike,
              key_file: str | os.PathLike) -> bool:
    """Restore one WAL file (PostgreSQL's ``restore_command``); False when it is not archived.

    Raises BackupIntegrityError for a damaged file or the wrong key: the command then exits
    with a status above 125, which makes PostgreSQL stop recovery instead of taking it for
    the end of the archive and promoting too early.
    """
    src = Path(archive_dir) / (wal_name + ARCHIVE_SUFFIX)
    if "/" in wal_name or not src.is_file():
        return False
    key = encryption.load_key(key_file, "--key-file")
    dest = Path(dest)
    tmp = dest.with_name(f".{dest.name}.crm-fetch")
    try:
        with open(tmp, "wb") as out:
            for chunk in _archived_chunks(src, key):
                out.write(chunk)
        os.replace(tmp, dest)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    return True


def _command_prefix(python: str | None) -> list[str]:
    return [python or sys.executable, "-m", "installer.backup_commands"]


def archive_command_line(settings: Settings, python: str | None = None) -> str:
    """The ``archive_command`` for postgresql.conf (it runs as the postgres user)."""
    cfg = settings.backup
    return shlex.join(_command_prefix(python) + ["wal-push", "--archive-dir", str(cfg.wal_archive_dir),
                                                 "--key-file", str(cfg.wal_key_file)]) + " %p %f"


def restore_command_line(settings: Settings, python: str | None = None, key_file: Path | None = None) -> str:
    """The ``restore_command`` a restore writes into the new data directory (run as the
    postgres user, so with its copy of the key unless ``key_file`` says otherwise)."""
    cfg = settings.backup
    return shlex.join(_command_prefix(python) + ["wal-fetch", "--archive-dir", str(cfg.wal_archive_dir),
                                                 "--key-file", str(key_file or cfg.wal_key_file)]) + " %f %p"


# ============================================================================= the database connection


@dataclass(frozen=True)
class _Connection:
    host: str
    port: int
    user: str
    password: str
    dbname: str
    timeout: int

    def describe(self) -> str:
        return f"PostgreSQL at {self.host}:{self.port} as {self.user!r}"

    def open(self):
        """A psycopg2 connection to the CRM database as the backup role."""
        import psycopg2

        return psycopg2.connect(host=self.host, port=self.port, user=self.user, password=self.password,
                                dbname=self.dbname, connect_timeout=self.timeout,
                                application_name=TOOL_APPLICATION_NAME)


def _connection(settings: Settings) -> _Connection:
    cfg = settings.backup
    try:
        password = read_secret(cfg.db_password_file, "[backup] db_password_file")
    except ApplianceError as exc:
        raise BackupError(str(exc)) from None
    db = settings.database
    return _Connection(db.host, db.port, cfg.db_user, password, db.name, db.connect_timeout_seconds)


@contextlib.contextmanager
def _tool_env(conn: _Connection, directory: Path) -> Iterator[dict]:
    """Environment for pg_basebackup/pg_dump: the password in a private pgpass file, never argv.

    The file lives in the (0700) partial backup directory, so that even a killed backup
    leaves it only where the next prune removes it.
    """
    def esc(text: str) -> str:
        return text.replace("\\", "\\\\").replace(":", "\\:")

    fd, path = tempfile.mkstemp(prefix=".pgpass-", dir=directory)
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(f"{esc(conn.host)}:{conn.port}:*:{esc(conn.user)}:{esc(conn.password)}\n")
        env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        env.update(PGPASSFILE=path, LC_ALL="C", PGCONNECT_TIMEOUT=str(conn.timeout), PGAPPNAME=TOOL_APPLICATION_NAME)
        yield env
    finally:
        os.unlink(path)


def _server_facts(conn: _Connection) -> dict:
    """Version, sizes, WAL settings and the schema's migrations, read before a backup."""
    import psycopg2

    try:
        pg = conn.open()
    except psycopg2.OperationalError as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise BackupError(f"cannot connect to {conn.describe()} database {conn.dbname!r}: {first}; check that "
                          f"the role exists with REPLICATION and pg_read_all_data and that [backup] "
                          f"db_password_file holds its password") from None
    try:
        pg.autocommit = True
        with pg.cursor() as cur:
            cur.execute("SELECT current_setting('server_version'), current_setting('server_version_num')::int, "
                        "(SELECT setting::bigint FROM pg_settings WHERE name = 'wal_segment_size'), "
                        "current_setting('archive_mode'), "
                        "(SELECT sum(pg_database_size(oid))::bigint FROM pg_database WHERE datallowconn), "
                        "(SELECT system_identifier::text FROM pg_control_system())")
            version, version_num, segment_size, archive_mode, db_bytes, system_id = cur.fetchone()
            # A server replaying this backup needs these at least as high (PostgreSQL refuses otherwise).
            cur.execute("SELECT name, setting FROM pg_settings WHERE name = ANY(%s) ORDER BY name",
                        (list(RECOVERY_MINIMUMS),))
            minimums = dict(cur.fetchall())
            cur.execute("SELECT to_regclass('schema_migration') IS NOT NULL")
            migrations = []
            if cur.fetchone()[0]:
                cur.execute("SELECT name FROM schema_migration ORDER BY name")
                migrations = [row[0] for row in cur.fetchall()]
    except psycopg2.Error as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise BackupError(f"{conn.describe()}: cannot read the server's facts: {first}; the role needs "
                          f"pg_read_all_data") from None
    finally:
        pg.close()
    return {"version": version, "version_num": version_num, "wal_segment_size": segment_size,
            "archive_mode": archive_mode, "database_bytes": int(db_bytes or 0), "system_identifier": system_id,
            "migrations": migrations, "schema_level": max((_migration_index(m) for m in migrations), default=0),
            "recovery_minimums": minimums}


def _migration_index(name: str) -> int:
    match = re.match(r"\d+", name)
    return int(match.group()) if match else -1


def pg_bin(version_num: int) -> Path:
    """The client programs matching the server's major version (Debian's layout)."""
    major = version_num // 10000
    path = Path(f"/usr/lib/postgresql/{major}/bin")
    if not (path / "pg_basebackup").exists():
        raise BackupError(f"{path}/pg_basebackup not found: the PostgreSQL {major} client programs are needed; "
                          f"run: apt-get install postgresql-client-{major}")
    return path


def _check_free_space(root: Path, kind: str, database_bytes: int, attachment_bytes: int) -> None:
    needed = database_bytes + attachment_bytes + SPACE_MARGIN
    free = shutil.disk_usage(root).free
    if free < needed:
        raise BackupError(
            f"not enough free space in {root} for a {kind} backup: expected up to {_size(needed)} (database "
            f"{_size(database_bytes)}, attachments {_size(attachment_bytes)}, margin {_size(SPACE_MARGIN)}), "
            f"found {_size(free)} free; free some space (crm-appliance backup prune) or point [backup] dir at "
            f"a larger disk")


# ============================================================================= taking a backup


class _Tool:
    """A PostgreSQL program whose stderr is collected on a thread (so its pipe never fills)."""

    def __init__(self, argv: list[str], env: dict, stdout=subprocess.DEVNULL):
        self.name = Path(argv[0]).name
        self.proc = subprocess.Popen(argv, stdout=stdout, stderr=subprocess.PIPE, env=env, cwd="/")
        self._err: list[bytes] = []
        self._thread = threading.Thread(target=lambda: self._err.extend(self.proc.stderr), daemon=True)
        self._thread.start()

    def finish(self) -> None:
        rc = self.proc.wait()
        self._thread.join()
        if rc != 0:
            lines = [ln.decode("utf-8", "replace").strip() for ln in self._err if ln.strip()]
            detail = "; ".join(lines[-3:]) or "no message"
            raise BackupError(f"{self.name} failed with exit status {rc}: {detail}")

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        self._thread.join()


def _new_id(root: Path, kind: str, started: dt.datetime) -> str:
    stem = started.strftime("%Y%m%dT%H%M%SZ") + "-" + kind
    candidate, n = stem, 1
    while (root / candidate).exists() or (root / (PARTIAL_PREFIX + candidate)).exists():
        n += 1
        candidate = f"{stem}-{n}"
    return candidate


def _file_entry(rel: str, writer: encryption.EncryptingWriter) -> dict:
    return {"path": rel, "size": writer.stored_size, "sha256": writer.stored_sha256.hexdigest(),
            "plain_size": writer.plain_size}


class _Writeback:
    """A file being written whose pages go to disk as they come, not all at the closing fsync.

    The kernel keeps dirty pages until 10% of memory is dirty or 30 s have passed, so a
    backup's files sat in the page cache and their fsync at the end wrote them all, on the
    backup's critical path (0.2 s for each 400 MB file here). Every ``WRITEBACK_BYTES``
    this starts the writes of what came since, without waiting for them
    (``sync_file_range(SYNC_FILE_RANGE_WRITE)``, as PostgreSQL's checkpoint_flush_after does).
    Only a hint: the fsync at the end is what makes the file durable.
    """

    WRITEBACK_BYTES = 8 << 20
    SYNC_FILE_RANGE_WRITE = 2
    _sync_file_range = None

    def __init__(self, fh: BinaryIO):
        self._fh = fh
        self._written = self._started = 0
        if _Writeback._sync_file_range is None:
            function = ctypes.CDLL(None, use_errno=True).sync_file_range
            function.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
            _Writeback._sync_file_range = function

    def write(self, data) -> int:
        n = self._fh.write(data)
        self._written += n
        if self._written - self._started >= self.WRITEBACK_BYTES:
            self._fh.flush()
            self._sync_file_range(self._fh.fileno(), self._started, self._written - self._started,
                                  self.SYNC_FILE_RANGE_WRITE)
            self._started = self._written
        return n

    def flush(self) -> None:
        self._fh.flush()


@contextlib.contextmanager
def _encrypted_output(path: Path, key: BackupKey) -> Iterator[encryption.EncryptingWriter]:
    with open(path, "xb") as fh:
        writer = encryption.EncryptingWriter(_Writeback(fh), key)
        yield writer
        writer.close()
        fh.flush()
        os.fsync(fh.fileno())


def take_backup(settings: Settings, kind: str = "base", *, progress: Progress | None = None) -> BackupInfo:
    """Take one backup of ``kind`` ("base" or "logical") and return its catalogue entry.

    Fails, leaving nothing behind, when the key is missing, space is short, a tool fails or
    encryption fails.
    """
    if kind not in KINDS:
        raise BackupError(f"unknown backup kind {kind!r}: expected one of {', '.join(KINDS)}")
    say = progress or (lambda message: None)
    cfg = settings.backup
    key = encryption.load_key(cfg.key_file)
    root = _ensure_dir(cfg.dir, "backup directory")
    conn = _connection(settings)
    with catalogue_lock(root, exclusive=True):
        facts = _server_facts(conn)
        if kind == "base" and facts["archive_mode"] not in ("on", "always"):
            raise BackupError(f"{conn.describe()}: archive_mode is {facts['archive_mode']}: a base backup needs "
                              f"continuous WAL archiving (archive_mode = on, archive_command = "
                              f"{archive_command_line(settings)!r}); the installer sets it")
        attachments = attachments_dir(settings)
        _check_free_space(root, kind, facts["database_bytes"], _tree_bytes(attachments))
        started = _now()
        backup_id = _new_id(root, kind, started)
        partial = root / (PARTIAL_PREFIX + backup_id)
        partial.mkdir(mode=0o700)
        try:
            say(f"backup {backup_id}: {kind} backup of {conn.describe()} into {partial}")
            capture = _AttachmentCapture(attachments, partial / ATTACHMENTS_FILE, key)
            try:
                if kind == "base":
                    manifest = _base_backup(settings, conn, facts, key, partial, backup_id, say)
                else:
                    manifest = _logical_backup(settings, conn, facts, key, partial, backup_id, say)
            except BaseException:
                capture.abandon()
                raise
            say("attachments")
            entry, counts = capture.finish()
            stopped = _now()
            manifest.update(
                format=FORMAT_VERSION, id=backup_id, kind=kind, appliance_version=appliance.__version__,
                schema={"level": facts["schema_level"], "migrations": facts["migrations"]},
                postgresql={"version": facts["version"], "version_num": facts["version_num"],
                            "wal_segment_size": facts["wal_segment_size"],
                            "system_identifier": facts["system_identifier"],
                            "recovery_minimums": facts["recovery_minimums"]},
                database=conn.dbname, database_bytes=facts["database_bytes"],
                started_at=_iso(started), stopped_at=_iso(stopped),
                duration_seconds=round((stopped - started).total_seconds(), 3),
                encryption={"cipher": encryption.CIPHER, "chunk_size": encryption.CHUNK_SIZE,
                            "key_fingerprint": key.fingerprint},
                attachments=counts)
            manifest["files"] = sorted(manifest["files"] + [entry], key=lambda f: f["path"])
            say("manifest")
            _write_manifest(partial, manifest, key)
            fsync_dir(partial)
            final = root / backup_id
            os.rename(partial, final)
            fsync_dir(root)
        except OSError as exc:
            shutil.rmtree(partial, ignore_errors=True)
            if exc.errno == errno.ENOSPC:
                raise BackupError(f"the disk holding {root} filled up during backup {backup_id}; the partial "
                                  f"backup was removed; free space or point [backup] dir at a larger disk") from None
            raise BackupError(f"backup {backup_id} failed: {exc.filename or root}: {exc.strerror}; the partial "
                              f"backup was removed") from None
        except BaseException:
            shutil.rmtree(partial, ignore_errors=True)
            raise
        _chown_like(final, root)
    say(f"backup {backup_id} complete")
    return get_backup(settings, backup_id)


def _base_backup(settings: Settings, conn: _Connection, facts: dict, key: BackupKey, partial: Path,
                 backup_id: str, say: Progress) -> dict:
    compression = settings.backup.compression
    method, suffix, _ = COMPRESSION[compression]
    method = method.format(jobs=parallel_jobs())
    label = f"crm-appliance {backup_id}"
    rel = f"base.tar{suffix}.enc"
    bindir = pg_bin(facts["version_num"])
    since = time.time()
    say(f"pg_basebackup (tar, {compression}) streamed through AES-256-GCM")
    with _tool_env(conn, partial) as env:
        # -X none: the WAL comes from the archive (the server waits until the backup's WAL is archived).
        # --no-manifest: pg_basebackup cannot add its backup_manifest to a tar the server
        # compressed; our manifest's checksums of the whole stream and GCM's tags stand for it.
        tool = _Tool([str(bindir / "pg_basebackup"), "-h", conn.host, "-p", str(conn.port), "-U", conn.user, "-w",
                      "-D", "-", "-F", "t", "-X", "none", "-c", "fast", "-l", label, f"--compress={method}",
                      "--no-manifest"],
                     env, stdout=subprocess.PIPE)
        # The drill's restore point and row counts must follow the backup's end; they start as
        # soon as the server has written it, while it waits for the archiver (up to a second).
        counting = _Background(_row_counts_once_stopped, conn, label, tool)
        try:
            with _encrypted_output(partial / rel, key) as writer:
                while block := tool.proc.stdout.read(encryption.CHUNK_SIZE):
                    writer.write(block)
            tool.finish()
        except BaseException:
            tool.kill()
            counting.join()  # pg_basebackup's error is the one to report
            raise
    files = [_file_entry(rel, writer)]
    try:
        archive_dir = settings.backup.wal_archive_dir
        say("backup label and WAL from the archive, beside the row counts at a restore point (for the restore drill)")
        info = _find_backup_history(archive_dir, label, key, since)
        segment_size = facts["wal_segment_size"]
        start_tli, start_seg = segment_of(info["start_wal"], segment_size)
        _, stop_seg = segment_of(info["stop_wal"], segment_size)
        (partial / "wal").mkdir()
        for segno in range(start_seg, stop_seg + 1):
            name = segment_name(start_tli, segno, segment_size)
            src = _wait_for_archived(archive_dir, name)
            files.append(_copy_archived(src, partial / "wal" / (name + ARCHIVE_SUFFIX), f"wal/{name}{ARCHIVE_SUFFIX}",
                                        key))
    except BaseException:
        counting.join()  # the copy's error is the one to report
        raise
    counts = counting.result()
    if counts is not None and lsn_to_int(counts["lsn"]) <= lsn_to_int(info["stop_lsn"]):
        # Made before the backup's end: recovery could not stop there. Again, under a name
        # of its own (recovery stops at the first restore point of a name).
        log.warning("the restore point for %s came before the backup's end (%s <= %s): counting again",
                    label, counts["lsn"], info["stop_lsn"])
        counts = _row_counts(conn, f"{label} after its end")
    return {"compression": compression, "label": label, "row_counts": counts,
            "start": {"lsn": info["start_lsn"], "wal": info["start_wal"], "timeline": start_tli},
            "stop": {"lsn": info["stop_lsn"], "wal": info["stop_wal"], "timeline": info["stop_timeline"]},
            "files": files}


class _Background:
    """``func(*args)`` on a thread; ``result()`` waits for it and returns its value or raises its error."""

    def __init__(self, func, *args):
        self._value, self._error = None, None
        self._thread = threading.Thread(target=self._run, args=(func, args), name=func.__name__, daemon=True)
        self._thread.start()

    def _run(self, func, args) -> None:
        try:
            self._value = func(*args)
        except BaseException as exc:  # noqa: BLE001 - handed to the caller by result()
            self._error = exc

    def join(self) -> None:
        self._thread.join()

    def result(self):
        self.join()
        if self._error is not None:
            raise self._error
        return self._value


def _row_counts_once_stopped(conn: _Connection, name: str, tool: _Tool) -> dict | None:
    """``_row_counts`` once the server has written the backup's end: its walsender then waits
    for the archiver (wait event BackupWaitWalArchive, polled in 1 s steps by the server), or
    once pg_basebackup has exited. None, without counting, if pg_basebackup failed."""
    with contextlib.closing(conn.open()) as pg:
        pg.autocommit = True
        with pg.cursor() as cur:
            while tool.proc.poll() is None:
                cur.execute("SELECT 1 FROM pg_stat_activity WHERE application_name = %s AND backend_type = 'walsender' "
                            "AND wait_event = 'BackupWaitWalArchive'", (TOOL_APPLICATION_NAME,))
                if cur.fetchone():
                    break
                time.sleep(0.05)
    if tool.proc.poll() not in (None, 0):
        return None
    return _row_counts(conn, name)


def _row_counts(conn: _Connection, name: str) -> dict | None:
    """Exact row counts of the CRM database at a named restore point made after the backup.

    The restore point is the first statement of a REPEATABLE READ transaction, so the
    snapshot the counts read and the WAL position of the restore point are taken together:
    a drill that recovers to ``recovery_target_name`` must find exactly these counts.
    None when the role may not create restore points (GRANT EXECUTE ON FUNCTION
    pg_create_restore_point(text) TO the backup role).
    """
    import psycopg2
    from psycopg2 import sql

    with contextlib.closing(conn.open()) as pg:
        pg.set_session(isolation_level="REPEATABLE READ")
        with pg.cursor() as cur:
            try:
                cur.execute("SELECT pg_create_restore_point(%s)::text", (name,))
            except psycopg2.errors.InsufficientPrivilege:
                log.warning("%s may not create restore points: the backup records no row counts", conn.user)
                return None
            lsn = cur.fetchone()[0]
            cur.execute("SELECT n.nspname, c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
                        "WHERE c.relkind = 'r' AND c.relpersistence = 'p' AND n.nspname NOT IN "
                        "('pg_catalog', 'information_schema') AND n.nspname NOT LIKE 'pg\\_%' ORDER BY 1, 2")
            tables = {}
            for schema, table in cur.fetchall():
                cur.execute(sql.SQL("SELECT count(*) FROM {}.{}").format(sql.Identifier(schema), sql.Identifier(table)))
                tables[f"{schema}.{table}"] = cur.fetchone()[0]
        pg.commit()
    return {"restore_point": name, "lsn": lsn, "tables": tables}


def _find_backup_history(archive_dir: Path, label: str, key: BackupKey, since: float) -> dict:
    """The server's backup history file for our label: exact start and stop LSN (``-X none`` prints none)."""
    deadline = time.monotonic() + WAL_WAIT_SECONDS
    seen: set[str] = set()
    while True:
        for name, path in sorted(_archive_files(archive_dir).items()):
            if not name.endswith(".backup") or name in seen:
                continue
            with contextlib.suppress(FileNotFoundError):
                if path.stat().st_mtime < since - 5:
                    seen.add(name)
                    continue
            text = b"".join(_archived_chunks(path, key)).decode("utf-8", "replace")
            seen.add(name)
            fields = dict(line.split(": ", 1) for line in text.splitlines() if ": " in line)
            if fields.get("LABEL") != label:
                continue
            start = re.match(r"(\S+) \(file (\w+)\)", fields["START WAL LOCATION"])
            stop = re.match(r"(\S+) \(file (\w+)\)", fields["STOP WAL LOCATION"])
            return {"start_lsn": start.group(1), "start_wal": start.group(2), "stop_lsn": stop.group(1),
                    "stop_wal": stop.group(2), "stop_timeline": int(fields.get("STOP TIMELINE", "0") or 0)}
        if time.monotonic() > deadline:
            raise BackupError(f"the server did not archive the backup history file for {label!r} into {archive_dir} "
                              f"within {WAL_WAIT_SECONDS} s: check archive_command in postgresql.conf and the "
                              f"server log")
        time.sleep(0.5)


def _wait_for_archived(archive_dir: Path, name: str) -> Path:
    path = archive_dir / (name + ARCHIVE_SUFFIX)
    deadline = time.monotonic() + WAL_WAIT_SECONDS
    while not path.exists():
        if time.monotonic() > deadline:
            raise BackupError(f"WAL segment {name} needed by the backup did not reach {archive_dir} within "
                              f"{WAL_WAIT_SECONDS} s: check archive_command and the server log")
        time.sleep(0.5)
    return path


def _copy_archived(src: Path, dest: Path, rel: str, key: BackupKey) -> dict:
    """Copy an archived file as is, checking on the way that it decrypts (the archive may be damaged)."""
    stored = hashlib.sha256()
    plain_size = 0
    with open(src, "rb") as fin, open(dest, "xb") as fout:
        reader = encryption.HashingReader(fin)
        for chunk in encryption.decrypt_chunks(reader, key, str(src)):
            plain_size += len(chunk)
        fin.seek(0)
        while block := fin.read(encryption.CHUNK_SIZE):
            stored.update(block)
            fout.write(block)
        fout.flush()
        os.fsync(fout.fileno())
    if stored.hexdigest() != reader.sha256.hexdigest():
        raise BackupError(f"{src} changed while it was copied")
    return {"path": rel, "size": reader.size, "sha256": stored.hexdigest(), "plain_size": plain_size}


def parallel_jobs() -> int:
    """``pg_dump -j`` and the server's zstd workers: one per core, at most 4."""
    return max(1, min(4, os.cpu_count() or 1))


def _logical_backup(settings: Settings, conn: _Connection, facts: dict, key: BackupKey, partial: Path,
                    backup_id: str, say: Progress) -> dict:
    bindir = pg_bin(facts["version_num"])
    # pg_dump -Fd can only write a directory: the plaintext stays inside the 0700 partial
    # directory, each file is encrypted while pg_dump writes it, and all are removed at the end.
    plain = partial / ".plain-dump"
    plain.mkdir(mode=0o700)  # pg_dump -Fd accepts an empty directory; the watch needs it first
    (partial / "dump").mkdir()
    jobs = str(parallel_jobs())
    files = []
    with _tool_env(conn, partial) as env:
        say(f"pg_dump -Fd -j {jobs} of database {conn.dbname!r}, each file encrypted as pg_dump writes it")
        start_lsn = _current_lsn(conn)
        encrypting = _DumpEncryption(plain, partial / "dump", key)
        tool = None
        try:
            tool = _Tool([str(bindir / "pg_dump"), "-h", conn.host, "-p", str(conn.port), "-U", conn.user, "-w",
                          "-d", conn.dbname, "-F", "d", "-j", jobs, "-Z", "1", "--no-sync", "-f", str(plain)], env)
            tool.finish()
        except BaseException:
            if tool is not None:
                tool.kill()
            encrypting.abandon()
            raise
        stop_lsn = _current_lsn(conn)
        say("encrypting the rest of the dump")
        files += encrypting.finish()
        say("pg_dumpall --globals-only (roles, without passwords)")
        tool = _Tool([str(bindir / "pg_dumpall"), "-h", conn.host, "-p", str(conn.port), "-U", conn.user, "-w",
                      "--globals-only", "--no-role-passwords"], env, stdout=subprocess.PIPE)
        try:
            with _encrypted_output(partial / "globals.sql.enc", key) as writer:
                while block := tool.proc.stdout.read(encryption.CHUNK_SIZE):
                    writer.write(block)
            tool.finish()
        except BaseException:
            tool.kill()
            raise
        files.append(_file_entry("globals.sql.enc", writer))
    return {"compression": "pg_dump -Z 1 (gzip)", "start": {"lsn": start_lsn}, "stop": {"lsn": stop_lsn},
            "files": files}


class _ClosedFiles:
    """Names of the files closed after writing in one directory (Linux inotify, IN_CLOSE_WRITE)."""

    IN_CLOSE_WRITE = 0x8
    EVENT = struct.Struct("iIII")  # struct inotify_event: wd, mask, cookie, len; then the name

    def __init__(self, directory: Path):
        libc = ctypes.CDLL(None, use_errno=True)
        self._fd = libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
        if self._fd < 0 or libc.inotify_add_watch(self._fd, os.fsencode(directory), self.IN_CLOSE_WRITE) < 0:
            err = ctypes.get_errno()
            if self._fd >= 0:
                os.close(self._fd)
            raise OSError(err, f"cannot watch the directory: {os.strerror(err)}", str(directory))
        self._wake_read, self._wake_write = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)

    def wait(self, timeout: float) -> list[str]:
        """The names closed since the last call, waiting up to ``timeout`` seconds for one or
        until ``wake``."""
        if self._fd not in select.select([self._fd, self._wake_read], [], [], timeout)[0]:
            return []
        data, names, pos = os.read(self._fd, 1 << 16), [], 0
        while pos < len(data):
            _, _, _, length = self.EVENT.unpack_from(data, pos)
            pos += self.EVENT.size
            names.append(os.fsdecode(data[pos:pos + length].rstrip(b"\0")))
            pos += length
        return names

    def wake(self) -> None:
        """End the current and every later ``wait`` at once."""
        os.write(self._wake_write, b"x")

    def close(self) -> None:
        for fd in (self._fd, self._wake_read, self._wake_write):
            os.close(fd)


def _identity(st: os.stat_result) -> tuple:
    return st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns


class _DumpEncryption:
    """Encrypt pg_dump -Fd's files on a thread while pg_dump writes them.

    A second pass over the whole dump after pg_dump ended took a sixth of the logical backup,
    and encrypting each file once closed gained little: pg_dump starts with the largest tables,
    which it closes last. So the thread follows every file as it grows (pg_dump only appends
    to them, each from start to end: a followed file's prefix never changes) and seals it when
    closed (inotify). ``finish``, once pg_dump has exited, completes what is still open, encrypts
    again from the start any file that changed after it was sealed, and encrypts ``toc.dat``,
    which pg_dump writes last.
    """

    POLL_SECONDS = 0.2

    def __init__(self, plain: Path, dest: Path, key: BackupKey):
        self.plain, self.dest, self.key = plain, dest, key
        # name -> (plaintext file, encrypted file, writer): files being followed
        self._open: dict[str, tuple[BinaryIO, BinaryIO, encryption.EncryptingWriter]] = {}
        self._done: dict[str, tuple[tuple, dict]] = {}  # name -> (identity when sealed, manifest entry)
        self._closed = _ClosedFiles(plain)
        self._stop = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="dump-encryption", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                closed = self._closed.wait(self.POLL_SECONDS)
                for name in sorted(os.listdir(self.plain)):
                    if name != "toc.dat" and name not in self._done:
                        self._follow(name)
                for name in closed:
                    if name != "toc.dat" and name in self._open:
                        self._seal(name)
        except BaseException as exc:  # re-raised by finish() in the backup's thread
            self._error = exc

    def _follow(self, name: str) -> None:
        """Encrypt what has been appended to ``name`` since the last call."""
        if name not in self._open:
            src = open(self.plain / name, "rb")
            out = open(self.dest / f"{name}.enc", "wb")
            self._open[name] = (src, out, encryption.EncryptingWriter(_Writeback(out), self.key))
        src, _, writer = self._open[name]
        while block := src.read(encryption.CHUNK_SIZE):
            writer.write(block)

    def _seal(self, name: str) -> None:
        self._follow(name)
        src, out, writer = self._open.pop(name)
        with src, out:
            writer.close()
            out.flush()
            os.fsync(out.fileno())
            self._done[name] = (_identity(os.fstat(src.fileno())), _file_entry(f"dump/{name}.enc", writer))

    def _halt(self) -> None:
        self._stop.set()
        self._closed.wake()  # not after the poll's 0.2 s: pg_dump has exited, the backup waits on this
        self._thread.join()
        self._closed.close()

    def finish(self) -> list[dict]:
        """After pg_dump exited: seal what is left or changed, remove the plaintext, return the entries."""
        self._halt()
        if self._error is not None:
            self._close_files()
            raise self._error
        entries = []
        for src in sorted(self.plain.iterdir()):
            done = self._done.get(src.name)
            if done is not None and done[0] != _identity(src.stat()):
                del self._done[src.name]  # written to after it was sealed: from the start again
            if src.name not in self._done:
                self._seal(src.name)  # goes on with a followed file, or starts one (toc.dat, a rewritten one)
            entries.append(self._done[src.name][1])
            src.unlink()
        self.plain.rmdir()
        return entries

    def abandon(self) -> None:
        """pg_dump failed: stop the thread and close the files (the partial directory goes with them)."""
        self._halt()
        self._close_files()

    def _close_files(self) -> None:
        for src, out, _ in self._open.values():
            src.close()
            out.close()
        self._open.clear()


def _current_lsn(conn: _Connection) -> str:
    with contextlib.closing(conn.open()) as pg:
        with pg.cursor() as cur:
            cur.execute("SELECT pg_current_wal_lsn()::text")
            return cur.fetchone()[0]


def _list_attachments(source: Path) -> list[str]:
    """Relative paths of the attachment files, sorted; none when the directory is absent."""
    found = []
    for dirpath, dirnames, filenames in os.walk(source):
        dirnames.sort()
        for name in sorted(filenames):
            if not name.startswith("."):  # an upload still being written (issue 6 renames into place)
                found.append(os.path.relpath(os.path.join(dirpath, name), source))
    return found


class _AttachmentCapture:
    """Tar the attachment files into an encrypted file on a thread, while the database part runs.

    Files listed at the backup's start are copied at once (content-addressed files never
    change); after the database part stops, ``finish`` lists again and adds the newcomers.
    So every attachment whose row is committed at the backup's consistency point (written
    before that row, issue 6's rule) is in the tar. A file removed meanwhile is skipped (its
    row was deleted); an absent or empty directory gives an empty tar.
    """

    def __init__(self, source: Path, dest: Path, key: BackupKey):
        self.source, self.dest, self.key = source, dest, key
        self._queue: queue.Queue[str | None] = queue.Queue()
        self._listed = set(_list_attachments(source))
        for rel in sorted(self._listed):
            self._queue.put(rel)
        self.counts = {"files": 0, "bytes": 0, "skipped": 0}
        self.entry: dict | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="attachments", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            with _encrypted_output(self.dest, self.key) as writer:
                # "w", not the stream mode "w|": that one cuts every write into 10 kB pieces.
                with tarfile.open(fileobj=writer, mode="w", format=tarfile.PAX_FORMAT,
                                  copybufsize=encryption.CHUNK_SIZE) as tar:
                    while (rel := self._queue.get()) is not None:
                        self._add(tar, rel)
            self.entry = _file_entry(ATTACHMENTS_FILE, writer)
        except BaseException as exc:  # re-raised by finish() in the backup's thread
            self._error = exc
            while self._queue.get() is not None:  # drain, so finish() never blocks
                pass

    def _add(self, tar: tarfile.TarFile, rel: str) -> None:
        path = self.source / rel
        try:
            fh = open(path, "rb")
        except FileNotFoundError:
            self.counts["skipped"] += 1
            return
        with fh:
            st = os.fstat(fh.fileno())
            info = tarfile.TarInfo(rel)
            info.size, info.mtime, info.mode = st.st_size, int(st.st_mtime), 0o640
            tar.addfile(info, fh)
        self.counts["files"] += 1
        self.counts["bytes"] += st.st_size

    def finish(self) -> tuple[dict, dict]:
        """Add the files that arrived during the database part, close the tar, return its entry."""
        for rel in _list_attachments(self.source):
            if rel not in self._listed:
                self._queue.put(rel)
        self._queue.put(None)
        self._thread.join()
        if self._error is not None:
            raise self._error
        return self.entry, self.counts

    def abandon(self) -> None:
        self._queue.put(None)
        self._thread.join()


# ============================================================================= manifest


def _canonical(body: dict) -> bytes:
    return json.dumps(body, sort_keys=True, separators=(",", ":")).encode("utf-8")


def _write_manifest(directory: Path, manifest: dict, key: BackupKey) -> None:
    body = {k: v for k, v in manifest.items() if k != "hmac"}
    _write_json_atomic(directory / MANIFEST, {**body, "hmac": key.sign(_canonical(body))})


def read_manifest(directory: Path, key: BackupKey | None = None) -> dict:
    """The manifest; with a key, also check the key's fingerprint and the manifest's signature."""
    path = directory / MANIFEST
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise BackupIntegrityError(f"{path}: the manifest is missing: the backup is incomplete or was damaged; "
                                   f"do not restore from it") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise BackupIntegrityError(f"{path}: the manifest is not valid JSON ({exc}): it was damaged") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), list):
        raise BackupIntegrityError(f"{path}: the manifest has no file list: it was damaged")
    if not isinstance(manifest.get("format"), int) or manifest["format"] > FORMAT_VERSION:
        raise BackupError(f"{path}: manifest format {manifest.get('format')!r} is newer than this appliance "
                          f"reads ({FORMAT_VERSION}); install crm-appliance {manifest.get('appliance_version')} or "
                          f"later to use this backup")
    if key is not None:
        recorded = (manifest.get("encryption") or {}).get("key_fingerprint", "")
        if recorded != key.fingerprint:
            raise BackupIntegrityError(
                f"{directory.name}: encrypted with the key whose fingerprint is {str(recorded)[:16]}, but "
                f"{key.path} holds the key {key.short}: use the key file that was in place when the backup "
                f"was made")
        body = {k: v for k, v in manifest.items() if k != "hmac"}
        if not hmac.compare_digest(str(manifest.get("hmac", "")), key.sign(_canonical(body))):
            raise BackupIntegrityError(f"{path}: the manifest was changed after the backup was written (its "
                                       f"signature does not match): do not restore from it")
    return manifest


def _read_status(directory: Path) -> dict:
    try:
        return json.loads((directory / STATUS).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


# ============================================================================= catalogue


def _info(path: Path) -> BackupInfo:
    kind = BACKUP_ID.match(path.name).group(1)
    try:
        manifest = read_manifest(path)
    except BackupIntegrityError as exc:
        return BackupInfo(id=path.name, kind=kind, path=path, state="damaged", error=str(exc))
    except BackupError as exc:  # a newer manifest format: readable by a newer appliance
        return BackupInfo(id=path.name, kind=kind, path=path, state="incompatible", error=str(exc))
    status = _read_status(path)
    state = "unverified" if not status else ("verified" if status.get("ok") else "failed")
    return BackupInfo(
        id=path.name, kind=manifest.get("kind", kind), path=path, state=state,
        started_at=_parse_time(manifest.get("started_at")), stopped_at=_parse_time(manifest.get("stopped_at")),
        size_bytes=sum(int(f.get("size", 0)) for f in manifest["files"]),
        duration_seconds=manifest.get("duration_seconds"), verified_at=_parse_time(status.get("verified_at")),
        error=status.get("error"), appliance_version=manifest.get("appliance_version"))


def list_backups(settings: Settings) -> list[BackupInfo]:
    """Every complete backup, oldest first. Partial (in-progress or abandoned) ones never appear."""
    root = settings.backup.dir
    if not root.is_dir():
        return []
    return [_info(p) for p in sorted(root.iterdir(), key=lambda p: p.name)
            if p.is_dir() and BACKUP_ID.match(p.name)]


def get_backup(settings: Settings, backup_id: str, kind: str | None = None) -> BackupInfo:
    """One backup by id, or "latest" (the newest usable one, of ``kind`` when given)."""
    backups = list_backups(settings)
    if backup_id == "latest":
        usable = [b for b in backups if b.state not in ("damaged", "incompatible") and (kind is None or b.kind == kind)]
        if not usable:
            what = f"{kind} backup" if kind else "backup"
            raise BackupError(f"no {what} in {settings.backup.dir}: take one with: crm-appliance backup"
                              + (f" --kind {kind}" if kind else ""))
        return usable[-1]
    for info in backups:
        if info.id == backup_id:
            return info
    known = ", ".join(b.id for b in backups[-5:]) or "none"
    raise BackupError(f"no backup {backup_id!r} in {settings.backup.dir}; the newest are: {known} "
                      f"(crm-appliance backups lists them all)")


# ============================================================================= verify


def _check_file_set(directory: Path, manifest: dict) -> None:
    listed = {f["path"] for f in manifest["files"]}
    present = set()
    for dirpath, _, filenames in os.walk(directory):
        for name in filenames:
            rel = os.path.relpath(os.path.join(dirpath, name), directory)
            if rel not in (MANIFEST, STATUS) and not name.startswith("."):
                present.add(rel)
    missing, extra = sorted(listed - present), sorted(present - listed)
    if missing:
        raise BackupIntegrityError(f"{directory / missing[0]}: listed in the manifest but missing"
                                   + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
                                   + ": the backup is incomplete; do not restore from it")
    if extra:
        raise BackupIntegrityError(f"{directory / extra[0]}: not in the manifest: a file was added to the backup "
                                   f"after it was written; remove it or do not trust this backup")


class _PlainCheck:
    """The decrypted content of one file against its manifest entry: the size, and the SHA-256
    that format 1 entries also record."""

    def __init__(self, entry: dict):
        self.entry, self.size = entry, 0
        self._digest = hashlib.sha256() if "plain_sha256" in entry else None

    def update(self, chunk: bytes) -> None:
        self.size += len(chunk)
        if self._digest is not None:
            self._digest.update(chunk)

    def check(self, path: Path) -> None:
        if self.size != self.entry["plain_size"]:
            raise BackupIntegrityError(f"{path}: decrypts to {self.size} bytes, the manifest says "
                                       f"{self.entry['plain_size']}")
        if self._digest is not None and self._digest.hexdigest() != self.entry["plain_sha256"]:
            raise BackupIntegrityError(f"{path}: the decrypted content differs from the manifest (SHA-256 "
                                       f"{self._digest.hexdigest()[:16]}..., expected "
                                       f"{self.entry['plain_sha256'][:16]}...)")


def _verify_file(directory: Path, entry: dict, key: BackupKey) -> int:
    """Decrypt one file without writing it out; check its stored size and SHA-256, every chunk's
    tag and the decrypted size."""
    path = directory / entry["path"]
    plain = _PlainCheck(entry)
    with open(path, "rb") as fh:
        reader = encryption.HashingReader(fh)
        for chunk in encryption.decrypt_chunks(reader, key, str(path)):
            plain.update(chunk)
        reader.read()  # anything after the final chunk would have failed authentication already
    if reader.size != entry["size"] or reader.sha256.hexdigest() != entry["sha256"]:
        raise BackupIntegrityError(f"{path}: expected {entry['size']} bytes with SHA-256 {entry['sha256'][:16]}..., "
                                   f"found {reader.size} bytes with {reader.sha256.hexdigest()[:16]}...: the file "
                                   f"was changed")
    plain.check(path)
    return plain.size


def verify(settings: Settings, backup_id: str = "latest", *, key: BackupKey | None = None,
           lock: bool = True) -> VerifyResult:
    """Re-check a backup completely: manifest signature and key, file set, every checksum, and
    every byte decrypted (nothing written out). Records the outcome (``backups`` shows it);
    raises BackupIntegrityError on the first problem. ``lock=False`` for a caller that
    already holds the catalogue lock (restore)."""
    info = get_backup(settings, backup_id)
    key = key or encryption.load_key(settings.backup.key_file)
    started = time.monotonic()
    with catalogue_lock(settings.backup.dir, exclusive=False) if lock else contextlib.nullcontext():
        try:
            manifest = read_manifest(info.path, key)
            _check_file_set(info.path, manifest)
            # Files on parallel threads (hashing and reading release the GIL), largest first;
            # map() keeps that order, so of two bad files the larger one's error is raised.
            largest_first = sorted(manifest["files"], key=lambda entry: -entry["size"])
            with concurrent.futures.ThreadPoolExecutor(parallel_jobs()) as pool:
                plain = sum(pool.map(lambda entry: _verify_file(info.path, entry, key), largest_first))
            stored = sum(entry["size"] for entry in manifest["files"])
        except BackupError as exc:
            _record_verify(info.path, ok=False, error=str(exc), seconds=time.monotonic() - started)
            raise
        except OSError as exc:
            message = f"{exc.filename or info.path}: cannot read: {exc.strerror}"
            _record_verify(info.path, ok=False, error=message, seconds=time.monotonic() - started)
            raise BackupIntegrityError(message) from None
        seconds = time.monotonic() - started
        _record_verify(info.path, ok=True, error=None, seconds=seconds)
    return VerifyResult(info.id, len(manifest["files"]), stored, plain, round(seconds, 3))


def _record_verify(directory: Path, ok: bool, error: str | None, seconds: float) -> None:
    with contextlib.suppress(OSError):  # a read-only backup can still be verified
        _write_json_atomic(directory / STATUS, {"verified_at": _iso(_now()), "ok": ok, "error": error,
                                                "seconds": round(seconds, 3)})


# ============================================================================= retention


def prune(settings: Settings, *, now: dt.datetime | None = None) -> PruneResult:
    """Apply retention: delete backups older than ``[backup] retention_days``, except the newest
    verified and the newest of each kind; delete archived WAL older than the start of the
    oldest base backup kept; remove partial backups left by a crash."""
    cfg = settings.backup
    root = _ensure_dir(cfg.dir, "backup directory")
    now = now or _now()
    cutoff = now - dt.timedelta(days=cfg.retention_days)
    with catalogue_lock(root, exclusive=True):
        partial_removed = []
        for path in root.iterdir():
            if path.name.startswith(PARTIAL_PREFIX) and path.is_dir():
                shutil.rmtree(path)  # we hold the lock: no backup is writing it
                partial_removed.append(path.name)
        backups = [b for b in list_backups(settings) if b.state not in ("damaged", "incompatible")]
        keep = {b.id for b in backups if b.started_at and b.started_at >= cutoff}
        for kind in KINDS:
            of_kind = [b for b in backups if b.kind == kind]
            verified = [b for b in of_kind if b.state == "verified"]
            if verified:
                keep.add(verified[-1].id)
            if of_kind:
                keep.add(of_kind[-1].id)
        deleted = []
        for info in backups:
            if info.id not in keep:
                shutil.rmtree(info.path)
                deleted.append(info.id)
                log.info("retention: deleted backup %s", info.id)
        kept_base = [b for b in backups if b.kind == "base" and b.id in keep]
        wal_deleted = wal_bytes = 0
        first_needed = None
        if kept_base:
            manifest = read_manifest(kept_base[0].path)
            segment_size = manifest["postgresql"]["wal_segment_size"]
            first_needed = manifest["start"]["wal"]
            _, first_seg = segment_of(first_needed, segment_size)
            for name, path in _archive_files(cfg.wal_archive_dir).items():
                if HISTORY.match(name):
                    continue  # timeline histories are tiny and needed to follow any timeline
                if WAL_SEGMENT.match(name[:24]) and segment_of(name[:24], segment_size)[1] < first_seg:
                    with contextlib.suppress(FileNotFoundError):
                        wal_bytes += path.stat().st_size
                        path.unlink()
                        wal_deleted += 1
    return PruneResult(deleted=deleted, kept=sorted(keep), partial_removed=partial_removed,
                       wal_deleted=wal_deleted, wal_bytes=wal_bytes, wal_kept_from=first_needed)


# ============================================================================= decrypt (emergency)


def decrypt(settings: Settings, backup_id: str, output: str | os.PathLike, *, with_archive: bool = True,
            key: BackupKey | None = None) -> DecryptResult:
    """Write a backup's plaintext into ``output`` for stock PostgreSQL tools (docs/backup.md).

    Base: ``base.tar.<zst|lz4|gz>`` (the data directory, tar), ``wal/`` (plain WAL segments
    from the backup's start; with ``with_archive`` every archived file after it too, for
    point-in-time recovery with ``restore_command = 'cp .../wal/%f %p'``). Logical:
    ``dump/`` for ``pg_restore`` and ``globals.sql``. Both: ``attachments.tar``.
    """
    info = get_backup(settings, backup_id)
    key = key or encryption.load_key(settings.backup.key_file)
    output = Path(output)
    if output.exists() and any(output.iterdir()):
        raise BackupError(f"{output}: not empty; decrypt into a new or empty directory")
    with catalogue_lock(settings.backup.dir, exclusive=False):
        manifest = read_manifest(info.path, key)
        _check_file_set(info.path, manifest)
        output.mkdir(mode=0o700, parents=True, exist_ok=True)
        written = []
        for entry in manifest["files"]:
            rel = entry["path"]
            src = info.path / rel
            if rel.startswith("wal/"):
                dest = output / rel[: -len(ARCHIVE_SUFFIX)]
                dest.parent.mkdir(exist_ok=True)
                with open(dest, "xb") as out:
                    for chunk in _archived_chunks(src, key):
                        out.write(chunk)
            else:
                dest = output / rel[: -len(".enc")]
                dest.parent.mkdir(exist_ok=True)
                plain = _PlainCheck(entry)
                with open(src, "rb") as fin, open(dest, "xb") as out:
                    for chunk in encryption.decrypt_chunks(fin, key, str(src)):
                        plain.update(chunk)
                        out.write(chunk)
                plain.check(src)
            written.append(str(dest.relative_to(output)))
        wal_files = sum(1 for w in written if w.startswith("wal/"))
        if with_archive and manifest["kind"] == "base":
            segment_size = manifest["postgresql"]["wal_segment_size"]
            _, first = segment_of(manifest["start"]["wal"], segment_size)
            (output / "wal").mkdir(exist_ok=True)
            for name, src in sorted(_archive_files(settings.backup.wal_archive_dir).items()):
                dest = output / "wal" / name
                needed = HISTORY.match(name) or segment_of(name[:24], segment_size)[1] >= first
                if dest.exists() or not needed:
                    continue
                with open(dest, "xb") as out:
                    for chunk in _archived_chunks(src, key):
                        out.write(chunk)
                wal_files += 1
        shutil.copy2(info.path / MANIFEST, output / MANIFEST)
    return DecryptResult(backup_id=info.id, output=output, files=written, wal_files=wal_files)


# ============================================================================= the archive's timelines


def _history(archive_dir: Path, timeline: int, key: BackupKey) -> list[tuple[int, int]]:
    """(ancestor timeline, LSN where it ended) for ``timeline``, oldest first."""
    path = archive_dir / (f"{timeline:08X}.history" + ARCHIVE_SUFFIX)
    text = b"".join(_archived_chunks(path, key)).decode("utf-8", "replace")
    out = []
    for line in text.splitlines():
        parts = line.split()
        if len(parts) >= 2 and parts[0].isdigit():
            out.append((int(parts[0]), lsn_to_int(parts[1])))
    return out


def check_wal_chain(settings: Settings, manifest: dict, key: BackupKey,
                    until: dt.datetime | None = None) -> dict:
    """Check that the archive holds every WAL segment from the backup's stop onwards, along
    the newest timeline (as ``recovery_target_timeline = 'latest'`` follows), up to ``until``
    (the first segment archived after it) or to the newest segment.

    Returns {"timeline", "last_segment", "last_archived_at", "segments"}, the last being the
    archived files recovery will ask for, in its order ([(WAL name, path)]); raises
    BackupIntegrityError naming the first missing segment.
    """
    archive_dir = settings.backup.wal_archive_dir
    segment_size = manifest["postgresql"]["wal_segment_size"]
    start_tli, _ = segment_of(manifest["start"]["wal"], segment_size)
    _, stop_seg = segment_of(manifest["stop"]["wal"], segment_size)
    files = _archive_files(archive_dir)
    # PostgreSQL probes N+1.history, N+2.history, ... and follows the last one found.
    target = start_tli
    while f"{target + 1:08X}.history" in files:
        target += 1
    # (timeline, first byte, end byte or None for the newest), along the path recovery follows
    path: list[tuple[int, int, int | None]] = [(start_tli, 0, None)]
    if target != start_tli:
        history = _history(archive_dir, target, key)
        if start_tli not in [tli for tli, _ in history]:
            raise BackupIntegrityError(f"the archive's newest timeline {target} does not descend from the backup's "
                                       f"timeline {start_tli}: a restore cannot follow it")
        path, begin = [], 0
        for tli, end in history:
            if tli >= start_tli:
                path.append((tli, begin, end))
            begin = end
        path.append((target, begin, None))
    segments = {}
    for name, p in files.items():
        if WAL_SEGMENT.match(name):
            segments[segment_of(name, segment_size)] = p
    last_seg = stop_seg
    for tli, begin, end in path:
        on_path = [s for (t, s) in segments if t == tli and s >= begin // segment_size
                   and (end is None or s <= end // segment_size)]
        last_seg = max([last_seg] + on_path)
    last_time = None
    _, start_seg = segment_of(manifest["start"]["wal"], segment_size)
    ordered = [(segment_name(start_tli, n, segment_size), segments[(start_tli, n)])
               for n in range(start_seg, stop_seg + 1) if (start_tli, n) in segments]
    segno = stop_seg + 1
    while segno <= last_seg:
        # The newest timeline that had begun by this segment is the one recovery reads.
        tli = [t for t, begin, _ in path if begin // segment_size <= segno][-1]
        found = segments.get((tli, segno))
        if found is not None:
            ordered.append((segment_name(tli, segno, segment_size), found))
        if found is None:
            name = segment_name(tli, segno, segment_size)
            reach = f" (archived {_iso(last_time)})" if last_time else ""
            raise BackupIntegrityError(
                f"WAL segment {name} is missing from {archive_dir}: recovery from backup {manifest['id']} cannot "
                f"go past segment {segment_name(tli, segno - 1, segment_size)}{reach}; restore to an earlier time "
                f"with --to, or from a newer backup")
        last_time = dt.datetime.fromtimestamp(found.stat().st_mtime, dt.timezone.utc)
        if until is not None and last_time >= until:
            break
        segno += 1
    return {"timeline": target, "last_segment": segno if segno <= last_seg else last_seg,
            "last_archived_at": last_time, "segments": ordered}


def newest_archived_at(settings: Settings) -> dt.datetime | None:
    """When the newest WAL file reached the archive (the latest point a restore can reach, roughly)."""
    times = [p.stat().st_mtime for name, p in _archive_files(settings.backup.wal_archive_dir).items()
             if WAL_SEGMENT.match(name)]
    return dt.datetime.fromtimestamp(max(times), dt.timezone.utc) if times else None


def record_restore(settings: Settings, entry: dict) -> None:
    """Append one restore's outcome to the history kept beside the backups."""
    path = _ensure_dir(settings.backup.dir, "backup directory") / RESTORE_HISTORY
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(json.dumps(entry, sort_keys=True) + "\n")


def restore_history(settings: Settings) -> list[dict]:
    path = settings.backup.dir / RESTORE_HISTORY
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
