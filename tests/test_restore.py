"""Restores against a real cluster: a crash, point-in-time targets, timelines, refusals, rollback.

The module's cluster archives WAL with our wal-push every 10 s at most (archive_timeout),
commits synchronously, and is restored in place through the same ``DebianCluster`` control
that drives the appliance's ``15/main``: stop, swap data directories, start.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psycopg2
import pytest

import appliance
from appliance import backup, restore
from appliance.errors import BackupIntegrityError, RestoreError
from tests.test_backup import BackupEnv, _attachments, make_backup_env

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root: pg_ctlcluster and the postgres user")

ARCHIVE_TIMEOUT = 10


@pytest.fixture(scope="module")
def env():
    environment = make_backup_env(archive_timeout=ARCHIVE_TIMEOUT)
    environment.cluster.psql("ALTER SYSTEM SET synchronous_commit = on")
    environment.cluster.psql("SELECT pg_reload_conf()")
    try:
        yield environment
    finally:
        environment.close()


def _cluster(env: BackupEnv) -> restore.DebianCluster:
    return restore.DebianCluster(env.cluster.version, env.cluster.name)


def _labels(env: BackupEnv, like: str = "%") -> set[str]:
    return set(filter(None, env.sql(f"SELECT label FROM probe WHERE label LIKE '{like}'").splitlines()))


def _insert(env: BackupEnv, *labels: str) -> None:
    env.sql("INSERT INTO probe (label) VALUES " + ", ".join(f"('{x}')" for x in labels))


def _server_now(env: BackupEnv) -> dt.datetime:
    return dt.datetime.fromisoformat(env.sql("SELECT clock_timestamp()"))


def _data_dir_identity(env: BackupEnv) -> tuple[int, int]:
    st = _cluster(env).data_dir.stat()
    return st.st_ino, st.st_dev


def _leftovers(env: BackupEnv) -> list[str]:
    data = _cluster(env).data_dir
    return sorted(p.name for p in data.parent.iterdir()
                  if p.name.startswith(data.name + ".") and "before-restore" not in p.name)


def _kill_cluster(env: BackupEnv) -> None:
    """SIGKILL the postmaster and every process it started: a crash, not a shutdown."""
    data = _cluster(env).data_dir
    postmaster = int((data / "postmaster.pid").read_text().splitlines()[0])
    children = subprocess.run(["ps", "-o", "pid=", "--ppid", str(postmaster)], capture_output=True,
                              text=True).stdout.split()
    for pid in [postmaster] + [int(c) for c in children]:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + 10
    while _cluster(env).is_running():
        assert time.monotonic() < deadline
        time.sleep(0.1)


# ============================================================================= round trip


def test_round_trip_after_a_crash(env):
    """Write continuously, back up, keep writing, SIGKILL PostgreSQL, restore latest: every
    write committed more than archive_timeout before the crash is back, and nothing is corrupt."""
    committed: list[tuple[int, float]] = []
    stop = threading.Event()
    failures: list[BaseException] = []

    def writer() -> None:
        try:
            conn = psycopg2.connect(host="127.0.0.1", port=env.cluster.port, dbname="crm_test", user="crm",
                                    password=env.settings.database.password())
            conn.autocommit = True
            with conn.cursor() as cur:
                i = 0
                while not stop.is_set():
                    cur.execute("INSERT INTO probe (label) VALUES (%s) RETURNING id", (f"stream-{i}",))
                    committed.append((cur.fetchone()[0], time.time()))
                    i += 1
                    time.sleep(0.02)
        except psycopg2.Error as exc:  # the crash ends the stream
            if not stop.is_set():
                failures.append(exc)

    thread = threading.Thread(target=writer, daemon=True)
    thread.start()
    time.sleep(1)
    info = backup.take_backup(env.settings, "base")
    backup_done = time.time()
    time.sleep(ARCHIVE_TIMEOUT + 5)
    stop.set()
    _kill_cluster(env)
    crash = time.time()
    thread.join(10)
    assert not failures and committed
    after_backup = [i for i, t in committed if t > backup_done]
    assert len(after_backup) > 100, "writes continued after the backup: the restore must replay WAL"

    result = restore.restore(env.settings, "latest", cluster=_cluster(env))
    assert result.backup_id == info.id and result.timeline >= 2
    assert [s.name for s in result.steps] == ["verify", "extract", "replay", "attachments", "swap", "start"]
    assert result.total_seconds >= sum(s.seconds for s in result.steps) - 0.1
    served = re.search(r"(\d+) of (\d+) WAL segments decrypted ahead", result.steps[2].detail)
    assert served and 1 <= int(served.group(1)) <= int(served.group(2)), result.steps[2].detail
    assert result.previous_data_dir and (result.previous_data_dir / "PG_VERSION").exists()
    present = {int(x) for x in env.sql("SELECT id FROM probe").split()}
    must_have = {i for i, t in committed if t < crash - ARCHIVE_TIMEOUT - 1}
    missing = sorted(must_have - present)
    assert not missing, f"{len(missing)} writes older than archive_timeout were lost, first {missing[:5]}"
    assert must_have & set(after_backup), "rows written after the backup came back by WAL replay"
    lost = len({i for i, _ in committed} - present)
    assert lost <= (ARCHIVE_TIMEOUT + 2) / 0.02
    env.sql("CREATE EXTENSION IF NOT EXISTS amcheck")
    checked = env.sql("SELECT count(bt_index_check(c.oid, true)) FROM pg_index i JOIN pg_class c ON c.oid = "
                      "i.indexrelid JOIN pg_am a ON a.oid = c.relam WHERE a.amname = 'btree' AND c.relpersistence "
                      "= 'p' AND c.relnamespace = 'public'::regnamespace")
    assert int(checked) >= 5  # probe's key and the CRM tables' indexes pass amcheck
    assert env.sql("SHOW restore_command", "postgres") == "" and env.sql("SHOW recovery_target_time", "postgres") == ""
    assert not (_cluster(env).data_dir / "recovery.signal").exists()
    history = backup.restore_history(env.settings)
    assert history[-1]["backup_id"] == info.id and history[-1]["total_seconds"] == result.total_seconds
    assert "72 h" in "\n".join(result.summary())


def test_restore_after_the_data_directory_is_lost(env):
    """Storage failure: the data directory is gone; restore latest rebuilds it from the backup."""
    import shutil

    info = backup.take_backup(env.settings, "base")
    _insert(env, "before-the-disk-died")
    env.switch_wal()
    cluster = _cluster(env)
    _kill_cluster(env)
    shutil.rmtree(cluster.data_dir)
    result = restore.restore(env.settings, "latest", cluster=cluster)
    assert result.backup_id == info.id and result.previous_data_dir is None
    assert "before-the-disk-died" in _labels(env)
    assert next(s for s in result.steps if s.name == "swap").detail == "there was no previous data"


# ============================================================================= point in time


def test_point_in_time_restore_returns_exactly_the_rows_before_the_target(env):
    info = backup.take_backup(env.settings, "base")
    before = [f"pitr-before-{i}" for i in range(50)]
    after = [f"pitr-after-{i}" for i in range(50)]
    _insert(env, *before)
    time.sleep(0.5)
    target = _server_now(env)
    time.sleep(0.5)
    _insert(env, *after)
    env.switch_wal()
    assert _labels(env, "pitr-%") == set(before) | set(after)

    result = restore.restore(env.settings, "latest", target_time=target, cluster=_cluster(env))
    assert result.backup_id == info.id
    assert _labels(env, "pitr-%") == set(before), "only the rows committed before the target"
    assert result.recovered_to is not None and result.recovered_to <= target
    pytest.pitr = {"backup": info.id, "before": before, "after": after, "timeline": result.timeline}


def test_a_later_restore_follows_the_newest_timeline(env):
    """After the point-in-time restore the archive holds two histories; 'latest' follows the new one."""
    pitr = pytest.pitr
    _insert(env, "on-the-new-timeline")
    env.switch_wal()
    result = restore.restore(env.settings, pitr["backup"], cluster=_cluster(env))
    assert result.timeline == pitr["timeline"] + 1
    labels = _labels(env, "pitr-%") | _labels(env, "on-the-new-timeline")
    assert labels == set(pitr["before"]) | {"on-the-new-timeline"}


def test_attachments_missing_after_the_backup_come_back(env):
    files = _attachments(env, count=4)
    backup.take_backup(env.settings, "base")
    root = backup.attachments_dir(env.settings)
    lost = sorted(files)[:2]
    for rel in lost:
        (root / rel).unlink()
    uploaded_later = root / "ff" / "uploaded-after-the-backup"
    uploaded_later.parent.mkdir(exist_ok=True)
    uploaded_later.write_bytes(b"new")
    result = restore.restore(env.settings, "latest", cluster=_cluster(env))
    for rel, data in files.items():
        assert (root / rel).read_bytes() == data
    for rel in lost:
        assert (root / rel).stat().st_mode & 0o777 == 0o400, "restored read-only, as stored"
    assert uploaded_later.read_bytes() == b"new", "files newer than the backup are kept"
    assert f"{len(lost)} files added" in next(s.detail for s in result.steps if s.name == "attachments")


def test_an_attachment_copy_cut_short_leaves_no_part_of_it(settings, tmp_path, monkeypatch):
    """A disk that fills up while a file comes back from the backup: the half-written file
    (customer data, under a dot name the retention sweep skips) is removed, not left behind."""
    import errno
    import hashlib
    import io
    import shutil
    import tarfile
    import types

    from appliance import attachments, encryption

    key = encryption.key_from_text("k" * 64, tmp_path / "key")
    data = b"%PDF-1.4 contract " * 50_000
    sha = hashlib.sha256(data).hexdigest()
    tar_bytes = io.BytesIO()
    with tarfile.open(fileobj=tar_bytes, mode="w") as tar:
        member = tarfile.TarInfo(f"{sha[:2]}/{sha}")
        member.size = len(data)
        tar.addfile(member, io.BytesIO(data))
    with open(tmp_path / backup.ATTACHMENTS_FILE, "wb") as fh, encryption.EncryptingWriter(fh, key) as writer:
        writer.write(tar_bytes.getvalue())
    shutil.rmtree(attachments.store_dir(settings), ignore_errors=True)

    def disk_full(src, dst, length=0):
        dst.write(src.read(100_000))
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(restore.shutil, "copyfileobj", disk_full)
    with pytest.raises(OSError, match="No space left"):
        restore._restore_attachments(settings, types.SimpleNamespace(path=tmp_path), key)
    assert [p for p in attachments.store_dir(settings).rglob("*") if p.is_file()] == []


# ============================================================================= the restore drill


def test_restore_drill_checks_a_scratch_copy_against_the_manifest(env):
    _insert(env, "drill-1", "drill-2")
    info = backup.take_backup(env.settings, "base")
    manifest = backup.read_manifest(info.path, env.key)
    counts = manifest["row_counts"]
    assert counts["tables"]["public.probe"] == int(env.sql("SELECT count(*) FROM probe")) > 0
    _insert(env, "after-the-restore-point")  # in the archive, but after the point the counts were taken at
    env.switch_wal()
    identity, labels = _data_dir_identity(env), _labels(env)
    result = restore.drill(env.settings)
    assert result.backup_id == info.id
    assert result.tables["public.probe"] == [counts["tables"]["public.probe"]] * 2, \
        "replay stopped at the restore point: the later row is not in the copy"
    assert len(result.tables) >= 10 and "passed" in str(result) and "no corruption" in str(result)
    assert [s.name for s in result.steps] == ["verify", "archive", "extract", "replay", "amcheck"]
    assert _data_dir_identity(env) == identity and _labels(env) == labels
    assert not list(Path("/var/tmp").glob("crm-drill-*"))
    assert backup.restore_history(env.settings)[-1]["kind"] == "drill"
    wrong = dict(counts, tables=dict(counts["tables"], **{"public.probe": counts["tables"]["public.probe"] + 1}))
    _resign(env, info.path, row_counts=wrong)
    with pytest.raises(RestoreError, match=rf"table public.probe has {counts['tables']['public.probe']} rows in the "
                                           rf"restored copy, the manifest says {counts['tables']['public.probe'] + 1}"):
        restore.drill(env.settings, info.id)
    assert not list(Path("/var/tmp").glob("crm-drill-*"))


def test_row_counts_are_taken_after_the_backups_end_even_if_started_early(env, monkeypatch):
    """The counts start while pg_basebackup runs, once the server has written the backup's end;
    a restore point made before that end (recovery could not stop there) is made again, under
    a name of its own, and the drill reaches it."""
    info = backup.take_backup(env.settings, "base")
    manifest = backup.read_manifest(info.path, env.key)
    assert manifest["row_counts"]["restore_point"] == f"crm-appliance {info.id}"
    assert backup.lsn_to_int(manifest["row_counts"]["lsn"]) > backup.lsn_to_int(manifest["stop"]["lsn"])
    monkeypatch.setattr(backup, "_row_counts_once_stopped", lambda conn, name, tool: backup._row_counts(conn, name))
    _insert(env, "counted-early")
    early = backup.take_backup(env.settings, "base")
    manifest = backup.read_manifest(early.path, env.key)
    counts = manifest["row_counts"]
    assert counts["restore_point"] == f"crm-appliance {early.id} after its end"
    assert backup.lsn_to_int(counts["lsn"]) > backup.lsn_to_int(manifest["stop"]["lsn"])
    env.switch_wal()
    result = restore.drill(env.settings, early.id)
    assert result.tables["public.probe"] == [counts["tables"]["public.probe"]] * 2 and "passed" in str(result)


# ============================================================================= refusals: nothing changes


def test_missing_wal_segment_is_refused_and_nothing_changes(env):
    info = backup.take_backup(env.settings, "base")
    _insert(env, "gap-1")
    first = env.switch_wal()
    _insert(env, "gap-2")
    env.switch_wal()
    archived = env.settings.backup.wal_archive_dir / (first + backup.ARCHIVE_SUFFIX)
    hidden = archived.with_name("." + archived.name)
    identity, labels = _data_dir_identity(env), _labels(env)
    os.rename(archived, hidden)
    try:
        with pytest.raises(BackupIntegrityError, match=f"WAL segment {first} is missing from .*restore to an earlier "
                                                       f"time with --to, or from a newer backup"):
            restore.restore(env.settings, info.id, cluster=_cluster(env))
        assert _data_dir_identity(env) == identity and _labels(env) == labels and _leftovers(env) == []
    finally:
        os.rename(hidden, archived)


def _resign(env: BackupEnv, path: Path, **changes) -> None:
    manifest = backup.read_manifest(path, env.key)
    for name, value in changes.items():
        manifest[name] = value
    backup._write_manifest(path, manifest, env.key)


def test_a_backup_from_a_newer_appliance_is_refused_naming_the_version(env):
    info = backup.take_backup(env.settings, "base")
    identity = _data_dir_identity(env)
    try:
        _resign(env, info.path, appliance_version="99.1.0")
        backup.verify(env.settings, info.id)  # intact and correctly signed: only too new
        with pytest.raises(RestoreError, match=r"made by crm-appliance 99\.1\.0, newer than this crm-appliance .*: "
                                               r"install crm-appliance 99\.1\.0 or later"):
            restore.restore(env.settings, info.id, cluster=_cluster(env))
        _resign(env, info.path, appliance_version="0.0.9",  # an older release, on a schema it never had
                schema={"level": 99, "migrations": ["0001_initial", "0099_future"]})
        with pytest.raises(RestoreError, match=r"schema migration 0099_future, which this crm-appliance .* does not "
                                               r"know \(the backup was made by 0\.0\.9\): install the release "
                                               r"that added migration 0099_future"):
            restore.restore(env.settings, info.id, cluster=_cluster(env))
        # Made by this very release on a schema a newer release migrated (then rolled back): it ran
        # on that schema, so it restores.
        _resign(env, info.path, appliance_version=appliance.__version__,
                schema={"level": 99, "migrations": ["0001_initial", "0099_future"]})
        restore.check_compatible(backup.read_manifest(info.path, env.key), int(env.cluster.version))
        assert _data_dir_identity(env) == identity and _leftovers(env) == []
    finally:
        import shutil

        shutil.rmtree(info.path)


def test_damaged_backup_is_refused_before_anything_changes(env):
    info = backup.take_backup(env.settings, "base")
    identity = _data_dir_identity(env)
    path = info.path / "base.tar.zst.enc"
    with open(path, "r+b") as fh:
        fh.seek(path.stat().st_size // 3)
        byte = fh.read(1)
        fh.seek(-1, 1)
        fh.write(bytes([byte[0] ^ 1]))
    try:
        with pytest.raises(BackupIntegrityError, match="fails authentication"):
            restore.restore(env.settings, info.id, cluster=_cluster(env))
        assert _data_dir_identity(env) == identity and _leftovers(env) == []
        assert backup.get_backup(env.settings, info.id).state == "failed"
    finally:
        import shutil

        shutil.rmtree(info.path)


def test_target_outside_the_recoverable_window(env):
    window = restore.recoverable_window(env.settings)
    assert window is not None
    too_early = window[0] - dt.timedelta(days=1)
    with pytest.raises(RestoreError, match=r"outside the recoverable window, which is \d{4}-.* to \d{4}-.* \(UTC\)"):
        restore.restore(env.settings, "latest", target_time=too_early, cluster=_cluster(env))
    too_late = dt.datetime.now(dt.timezone.utc) + dt.timedelta(hours=1)
    with pytest.raises(RestoreError, match="outside the recoverable window"):
        restore.restore(env.settings, "latest", target_time=too_late, cluster=_cluster(env))


# ============================================================================= failure after the swap


def test_a_failed_start_puts_the_previous_data_back(env):
    backup.take_backup(env.settings, "base")
    _insert(env, "written-before-the-failed-restore")
    # A commit after the target, so that replay reaches the target whatever the machine's load.
    target = _server_now(env)
    time.sleep(0.2)
    _insert(env, "written-after-the-target")
    env.switch_wal()
    labels = _labels(env)
    called = []

    def health_gate() -> None:
        called.append("after_start")
        raise RuntimeError("health gate: /healthz answered 503")

    hooks = restore.RestoreHooks(before_swap=lambda: called.append("before_swap"), after_start=health_gate,
                                 after_rollback=lambda: called.append("after_rollback"))
    archive_before = set(os.listdir(env.settings.backup.wal_archive_dir))
    with pytest.raises(RestoreError, match="health gate: /healthz answered 503.*the previous data is back in place"):
        restore.restore(env.settings, "latest", target_time=target, cluster=_cluster(env), hooks=hooks)
    assert called == ["before_swap", "after_start", "after_rollback"]
    assert _labels(env) == labels and "written-before-the-failed-restore" in labels
    assert _leftovers(env) == []
    timelines = {n[:8] for n in archive_before if n[:8].isalnum()}
    abandoned = {n for n in os.listdir(env.settings.backup.wal_archive_dir) if n[:8] not in timelines}
    assert not abandoned, f"the abandoned restore's timeline stays out of the archive: {abandoned}"


def test_a_killed_restore_can_be_run_again(env):
    """Kill a restore after its swap: the next restore puts the previous data back, then completes."""
    info = backup.take_backup(env.settings, "base")
    _insert(env, "before-the-killed-restore")
    env.switch_wal()
    marker = env.base / "restore-reached-its-health-gate"
    script = f"""
