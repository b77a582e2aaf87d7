"""Notices in the reader's language (issue 6, R-16).

A notice kept only its English text, built when it was raised, so a boss reading Chinese read
English. It now keeps the message id (an English template with ``%(name)s`` placeholders,
extracted into the UI catalogue) and its parameters, and is translated when shown and mailed.
``message`` stays: the English text, for the rows written before this step (both new
columns NULL: shown as they are) and for the logs and the command line.

Frozen SQL, like the other steps.
"""

SCHEMA = r"""
ALTER TABLE "notice" ADD COLUMN "message_id" TEXT;
ALTER TABLE "notice" ADD COLUMN "params" JSONB;
"""


def up(migrator, db):
    db.execute_sql(SCHEMA)
