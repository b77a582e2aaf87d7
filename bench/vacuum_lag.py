"""What autovacuum's thresholds cost the search walks while seats keep changing records.

    .venv/bin/python bench/load/keep_sets.py --dir /tmp/sets --scales 1
    .venv/bin/python bench/vacuum_lag.py --password-file /tmp/sets/seat-password /tmp/sets/crm_test.toml
    .venv/bin/python bench/vacuum_lag.py --batch 5000 --password-file ... /tmp/sets/crm_test.toml

A list or search walks an index-only scan (migration 0008) and fetches from the table every
row changed since the last VACUUM; changed rows are the newest, the first a walk passes.
For PostgreSQL's default thresholds (a fifth of the table) and then migration 0009's (a
thousand rows), in the same process on the same data: VACUUM, then ``--rate`` random rows per
second of each of contact, lead and activity get ``updated_at = now()`` (as an edit does)
for ``--minutes``, while every ``--every`` seconds twelve searches of a manager and the boss
are measured: SQL milliseconds summed (best of three per page) and the heap fetches their
statements make (EXPLAIN ANALYZE). Prints each sample and the mean per setting; leaves
migration 0009's settings in place.

The trickle compresses a working day into minutes, so autovacuum (its turn comes every
minute) runs beside the searches on two cores. ``--batch N`` is the other view: N rows per
table changed at once, then ``--settle`` seconds for autovacuum's turn, then the searches,
as when edits are spread over hours and a VACUUM comes between them and the next search.
"""

from __future__ import annotations

import argparse
import importlib
import random
import statistics
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent / "load"))

from run import instrumented_app, logged_in_client  # noqa: E402  (run.py puts the project on sys.path)

from webapp import prepared  # noqa: E402

MIGRATION = importlib.import_module("webapp.migrations.0009_vacuum_thresholds")
CHANGED_TABLES = ("contact", "lead", "activity")
SEATS = {"manager": 2, "boss": 1}  # demo seats: 1 is the boss, 2-6 the managers
PAGES = ("/contacts/?q=王", "/contacts/?q=Apex", "/leads/?q=华信", "/leads/?q=陈",
         "/search/?q=华信", "/activities/?q=call")


def plan_heap_fetches(plan: dict) -> int:
    return (plan.get("Heap Fetches") or 0) + sum(plan_heap_fetches(p) for p in plan.get("Plans", []))


def measure(app, db, captured, password: str) -> tuple[float, int]:
    """Twelve searches: SQL ms summed (best of three each) and their statements' heap fetches."""
    total_ms, fetches = 0.0, 0
    for seat in SEATS.values():
        client = logged_in_client(app, seat, password)
        for path in PAGES:
            best = None
            for _ in range(3):
                captured.clear()
                if client.get(path).status_code != 200:
                    raise SystemExit(f"{path} answered an error for seat {seat}")
                ms = sum(c[2] for c in captured if not c[0].startswith("PREPARE"))
                best = ms if best is None else min(best, ms)
            total_ms += best
            for sql, params, _ in list(captured):
                sql, params = prepared.as_select(sql, params)
                if sql.lstrip().upper().startswith(("SELECT", "WITH")):
                    with db.connection_context():
                        cursor = db.cursor()
                        cursor.execute("EXPLAIN (ANALYZE, FORMAT JSON) " + sql, params)
                        fetches += plan_heap_fetches(cursor.fetchone()[0][0]["Plan"])
    return total_ms, fetches


def change_rows(db, rate: float, stop: threading.Event, changed: list[int]) -> None:
    """``rate`` random rows per second of each changed table get a new ``updated_at``."""
    while not stop.wait(1.0):
        change_batch(db, int(rate))
        changed[0] += int(rate)


def change_batch(db, rows: int) -> None:
    """``rows`` random rows of each changed table get a new ``updated_at``, as an edit does."""
    execute = type(db).execute_sql  # not the instrumented one: these statements are not the searches'
    with db.connection_context():
        for table in CHANGED_TABLES:
            low, high = execute(db, f'SELECT min(id), max(id) FROM "{table}"').fetchone()
            chosen = [random.randint(low, high) for _ in range(rows)]
            execute(db, f'UPDATE "{table}" SET updated_at = now() WHERE id = ANY(%s)', (chosen,))


