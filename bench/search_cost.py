"""SQL time of every list and search the seat load test makes, per role, on demo data sets.

Each data set is named by an appliance config whose database holds ``crm-appliance
demo-data`` (as ``bench/load/run.py`` builds them; its seats log in with the password in
``--password-file``). For an agent (seat 10), a manager (seat 2) and the boss (seat 1), each
module's list as the mix of ``bench/load/locustfile.py`` asks for it (bare; each filter
value; each word, alone and with each filter value) and the global search for each of its
words are requested through the Flask test client: once
to warm the caches, then ``--repeat`` times; the best run's SQL time counts (milliseconds in
``execute_sql``, the statements of the page). Printed: every search per data set, the
slowest, and the sums per kind, with the growth from the first data set to each other::

    .venv/bin/python bench/search_cost.py --password-file F scale1.toml scale10.toml

With ``--bounded-from ROWS`` each data set is measured twice in the same process, the second
time with a search walk bounded in tables of ROWS rows or more (``webapp.crud.BOUNDED_FROM_ROWS``;
with one data set the growth column is then the ratio to the code's own setting).

Single requests on an otherwise idle server: what a search costs PostgreSQL and the
driver, not how it queues under load (the load test measures that).
"""

from __future__ import annotations

import argparse
import sys
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import quote

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench" / "load"))

import locustfile  # noqa: E402  (the load test's words and filters)
from run import ROLES, instrumented_app, logged_in_client  # noqa: E402  (the load test's query report)


def searches() -> list[tuple[str, str]]:
    """(kind, path) of every list and search the load mix makes, named as the load test names
    them: a list without parameters is "list"; with a word, a filter or both, "list search"."""
    paths = []
    for prefix, (filters, words) in locustfile.MODULES.items():
        narrowing = [f"{name}={value}" for name, values in filters.items() for value in values]
        paths.append(("list", f"/{prefix}/"))
        paths += [("list search", f"/{prefix}/?{f}") for f in narrowing]
        for word in words:
            paths.append(("list search", f"/{prefix}/?q={quote(word)}"))
            paths += [("list search", f"/{prefix}/?q={quote(word)}&{f}") for f in narrowing]
    paths += [("global search", f"/search/?q={quote(word)}") for word in locustfile.GLOBAL_SEARCH]
    return paths


def measure(config_path: Path, password: str, repeat: int) -> dict[tuple[str, str, str], float]:
    """(role, kind, path) -> best SQL milliseconds of the page."""
    app, db, captured = instrumented_app(config_path)
    out = {}
    try:
        for role, seat in ROLES:
            client = logged_in_client(app, seat, password)
            for kind, path in searches():
                client.get(path)
                best = None
                for _ in range(repeat):
                    captured.clear()
                    if client.get(path).status_code != 200:
                        raise SystemExit(f"{config_path}: {path} did not answer 200 for the {role}")
                    best = min(best if best is not None else float("inf"), sum(ms for _, _, ms in captured))
                out[(role, kind, path)] = best
    finally:
        db.close_all()
    return out


@contextmanager
def bounded_from(rows: int):
    """Search walks bounded in tables of ``rows`` rows or more, each table's boundary looked up anew."""
    from webapp import crud

    kept = crud.BOUNDED_FROM_ROWS
    crud.BOUNDED_FROM_ROWS = rows
    crud._walk_boundaries.clear()
    try:
        yield
    finally:
        crud.BOUNDED_FROM_ROWS = kept
        crud._walk_boundaries.clear()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("configs", nargs="+", type=Path, help="appliance configs, one per data set")
    parser.add_argument("--password-file", type=Path, required=True, help="the demo seats' password")
    parser.add_argument("--repeat", type=int, default=3, help="timed requests per search [3]")
    parser.add_argument("--bounded-from", type=int, metavar="ROWS",
                        help="also measure each data set with search walks bounded in tables of ROWS rows or more")
    args = parser.parse_args()
    password = args.password_file.read_text().strip()
    results, names = [], []
    for path in args.configs:
        results.append(measure(path, password, args.repeat))
        names.append(path.stem)
        if args.bounded_from is not None:
            with bounded_from(args.bounded_from):
                results.append(measure(path, password, args.repeat))
            names.append(f"@{args.bounded_from}")
    keys = list(results[0])
    print(f"{'role':8} {'kind':14} " + " ".join(f"{n[:10]:>10}" for n in names) + "  path")
    for key in sorted(keys, key=lambda k: -results[-1][k]):
        print(f"{key[0]:8} {key[1]:14} " + " ".join(f"{r[key]:10.2f}" for r in results) + f"  {key[2]}")
    print("\nSQL ms summed per kind (and growth from the first data set)")
    for kind in ("list", "list search", "global search", "all"):
        sums = [sum(v for k, v in r.items() if kind in ("all", k[1])) for r in results]
        growth = " ".join(f"{s / sums[0]:.2f}x" for s in sums[1:])
        print(f"  {kind:14} " + " ".join(f"{s:10.0f}" for s in sums) + f"  {growth}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
