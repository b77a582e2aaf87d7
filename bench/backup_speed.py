"""Backup, verify and restore speed next to the raw PostgreSQL tools, in the same run.

Builds a throwaway cluster that archives its WAL with our wal-push, fills it with pgbench
tables plus a table of random text (which compresses like real records do, unlike
pgbench's padding), and attachment files of random bytes. Then times, on the same data:

- raw ``pg_basebackup -Ft -X none -c fast --compress=zstd:1`` into a directory (baseline)
  against ``take_backup(kind="base")`` (the same stream, encrypted in chunks, plus WAL
  copies, attachments and the manifest);
- ``sha256sum`` of the raw backup (baseline) against ``verify`` (checksums and decryption);
- ``tar --zstd -x`` of the raw backup (baseline) against ``restore`` (verify, extract,
  replay, swap, start: the RTO), after some writes to replay.

    .venv/bin/python bench/backup_speed.py [--scale 50] [--text-mb 300] [--attachments-mb 200] [--repeat 3]

Run as root (pg_createcluster). Backup and verify run ``--repeat`` times, alternating with
their baselines, and the best time of each counts (small hosts are noisy). Prints seconds,
MB/s and each of ours as a ratio of its baseline.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from appliance import backup, restore  # noqa: E402
from tests.test_backup import make_backup_env  # noqa: E402


def timed(fn):
    started = time.perf_counter()
    value = fn()
    return time.perf_counter() - started, value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", type=int, default=50, help="pgbench scale (about 15 MB each)")
    parser.add_argument("--text-mb", type=int, default=300, help="MB of random text rows")
    parser.add_argument("--attachments-mb", type=int, default=200, help="MB of attachment files")
    parser.add_argument("--repeat", type=int, default=3, help="runs of backup and verify; the best counts")
    args = parser.parse_args()
    if os.geteuid() != 0:
        sys.exit("run as root: the benchmark creates a throwaway cluster with pg_createcluster")

    env = make_backup_env()
    work = Path(tempfile.mkdtemp(prefix="crm-bench-"))
    try:
        bindir = f"/usr/lib/postgresql/{env.cluster.version}/bin"
        as_pg = ["runuser", "-u", "postgres", "--"]
        print(f"generating: pgbench scale {args.scale}, {args.text_mb} MB of text, {args.attachments_mb} MB of attachments")
        subprocess.run(as_pg + [f"{bindir}/pgbench", "-i", "-q", "-s", str(args.scale), "-h", str(env.cluster.socket_dir),
                                "-p", str(env.cluster.port), "crm_test"], check=True, capture_output=True, cwd="/")
        rows = args.text_mb * 1024**2 // 330
        env.sql("CREATE TABLE notes_bench (id bigserial PRIMARY KEY, body text)")
        env.sql(f"INSERT INTO notes_bench (body) SELECT string_agg(md5(random()::text), ' ') FROM "
                f"generate_series(1, {rows}) g, generate_series(1, 10) k GROUP BY g")
        env.sql("CHECKPOINT", "postgres")
        root = backup.attachments_dir(env.settings)
        for i in range(args.attachments_mb):
            path = root / f"{i % 256:02x}" / f"file-{i}"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(os.urandom(1024**2))
        db_bytes = int(env.sql("SELECT sum(pg_database_size(datname)) FROM pg_database", "postgres"))
        total_in = db_bytes + args.attachments_mb * 1024**2
        print(f"database {db_bytes / 1e6:.0f} MB + attachments {args.attachments_mb} MB")

        raw_dir = work / "raw"
        env_vars = {**os.environ, "PGPASSWORD": env.settings.backup.db_password_file.read_text().strip()}
        raw_cmd = [f"{bindir}/pg_basebackup", "-h", "127.0.0.1", "-p", str(env.cluster.port), "-U", "crm_backup",
                   "-D", str(raw_dir), "-F", "t", "-X", "none", "-c", "fast", "--compress=zstd:1"]

        def raw() -> None:
            shutil.rmtree(raw_dir, ignore_errors=True)
            subprocess.run(raw_cmd, check=True, capture_output=True, env=env_vars)
            subprocess.run(["tar", "-cf", str(work / "att.tar"), "-C", str(root), "."], check=True)

        raw_times, ours_times, raw_verify_times, ours_verify_times, count_times = [], [], [], [], []
        for _ in range(args.repeat):
            raw_times.append(timed(raw)[0])
            marks: dict[str, float] = {}

            def mark(message: str) -> None:
                marks.setdefault(message.split(" ")[0], time.perf_counter())

            seconds, info = timed(lambda: backup.take_backup(env.settings, "base", progress=mark))
            ours_times.append(seconds)
            count_times.append(marks["attachments"] - marks["row"])  # the drill's row counts
            raw_verify_times.append(timed(lambda: subprocess.run(
                ["sha256sum", *map(str, raw_dir.iterdir()), str(work / "att.tar")], check=True,
                capture_output=True))[0])
            seconds, checked = timed(lambda: backup.verify(env.settings, info.id))
            ours_verify_times.append(seconds)
        raw_backup, ours_backup = min(raw_times), min(ours_times)
        counting = count_times[ours_times.index(ours_backup)]
        raw_verify, ours_verify = min(raw_verify_times), min(ours_verify_times)
        raw_size = sum(p.stat().st_size for p in raw_dir.iterdir())
        print(f"backup runs: raw {', '.join(f'{t:.1f}' for t in raw_times)} s; "
              f"ours {', '.join(f'{t:.1f}' for t in ours_times)} s")

        env.sql("INSERT INTO notes_bench (body) SELECT md5(random()::text) FROM generate_series(1, 200000)")
        env.switch_wal()
        extract = work / "extract"
        extract.mkdir()
        raw_restore, _ = timed(lambda: subprocess.run(["tar", "--zstd", "-xf", str(raw_dir / "base.tar.zst"), "-C",
                                                       str(extract)], check=True))
        cluster = restore.DebianCluster(env.cluster.version, env.cluster.name)
        ours_restore, result = timed(lambda: restore.restore(env.settings, info.id, cluster=cluster,
                                                             remove_previous=True))

        mb = total_in / 1e6
        print(f"\n{'':34}{'seconds':>9}{'MB/s':>9}{'ratio':>8}")
        rows_out = [
            ("raw pg_basebackup + tar attachments", raw_backup, mb, None),
            ("crm-appliance backup (base)", ours_backup, mb, ours_backup / raw_backup),
            ("  without the drill's row counts", ours_backup - counting, mb, (ours_backup - counting) / raw_backup),
            ("raw sha256sum of the raw backup", raw_verify, checked.stored_bytes / 1e6, None),
            ("crm-appliance backup verify", ours_verify, checked.stored_bytes / 1e6, ours_verify / raw_verify),
            ("raw tar -x of the raw backup", raw_restore, db_bytes / 1e6, None),
            ("crm-appliance restore (RTO)", ours_restore, db_bytes / 1e6, ours_restore / raw_restore),
        ]
        for name, seconds, size_mb, ratio in rows_out:
            print(f"{name:34}{seconds:9.1f}{size_mb / seconds:9.0f}{(f'{ratio:.2f}x' if ratio else ''):>8}")
        print(f"\nbackup size: ours {info.size_bytes / 1e6:.0f} MB, raw {raw_size / 1e6:.0f} MB + "
              f"{(work / 'att.tar').stat().st_size / 1e6:.0f} MB attachments")
        print("restore steps: " + ", ".join(f"{s.name} {s.seconds:.1f} s" for s in result.steps))
    finally:
        shutil.rmtree(work, ignore_errors=True)
        env.close()


if __name__ == "__main__":
    main()
