"""Wall time of a fresh install and of an idempotent re-run, on this machine.

"Fresh" starts from the uninstalled state: ``uninstall`` first (services, nginx and the
PostgreSQL cluster stopped; the program, the virtual environment, the units and the site
removed), so the install rebuilds the virtual environment (pip, with its cache), writes
every file, starts every service and waits for the CRM to answer through nginx. Debian's
packages stay installed, and the data too: apt's download and unpack time is not in the
number (docs/install.md also records a first install with nginx and supervisor not yet
installed).
The re-run is the same install again, which must change nothing.

    .venv/bin/python bench/install_time.py [--profile eval] [--runs 1]

Run as root on the appliance host; it leaves the appliance installed and running.
Prints one line per measurement and a JSON summary.
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from rich.console import Console  # noqa: E402

from installer import deploy  # noqa: E402


def _ctx(profile: str) -> deploy.InstallContext:
    return deploy.InstallContext(profile=profile, yes=True, console=Console(file=io.StringIO()))


def _timed(what, profile: str):
    started = time.monotonic()
    result = what(_ctx(profile))
    return time.monotonic() - started, result


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
    print(json.dumps({"profile": args.profile, "runs": args.runs,
                      "fresh_install_s": round(statistics.median(fresh), 1),
                      "rerun_s": round(statistics.median(rerun), 1)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
