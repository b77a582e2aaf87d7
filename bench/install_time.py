"""Wall time of a fresh install, an idempotent re-run and an upgrade, on this machine.

"Fresh" starts from the uninstalled state: ``uninstall`` first (services, nginx and the
PostgreSQL cluster stopped; the program, the virtual environment, the units and the site
removed), so the install rebuilds the virtual environment (pip, with its cache), writes
every file, starts every service and waits for the CRM to answer through nginx. Debian's
packages stay installed, and the data too: apt's download and unpack time is not in the
number (docs/install.md also records a first install with nginx and supervisor not yet
installed).
The re-run is the same install again, which must change nothing.

The upgrade switches to another release (this source tree plus one migration, built in a
temporary directory) and back: its wall time, and how long nginx answered with the
maintenance page, polled every 0.1 s. The ratio to the re-run, measured in the same
process, says what the release switch costs beyond an install that changes nothing.

    .venv/bin/python bench/install_time.py [--profile eval] [--runs 1]

Run as root on the appliance host; it leaves the appliance installed and running.
Prints one line per measurement and a JSON summary.
"""

from __future__ import annotations

import argparse
import io
import json
import shutil
import ssl
import statistics
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from rich.console import Console  # noqa: E402

from installer import deploy  # noqa: E402


def _ctx(profile: str, source_dir: Path = deploy.SOURCE_DIR) -> deploy.InstallContext:
    return deploy.InstallContext(profile=profile, yes=True, console=Console(file=io.StringIO()),
                                 source_dir=source_dir)


def _timed(what, profile: str, source_dir: Path = deploy.SOURCE_DIR):
    started = time.monotonic()
    result = what(_ctx(profile, source_dir))
    return time.monotonic() - started, result


def next_release(where: Path) -> Path:
    """This source tree plus one migration: another release, with a schema change to apply."""
    for path in deploy.source_files(deploy.SOURCE_DIR):
        dest = where / path.relative_to(deploy.SOURCE_DIR)
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, dest)
    (where / "webapp" / "migrations" / "0999_bench_upgrade.py").write_text(
        'def up(migrator, db):\n    db.execute_sql(\'CREATE TABLE IF NOT EXISTS "bench_upgrade" (id int)\')\n')
    return where


class MaintenanceClock(threading.Thread):
    """Seconds nginx answered 503 (the maintenance page) while it runs, polled every 0.1 s."""

    def __init__(self):
        super().__init__(daemon=True)
        self.stop, self.seconds = threading.Event(), 0.0
        self.context = ssl.create_default_context()
        self.context.check_hostname, self.context.verify_mode = False, ssl.CERT_NONE

    def run(self):
        last = time.monotonic()
        while not self.stop.is_set():
            try:
                with urllib.request.urlopen("https://127.0.0.1/auth/login", timeout=5, context=self.context):
                    down = False
            except urllib.error.HTTPError as exc:
                down = exc.code == 503
            except OSError:
                down = True
            now = time.monotonic()
            if down:
                self.seconds += now - last
            last = now
            time.sleep(0.1)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", default="eval", help="sizing profile passed to install [default: eval]")
    parser.add_argument("--runs", type=int, default=1, help="fresh install + re-run pairs [default: 1]")
    args = parser.parse_args()

    # Warm up: the release wheel is built once per source tree and cached; building it is
    # part of the first install from a new source, not of the install itself.
    _timed(deploy.install, args.profile)

    fresh, rerun = [], []
    for n in range(1, args.runs + 1):
        seconds, _ = _timed(deploy.uninstall, args.profile)
        print(f"run {n}: uninstall             {seconds:6.1f} s", flush=True)
        seconds, result = _timed(deploy.install, args.profile)
        fresh.append(seconds)
        print(f"run {n}: fresh install         {seconds:6.1f} s  ({result.changed} changed)", flush=True)
        seconds, result = _timed(deploy.install, args.profile)
        rerun.append(seconds)
        print(f"run {n}: idempotent re-run     {seconds:6.1f} s  ({result.changed} changed)", flush=True)
        if result.changed:
            print(f"re-run changed {result.changed} task(s): {result.changed_tasks}", file=sys.stderr)
            return 1
    upgrade, downtime = [], []
    with tempfile.TemporaryDirectory(prefix="crm-bench-release-") as tmp:
        other = next_release(Path(tmp))
        _timed(deploy.build_release, args.profile, other)  # the wheel is built before the clock starts
        for source, label in ((other, "upgrade to a new release"), (deploy.SOURCE_DIR, "upgrade back")):
            clock = MaintenanceClock()
            clock.start()
            seconds, result = _timed(deploy.upgrade, args.profile, source)
            clock.stop.set()
            clock.join()
            upgrade.append(seconds)
            downtime.append(clock.seconds)
            print(f"{label:<26} {seconds:6.1f} s  (maintenance page {clock.seconds:.1f} s, "
                  f"{result.previous_version} -> {result.version})", flush=True)
    print(json.dumps({"profile": args.profile, "runs": args.runs,
                      "fresh_install_s": round(statistics.median(fresh), 1),
                      "rerun_s": round(statistics.median(rerun), 1),
                      "upgrade_s": round(statistics.median(upgrade), 1),
                      "upgrade_maintenance_page_s": round(statistics.median(downtime), 1),
                      "upgrade_to_rerun_ratio": round(statistics.median(upgrade) / statistics.median(rerun), 2)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
