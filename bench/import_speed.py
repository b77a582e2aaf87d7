"""Import speed: a 100,000-row CSV of accounts, then one of contacts, next to a raw COPY.

Builds a throwaway cluster and database (migrated, as in production: the trigram search
index and the generated search column included), writes two CSV files with Chinese
headers and values (accounts; contacts naming those accounts), then times for each:
reading the file, the dry run (``validate``: every row checked, duplicates looked up
among the visible records) and the real import (``import_table``: the dry run again,
then the records and one audit row each, in one transaction). The baseline, in the same
run, is PostgreSQL's ``COPY`` of the same contact rows, into a bare table without
indexes and into the real ``contact`` table.

    .venv/bin/python bench/import_speed.py [--rows 100000] [--format csv|xlsx]

Prints seconds and rows per second, and each step's time as a ratio of the COPYs. With
``--format xlsx`` the same rows are also written as Excel workbooks and those are imported;
reading the CSV file is timed beside reading the workbook, and so is loading the rows the
web import keeps beside an uploaded workbook (``webapp.imports.store_table``), which is
what each review page, report and the import itself cost instead of reading it again.
"""

from __future__ import annotations

import argparse
import csv
import io
import random
import secrets
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from appliance import config, importer, seats  # noqa: E402
from appliance.db import migrate, open_database  # noqa: E402
from tests.conftest import make_settings  # noqa: E402
from tests.pgcluster import start_cluster  # noqa: E402
from webapp import imports  # noqa: E402

FAMILY = "王李张刘陈杨黄赵吴周徐孙马朱胡郭何高林罗"
GIVEN = "伟芳娜敏静丽强磊军洋勇艳杰娟涛明超秀霞平刚桂英华"
TEXT_COLUMNS = ("first_name", "last_name", "email", "phone", "job_title", "description")  # "" is no NULL
CITIES = ("上海", "北京", "深圳", "广州", "杭州", "成都", "南京", "武汉")


def write_files(folder: Path, rows: int) -> tuple[Path, Path]:
    rnd = random.Random(6)
    accounts, contacts = folder / "accounts.csv", folder / "contacts.csv"
    with accounts.open("w", encoding="utf-8-sig", newline="") as out:
        writer = csv.writer(out)
        writer.writerow(["公司名称", "邮箱", "电话", "城市", "行业", "备注"])
        for i in range(rows):
            writer.writerow([f"华信科技{i}有限公司", f"info{i}@company{i}.cn", f"021-{50000000 + i}",
                             rnd.choice(CITIES), "制造业", "年度客户，重点跟进"])
    with contacts.open("w", encoding="utf-8-sig", newline="") as out:
        writer = csv.writer(out)
        writer.writerow(["姓名", "邮箱", "手机", "公司", "职位"])
        for i in range(rows):
            name = rnd.choice(FAMILY) + rnd.choice(GIVEN) + rnd.choice(GIVEN)
            writer.writerow([name, f"person{i}@company{rnd.randrange(rows)}.cn", f"1{380000000 + i:010d}",
                             f"华信科技{rnd.randrange(rows)}有限公司", "采购经理"])
    return accounts, contacts


def to_xlsx(path: Path) -> Path:
    """The same rows as an Excel workbook (every cell text, as typed)."""
    from openpyxl import Workbook

    book = Workbook(write_only=True)
    sheet = book.create_sheet("Sheet1")
    with path.open(encoding="utf-8-sig", newline="") as source:
        for row in csv.reader(source):
            sheet.append(row)
    out = path.with_suffix(".xlsx")
    book.save(out)
    return out


def timed(fn):
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


