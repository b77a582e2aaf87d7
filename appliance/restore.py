"""Restore a base backup, to the end of the WAL archive or to a point in time.

The order keeps the current data safe until the restored data has proved itself::

    verify     the backup (every checksum, every byte decrypted, the key, the manifest's
               signature), its compatibility, and the WAL archive's continuity to the target
    extract    into a NEW data directory beside the current one (tar of the verified,
               decrypted stream); the backup's own WAL goes into pg_wal; recovery is configured
    replay     a second postmaster on the new directory (private socket, no TCP) replays
               archived WAL to the target and promotes; the current cluster keeps running
    attachments  files missing from <data_dir>/attachments are added (never replaced)
    swap       hook, stop the cluster, exchange the two directories in one rename (renameat2)
    start      start the cluster on the restored data, wait until it answers, hook

A failure after the swap stops the cluster, exchanges the directories back, starts it on the
previous data and removes the attachments that were added. A restore killed part-way leaves
a journal beside the data directory; the next restore puts the previous data back first.

``drill`` (the scheduler's weekly job) does the same into a scratch server that never
replaces anything, then runs pg_amcheck and compares row counts with the manifest.

Maintenance mode, stopping the web app and the scheduler, migrations and the health gate are
the caller's, through ``RestoreHooks``. ``RestoreResult`` holds each step's time and the
total (the RTO), next to the seeds' promise (R-19: usually 12 h, at most 72 h).
"""

from __future__ import annotations

import contextlib
import ctypes
import datetime as dt
import io
import json
import logging
import os
import pwd
import re
import shlex
import shutil
import socket
import subprocess
import tarfile
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path, PurePosixPath
from typing import Callable, Iterator

import appliance
from appliance import backup as backup_mod
from appliance import encryption
from appliance.config import Settings
from appliance.errors import RestoreError
from appliance.files import fsync_dir

log = logging.getLogger(__name__)

PROMISE = "the service agreement's promise: usually within 12 h, at most 72 h (R-19)"
JOURNAL_SUFFIX = ".restore-journal.json"
# Written for a restore, reset (ALTER SYSTEM RESET) once it has promoted.
RECOVERY_SETTINGS = ("restore_command", "recovery_target", "recovery_target_time", "recovery_target_name",
                     "recovery_target_action", "recovery_target_timeline")
NEW_SUFFIX = ".restore-new"
# The decrypted WAL waiting for recovery (WalPrefetcher), inside the new data directory so
# that handing a segment over is a rename on one file system; removed after the replay.
WAL_SPOOL = "crm_wal_spool"
PREFETCH_DEPTH = 8  # segments decrypted ahead of recovery: 128 MB of disk at most
Progress = Callable[[str], None]


# ============================================================================= results


@dataclass
class Step:
    name: str
    seconds: float
    detail: str = ""


@dataclass
class RestoreResult:
    backup_id: str
    target_time: dt.datetime | None
    recovered_to: dt.datetime | None  # the last transaction replayed
    timeline: int | None
    data_dir: Path
    previous_data_dir: Path | None  # kept unless remove_previous; None when there was none
    steps: list[Step] = field(default_factory=list)
    total_seconds: float = 0.0
    started_at: dt.datetime | None = None

    @property
    def rto_seconds(self) -> float:
        return self.total_seconds

    def to_json(self) -> dict:
        data = asdict(self)
        for name in ("target_time", "recovered_to", "started_at"):
            value = getattr(self, name)
            data[name] = backup_mod._iso(value) if value else None
        data["data_dir"] = str(self.data_dir)
        data["previous_data_dir"] = str(self.previous_data_dir) if self.previous_data_dir else None
        data["promise"] = PROMISE
        return data

    def summary(self) -> list[str]:
        lines = [f"{s.name:12} {s.seconds:8.1f} s  {s.detail}".rstrip() for s in self.steps]
        lines.append(f"{'total (RTO)':12} {self.total_seconds:8.1f} s  against {PROMISE}")
        return lines


@dataclass
class RestoreHooks:
    """The caller's part of a restore. Any exception from ``after_start`` rolls the restore back."""

    before_swap: Callable[[], None] | None = None  # e.g. maintenance mode on, web app and scheduler stopped
    after_start: Callable[[], None] | None = None  # e.g. migrate an older schema, then the health gate
    after_rollback: Callable[[], None] | None = None  # e.g. start the web app again on the previous data


# ============================================================================= cluster control


def _as_user(user: str, argv: list[str]) -> list[str]:
    """Run as ``user``: directly when we are that user, through runuser when we are root."""
    if pwd.getpwuid(os.geteuid()).pw_name == user:
        return argv
    if os.geteuid() != 0:
        raise RestoreError(f"a restore runs as root (or as {user}, the cluster's owner); run it with sudo")
    return ["runuser", "-u", user, "--"] + argv


