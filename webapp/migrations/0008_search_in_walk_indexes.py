"""The indexes that lists walk hold what lists narrow by, so a search walk reads no table rows.

A search for a common word ("王", "Smith") walks a seat's newest rows in ``{table}_owner``
(an agent) or everyone's in ``{table}_recent`` (a manager, testing the team there too; the
boss) and tests each row for the word. The word and the team were in the table only, so
the walk fetched every row it passed, and an agent's rows lie scattered over the whole
table: at ten times the 50-seat data set these walks were the statements PostgreSQL spent
the most time on under load (an agent's contacts searched for one common character: about
1,700 buffers per call). With the columns the walk tests included in its index (the search
text, the gate's owner and team, and the choice filters: a lead's status, a ticket's
priority), the walk is an index-only scan: a seat's entries sit together in
``(owner_id, updated_at)``, and the page's ids come from a few index pages
(``webapp.crud.first_rows`` asks for the ids alone, then reads the page's rows by id).
docs/performance.md has the measurements.

The owner index of opportunities also holds the amount, for the dashboard's pipeline (a
seat's opportunities counted and summed by stage): at ten times the 50-seat data set an
agent's pipeline read 399 table pages (28 ms from a cold cache), and 10 index pages with
the amount in the index (0.2 ms).

Each index is built anew under a temporary name, then the old one is dropped and the new
one takes its name. Dropping ``search_text`` (as 0006 and 0007 did to redefine it) would
drop these indexes with it: a later step that redefines the column must build them again.
"""

# Frozen, like the other steps: the columns each module's lists filter by choice.
CHOICE_FILTERS = {
    "account": (),
    "contact": (),
    "lead": ("status",),
    "opportunity": ("stage",),
    "ticket": ("status", "priority"),
    "activity": ("status", "kind"),
}
# The owner index of opportunities also holds the amount: a seat's pipeline on the dashboard
# (its opportunities counted and summed by stage) is then read from the index alone.
OWNER_EXTRA = {"opportunity": ("amount",)}
# Index name suffix -> (key columns, included columns before the table's choice filters).
WALK_INDEXES = {
    "owner": (("owner_id", "updated_at", "id"), ("search_text",)),
    "recent": (("updated_at", "id"), ("owner_id", "team_id", "search_text")),
}


def _quoted(columns) -> str:
    return ", ".join(f'"{c}"' for c in columns)


def up(migrator, db):
    for table, filters in CHOICE_FILTERS.items():
        for suffix, (keys, included) in WALK_INDEXES.items():
            name = f"{table}_{suffix}"
            extra = OWNER_EXTRA.get(table, ()) if suffix == "owner" else ()
            db.execute_sql(f'CREATE INDEX "{name}_new" ON "{table}" ({_quoted(keys)}) '
                           f'INCLUDE ({_quoted(included + filters + extra)}) WHERE "deleted_at" IS NULL')
            db.execute_sql(f'DROP INDEX "{name}"')
            db.execute_sql(f'ALTER INDEX "{name}_new" RENAME TO "{name}"')