import sys, time
from pathlib import Path
from appliance import config, restore
settings = config.load(sys.argv[1])
def hang():
    Path({str(marker)!r}).write_text("here")
    time.sleep(600)
restore.restore(settings, {info.id!r}, hooks=restore.RestoreHooks(after_start=hang))
"""
    proc = subprocess.Popen([sys.executable, "-c", script, str(env.config_path)], cwd=Path(__file__).parent.parent)
    deadline = time.monotonic() + 300
    while not marker.exists():
        assert proc.poll() is None and time.monotonic() < deadline, "the restore ended before it could be killed"
        time.sleep(0.1)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    cluster = _cluster(env)
    journal = cluster.data_dir.with_name(cluster.data_dir.name + restore.JOURNAL_SUFFIX)
    state = json.loads(journal.read_text())
    assert state["phase"] == "swapped" and (Path(state["previous"]) / "PG_VERSION").exists(), \
        "killed after the swap, the previous data is intact beside it"
    messages: list[str] = []
    result = restore.restore(env.settings, info.id, cluster=cluster, progress=messages.append)
    assert any("putting the previous data back" in m for m in messages)
    assert not journal.exists() and _leftovers(env) == []
    assert not Path(state["work"]).exists(), "the killed run's scratch directory is cleaned up"
    assert "before-the-killed-restore" in _labels(env)  # replayed from the archive to its end
    assert result.backup_id == info.id


# ============================================================================= WAL prefetch


def _archived_segments(tmp_path, count: int):
    """A key and ``count`` small fake segments archived with wal-push: (key, {name: bytes}, [(name, path)])."""
    key_file = tmp_path / "key"
    key_file.write_text("k" * 40)
    key_file.chmod(0o600)
    archive = tmp_path / "archive"
    archive.mkdir()
    originals, segments = {}, []
    for n in range(1, count + 1):
        name = f"0000000100000000000000{n:02X}"
        plain = tmp_path / name
        plain.write_bytes(os.urandom(64 * 1024) + bytes([n]) * 1024)
        backup.wal_push(plain, name, archive, key_file)
        originals[name] = plain.read_bytes()
        segments.append((name, archive / (name + backup.ARCHIVE_SUFFIX)))
    return appliance.encryption.load_key(key_file), originals, segments


def test_wal_prefetcher_keeps_a_bounded_spool_in_recovery_order(tmp_path, monkeypatch):
    """What recovery takes is the archived bytes, in order; a segment recovery fetched itself
    (not in the spool yet) is dropped once it is passed; never more than ``depth`` wait."""
    key, originals, segments = _archived_segments(tmp_path, 8)
    owner = __import__("pwd").getpwuid(os.geteuid()).pw_name
    monkeypatch.setattr(restore, "_chown_tree", lambda path, user: None)
    spool, taken, most_waiting = tmp_path / "data" / restore.WAL_SPOOL, {}, 0
    spool.parent.mkdir()

    def wait_for(name: str) -> None:
        nonlocal most_waiting
        deadline = time.monotonic() + 10
        while not (spool / name).exists():
            most_waiting = max(most_waiting, len([p for p in spool.iterdir() if not p.name.startswith(".")]))
            assert time.monotonic() < deadline, f"{name} never reached the spool"
            time.sleep(0.005)

    skipped = segments[2][0]  # as if wal-fetch got it first: the spool's copy is never taken
    with restore.WalPrefetcher(segments, spool, key, owner, depth=3) as prefetch:
        for name, _ in segments:
            if name == skipped:
                continue
            wait_for(name)
            os.rename(spool / name, tmp_path / "data" / "RECOVERYXLOG")  # what the mv in restore_command does
            taken[name] = (tmp_path / "data" / "RECOVERYXLOG").read_bytes()
        deadline = time.monotonic() + 10
        while prefetch.served < 7 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert not (spool / skipped).exists(), "passed without being taken: dropped"
    assert taken == {n: b for n, b in originals.items() if n != skipped}
    assert prefetch.served == 7 and prefetch.error is None and most_waiting <= 3
    assert not spool.exists()


def test_a_damaged_segment_stops_the_prefetch_and_is_left_to_wal_fetch(tmp_path, monkeypatch):
    key, _, segments = _archived_segments(tmp_path, 2)
    damaged = bytearray(segments[0][1].read_bytes())
    damaged[-40] ^= 0xFF
    segments[0][1].write_bytes(bytes(damaged))
    monkeypatch.setattr(restore, "_chown_tree", lambda path, user: None)
    spool = tmp_path / "data" / restore.WAL_SPOOL
    spool.parent.mkdir()
    with restore.WalPrefetcher(segments, spool, key, "nobody") as prefetch:
        deadline = time.monotonic() + 10
        while prefetch.error is None and time.monotonic() < deadline:
            time.sleep(0.01)
        assert sorted(p.name for p in spool.iterdir()) == [], "nothing half-written, nothing after it"
    assert prefetch.error.startswith(segments[0][0])


def test_postmaster_alive_reads_the_pid_file_and_asks_the_kernel(tmp_path):
    """The replay's wait for promotion looks at postmaster.pid instead of starting pg_ctl: a
    running process is alive; an exited one, no file, a half-written file are not."""
    data = tmp_path / "data"
    data.mkdir()
    assert not restore._postmaster_alive(data)  # not started yet
    (data / "postmaster.pid").write_text("")
    assert not restore._postmaster_alive(data)  # being written
    child = subprocess.Popen(["sleep", "30"])
    try:
        (data / "postmaster.pid").write_text(f"{child.pid}\n{data}\n1700000000\n5432\n")
        assert restore._postmaster_alive(data)
    finally:
        child.kill()
        child.wait()
    assert not restore._postmaster_alive(data)  # its pid file left behind after a crash
