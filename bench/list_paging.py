"""List pages stay as fast deep in a large table as on the first page (keyset paging, no count).

Builds a throwaway cluster with N accounts over 50 seats, then times, through the
real Flask app, the first list page and a page deep in the table reached by its
cursor, for an agent (own records) and the boss (all records). The baseline, in
the same run, is the same page fetched with OFFSET, the usual way lists page.

    .venv/bin/python bench/list_paging.py [--rows 200000] [--repeat 30]

Prints median milliseconds and each deep page's cost as a ratio of the first page.
"""

from __future__ import annotations

import argparse
import base64
import json
import secrets
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from appliance import config, seats  # noqa: E402
from appliance.db import migrate, open_database  # noqa: E402
from tests.pgcluster import start_cluster  # noqa: E402

PASSWORD = "bench password 123"


def median_ms(fn, repeat: int) -> float:
    fn()  # warm up
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def cursor(updated_at, rid) -> str:
    return base64.urlsafe_b64encode(json.dumps([updated_at.isoformat(), rid]).encode()).decode().rstrip("=")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--repeat", type=int, default=30)
    args = parser.parse_args()

    cluster = start_cluster()
    try:
        with tempfile.TemporaryDirectory() as tmp:
            tmp = Path(tmp)
            password = cluster.create_app_database("crm_bench", "crm")
            config.write_secret(tmp / "pw", password)
            config.write_secret(tmp / "key", secrets.token_urlsafe(48))
            settings = config.from_mapping({
                "database": {"port": cluster.port, "name": "crm_bench", "password_file": str(tmp / "pw")},
                "web": {"public_url": "http://127.0.0.1", "secret_key_file": str(tmp / "key"), "page_size": 50},
                "seats": {"licensed": 100}}, source="<bench>")
            db = open_database(settings)
            migrate(db)
            from webapp import create_app
            from webapp.permissions import ensure_builtin_roles

            with db.connection_context():
                ensure_builtin_roles()
                people = [seats.add_seat(settings, f"s{i}@bench.cn", f"Seat {i}", "boss" if i == 0 else "agent")
                          for i in range(50)]
                for who in (people[0], people[1]):
                    seats.set_password(seats.find_token(who.link.rsplit("/", 1)[1]), PASSWORD)
                t0 = time.perf_counter()
                db.execute_sql(
                    "INSERT INTO account (owner_id, created_at, updated_at, name, city) "
                    "SELECT 1 + (i %% 50), now() - i * interval '1 second', now() - i * interval '1 second', "
                    "'Company ' || i, 'City ' || (i %% 300) FROM generate_series(1, %s) AS i", (args.rows,))
                db.execute_sql("ANALYZE account")
                print(f"inserted {args.rows:,} accounts in {time.perf_counter() - t0:.1f} s")

            app = create_app(settings, database=db)
            results = []
            for label, who, where in (("agent (own records)", people[1].user, "owner_id = %s" % people[1].user.id),
                                      ("boss (all records)", people[0].user, "true")):
                client = app.test_client()
                token = client.get("/auth/login").get_data(as_text=True).split('name="csrf_token" type="hidden" value="')[1].split('"')[0]
                client.post("/auth/login", data={"email": who.email, "password": PASSWORD, "csrf_token": token})
                with db.connection_context():
                    total = db.execute_sql(f"SELECT count(*) FROM account WHERE {where}").fetchone()[0]
                    depth = int(total * 0.9)
                    upd, rid = db.execute_sql(
                        f"SELECT updated_at, id FROM account WHERE deleted_at IS NULL AND {where} "
                        "ORDER BY updated_at DESC, id DESC OFFSET %s LIMIT 1", (depth,)).fetchone()
                first = median_ms(lambda: client.get("/accounts/"), args.repeat)
                deep = median_ms(lambda: client.get(f"/accounts/?after={cursor(upd, rid)}"), args.repeat)

                def offset_page(offset):
                    with db.connection_context():
                        db.execute_sql(f"SELECT * FROM account WHERE deleted_at IS NULL AND {where} "
                                       "ORDER BY updated_at DESC, id DESC OFFSET %s LIMIT 51", (offset,)).fetchall()

                offset_first = median_ms(lambda: offset_page(0), args.repeat)
                offset_deep = median_ms(lambda: offset_page(depth), args.repeat)
                results.append((label, total, depth, first, deep, offset_first, offset_deep))
            db.close_all()
    finally:
        cluster.stop_and_remove()

    print()
    print(f"{'seat':22} {'rows seen':>10} {'depth':>8} | {'app first':>9} {'app deep':>9} {'ratio':>6} |"
          f" {'OFFSET first':>12} {'OFFSET deep':>11} {'ratio':>7}")
    for label, total, depth, first, deep, o_first, o_deep in results:
        print(f"{label:22} {total:>10,} {depth:>8,} | {first:>7.1f}ms {deep:>7.1f}ms {deep / first:>6.2f} |"
              f" {o_first:>10.2f}ms {o_deep:>9.2f}ms {o_deep / o_first:>7.1f}")
    print("\napp = a whole list page through Flask (keyset cursor); OFFSET = the bare SQL query alone, for comparison")


if __name__ == "__main__":
    main()
