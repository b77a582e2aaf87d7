"""How long the diagnostics bundle takes to build, and how big it is, on a 50-seat data set.

A throwaway PostgreSQL cluster gets the demo data set (``crm-appliance demo-data``: 50 seats,
3 years, ``--scale``), full logs (web access lines, an install log, the scheduler's) and two
months of the uptime ledger at one probe every 30 s. Then the bundle is built twice in the
same process: first for the same appliance with an empty database (the baseline), then with
the data set. Issue 5's goals: well under 10 s and under 5 MB.

    .venv/bin/python bench/diagnostics_bundle.py [--scale 1] [--log-lines 2000]

Run as root (the cluster is made with pg_createcluster). Prints one line per figure and a
JSON summary; touches nothing of an installed appliance.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import secrets
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from appliance import config, demo_data, diagnostics  # noqa: E402
from appliance.db import migrate, open_database  # noqa: E402
from tests.conftest import make_settings  # noqa: E402
from tests.pgcluster import start_cluster  # noqa: E402


def fill_logs(settings: config.Settings, lines: int) -> None:
    """Logs as a busy appliance leaves them: more lines than the bundle keeps."""
    log_dir = settings.appliance.log_dir
    log_dir.mkdir(parents=True, exist_ok=True)
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%d/%b/%Y:%H:%M:%S +0000")
    with open(log_dir / "crm-appliance-web.log", "w") as fh:
        for i in range(lines * 3):
            fh.write(f'[{stamp}] 10.0.{i % 250}.{i % 200} "GET /contacts/{i}?q=wang" 200 {5000 + i % 900} '
                     f'{12 + i % 40}ms\n')
    with open(log_dir / "crm-appliance-scheduler.log", "w") as fh:
        for i in range(lines * 2):
            fh.write(f"2026-11-23 01:30:{i % 60:02d},000 INFO apscheduler.executors.default: Job \"uptime_probe\" "
                     f"executed successfully\n")
    with open(log_dir / "install-20261101T010000Z.log", "w") as fh:
        fh.write(json.dumps({"event": "crm_appliance_start", "kind": "install", "profile": "standard-50",
                             "plan": {"workers": 4}, "accepted_risks": []}) + "\n")
        for i in range(lines):
            fh.write(json.dumps({"event": "runner_on_ok", "event_data": {"task": f"Task {i}", "role": "webapp",
                                                                          "host": "localhost", "res": {}}}) + "\n")


def fill_ledger(settings: config.Settings, days: int = 61, interval: int = 30) -> int:
    """Two months of probes, one line each, as appliance.monitor writes them."""
    directory = settings.appliance.data_dir / "monitor"
    directory.mkdir(parents=True, exist_ok=True)
    now = int(time.time())
    files: dict[str, list[str]] = {}
    count = 0
    for t in range(now - days * 86400, now, interval):
        month = dt.datetime.fromtimestamp(t, dt.timezone.utc).strftime("%Y-%m")
        files.setdefault(month, []).append(f"{t} 1 {8 + t % 20} 200\n")
        count += 1
    for month, lines in files.items():
        (directory / f"probes-{month}.log").write_text("".join(lines))
    return count


def build(settings: config.Settings, out_dir: Path, host: diagnostics.HostPaths, label: str):
    output = out_dir / f"{label}.tar.gz"
    started = time.monotonic()
    result = diagnostics.build_bundle(settings, output, host=host)
    seconds = time.monotonic() - started
    size = output.stat().st_size
    print(f"{label:<26} {seconds:6.2f} s  {size / 1e6:6.2f} MB  {len(result.files)} files", flush=True)
    return seconds, size


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", type=float, default=1.0, help="demo data scale [default: 1, the 50-seat set]")
    parser.add_argument("--log-lines", type=int, default=2000, help="[diagnostics] log_lines [default: 2000]")
    args = parser.parse_args()

    cluster = start_cluster()
    work = Path(tempfile.mkdtemp(prefix="crm-bench-diag-"))
    try:
        os.chmod(work, 0o700)
        password = cluster.create_app_database("crm_test", "crm")
        config.write_secret(work / "db-password", password)
        config.write_secret(work / "secret-key", secrets.token_urlsafe(48))
        settings = make_settings(cluster, work, diagnostics={"log_lines": args.log_lines})
        settings.appliance.data_dir.mkdir(parents=True)
        db = open_database(settings)
        migrate(db)
        db.close_all()
        fill_logs(settings, args.log_lines)
        probes = fill_ledger(settings)
        # Only the test's own parts: no installed release, supervisord or nginx of this host.
        host = diagnostics.HostPaths(release=work / "none", maintenance_flag=work / "none",
                                     supervisord_conf=work / "none", nginx_error_log=work / "none",
                                     nginx_pid=work / "none", host_commands=False)
        print(f"ledger: {probes} probes over 61 days; logs: {args.log_lines * 3} web lines", flush=True)

        base_s, base_b = build(settings, work, host, "empty database (baseline)")
        started = time.monotonic()
        made = demo_data.generate(settings, seats=50, years=3, scale=args.scale)
        print(f"demo data: {made} ({time.monotonic() - started:.0f} s)", flush=True)
        data_s, data_b = build(settings, work, host, "with the 50-seat data set")
        print(json.dumps({"scale": args.scale, "records": sum(made.counts.values()),
                          "bundle_seconds": round(data_s, 2), "bundle_mb": round(data_b / 1e6, 2),
                          "baseline_seconds": round(base_s, 2), "baseline_mb": round(base_b / 1e6, 2),
                          "seconds_ratio": round(data_s / base_s, 2),
                          "goal_met": data_s < 10 and data_b < 5e6}))
        return 0 if data_s < 10 and data_b < 5e6 else 1
    finally:
        cluster.stop_and_remove()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