def copy_rows(db, table: str, columns: list[str], rows: list[tuple]) -> float:
    """Seconds to COPY ``rows`` into ``table`` and commit."""
    buf = io.StringIO()
    csv.writer(buf).writerows(rows)
    buf.seek(0)
    start = time.perf_counter()
    with db.atomic():
        cursor = db.connection().cursor()
        cursor.copy_expert(f'COPY "{table}" ({", ".join(columns)}) FROM STDIN WITH (FORMAT csv, '
                           f'FORCE_NOT_NULL ({", ".join(TEXT_COLUMNS)}))', buf)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--format", choices=("csv", "xlsx"), default="csv",
                        help="the files imported; with xlsx, reading the CSV is timed beside")
    args = parser.parse_args()

    cluster = start_cluster()
    results = []
    try:
        with tempfile.TemporaryDirectory() as tmp:
            tmp = Path(tmp)
            # The tests' settings (database crm_test, secrets in tmp), as bench/diagnostics_bundle.py does.
            config.write_secret(tmp / "db-password", cluster.create_app_database("crm_test", "crm"))
            config.write_secret(tmp / "secret-key", secrets.token_urlsafe(48))
            settings = make_settings(cluster, tmp, seats={"licensed": 10})
            db = open_database(settings)
            migrate(db)
            from webapp.models import User
            from webapp.permissions import ensure_builtin_roles

            accounts_csv, contacts_csv = write_files(tmp, args.rows)
            files = {"account": accounts_csv, "contact": contacts_csv}
            if args.format == "xlsx":
                files = {entity: to_xlsx(path) for entity, path in files.items()}
            print(", ".join(f"{path.name} {path.stat().st_size / 1e6:.1f} MB" for path in
                            {accounts_csv, contacts_csv, *files.values()}) + f"; {args.rows:,} rows each")
            with db.connection_context():
                ensure_builtin_roles()
                boss = seats.add_seat(settings, "boss@bench.cn", "Boss", "boss", "East").user
                boss = User.get_by_id(boss.id)
                for entity, path in files.items():
                    table, read_s = timed(lambda: importer.read_table(path, path.name))
                    csv_s = kept_s = None
                    if args.format == "xlsx":
                        source = accounts_csv if entity == "account" else contacts_csv
                        same, csv_s = timed(lambda: importer.read_table(source, source.name))
                        assert (same.headers, same.rows) == (table.headers, table.rows), "the workbook reads as the CSV"
                        job = tmp / f"job-{entity}"
                        job.mkdir()
                        imports.store_table(job, table)
                        kept, kept_s = timed(lambda: imports.load_table(job, {}))
                        assert (kept.headers, kept.rows) == (table.headers, table.rows)
                    mapping = importer.guess_mapping(table.headers, entity)
                    plan, dry_s = timed(lambda: importer.validate(table, mapping, entity, boss))
                    assert plan.ok, plan.errors[:5]
                    real, import_s = timed(lambda: importer.import_table(table, mapping, entity, boss))
                    assert real.records == plan.records
                    results.append((entity, len(plan.records), len(plan.duplicates), read_s, csv_s, kept_s, dry_s,
                                    import_s))
                # The baseline: the same contact rows, as the import wrote them, by COPY.
                columns = ["first_name", "last_name", "email", "phone", "account_id", "job_title", "owner_id",
                           "team_id", "description", "created_at", "updated_at"]
                now = time.strftime("%Y-%m-%d %H:%M:%S")
                rows = [(r["first_name"], r["last_name"], r.get("email", ""), r.get("phone", ""), r.get("account"),
                         r.get("title_text", ""), r["owner"], r["team"], "", now, now) for r in real.records]
                db.execute_sql("CREATE TABLE bare_contact (first_name text, last_name text, email text, "
                               "phone text, account_id int, job_title text, owner_id int, team_id int, "
                               "description text, created_at timestamp, updated_at timestamp)")
                bare_s = copy_rows(db, "bare_contact", columns, rows)
                real_table_s = copy_rows(db, "contact", columns, rows)
            db.close_all()
    finally:
        cluster.stop_and_remove()

    print(f"\nbaseline: COPY of the {len(rows):,} contact rows into a bare table {bare_s:.2f} s "
          f"({len(rows) / bare_s:,.0f} rows/s); into the real contact table (indexes, search column) "
          f"{real_table_s:.2f} s ({len(rows) / real_table_s:,.0f} rows/s)\n")
    print(f"{'file':8} {'rows':>8} {'dups':>5} | {'read':>6} {'dry run':>8} {'import':>7} | {'import rows/s':>13} |"
          f" {'import / bare COPY':>18} {'import / table COPY':>19}")
    for entity, count, dups, read_s, csv_s, kept_s, dry_s, import_s in results:
        print(f"{entity:8} {count:>8,} {dups:>5,} | {read_s:>5.1f}s {dry_s:>7.1f}s {import_s:>6.1f}s |"
              f" {count / import_s:>13,.0f} | {import_s / bare_s:>18.1f} {import_s / real_table_s:>19.1f}")
    if args.format == "xlsx":
        print("\nreading the same rows:")
        for entity, count, _, read_s, csv_s, kept_s, *_ in results:
            print(f"{entity:8} .xlsx {read_s:.2f} s, .csv {csv_s:.2f} s ({read_s / csv_s:.1f}x); the rows kept "
                  f"beside an uploaded workbook load in {kept_s:.2f} s")
    print("\nimport = the dry run again, then COPY of the records and of one audit row each, in one transaction")


if __name__ == "__main__":
    main()