def _run(argv: list[str], what: str, timeout: float | None = None, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run(argv, capture_output=True, text=True, cwd="/", timeout=timeout,
                            env={**os.environ, "LC_ALL": "C"})
    if check and result.returncode != 0:
        detail = (result.stderr or result.stdout).strip().splitlines()[-3:]
        raise RestoreError(f"{what} failed (exit status {result.returncode}): {'; '.join(detail) or 'no message'}")
    return result


class ClusterControl:
    """What a restore needs to know and do about the cluster it replaces."""

    version: int  # PostgreSQL major version
    data_dir: Path
    run_as: str  # the OS user owning the data directory
    port: int
    socket_dir: Path
    db_user: str | None = None  # the superuser role psql connects as; None: the OS user's name

    @property
    def bin_dir(self) -> Path:
        return Path(f"/usr/lib/postgresql/{self.version}/bin")

    def start(self) -> None:
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError

    def is_running(self) -> bool:
        raise NotImplementedError

    def server_options(self, data_dir: Path, port: int, socket_dir: Path) -> list[str]:
        """``postgres`` options for a second postmaster on ``data_dir``, beside the running one."""
        raise NotImplementedError

    def psql(self, *sql: str, socket_dir: Path | None = None, port: int | None = None,
             database: str = "postgres") -> str:
        """Run each statement in turn (each in a transaction of its own) in one psql; its output."""
        if not sql:
            raise ValueError("psql needs at least one statement")  # else it would wait for input
        argv = [str(self.bin_dir / "psql"), "-X", "-q", "-At", "-v", "ON_ERROR_STOP=1",
                "-h", str(socket_dir or self.socket_dir), "-p", str(port or self.port), "-d", database]
        for statement in sql:
            argv += ["-c", statement]
        if self.db_user:
            argv[1:1] = ["-U", self.db_user]
        return _run(_as_user(self.run_as, argv), "psql", timeout=60).stdout.strip()


class DebianCluster(ClusterControl):
    """A cluster managed by Debian's postgresql-common: ``pg_ctlcluster 15 main``."""

    def __init__(self, version: int | str, name: str):
        self.version, self.name = int(version), name
        self.config_file = Path("/etc/postgresql") / str(version) / name / "postgresql.conf"
        if not self.config_file.exists():
            raise RestoreError(f"{self.config_file}: no such cluster {version}/{name}; pg_lsclusters lists them, "
                               f"and [backup] cluster names the appliance's")
        self.run_as = pwd.getpwuid(self.config_file.stat().st_uid).pw_name
        self.data_dir = Path(self._setting("data_directory"))
        self.port = int(self._setting("port"))
        self.socket_dir = Path(self._setting("unix_socket_directories").split(",")[0].strip())

    @classmethod
    def from_setting(cls, value: str) -> "DebianCluster":
        match = re.fullmatch(r"(\d+)/([\w.-]+)", value.strip())
        if not match:
            raise RestoreError(f"[backup] cluster: expected version/name such as 15/main, found {value!r}")
        return cls(match.group(1), match.group(2))

    def _setting(self, name: str) -> str:
        # postgres -C reads postgresql.conf with its includes (conf.d), as the server does.
        argv = [str(self.bin_dir / "postgres"), "-C", name, "-c", f"config_file={self.config_file}"]
        return _run(_as_user(self.run_as, argv), f"reading {name} of cluster {self.version}/{self.name}").stdout.strip()

    def _ctl(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        return _run(["pg_ctlcluster", str(self.version), self.name, *args],
                    f"pg_ctlcluster {self.version} {self.name} {args[0]}", check=check)

    def start(self) -> None:
        self._ctl("start")

    def stop(self) -> None:
        if self.is_running():
            self._ctl("stop", "-m", "fast")

    def is_running(self) -> bool:
        return self._ctl("status", check=False).returncode == 0

    def server_options(self, data_dir: Path, port: int, socket_dir: Path) -> list[str]:
        return ["-c", f"config_file={self.config_file}", "-c", f"data_directory={data_dir}", "-c", f"port={port}",
                "-c", "listen_addresses=", "-c", f"unix_socket_directories={socket_dir}",
                "-c", "external_pid_file=", "-c", f"cluster_name={self.version}/{self.name}-restore"]


# ============================================================================= helpers


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _exchange(a: Path, b: Path) -> None:
    """Swap two directories in one step (Linux renameat2 RENAME_EXCHANGE)."""
    libc = ctypes.CDLL(None, use_errno=True)
    rc = libc.renameat2(-100, os.fsencode(a), -100, os.fsencode(b), 2)  # AT_FDCWD, RENAME_EXCHANGE
    if rc != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), str(a), None, str(b))
    fsync_dir(a.parent)


def _chown_tree(path: Path, user: str) -> None:
    pw = pwd.getpwnam(user)
    if os.geteuid() != 0:
        return
    for dirpath, dirnames, filenames in os.walk(path):
        os.chown(dirpath, pw.pw_uid, pw.pw_gid)
        for name in filenames:
            os.lchown(os.path.join(dirpath, name), pw.pw_uid, pw.pw_gid)


