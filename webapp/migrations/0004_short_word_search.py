"""Search that also finds one- and two-character words from an index.

pg_trgm indexes trigrams, so a search for a word shorter than three characters found no
trigram to look up and read every row: most Chinese words are two characters ("华信",
"王伟"), so on this appliance that was the common case, and the slowest page by far
(docs/performance.md: 0.5 s at the 50-seat data set, 9 s at ten times that).

Each record table gets a stored column ``search_text``: its search columns joined by U+001F
(which a search never contains, so no match spans two columns), with every character
written three times ("华信" -> "华华华信信信"). The search writes its words the same way. A
word of n characters then has 3n - 2 trigrams (one for a single character), and a tripled
word occurs in a tripled text exactly when the word occurs in the text: a match cannot
straddle the triples, as each of its characters would have to equal both neighbours in
the text. Same results as before, now from one trigram index per table instead of one per
column, for live rows only (every search filters on ``deleted_at IS NULL``); PostgreSQL
keeps the column up to date on every write, and rechecking a row is one ILIKE on it. And
a column has statistics, from which the planner sees how common a word is: a common one
("王") is found by walking the newest rows, a rare one ("华信") in the index.
Adding the column rewrites each table once (20 s at the 50-seat data set).
"""

# Frozen, like the other steps: the search columns of 0001 (webapp.crud.matches reads the
# result; a test checks that the searches use these indexes).
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
        for column in columns:
            db.execute_sql(f'DROP INDEX IF EXISTS "{table}_{column}_trgm"')
        joined = " || E'\\x1f' || ".join(f"""coalesce("{c}", '')""" for c in columns)
        db.execute_sql(f"""ALTER TABLE "{table}" ADD COLUMN "search_text" text GENERATED ALWAYS AS """
                       f"""(regexp_replace({joined}, '(.)', '\\1\\1\\1', 'g')) STORED""")
        db.execute_sql(f'CREATE INDEX "{table}_search" ON "{table}" USING GIN ("search_text" gin_trgm_ops) '
                       f'WHERE "deleted_at" IS NULL')
        db.execute_sql(f'ANALYZE "{table}"')  # the planner reads how common a word is from these statistics
