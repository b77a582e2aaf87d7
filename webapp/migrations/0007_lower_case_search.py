"""``search_text`` is stored lower-cased, so a search compares it as it is.

Until now the column kept the case of the record's text, and a search for a word with
case ("Smith") read each row it looked at through ``ILIKE`` and ``strpos(lower(...))``:
PostgreSQL lower-cased the row's whole text twice per row. A list search that walks the
newest rows (a common word, or a manager's team) spends most of its time there.
Stored lower-cased, the same search is a ``LIKE`` and a ``strpos`` on the text as stored
(``webapp.crud.matches``): the list searches of the load test's mix took a quarter less
SQL at the 50-seat data set, a sixth less at ten times it (docs/performance.md).

The trigram index is unchanged in what it finds (pg_trgm lower-cases its trigrams
anyway), and so are the results: the row's text and the word are lower-cased by the same
function, PostgreSQL's ``lower``, as ``strpos(lower(...))`` did before. Digits stay once,
every other character three times (0004, 0006). Rewrites each record table once, as 0006 did.
"""

# Frozen, like the other steps: the search columns of 0004.
SEARCH_COLUMNS = {
    "account": ("name", "email", "phone", "city"),
    "contact": ("first_name", "last_name", "email", "phone"),
    "lead": ("first_name", "last_name", "company", "email", "phone"),
    "opportunity": ("name",),
    "ticket": ("subject",),
    "activity": ("subject",),
}


def up(migrator, db):
    for table, columns in SEARCH_COLUMNS.items():
        joined = " || E'\\x1f' || ".join(f"""coalesce("{c}", '')""" for c in columns)
        db.execute_sql(f'ALTER TABLE "{table}" DROP COLUMN "search_text"')  # its index goes with it
        db.execute_sql(f"""ALTER TABLE "{table}" ADD COLUMN "search_text" text GENERATED ALWAYS AS """
                       f"""(lower(regexp_replace({joined}, '([^0-9])', '\\1\\1\\1', 'g'))) STORED""")
        db.execute_sql(f'CREATE INDEX "{table}_search" ON "{table}" USING GIN ("search_text" gin_trgm_ops) '
                       f'WHERE "deleted_at" IS NULL')
        db.execute_sql(f'ANALYZE "{table}"')