def _conf_quote(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


@contextlib.contextmanager
def _timed(steps: list[Step], name: str, say: Progress) -> Iterator[Step]:
    say(f"{name} ...")
    step = Step(name, 0.0)
    started = time.monotonic()
    try:
        yield step
    finally:
        step.seconds = round(time.monotonic() - started, 3)
        steps.append(step)
        say(f"{name}: {step.seconds:.1f} s {step.detail}".rstrip())


def _version_tuple(text: str) -> tuple[int, ...]:
    match = re.match(r"(\d+(?:\.\d+)*)", text or "")
    return tuple(int(p) for p in match.group(1).split(".")) if match else (0,)


def check_compatible(manifest: dict, cluster_version: int) -> None:
    """Refuse a backup this appliance cannot restore, naming what to install instead."""
    made_by = manifest.get("appliance_version") or "?"
    if manifest.get("kind") != "base":
        raise RestoreError(f"backup {manifest.get('id')} is a logical dump: restore it with pg_restore as "
                           f"docs/backup.md describes, or choose a base backup")
    if _version_tuple(made_by) > _version_tuple(appliance.__version__):
        raise RestoreError(f"backup {manifest['id']} was made by crm-appliance {made_by}, newer than this "
                           f"crm-appliance {appliance.__version__}: install crm-appliance {made_by} or later to "
                           f"restore it")
    from appliance.db import MIGRATIONS_DIR

    known = {p.stem for p in MIGRATIONS_DIR.glob("[0-9]*.py")}
    level = max([backup_mod._migration_index(n) for n in known] or [0])
    schema = manifest.get("schema") or {}
    unknown = sorted(set(schema.get("migrations") or []) - known)
    # A backup made by this very release is fine even with a migration it does not know: it
    # ran on that schema (a newer release migrated it, then was rolled back to this one).
    if (unknown or int(schema.get("level") or 0) > level) and made_by != appliance.__version__:
        name = unknown[0] if unknown else f"level {schema.get('level')}"
        raise RestoreError(f"backup {manifest['id']} has schema migration {name}, which this crm-appliance "
                           f"{appliance.__version__} does not know (the backup was made by {made_by}): install "
                           f"the release that added migration {name} to restore it")
    major = int(manifest["postgresql"]["version_num"]) // 10000
    if major != cluster_version:
        raise RestoreError(f"backup {manifest['id']} is of PostgreSQL {major}, but the cluster is PostgreSQL "
                           f"{cluster_version}: a physical backup restores only into the same major version")


def _choose(settings: Settings, backup_id: str, target: dt.datetime | None) -> backup_mod.BackupInfo:
    bases = [b for b in backup_mod.list_backups(settings)
             if b.kind == "base" and b.state not in ("damaged", "incompatible")]
    if backup_id != "latest":
        info = backup_mod.get_backup(settings, backup_id)
        if target and info.stopped_at and target < info.stopped_at:
            raise RestoreError(f"--to {backup_mod._iso(target)} is before backup {info.id} ended "
                               f"({backup_mod._iso(info.stopped_at)}): choose an older backup or a later time")
        return info
    if not bases:
        raise RestoreError(f"no base backup in {settings.backup.dir} to restore from; list them with: "
                           f"crm-appliance backups")
    if target is None:
        return bases[-1]
    fitting = [b for b in bases if b.stopped_at and b.stopped_at <= target]
    if not fitting:
        raise RestoreError(f"--to {backup_mod._iso(target)} is outside the recoverable window, which is "
                           f"{window_text(settings)}: choose a time in it")
    return fitting[-1]


def recoverable_window(settings: Settings) -> tuple[dt.datetime, dt.datetime] | None:
    """(earliest, latest) point a restore can reach: from the oldest base backup's end to the
    newest archived WAL; None without a base backup."""
    bases = [b for b in backup_mod.list_backups(settings) if b.kind == "base" and b.stopped_at
             and b.state not in ("damaged", "incompatible")]
    if not bases:
        return None
    newest = backup_mod.newest_archived_at(settings)
    latest = max([b.stopped_at for b in bases] + ([newest] if newest else []))
    return bases[0].stopped_at, latest


def window_text(settings: Settings) -> str:
    window = recoverable_window(settings)
    if window is None:
        return "empty (there is no base backup)"
    return f"{backup_mod._iso(window[0])} to {backup_mod._iso(window[1])} (UTC)"


# ============================================================================= the restore


def restore(settings: Settings, backup_id: str = "latest", *, target_time: dt.datetime | None = None,
            cluster: ClusterControl | None = None, hooks: RestoreHooks | None = None,
            remove_previous: bool = False, recovery_timeout: float = 6 * 3600,
            progress: Progress | None = None) -> RestoreResult:
    """Restore ``backup_id`` ("latest": the newest base backup that ends before ``target_time``)
    and replay archived WAL to ``target_time`` (aware datetime; naive means UTC) or to the end.

    Raises RestoreError (or BackupIntegrityError for a damaged backup or archive) without
    changing anything when a check fails, and with the previous data back in place when a
    later step fails.
    """
    say = progress or (lambda message: None)
    hooks = hooks or RestoreHooks()
    if target_time is not None and target_time.tzinfo is None:
        target_time = target_time.replace(tzinfo=dt.timezone.utc)
    started_at, t0 = backup_mod._now(), time.monotonic()
    cluster = cluster or DebianCluster.from_setting(settings.backup.cluster)
    key = encryption.load_key(settings.backup.key_file)
    steps: list[Step] = []
    root = settings.backup.dir
    if not root.is_dir():
        raise RestoreError(f"{root}: no backup directory, so no backup to restore; check [backup] dir")
    with backup_mod.catalogue_lock(root, exclusive=True):
        _finish_interrupted(settings, cluster, say)
        with _timed(steps, "verify", say) as step:
            info = _choose(settings, backup_id, target_time)
            checked = backup_mod.verify(settings, info.id, key=key, lock=False)
            manifest = backup_mod.read_manifest(info.path, key)
            check_compatible(manifest, cluster.version)
            if target_time is not None:
                newest = backup_mod.newest_archived_at(settings)
                if newest is None or target_time > newest:
                    raise RestoreError(f"--to {backup_mod._iso(target_time)} is outside the recoverable window, "
                                       f"which is {window_text(settings)}: choose a time in it, or restore latest")
            chain = backup_mod.check_wal_chain(settings, manifest, key, until=target_time)
            step.detail = (f"backup {info.id}: {checked.files} files, {backup_mod._size(checked.stored_bytes)}; "
                           f"WAL to timeline {chain['timeline']} continuous")
        result = RestoreResult(backup_id=info.id, target_time=target_time, recovered_to=None, timeline=None,
                               data_dir=cluster.data_dir, previous_data_dir=None, started_at=started_at)
        new_dir = cluster.data_dir.with_name(cluster.data_dir.name + NEW_SUFFIX)
        journal = cluster.data_dir.with_name(cluster.data_dir.name + JOURNAL_SUFFIX)
        work = Path(tempfile.mkdtemp(prefix="crm-restore-"))
        os.chmod(work, 0o700)
        _chown_tree(work, cluster.run_as)
        added: list[Path] = []
        new_timeline = None
        replayed = False
        try:
            _write_journal(journal, {"phase": "preparing", "new": str(new_dir), "backup": info.id, "work": str(work)})
            with _timed(steps, "extract", say) as step:
                spool = new_dir / WAL_SPOOL
                _extract(info, manifest, key, cluster, new_dir, _recovery_settings(settings, target_time, spool))
                step.detail = f"into {new_dir}"
            with _timed(steps, "replay", say) as step:
                with WalPrefetcher(chain["segments"], spool, key, cluster.run_as) as prefetch:
                    replay = _replay(cluster, new_dir, work, recovery_timeout)
                new_timeline, replayed = replay["timeline"], True
                result.recovered_to, result.timeline = replay["recovered_to"], replay["timeline"]
                step.detail = (f"to {backup_mod._iso(result.recovered_to) if result.recovered_to else 'the backup end'}"
                               f", timeline {result.timeline}; {prefetch.served} of {len(chain['segments'])} WAL "
                               f"segments decrypted ahead")
            with _timed(steps, "attachments", say) as step:
                added = _restore_attachments(settings, info, key)
                step.detail = f"{len(added)} files added"
            previous = _swap_and_start(cluster, new_dir, journal, hooks, steps, say, new_timeline, work)
            result.previous_data_dir = previous
        except BaseException:
            for path in reversed(added):
                with contextlib.suppress(OSError):
                    path.unlink()
            if new_timeline is not None:
                _forget_timeline(settings, new_timeline)
            if new_dir.exists():
                shutil.rmtree(new_dir, ignore_errors=True)
            with contextlib.suppress(OSError):
                journal.unlink()
            if replayed or not (work / "recovery.log").exists():
                shutil.rmtree(work, ignore_errors=True)  # else kept: the error names its server log
            raise
        if remove_previous and result.previous_data_dir:
            shutil.rmtree(result.previous_data_dir, ignore_errors=True)
            result.previous_data_dir = None
        shutil.rmtree(work, ignore_errors=True)
        result.steps = steps
        result.total_seconds = round(time.monotonic() - t0, 3)
    with contextlib.suppress(OSError):
        backup_mod.record_restore(settings, result.to_json())
    return result


def _write_journal(path: Path, data: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data), encoding="utf-8")
    os.replace(tmp, path)
    fsync_dir(path.parent)