def set_thresholds(db, defaults: bool) -> None:
    """PostgreSQL's defaults on the changed tables, or migration 0009 applied again; then VACUUM."""
    with db.connection_context():
        if defaults:
            for table in CHANGED_TABLES:
                db.execute_sql(f'ALTER TABLE "{table}" RESET ({", ".join(MIGRATION.THRESHOLDS)})')
        else:
            MIGRATION.up(None, db)
        for table in CHANGED_TABLES:
            db.execute_sql(f'VACUUM "{table}"')


def autovacuum_count(db) -> int:
    with db.connection_context():
        return db.execute_sql("SELECT sum(autovacuum_count) FROM pg_stat_user_tables WHERE relname = ANY(%s)",
                              (list(CHANGED_TABLES),)).fetchone()[0]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config", type=Path, help="a kept data set's config (bench/load/keep_sets.py)")
    parser.add_argument("--password-file", type=Path, required=True, help="the demo seats' password")
    parser.add_argument("--minutes", type=float, default=4, help="changing rows for this long per setting [4]")
    parser.add_argument("--rate", type=float, default=20, help="rows changed per second in each table [20]")
    parser.add_argument("--every", type=float, default=30, help="seconds between measurements [30]")
    parser.add_argument("--batch", type=int, metavar="N",
                        help="instead: change N rows per table at once, wait --settle s (autovacuum's turn), "
                             "then measure three times: edits spread over a working day, vacuumed in between")
    parser.add_argument("--settle", type=float, default=90, help="seconds to wait after --batch [90]")
    args = parser.parse_args()
    password = args.password_file.read_text().strip()
    app, db, captured = instrumented_app(args.config)
    means = {}
    try:
        for label, defaults in (("PostgreSQL's defaults", True), ("migration 0009", False)):
            set_thresholds(db, defaults)
            vacuums_before = autovacuum_count(db)
            if args.batch:
                print(f"{label}: fresh VACUUM, SQL {measure(app, db, captured, password)[0]:6.1f} ms", flush=True)
                change_batch(db, args.batch)
                time.sleep(args.settle)
                samples = [measure(app, db, captured, password) for _ in range(3)]
                means[label] = statistics.mean(ms for ms, _ in samples)
                print(f"{label}: {args.batch} rows changed per table, {args.settle:.0f} s later: SQL "
                      + ", ".join(f"{ms:.1f} ms ({fetches} heap fetches)" for ms, fetches in samples)
                      + f"; autovacuum runs on the changed tables {autovacuum_count(db) - vacuums_before}",
                      flush=True)
                continue
            stop, changed, samples = threading.Event(), [0], []
            changer = threading.Thread(target=change_rows, args=(db, args.rate, stop, changed), daemon=True)
            changer.start()
            started = time.monotonic()
            try:
                while time.monotonic() - started < args.minutes * 60:
                    ms, fetches = measure(app, db, captured, password)
                    samples.append(ms)
                    print(f"{label}: {changed[0]:>5} rows changed per table, SQL {ms:6.1f} ms, "
                          f"heap fetches {fetches:>6}", flush=True)
                    time.sleep(max(0.0, args.every - (time.monotonic() - started) % args.every))
            finally:
                stop.set()
                changer.join()
            means[label] = statistics.mean(samples)
            print(f"{label}: mean SQL {means[label]:.1f} ms over {len(samples)} samples; "
                  f"autovacuum runs on the changed tables {autovacuum_count(db) - vacuums_before}", flush=True)
    finally:
        set_thresholds(db, defaults=False)
        db.close_all()
    (before, after) = means.values()
    how = (f"{args.settle:.0f} s after {args.batch} rows per table changed" if args.batch
           else f"while {args.rate:g} rows/s per table change")
    print(f"== twelve searches' SQL {how}: defaults {before:.1f} ms, migration 0009 {after:.1f} ms "
          f"({after / before:.2f}x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
