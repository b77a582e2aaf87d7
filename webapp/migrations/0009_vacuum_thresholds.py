"""Autovacuum visits a record table after every thousand changed or inserted rows, whatever its size.

A list or search walks ``{table}_owner`` or ``{table}_recent`` (0008) as an index-only scan:
it reads no table row while the visibility map says the row's page is all-visible. A row
changed since the last VACUUM is on a page that is not, and the walk fetches it from the
table. Changed rows are also the newest ones, the first that every walk passes. PostgreSQL's
default waits for a fifth of a table to change (50 rows plus 20%), so the larger the table,
the more of the newest rows stay unmarked: 40,000 contacts at the 50-seat data set, 400,000 at
ten times it. Measured on the load test's 50-seat set (docs/performance.md), twelve searches
of a manager and the boss took 22.4 ms of SQL after VACUUM and 36.9 ms after 5,000 rows of
each searched table changed (16,854 fetches from the tables).

With a fixed threshold the walk passes at most about a thousand unmarked rows per table. A
VACUUM that finds few dead rows is cheap: it reads only the pages not marked all-visible, and
PostgreSQL skips the index pass when dead rows lie on under 2% of the table's pages.
"""

# Frozen, like the other steps: the tables whose lists walk an index-only scan (0008).
RECORD_TABLES = ("account", "contact", "lead", "opportunity", "ticket", "activity")
THRESHOLDS = {
    "autovacuum_vacuum_threshold": 1000,  # updated or deleted rows (dead row versions)
    "autovacuum_vacuum_scale_factor": 0,
    "autovacuum_vacuum_insert_threshold": 1000,  # inserted rows: new pages marked all-visible too
    "autovacuum_vacuum_insert_scale_factor": 0,
}


def up(migrator, db):
    settings = ", ".join(f"{name} = {value}" for name, value in THRESHOLDS.items())
    for table in RECORD_TABLES:
        db.execute_sql(f'ALTER TABLE "{table}" SET ({settings})')