def _finish_interrupted(settings: Settings, cluster: ClusterControl, say: Progress) -> None:
    """A restore killed part-way: put the previous data back, remove the half-made directory."""
    journal = cluster.data_dir.with_name(cluster.data_dir.name + JOURNAL_SUFFIX)
    new_dir = cluster.data_dir.with_name(cluster.data_dir.name + NEW_SUFFIX)
    try:
        state = json.loads(journal.read_text(encoding="utf-8"))
    except FileNotFoundError:
        state = None
    except ValueError:
        state = {"phase": "preparing"}
    if state and state.get("phase") == "swapped":
        previous = Path(state["previous"]) if state.get("previous") else None
        say(f"an earlier restore stopped after its swap: putting the previous data back from {previous}")
        cluster.stop()
        if previous is not None and previous.exists():
            if cluster.data_dir.exists():
                _exchange(previous, cluster.data_dir)
                shutil.rmtree(previous, ignore_errors=True)
            else:
                os.rename(previous, cluster.data_dir)
        if state.get("timeline"):
            _forget_timeline(settings, int(state["timeline"]))
        cluster.start()
    if new_dir.exists():
        say(f"removing {new_dir}, left by an earlier restore that did not finish")
        shutil.rmtree(new_dir)
    if state and str(state.get("work", "")).startswith(tempfile.gettempdir() + "/crm-restore-"):
        shutil.rmtree(state["work"], ignore_errors=True)
    with contextlib.suppress(FileNotFoundError):
        journal.unlink()


def _pipe_to(argv: list[str], chunks: Iterator[bytes], what: str) -> None:
    """Feed ``chunks`` to a program's stdin; its stderr is drained on a thread."""
    proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd="/")
    err: list[bytes] = []
    reader = threading.Thread(target=lambda: err.extend(proc.stderr), daemon=True)
    reader.start()
    try:
        for chunk in chunks:
            proc.stdin.write(chunk)
        proc.stdin.close()
    except BrokenPipeError:
        pass  # the program ended early; its status and message say why
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    rc = proc.wait()
    reader.join()
    if rc != 0:
        detail = "; ".join(ln.decode("utf-8", "replace").strip() for ln in err[-3:]) or "no message"
        raise RestoreError(f"{what} failed (exit status {rc}): {detail}")


