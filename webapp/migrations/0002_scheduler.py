"""The scheduler's job history, and notices for the boss (a failed job, later quota warnings).

Frozen SQL, like the first step.
"""

SCHEMA = r"""
CREATE TABLE "job_run" (
  "id" BIGSERIAL PRIMARY KEY,
  "job" VARCHAR(50) NOT NULL,
  "started_at" TIMESTAMP NOT NULL,
  "finished_at" TIMESTAMP,
  "outcome" VARCHAR(10) NOT NULL CHECK ("outcome" IN ('running', 'ok', 'failed')),
  "message" TEXT NOT NULL DEFAULT '');
CREATE INDEX "job_run_job_started" ON "job_run" ("job", "started_at");

CREATE TABLE "notice" (
  "id" SERIAL PRIMARY KEY,
  "created_at" TIMESTAMP NOT NULL DEFAULT (now() AT TIME ZONE 'utc'),
  "level" VARCHAR(10) NOT NULL CHECK ("level" IN ('info', 'warning', 'error')),
  "source" VARCHAR(50) NOT NULL,
  "message" TEXT NOT NULL,
  "acknowledged_at" TIMESTAMP,
  "acknowledged_by_id" INTEGER REFERENCES "user" ("id") ON DELETE SET NULL);
CREATE INDEX "notice_open" ON "notice" ("created_at") WHERE "acknowledged_at" IS NULL;
"""


def up(migrator, db):
    db.execute_sql(SCHEMA)
