"""The foreign-key indexes the models declare and the first step left out.

Found by the load test (bench/load, docs/performance.md): a contact's page lists its
opportunities and tickets by ``contact_id``, which without an index is a sequential scan
that grows with the data set. The other four also serve the ON DELETE SET NULL checks when
records are purged. Frozen SQL, like the first step.
"""

SCHEMA = r"""
CREATE INDEX IF NOT EXISTS "opportunity_contact_id" ON "opportunity" ("contact_id");
CREATE INDEX IF NOT EXISTS "ticket_contact_id" ON "ticket" ("contact_id");
CREATE INDEX IF NOT EXISTS "opportunity_lead_id" ON "opportunity" ("lead_id");
CREATE INDEX IF NOT EXISTS "lead_converted_account_id" ON "lead" ("converted_account_id");
CREATE INDEX IF NOT EXISTS "lead_converted_contact_id" ON "lead" ("converted_contact_id");
CREATE INDEX IF NOT EXISTS "user_role_id" ON "user" ("role_id");
"""


def up(migrator, db):
    db.execute_sql(SCHEMA)