def _recovery_settings(settings: Settings, target: dt.datetime | None, spool: Path) -> dict[str, str]:
    # A segment the prefetcher has decrypted is a rename away; anything else (not there yet,
    # a timeline history file) is fetched by a wal-fetch process, which also says what is
    # wrong with a damaged file. A failed mv must not look like the end of the archive.
    fetch = backup_mod.restore_command_line(settings)
    recovery = {"restore_command": f"mv -f {shlex.quote(str(spool))}/%f %p 2>/dev/null || exec {fetch}",
                "recovery_target_timeline": "latest", "recovery_target_action": "promote"}
    if target is not None:
        recovery["recovery_target_time"] = target.astimezone(dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S.%f+00")
    return recovery


def _extract(info: backup_mod.BackupInfo, manifest: dict, key: encryption.BackupKey, cluster: ClusterControl,
             new_dir: Path, recovery: dict[str, str]) -> None:
    if new_dir.exists():
        shutil.rmtree(new_dir)
    try:
        new_dir.mkdir(mode=0o700)
    except OSError as exc:
        raise RestoreError(f"{new_dir}: cannot create the new data directory: {exc.strerror}") from None
    _chown_tree(new_dir, cluster.run_as)
    free = shutil.disk_usage(new_dir).free
    needed = int(manifest.get("database_bytes") or 0)
    if free < needed:
        raise RestoreError(f"not enough free space beside {cluster.data_dir} for the restored data: expected about "
                           f"{backup_mod._size(needed)}, found {backup_mod._size(free)} free")
    base = [f for f in manifest["files"] if f["path"].startswith("base.tar")][0]
    _, _, tar_opts = backup_mod.COMPRESSION[manifest["compression"]]
    src = info.path / base["path"]
    with open(src, "rb") as fh:
        _pipe_to(_as_user(cluster.run_as, ["tar", "-x", "-f", "-", "-C", str(new_dir), *tar_opts]),
                 encryption.decrypt_chunks(fh, key, str(src)), f"extracting {src} with tar")
    # The backup's own WAL (start to stop) makes it consistent even if the archive lost it.
    wal_dir = new_dir / "pg_wal"
    for entry in manifest["files"]:
        if entry["path"].startswith("wal/"):
            name = Path(entry["path"]).name[: -len(backup_mod.ARCHIVE_SUFFIX)]
            with open(wal_dir / name, "wb") as out:
                for chunk in backup_mod._archived_chunks(info.path / entry["path"], key):
                    out.write(chunk)
    lines = ["", f"# crm-appliance restore of backup {info.id}; removed again after promotion"]
    lines += [f"{name} = {_conf_quote(value)}" for name, value in recovery.items()]
    with open(new_dir / "postgresql.auto.conf", "a", encoding="utf-8") as conf:
        conf.write("\n".join(lines) + "\n")
    (new_dir / "recovery.signal").touch()
    _chown_tree(new_dir, cluster.run_as)


class WalPrefetcher:
    """Decrypts the archived WAL that recovery will ask for into a spool in the data
    directory, ahead of the server: pgBackRest's asynchronous archive-get, in small.

    Without it every 16 MB segment cost a wal-fetch process (a Python start, then decrypt
    and gunzip while the server waits): replay ran at a quarter of the speed of replaying
    plain files with cp. With it the restore_command is a rename, and decryption overlaps
    the replay. At most ``depth`` segments wait in the spool; a segment the server fetched
    itself before the prefetcher got there is dropped once the server has moved past it.
    A file the prefetcher cannot decrypt is left to wal-fetch, which stops recovery with the
    reason.
    """

    def __init__(self, segments: list[tuple[str, Path]], spool: Path, key: encryption.BackupKey, owner: str,
                 depth: int = PREFETCH_DEPTH):
        self.segments, self.spool, self.key, self.owner, self.depth = segments, spool, key, owner, depth
        self.served = 0  # segments the server took from the spool
        self.error: str | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="wal-prefetch", daemon=True)

    def __enter__(self) -> "WalPrefetcher":
        self.spool.mkdir(mode=0o700, exist_ok=True)
        _chown_tree(self.spool, self.owner)
        self._thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self._stop.set()
        self._thread.join()
        shutil.rmtree(self.spool, ignore_errors=True)

    def _run(self) -> None:
        owner = self.spool.stat()
        waiting: list[str] = []  # decrypted, in recovery's order, not yet taken
        for name, path in self.segments:
            while True:
                waiting = self._forget_taken(waiting)
                if len(waiting) < self.depth or self._stop.is_set():
                    break
                self._stop.wait(0.02)
            if self._stop.is_set():
                return
            tmp = self.spool / f".{name}.part"
            try:
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
                with open(fd, "wb") as out:
                    for chunk in backup_mod._archived_chunks(path, self.key):
                        out.write(chunk)
                if os.geteuid() == 0:
                    os.chown(tmp, owner.st_uid, owner.st_gid)
                os.rename(tmp, self.spool / name)
                waiting.append(name)
            except Exception as exc:  # noqa: BLE001 - wal-fetch meets the same file and stops recovery
                self.error = f"{name}: {exc}"
                log.warning("WAL prefetch stopped at %s; the server fetches the rest itself", self.error)
                with contextlib.suppress(OSError):
                    tmp.unlink()
                return
        while waiting and not self._stop.wait(0.05):
            waiting = self._forget_taken(waiting)

    def _forget_taken(self, waiting: list[str]) -> list[str]:
        """Count what the server took; drop what it passed without taking (fetched itself)."""
        taken = [n for n in waiting if not (self.spool / n).exists()]
        if not taken:
            return waiting
        self.served += len(taken)
        passed = waiting.index(taken[-1])
        for stale in waiting[:passed]:
            if stale not in taken:
                with contextlib.suppress(OSError):
                    (self.spool / stale).unlink()
        return waiting[passed + 1:]


def _server_log_tail(path: Path) -> str:
    try:
        lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        return "no server log"
    important = [ln for ln in lines if "FATAL" in ln or "PANIC" in ln or "ERROR" in ln]
    return "; ".join((important or lines)[-2:]) or "empty server log"


def _postmaster_alive(data_dir: Path) -> bool:
    """Whether the postmaster that postmaster.pid names still runs (without starting a process)."""
    try:
        pid = int((data_dir / "postmaster.pid").read_text().split("\n", 1)[0])
        os.kill(pid, 0)
    except PermissionError:  # it runs, as another user
        return True
    except (OSError, ValueError):  # no file yet or any more, half written, or no such process
        return False
    return True


