"""Build the load test's data sets and keep them, for ``bench/search_cost.py``, psql and EXPLAIN.

The same build as ``bench/load/run.py`` (its ``Appliance.build``: the real ``crm-appliance
demo-data`` in a throwaway cluster with the sizing plan's settings), without the load
phases, and nothing is removed at the end. Prints what to run next and how to drop the
cluster::

    .venv/bin/python bench/load/keep_sets.py --dir /tmp/sets [--seats 1000] [--scales 1,10]
    .venv/bin/python bench/search_cost.py --password-file /tmp/sets/seat-password \\
        /tmp/sets/crm_test.toml /tmp/sets/crm_scale10.toml
"""

from __future__ import annotations

import argparse
import secrets
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from run import Appliance, log  # noqa: E402  (run.py puts the project on sys.path)

from appliance import config  # noqa: E402
from sizing.host import gather  # noqa: E402
from sizing.plan import Resources, make_plan  # noqa: E402
from tests.pgcluster import start_cluster  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", type=Path, required=True, help="new directory for the configs and secrets")
    parser.add_argument("--seats", type=int, default=1000, help="demo seats, as the load test's largest phase [1000]")
    parser.add_argument("--scales", default="1,10", help="data set scales [1,10]")
    args = parser.parse_args()
    args.dir.mkdir(mode=0o700, parents=True)
    pg = make_plan(50, Resources.of_host(gather(tempfile.gettempdir(), ports=()))).postgresql_conf()
    pg["shared_preload_libraries"] = "pg_stat_statements"
    cluster = start_cluster(pg)
    password = secrets.token_urlsafe(18)
    config.write_secret(args.dir / "db-password", cluster.create_app_database("crm_test", "crm"))
    config.write_secret(args.dir / "secret-key", secrets.token_urlsafe(48))
    config.write_secret(args.dir / "seat-password", password)
    app = Appliance(args.dir, cluster, password, args.dir / "seat-password", 5, 8)
    configs = []
    for i, scale in enumerate(float(s) for s in args.scales.split(",")):
        name = "crm_test" if i == 0 else f"crm_scale{scale:g}".replace(".", "_")
        log(f"building demo data: {args.seats} seats, records of --scale {scale:g} ({name})")
        path, summary, seconds = app.build(name, args.seats, scale)
        log(f"  {summary} ({seconds:.0f} s)")
        cluster.psql("VACUUM ANALYZE", database=name)
        cluster.psql("CREATE EXTENSION IF NOT EXISTS pg_stat_statements", database=name)
        configs.append(str(path))
    for setting in ("fsync", "synchronous_commit", "full_page_writes"):  # as run.py: durable after the bulk load
        cluster.psql(f"ALTER SYSTEM SET {setting} = on")
    cluster.psql("SELECT pg_reload_conf()")
    print(f"kept: cluster {cluster.name} on port {cluster.port} in {cluster.base}; configs {' '.join(configs)}")
    print(f"next: .venv/bin/python bench/search_cost.py --password-file {args.dir / 'seat-password'} "
          + " ".join(configs))
    print(f"drop: pg_dropcluster --stop {cluster.version} {cluster.name}; rm -rf {cluster.base} {args.dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
