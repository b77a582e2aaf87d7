"""Backup, verify and restore speed next to the raw PostgreSQL tools, in the same run.

Builds a throwaway cluster that archives its WAL with our wal-push, fills it with pgbench
tables plus a table of random text (which compresses like real records do, unlike
pgbench's padding), and attachment files of random bytes. Then times, on the same data:

- raw ``pg_basebackup -Ft -X none -c fast`` into a directory, with the server compressing as
  ours does (``--compress=server-zstd:level=1,workers=N``) and, as a second baseline, with
  pg_basebackup's own client-side ``--compress=zstd:1``, each plus ``tar`` of the attachments
  and ``sync`` of that tar (pg_basebackup and pg_dump fsync what they write, and a backup still
  in the page cache is not one yet; ours fsyncs every file) against
  ``take_backup(kind="base")`` (the same stream, encrypted in chunks, plus WAL copies,
  attachments, row counts and the manifest);
- ``sha256sum`` of the raw backup (baseline) against ``verify`` (checksums and decryption);
- raw ``pg_dump -Fd -j N -Z 1`` plus ``tar`` and ``sync`` of the attachments (baseline) against
  ``take_backup(kind="logical")`` (the same dump, encrypted file by file, plus
  ``pg_dumpall --globals-only``, attachments and the manifest);
- ``pg_restore -j N`` of the raw dump (baseline) against ``backup decrypt`` of ours followed by
  the same ``pg_restore -j N`` (into a second throwaway cluster, a fresh database each time);
- WAL replay: after the last base backup, updates in a loop write ``--wal-mb`` of WAL; the
  stock emergency procedure (``tar --zstd -x`` of the decrypted base backup, then a server
  replaying the decrypted WAL with ``restore_command = 'cp ...'``, and again with the same WAL
  kept gzip-compressed as our archive keeps it, ``restore_command = 'gunzip ...'``) against
  ``restore`` (verify, extract, replay with the WAL decrypted ahead, swap, start: the RTO). The replay rate is MB of
  WAL from the backup's stop to the end, per second of the replay step (server start, replay,
  promotion, and for ours the checkpoint and stop after it).

    .venv/bin/python bench/backup_speed.py [--scale 50] [--text-mb 300] [--attachments-mb 200] [--wal-mb 512] [--repeat 3]

Run as root (pg_createcluster). Each timed step runs ``--repeat`` times, alternating with its
baseline, and the best time of each counts (small hosts are noisy); the restores (pg_restore,
extract and replay) each start after a sync, so none pays for the writes of the one before.
Prints seconds, MB/s and each of ours as a ratio of its baseline.
"""

from __future__ import annotations

import argparse
import gzip
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from appliance import backup, restore  # noqa: E402
from tests.pgcluster import free_port, start_cluster  # noqa: E402
from tests.test_backup import give_to_postgres, make_backup_env  # noqa: E402

AS_PG = ["runuser", "-u", "postgres", "--"]


def timed(fn):
    started = time.perf_counter()
    value = fn()
    return time.perf_counter() - started, value


def generate(env, scale: int, text_mb: int, attachments_mb: int) -> int:
    """Fill the cluster and the attachments directory; returns the databases' bytes."""
    bindir = f"/usr/lib/postgresql/{env.cluster.version}/bin"
    subprocess.run(AS_PG + [f"{bindir}/pgbench", "-i", "-q", "-s", str(scale), "-h", str(env.cluster.socket_dir),
                            "-p", str(env.cluster.port), "crm_test"], check=True, capture_output=True, cwd="/")
    rows = text_mb * 1024**2 // 330
    env.sql("CREATE TABLE notes_bench (id bigserial PRIMARY KEY, body text)")
    env.sql(f"INSERT INTO notes_bench (body) SELECT string_agg(md5(random()::text), ' ') FROM "
            f"generate_series(1, {rows}) g, generate_series(1, 10) k GROUP BY g")
    env.sql("VACUUM (ANALYZE) notes_bench")  # pgbench -i vacuums its own
    # No autovacuum during the timed runs: after the WAL is written, and in every restored copy
    # (whose statistics start empty), it would scan the tables beside whichever step runs then.
    env.sql("ALTER SYSTEM SET autovacuum = off", "postgres")
    env.sql("SELECT pg_reload_conf()", "postgres")
    env.sql("CHECKPOINT", "postgres")
    root = backup.attachments_dir(env.settings)
    for i in range(attachments_mb):
        path = root / f"{i % 256:02x}" / f"file-{i}"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(os.urandom(1024**2))
    env.switch_wal()  # the archiver has caught up before anything is timed
    return int(env.sql("SELECT sum(pg_database_size(datname)) FROM pg_database", "postgres"))