def _replay(cluster: ClusterControl, new_dir: Path, work: Path, timeout: float) -> dict:
    """Start a second postmaster on the new directory, wait for promotion, clean up, stop it."""
    port = _free_port()
    log_file = work / "recovery.log"
    pg_ctl = str(cluster.bin_dir / "pg_ctl")
    options = " ".join(shlex.quote(o) for o in cluster.server_options(new_dir, port, work))
    # -w returns once the server is consistent (or has died); a long replay to the consistent
    # point may outlast -t, which is fine: the loop below keeps waiting while it runs.
    _run(_as_user(cluster.run_as, [pg_ctl, "-D", str(new_dir), "-l", str(log_file), "-o", options, "-w", "-t", "60",
                                   "start"]), "starting PostgreSQL on the restored data", check=False)
    deadline = time.monotonic() + timeout
    try:
        while True:
            # The startup process removes recovery.signal when it promotes: until then a look
            # at the directory every 50 ms, not two processes every 0.3 s, which cost up to
            # half a second of the step and took CPU from the replay.
            if (new_dir / "recovery.signal").exists() and _postmaster_alive(new_dir):
                if time.monotonic() > deadline:
                    raise RestoreError(f"WAL replay did not finish within {timeout:.0f} s; nothing was changed "
                                       f"(server log: {log_file})")
                time.sleep(0.05)
                continue
            status = _run(_as_user(cluster.run_as, [pg_ctl, "-D", str(new_dir), "status"]), "pg_ctl status", check=False)
            if status.returncode != 0:
                raise RestoreError(f"WAL replay on the restored data stopped: {_server_log_tail(log_file)}; "
                                   f"nothing was changed (server log: {log_file})")
            try:
                in_recovery = cluster.psql("SELECT pg_is_in_recovery()", socket_dir=work, port=port)
            except RestoreError:
                in_recovery = "starting"
            if in_recovery == "f":
                break
            if time.monotonic() > deadline:
                raise RestoreError(f"WAL replay did not finish within {timeout:.0f} s; nothing was changed "
                                   f"(server log: {log_file})")
            time.sleep(0.3)
        facts = cluster.psql("SELECT coalesce(pg_last_xact_replay_timestamp()::text, ''), "
                             "substr(pg_walfile_name(pg_current_wal_lsn()), 1, 8)",
                             *(f"ALTER SYSTEM RESET {name}" for name in RECOVERY_SETTINGS), "CHECKPOINT",
                             socket_dir=work, port=port)
        replayed, timeline = facts.split("|")
    finally:
        _run(_as_user(cluster.run_as, [pg_ctl, "-D", str(new_dir), "-m", "fast", "-w", "-t", "300", "stop"]),
             "stopping PostgreSQL on the restored data", check=False)
    recovered = dt.datetime.fromisoformat(replayed).astimezone(dt.timezone.utc) if replayed else None
    return {"recovered_to": recovered, "timeline": int(timeline, 16)}


def _forget_timeline(settings: Settings, timeline: int) -> None:
    """Remove from the archive what an abandoned restore's timeline wrote, so that a later
    recovery to 'latest' does not follow it."""
    prefix = f"{timeline:08X}"
    for name, path in backup_mod._archive_files(settings.backup.wal_archive_dir).items():
        if name.startswith(prefix):
            with contextlib.suppress(OSError):
                path.unlink()


def _swap_and_start(cluster: ClusterControl, new_dir: Path, journal: Path, hooks: RestoreHooks,
                    steps: list[Step], say: Progress, timeline: int | None, work: Path) -> Path | None:
    stamp = time.strftime("%Y%m%dT%H%M%S")
    previous = cluster.data_dir.with_name(f"{cluster.data_dir.name}.before-restore-{stamp}")
    with _timed(steps, "swap", say) as step:
        if hooks.before_swap:
            hooks.before_swap()
        cluster.stop()
        had_previous = cluster.data_dir.exists()
        if had_previous:
            _exchange(new_dir, cluster.data_dir)  # the previous data is now at new_dir's name
            os.rename(new_dir, previous)
        else:
            os.rename(new_dir, cluster.data_dir)
        fsync_dir(cluster.data_dir.parent)
        _write_journal(journal, {"phase": "swapped", "previous": str(previous) if had_previous else "",
                                 "timeline": timeline, "work": str(work)})
        step.detail = f"previous data kept in {previous}" if had_previous else "there was no previous data"
    try:
        with _timed(steps, "start", say) as step:
            cluster.start()
            deadline = time.monotonic() + 300
            while True:
                try:
                    if cluster.psql("SELECT pg_is_in_recovery()") == "f":
                        break
                except RestoreError:
                    pass
                if time.monotonic() > deadline:
                    raise RestoreError(f"PostgreSQL did not answer on {cluster.socket_dir} port {cluster.port} "
                                       f"within 300 s after the swap")
                time.sleep(0.3)
            if hooks.after_start:
                hooks.after_start()
    except BaseException as exc:
        say(f"start failed ({exc}); putting the previous data back")
        with contextlib.suppress(Exception):
            cluster.stop()
        failed = cluster.data_dir.with_name(f"{cluster.data_dir.name}.failed-restore-{stamp}")
        if had_previous:
            _exchange(previous, cluster.data_dir)
            os.rename(previous, failed)
        else:
            os.rename(cluster.data_dir, failed)
        shutil.rmtree(failed, ignore_errors=True)
        with contextlib.suppress(OSError):
            journal.unlink()
        if had_previous:
            cluster.start()
        if hooks.after_rollback:
            hooks.after_rollback()
        if isinstance(exc, Exception) and not isinstance(exc, RestoreError):
            raise RestoreError(f"the restored cluster failed its start ({exc}); the previous data is back in "
                               f"place") from exc
        raise
    journal.unlink()
    return previous if had_previous else None


