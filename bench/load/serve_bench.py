"""``crm-appliance serve`` with one bench-only endpoint added: the stack's ceiling.

    .venv/bin/python bench/load/serve_bench.py --config C.toml serve --bind 127.0.0.1:P --workers W --threads T

Runs the real command (installer.cli, the same checks, the same gunicorn gthread
server and app factory) in this process, after wrapping the app factory so that each
worker's app also answers ``GET /_bench/ceiling``: one row read through the app's own
connection pool (``before_request`` takes the connection, ``teardown_request`` gives it
back, as for every page), no login, no template. The product has no such endpoint and
gets none: it exists only when the server is started through this file.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

CEILING_PATH = "/_bench/ceiling"


def add_ceiling(app):
    """Register the ceiling endpoint on a built app and let it past the login check."""
    from webapp import auth

    db = app.extensions["crm_db"]

    def ceiling():
        row = db.execute_sql('SELECT id, name FROM "user" ORDER BY id LIMIT 1').fetchone()
        return {"id": row[0]} if row else {"id": None}

    app.add_url_rule(CEILING_PATH, "bench_ceiling", ceiling)
    auth.PUBLIC_ENDPOINTS.add("bench_ceiling")
    return app


def main() -> None:
    import webapp
    from installer import cli

    real_create_app = webapp.create_app

    def create_app_with_ceiling(settings, database=None):
        return add_ceiling(real_create_app(settings, database=database))

    # installer.serve.CrmServer.load() imports create_app from webapp when each worker starts.
    webapp.create_app = create_app_with_ceiling
    cli.main(args=sys.argv[1:], prog_name="crm-appliance")


if __name__ == "__main__":
    main()