def write_wal(env, megabytes: int) -> None:
    """Updates in a loop, a commit each, until ``megabytes`` of WAL are written."""
    env.sql(f"""DO $$
        DECLARE start pg_lsn := pg_current_wal_lsn(); i int := 0; n int := (SELECT max(aid) FROM pgbench_accounts);
        BEGIN
          WHILE pg_wal_lsn_diff(pg_current_wal_lsn(), start) < {megabytes} * 1000000 LOOP
            UPDATE pgbench_accounts SET abalance = abalance + 1
             WHERE aid > (i * 20000) % n AND aid <= (i * 20000) % n + 20000;
            COMMIT;
            i := i + 1;
          END LOOP;
        END $$""")


def raw_replay(cluster: restore.DebianCluster, restore_command: str, data: Path,
               run_dir: Path) -> tuple[float, float | None]:
    """Start a server on ``data`` replaying WAL with ``restore_command``; seconds to promotion
    (and stop), and the redo time the server logs."""
    port = free_port()
    with open(data / "postgresql.auto.conf", "a") as conf:
        conf.write(f"restore_command = '{restore_command}'\nrecovery_target_action = 'promote'\n"
                   f"recovery_target_timeline = 'latest'\n")
    (data / "recovery.signal").touch()
    give_to_postgres(data)
    options = cluster.server_options(data, port, run_dir) + ["-c", "archive_mode=off"]
    pg_ctl = f"{cluster.bin_dir}/pg_ctl"
    log = run_dir / "log"
    started = time.perf_counter()
    subprocess.run(AS_PG + [pg_ctl, "-D", str(data), "-l", str(log), "-o", " ".join(options), "-w", "-t", "3600",
                            "start"], check=True, capture_output=True, cwd="/")
    try:
        while True:
            out = subprocess.run(AS_PG + [f"{cluster.bin_dir}/psql", "-XAt", "-h", str(run_dir), "-p", str(port),
                                          "-d", "postgres", "-c", "SELECT pg_is_in_recovery()"],
                                 capture_output=True, text=True, cwd="/")
            if out.stdout.strip() == "f":
                break
            if time.perf_counter() - started > 3600:
                raise RuntimeError(f"raw replay did not finish: {log.read_text()[-2000:]}")
            time.sleep(0.1)
    finally:
        subprocess.run(AS_PG + [pg_ctl, "-D", str(data), "-m", "fast", "-w", "stop"], capture_output=True, cwd="/")
    seconds = time.perf_counter() - started
    redo = None
    for line in log.read_text(errors="replace").splitlines():  # "redo done at ... elapsed: 5.67 s"
        if "redo done at" in line and "elapsed:" in line:
            redo = float(line.rsplit("elapsed:", 1)[1].split()[0])
    return seconds, redo


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", type=int, default=50, help="pgbench scale (about 15 MB each)")
    parser.add_argument("--text-mb", type=int, default=300, help="MB of random text rows")
    parser.add_argument("--attachments-mb", type=int, default=200, help="MB of attachment files")
    parser.add_argument("--wal-mb", type=int, default=512, help="MB of WAL written after the last base backup")
    parser.add_argument("--repeat", type=int, default=3, help="runs of each timed step; the best counts")
    args = parser.parse_args()
    if os.geteuid() != 0:
        sys.exit("run as root: the benchmark creates a throwaway cluster with pg_createcluster")
    # SIGTERM (kill, a timeout) ends the run through the finally below, which drops the cluster.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(f"stopped by signal {signum}"))

    env = make_backup_env()
    target = None
    work = Path(tempfile.mkdtemp(prefix="crm-bench-"))
    os.chmod(work, 0o755)  # the postgres user reads the dumps and runs the raw replay here
    try:
        bindir = f"/usr/lib/postgresql/{env.cluster.version}/bin"
        print(f"generating: pgbench scale {args.scale}, {args.text_mb} MB of text, {args.attachments_mb} MB of "
              f"attachments")
        db_bytes = generate(env, args.scale, args.text_mb, args.attachments_mb)
        root = backup.attachments_dir(env.settings)
        total_in = db_bytes + args.attachments_mb * 1024**2
        print(f"database {db_bytes / 1e6:.0f} MB + attachments {args.attachments_mb} MB")
        print(f"load before the runs: {os.getloadavg()[0]:.2f} {os.getloadavg()[1]:.2f} {os.getloadavg()[2]:.2f}")
        env_vars = {**os.environ, "PGPASSWORD": env.settings.backup.db_password_file.read_text().strip()}
        connect = ["-h", "127.0.0.1", "-p", str(env.cluster.port), "-U", "crm_backup"]
        att_tar = work / "att.tar"

        # ------------------------------------------------------------------ base backup and verify
        raw_dir = work / "raw"
        jobs = backup.parallel_jobs()
        raw_cmd = [f"{bindir}/pg_basebackup", *connect, "-D", str(raw_dir), "-F", "t", "-X", "none", "-c", "fast"]
        ours_compress = "--compress=" + backup.COMPRESSION["zstd"][0].format(jobs=jobs)

        def tar_attachments() -> None:
            subprocess.run(["tar", "-cf", str(att_tar), "-C", str(root), "."], check=True)
            subprocess.run(["sync", str(att_tar)], check=True)  # fsync: on disk, as the tools' own output

        def raw_base(compress: str) -> None:
            shutil.rmtree(raw_dir, ignore_errors=True)
            subprocess.run(raw_cmd + [compress], check=True, capture_output=True, env=env_vars)
            tar_attachments()

        raw_times, raw_client_times, ours_times, raw_verify_times, ours_verify_times = [], [], [], [], []
        for _ in range(args.repeat):
            raw_client_times.append(timed(lambda: raw_base("--compress=zstd:1"))[0])
            raw_times.append(timed(lambda: raw_base(ours_compress))[0])
            seconds, info = timed(lambda: backup.take_backup(env.settings, "base"))
            ours_times.append(seconds)
            raw_verify_times.append(timed(lambda: subprocess.run(
                ["sha256sum", *map(str, raw_dir.iterdir()), str(att_tar)], check=True, capture_output=True))[0])
            seconds, checked = timed(lambda: backup.verify(env.settings, info.id))
            ours_verify_times.append(seconds)
        raw_size = sum(p.stat().st_size for p in raw_dir.iterdir())
        base_info = info
        print(f"base backup runs: raw (client zstd:1) {', '.join(f'{t:.1f}' for t in raw_client_times)} s; "
              f"raw ({ours_compress}) {', '.join(f'{t:.1f}' for t in raw_times)} s; "
              f"ours {', '.join(f'{t:.1f}' for t in ours_times)} s")

        # ------------------------------------------------------------------ logical dump and pg_restore
        raw_dump = work / "raw-dump"

        def raw_logical() -> None:
            shutil.rmtree(raw_dump, ignore_errors=True)
            subprocess.run([f"{bindir}/pg_dump", *connect, "-d", "crm_test", "-F", "d", "-j", str(jobs), "-Z", "1",
                            "-f", str(raw_dump)], check=True, capture_output=True, env=env_vars)
            tar_attachments()

        raw_dump_times, ours_dump_times = [], []
        logical_ids = []
        for _ in range(args.repeat):
            raw_dump_times.append(timed(raw_logical)[0])
            seconds, linfo = timed(lambda: backup.take_backup(env.settings, "logical"))
            ours_dump_times.append(seconds)
            logical_ids.append(linfo.id)
        for old in logical_ids[:-1]:  # the logical ones are not needed for anything else: save the disk
            shutil.rmtree(backup.get_backup(env.settings, old).path)
        raw_dump_size = sum(p.stat().st_size for p in raw_dump.iterdir())
        print(f"logical dump runs: raw {', '.join(f'{t:.1f}' for t in raw_dump_times)} s; "
              f"ours {', '.join(f'{t:.1f}' for t in ours_dump_times)} s")

        target = start_cluster()  # pg_restore goes to a second cluster: no WAL for the archive to take
        give_to_postgres(raw_dump)
        decrypted = work / "logical-plain"

        def pg_restore(dump: Path, database: str) -> None:
            target.psql(f"DROP DATABASE IF EXISTS {database}")
            target.psql(f"CREATE DATABASE {database}")
            done = subprocess.run(AS_PG + [f"{bindir}/pg_restore", "-h", str(target.socket_dir), "-p",
                                           str(target.port), "-d", database, "-j", str(jobs), "--no-owner",
                                           "--no-privileges", str(dump)], capture_output=True, text=True, cwd="/")
            if done.returncode != 0:
                raise RuntimeError(f"pg_restore of {dump}: {done.stderr[-2000:]}")

        def ours_pg_restore() -> None:
            shutil.rmtree(decrypted, ignore_errors=True)
            backup.decrypt(env.settings, linfo.id, decrypted)
            give_to_postgres(decrypted)
            pg_restore(decrypted / "dump", "from_ours")

        def settled() -> None:
            """Nothing of the previous step left to write: each restore starts on a quiet disk, not
            while the kernel and the checkpointer still write the one before (always the raw one)."""
            target.psql("CHECKPOINT")
            os.sync()

        raw_pgr_times, ours_pgr_times = [], []
        for _ in range(args.repeat):
            settled()
            raw_pgr_times.append(timed(lambda: pg_restore(raw_dump, "from_raw"))[0])
            settled()
            ours_pgr_times.append(timed(ours_pg_restore)[0])
        count = "SELECT count(*) FROM pgbench_accounts"
        assert target.psql(count, "from_ours").strip() == target.psql(count, "from_raw").strip() == env.sql(count)
        target.stop_and_remove()
        target = None
        shutil.rmtree(decrypted, ignore_errors=True)
        print(f"pg_restore runs: raw {', '.join(f'{t:.1f}' for t in raw_pgr_times)} s; "
              f"ours (decrypt + pg_restore) {', '.join(f'{t:.1f}' for t in ours_pgr_times)} s")

        # ------------------------------------------------------------------ WAL replay and restore
        start_lsn = env.sql("SELECT pg_current_wal_lsn()")
        wal_seconds, _ = timed(lambda: write_wal(env, args.wal_mb))
        end_lsn = env.sql("SELECT pg_current_wal_lsn()")
        written = int(env.sql(f"SELECT pg_wal_lsn_diff('{end_lsn}', '{start_lsn}')"))
        env.switch_wal()
        stop_lsn = backup.read_manifest(base_info.path)["stop"]["lsn"]
        replay_bytes = int(env.sql(f"SELECT pg_wal_lsn_diff('{end_lsn}', '{stop_lsn}')"))
        print(f"WAL: {written / 1e6:.0f} MB written in {wal_seconds:.1f} s by updates; "
              f"{replay_bytes / 1e6:.0f} MB to replay after backup {base_info.id}")

        cluster = restore.DebianCluster(env.cluster.version, env.cluster.name)
        plain = work / "base-plain"
        decrypt_seconds, _ = timed(lambda: backup.decrypt(env.settings, base_info.id, plain))
        # The stock procedure for an archive kept compressed as ours is (gzip -1, as wal-push):
        # the same WAL, gzipped, and restore_command gunzip.
        plain_gz = work / "wal-gz"
        plain_gz.mkdir()
        for src in (plain / "wal").iterdir():
            (plain_gz / f"{src.name}.gz").write_bytes(gzip.compress(src.read_bytes(), 1))
        give_to_postgres(plain)
        give_to_postgres(plain_gz)
        commands = {"cp": f'cp {plain}/wal/%f "%p"', "gunzip": f'gunzip -c {plain_gz}/%f.gz > "%p"'}
        raw_data, run_dir = work / "raw-data", work / "raw-run"
        run_dir.mkdir()
        give_to_postgres(run_dir)
        # Each run replays the same WAL: a restore promotes to a new timeline at the end of the
        # archive, and the next run (of either) replays the old one up to that end again.
        raw_runs, raw_gz_runs, ours_runs = [], [], []
        for _ in range(args.repeat):
            for command, runs in (("cp", raw_runs), ("gunzip", raw_gz_runs)):
                shutil.rmtree(raw_data, ignore_errors=True)
                raw_data.mkdir(mode=0o700)
                give_to_postgres(raw_data)
                os.sync()
                extract_s, _ = timed(lambda: subprocess.run(
                    AS_PG + ["tar", "--zstd", "-xf", str(plain / "base.tar.zst"), "-C", str(raw_data)], check=True,
                    cwd="/"))
                runs.append((extract_s, *raw_replay(cluster, commands[command], raw_data, run_dir)))
            os.sync()
            ours_runs.append(timed(lambda: restore.restore(env.settings, base_info.id, cluster=cluster,
                                                           remove_previous=True)))
        shutil.rmtree(raw_data, ignore_errors=True)
        shutil.rmtree(plain, ignore_errors=True)
        shutil.rmtree(plain_gz, ignore_errors=True)
        raw_extract = min(r[0] for r in raw_runs + raw_gz_runs)
        raw_replay_s = min(r[1] for r in raw_runs)
        raw_gz_replay = min(r[1] for r in raw_gz_runs)
        raw_redo = min((r[2] for r in raw_runs if r[2]), default=None)
        raw_both = min(r[0] + r[1] for r in raw_runs)
        raw_gz_both = min(r[0] + r[1] for r in raw_gz_runs)
        ours_restore, result = min(ours_runs, key=lambda run: run[0])
        step_runs = [{s.name: s.seconds for s in r.steps} for _, r in ours_runs]
        steps = {name: min(r[name] for r in step_runs) for name in step_runs[0]}
        ours_both = min(r["extract"] + r["replay"] for r in step_runs)
        ours_parts = ", ".join(f"{r['extract']:.1f} + {r['replay']:.1f}" for r in step_runs)
        print(f"restore runs: raw extract + replay {', '.join(f'{r[0]:.1f} + {r[1]:.1f}' for r in raw_runs)} s; "
              f"with gunzip {', '.join(f'{r[0]:.1f} + {r[1]:.1f}' for r in raw_gz_runs)} s; "
              f"ours {', '.join(f'{t:.1f}' for t, _ in ours_runs)} s (extract + replay {ours_parts} s)")

        # ------------------------------------------------------------------ report
        mb = total_in / 1e6
        dump_mb = (db_bytes + args.attachments_mb * 1024**2) / 1e6
        wal_mb = replay_bytes / 1e6
        best = min
        rows_out = [
            ("raw pg_basebackup client zstd:1 + tar", best(raw_client_times), mb, None),
            ("raw pg_basebackup server zstd + tar", best(raw_times), mb, None),
            ("crm-appliance backup (base)", best(ours_times), mb, best(ours_times) / best(raw_times)),
            ("  the same against client zstd:1", best(ours_times), mb, best(ours_times) / best(raw_client_times)),
            ("raw sha256sum of the raw backup", best(raw_verify_times), checked.stored_bytes / 1e6, None),
            ("crm-appliance backup verify", best(ours_verify_times), checked.stored_bytes / 1e6,
             best(ours_verify_times) / best(raw_verify_times)),
            (f"raw pg_dump -Fd -j {jobs} -Z 1 + tar", best(raw_dump_times), dump_mb, None),
            ("crm-appliance backup (logical)", best(ours_dump_times), dump_mb,
             best(ours_dump_times) / best(raw_dump_times)),
            (f"raw pg_restore -j {jobs} of the raw dump", best(raw_pgr_times), db_bytes / 1e6, None),
            (f"backup decrypt + pg_restore -j {jobs}", best(ours_pgr_times), db_bytes / 1e6,
             best(ours_pgr_times) / best(raw_pgr_times)),
            ("raw tar --zstd -x (decrypted base)", raw_extract, db_bytes / 1e6, None),
            ("crm-appliance restore: extract step", steps["extract"], db_bytes / 1e6, steps["extract"] / raw_extract),
            ("raw replay, restore_command cp (WAL)", raw_replay_s, wal_mb, None),
            ("crm-appliance restore: replay (WAL)", steps["replay"], wal_mb, steps["replay"] / raw_replay_s),
            ("raw replay, restore_command gunzip (WAL)", raw_gz_replay, wal_mb, None),
            ("  ours against gunzip", steps["replay"], wal_mb, steps["replay"] / raw_gz_replay),
            ("raw extract + replay", raw_both, db_bytes / 1e6, None),
            ("crm-appliance restore: extract + replay", ours_both, db_bytes / 1e6, ours_both / raw_both),
            ("raw extract + replay with gunzip", raw_gz_both, db_bytes / 1e6, None),
            ("  ours against extract + gunzip replay", ours_both, db_bytes / 1e6, ours_both / raw_gz_both),
            ("crm-appliance restore (RTO)", ours_restore, db_bytes / 1e6, ours_restore / raw_both),
        ]
        print(f"\n{'':40}{'seconds':>9}{'MB/s':>9}{'ratio':>8}")
        for name, seconds, size_mb, ratio in rows_out:
            print(f"{name:40}{seconds:9.1f}{size_mb / seconds:9.0f}{(f'{ratio:.2f}x' if ratio else ''):>8}")
        print(f"\nbase backup size: ours {base_info.size_bytes / 1e6:.0f} MB, raw {raw_size / 1e6:.0f} MB + "
              f"{att_tar.stat().st_size / 1e6:.0f} MB attachments")
        print(f"logical backup size: ours {linfo.size_bytes / 1e6:.0f} MB, raw dump {raw_dump_size / 1e6:.0f} MB")
        if raw_redo:
            print(f"raw redo as the server logs it: {raw_redo:.1f} s, {wal_mb / raw_redo:.0f} MB/s")
        print(f"decrypt of the base backup for the raw replay: {decrypt_seconds:.1f} s")
        print("restore steps (of the fastest restore): " + ", ".join(f"{s.name} {s.seconds:.1f} s"
                                                                     for s in result.steps))
        print(f"load after the runs: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    finally:
        if target is not None:
            target.stop_and_remove()
        shutil.rmtree(work, ignore_errors=True)
        env.close()


if __name__ == "__main__":
    main()