def _restore_attachments(settings: Settings, info: backup_mod.BackupInfo, key: encryption.BackupKey) -> list[Path]:
    """Add the backup's attachment files that are missing; never replace or delete one.

    Files are content-addressed and immutable, so a file already present is the same file;
    files uploaded after the backup (and referenced by WAL replayed past it) stay.
    """
    dest_root = backup_mod.attachments_dir(settings)
    src = info.path / backup_mod.ATTACHMENTS_FILE
    owner = None
    for candidate in (dest_root, dest_root.parent):
        if candidate.exists():
            st = candidate.stat()
            owner = (st.st_uid, st.st_gid)
            break
    added: list[Path] = []
    with open(src, "rb") as fh:
        stream = io.BufferedReader(encryption.DecryptingReader(fh, key, str(src)), buffer_size=1 << 20)
        try:
            with tarfile.open(fileobj=stream, mode="r|") as tar:
                for member in tar:
                    if not member.isfile():
                        continue
                    rel = PurePosixPath(member.name)
                    if rel.is_absolute() or ".." in rel.parts:
                        raise RestoreError(f"{src}: unsafe path {member.name!r} in the attachments")
                    target = dest_root.joinpath(*rel.parts)
                    if target.exists() and target.stat().st_size == member.size:
                        continue
                    target.parent.mkdir(parents=True, exist_ok=True)
                    tmp = target.with_name(f".{target.name}.restore")
                    try:
                        with tar.extractfile(member) as data, open(tmp, "wb") as out:
                            shutil.copyfileobj(data, out, 1 << 20)
                        os.chmod(tmp, 0o400)  # read-only, as the store keeps its files
                        os.replace(tmp, target)
                    except BaseException:
                        tmp.unlink(missing_ok=True)  # a part copy (disk full, damaged archive): no trace
                        raise
                    added.append(target)
                    if owner and os.geteuid() == 0:
                        os.chown(target, *owner)
                        for parent in target.relative_to(dest_root).parents:
                            os.chown(dest_root / parent, *owner)
        except BaseException:
            for path in added:
                with contextlib.suppress(OSError):
                    path.unlink()
            raise
    return added


# ============================================================================= the restore drill


class ScratchCluster(ClusterControl):
    """A throwaway server on a restored copy: its own directory, private socket, no TCP, no archiving."""

    def __init__(self, base: Path, version: int, run_as: str):
        self.version, self.base, self.run_as = version, base, run_as
        self.data_dir, self.socket_dir = base / "data", base / "run"
        self.port = _free_port()
        self.db_user = "postgres"  # the superuser of the restored cluster, over trust on the private socket

    def server_options(self, data_dir: Path, port: int, socket_dir: Path) -> list[str]:
        return ["-c", f"port={port}", "-c", "listen_addresses=", "-c", f"unix_socket_directories={socket_dir}",
                "-c", "archive_mode=off", "-c", f"hba_file={self.base / 'pg_hba.conf'}",
                "-c", f"ident_file={self.base / 'pg_ident.conf'}", "-c", "cluster_name=crm-restore-drill"]

    def _ctl(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        options = " ".join(shlex.quote(o) for o in self.server_options(self.data_dir, self.port, self.socket_dir))
        argv = [str(self.bin_dir / "pg_ctl"), "-D", str(self.data_dir), "-l", str(self.socket_dir / "server.log"),
                "-o", options, *args]
        return _run(_as_user(self.run_as, argv), f"pg_ctl {args[-1]} of the drill's scratch server", check=check)

    def start(self) -> None:
        self._ctl("-w", "-t", "300", "start")

    def stop(self) -> None:
        self._ctl("-m", "fast", "-w", "stop", check=False)

    def is_running(self) -> bool:
        return self._ctl("status", check=False).returncode == 0


@dataclass
class DrillResult:
    backup_id: str
    seconds: float
    steps: list[Step]
    tables: dict[str, list[int]]  # table -> [rows in the manifest, rows restored]
    amcheck: str

    def __str__(self) -> str:
        return (f"restore drill of backup {self.backup_id} passed in {self.seconds:.1f} s: {len(self.tables)} tables "
                f"with the manifest's row counts; {self.amcheck}")

    def to_json(self) -> dict:
        data = asdict(self)
        data["kind"] = "drill"
        return data


def _wait_for_restore_point(settings: Settings, manifest: dict, lsn: str) -> str:
    """The restore point is written just after the backup: a drill right after it waits for
    the segment holding it to be archived (archive_timeout forces that within its seconds)."""
    size = manifest["postgresql"]["wal_segment_size"]
    timeline = manifest["stop"]["timeline"] or manifest["start"]["timeline"]
    name = backup_mod.segment_name(timeline, backup_mod.lsn_to_int(lsn) // size, size)
    wait = settings.backup.archive_timeout_seconds + 30
    deadline = time.monotonic() + wait
    while name not in backup_mod._archive_files(settings.backup.wal_archive_dir):
        if time.monotonic() > deadline:
            raise RestoreError(f"the WAL segment {name} holding the backup's restore point {lsn} is not archived "
                               f"after {wait} s: check archive_command (crm-appliance scheduler run wal_check)")
        time.sleep(1)
    return f"restore point {lsn} is in archived segment {name}"


def drill(settings: Settings, backup_id: str = "latest", *, scratch_parent: Path = Path("/var/tmp"),
          timeout: float = 6 * 3600, progress: Progress | None = None) -> DrillResult:
    """Restore a base backup into a scratch server and check it, touching nothing else.

    The backup is verified, extracted beside nothing that runs, replayed from the archive to
    the restore point the backup recorded with its row counts, and promoted; pg_amcheck then
    checks every table and index, and each table's row count must equal the manifest's. The
    scratch server listens on a private socket only and does not archive. Raises
    RestoreError (or BackupIntegrityError) on any failure; records the outcome beside the
    restore history.
    """
    say = progress or (lambda message: None)
    t0 = time.monotonic()
    key = encryption.load_key(settings.backup.key_file)
    # As root the scratch server runs as postgres with its key copy; otherwise (the
    # scheduler's user) as ourselves, with the key we can read.
    run_as = "postgres" if os.geteuid() == 0 else pwd.getpwuid(os.geteuid()).pw_name
    fetch_key = settings.backup.wal_key_file if os.geteuid() == 0 else settings.backup.key_file
    steps: list[Step] = []
    with backup_mod.catalogue_lock(settings.backup.dir, exclusive=False):
        with _timed(steps, "verify", say) as step:
            info = backup_mod.get_backup(settings, backup_id, kind="base")
            checked = backup_mod.verify(settings, info.id, key=key, lock=False)
            manifest = backup_mod.read_manifest(info.path, key)
            version = int(manifest["postgresql"]["version_num"]) // 10000
            check_compatible(manifest, version)
            counts = manifest.get("row_counts")
            step.detail = f"backup {info.id}: {checked.files} files"
        if counts and counts.get("lsn"):
            with _timed(steps, "archive", say) as step:
                step.detail = _wait_for_restore_point(settings, manifest, counts["lsn"])
        base = Path(tempfile.mkdtemp(prefix="crm-drill-", dir=scratch_parent))
        try:
            os.chmod(base, 0o700)
            (base / "run").mkdir()
            (base / "pg_hba.conf").write_text("local all all trust\n")  # the socket directory is private
            (base / "pg_ident.conf").write_text("")
            _chown_tree(base, run_as)
            scratch = ScratchCluster(base, version, run_as)
            recovery = {"restore_command": backup_mod.restore_command_line(settings, key_file=fetch_key),
                        "recovery_target_action": "promote"}
            if counts:
                recovery["recovery_target_name"] = counts["restore_point"]
            else:
                recovery["recovery_target"] = "immediate"
            with _timed(steps, "extract", say) as step:
                _extract(info, manifest, key, scratch, scratch.data_dir, recovery)
                # Debian keeps postgresql.conf outside the data directory: give the scratch server one.
                minimums = manifest["postgresql"].get("recovery_minimums") or {}
                conf = "".join(f"{name} = {value}\n" for name, value in minimums.items())
                (scratch.data_dir / "postgresql.conf").write_text(conf + "shared_buffers = '128MB'\n")
                _chown_tree(scratch.data_dir, run_as)
            with _timed(steps, "replay", say) as step:
                _replay(scratch, scratch.data_dir, scratch.socket_dir, timeout)
                step.detail = f"to {counts['restore_point'] if counts else 'the end of the backup'}"
            with _timed(steps, "amcheck", say) as step:
                scratch.start()
                try:
                    result = _run(_as_user(run_as, [str(scratch.bin_dir / "pg_amcheck"), "-h", str(scratch.socket_dir),
                                                    "-p", str(scratch.port), "-U", "postgres", "--all",
                                                    "--install-missing", "--heapallindexed"]),
                                  "pg_amcheck of the restored copy", check=False)
                    if result.returncode != 0:
                        found = (result.stdout + result.stderr).strip().splitlines()[:3]
                        raise RestoreError(f"restore drill of backup {info.id}: pg_amcheck found corruption in the "
                                           f"restored copy: {'; '.join(found)}")
                    step.detail = "pg_amcheck --all --heapallindexed: no corruption"
                    tables = {}
                    if counts and counts["tables"]:
                        names = sorted(counts["tables"])
                        # One psql for all the tables, one line per count, in order.
                        lines = scratch.psql(*('SELECT count(*) FROM "{}"."{}"'.format(*t.split(".", 1)) for t in names),
                                             database=manifest["database"]).splitlines()
                        if len(lines) != len(names):
                            raise RestoreError(f"restore drill of backup {info.id}: counting the rows of "
                                               f"{len(names)} tables gave {len(lines)} answers")
                        tables = {t: [counts["tables"][t], int(n)] for t, n in zip(names, lines)}
                finally:
                    scratch.stop()
            wrong = {t: c for t, c in tables.items() if c[0] != c[1]}
            if wrong:
                table, (expected, restored) = sorted(wrong.items())[0]
                raise RestoreError(f"restore drill of backup {info.id}: table {table} has {restored} rows in the "
                                   f"restored copy, the manifest says {expected}"
                                   + (f" (and {len(wrong) - 1} more tables differ)" if len(wrong) > 1 else ""))
        finally:
            shutil.rmtree(base, ignore_errors=True)
    outcome = DrillResult(backup_id=info.id, seconds=round(time.monotonic() - t0, 3), steps=steps, tables=tables,
                          amcheck="pg_amcheck found no corruption" + ("" if counts else
                                  "; no row counts in the manifest (grant pg_create_restore_point to the backup role)"))
    with contextlib.suppress(OSError):
        backup_mod.record_restore(settings, outcome.to_json())
    return outcome
