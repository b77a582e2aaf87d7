"""The first schema: seats, roles, teams, the CRM records, notes, audit and login logs.

Frozen SQL rather than the models, so that later model changes never alter what
this step does; later steps change the schema from here.
"""

SCHEMA = r"""
CREATE EXTENSION IF NOT EXISTS pg_trgm;

CREATE TABLE "role" (
  "id" SERIAL PRIMARY KEY,
  "name" VARCHAR(50) NOT NULL UNIQUE,
  "permissions" JSONB NOT NULL DEFAULT '{}',
  "is_admin" BOOLEAN NOT NULL DEFAULT false,
  "builtin" BOOLEAN NOT NULL DEFAULT false);

CREATE TABLE "team" (
  "id" SERIAL PRIMARY KEY,
  "name" VARCHAR(100) NOT NULL UNIQUE,
  "created_at" TIMESTAMP NOT NULL DEFAULT (now() AT TIME ZONE 'utc'));

CREATE TABLE "user" (
  "id" SERIAL PRIMARY KEY,
  "email" VARCHAR(254) NOT NULL UNIQUE CHECK ("email" = lower("email")),
  "name" VARCHAR(100) NOT NULL,
  "role_id" INTEGER NOT NULL REFERENCES "role" ("id") ON DELETE RESTRICT,
  "team_id" INTEGER REFERENCES "team" ("id") ON DELETE SET NULL,
  "password_hash" VARCHAR(255),
  "locale" VARCHAR(10),
  "active" BOOLEAN NOT NULL DEFAULT true,
  "suspended_reason" VARCHAR(200),
  "failed_logins" SMALLINT NOT NULL DEFAULT 0,
  "locked_until" TIMESTAMP,
  "session_version" INTEGER NOT NULL DEFAULT 1,
  "last_login_at" TIMESTAMP,
  "created_at" TIMESTAMP NOT NULL DEFAULT (now() AT TIME ZONE 'utc'));
CREATE INDEX "user_team_id" ON "user" ("team_id");

CREATE TABLE "set_password_token" (
  "id" SERIAL PRIMARY KEY,
  "user_id" INTEGER NOT NULL REFERENCES "user" ("id") ON DELETE CASCADE,
  "token_hash" VARCHAR(64) NOT NULL UNIQUE,
  "expires_at" TIMESTAMP NOT NULL,
  "used_at" TIMESTAMP,
  "created_at" TIMESTAMP NOT NULL DEFAULT (now() AT TIME ZONE 'utc'));
CREATE INDEX "set_password_token_user_id" ON "set_password_token" ("user_id");

CREATE TABLE "account" (
  "id" SERIAL PRIMARY KEY,
  "owner_id" INTEGER NOT NULL REFERENCES "user" ("id") ON DELETE RESTRICT,
  "team_id" INTEGER REFERENCES "team" ("id") ON DELETE SET NULL,
  "created_at" TIMESTAMP NOT NULL, "updated_at" TIMESTAMP NOT NULL, "deleted_at" TIMESTAMP,
  "name" VARCHAR(200) NOT NULL,
  "industry" VARCHAR(100) NOT NULL DEFAULT '',
  "website" VARCHAR(200) NOT NULL DEFAULT '',
  "email" VARCHAR(254) NOT NULL DEFAULT '',
  "phone" VARCHAR(50) NOT NULL DEFAULT '',
  "city" VARCHAR(100) NOT NULL DEFAULT '',
  "country" VARCHAR(100) NOT NULL DEFAULT '',
  "description" TEXT NOT NULL DEFAULT '');

CREATE TABLE "contact" (
  "id" SERIAL PRIMARY KEY,
  "owner_id" INTEGER NOT NULL REFERENCES "user" ("id") ON DELETE RESTRICT,
  "team_id" INTEGER REFERENCES "team" ("id") ON DELETE SET NULL,
  "created_at" TIMESTAMP NOT NULL, "updated_at" TIMESTAMP NOT NULL, "deleted_at" TIMESTAMP,
  "first_name" VARCHAR(100) NOT NULL DEFAULT '',
  "last_name" VARCHAR(100) NOT NULL,
  "job_title" VARCHAR(100) NOT NULL DEFAULT '',
  "email" VARCHAR(254) NOT NULL DEFAULT '',
  "phone" VARCHAR(50) NOT NULL DEFAULT '',
  "account_id" INTEGER REFERENCES "account" ("id") ON DELETE SET NULL,
  "description" TEXT NOT NULL DEFAULT '');
CREATE INDEX "contact_account_id" ON "contact" ("account_id");

CREATE TABLE "lead" (
  "id" SERIAL PRIMARY KEY,
  "owner_id" INTEGER NOT NULL REFERENCES "user" ("id") ON DELETE RESTRICT,
  "team_id" INTEGER REFERENCES "team" ("id") ON DELETE SET NULL,
  "created_at" TIMESTAMP NOT NULL, "updated_at" TIMESTAMP NOT NULL, "deleted_at" TIMESTAMP,
  "first_name" VARCHAR(100) NOT NULL DEFAULT '',
  "last_name" VARCHAR(100) NOT NULL,
  "company" VARCHAR(200) NOT NULL DEFAULT '',
  "email" VARCHAR(254) NOT NULL DEFAULT '',
  "phone" VARCHAR(50) NOT NULL DEFAULT '',
  "source" VARCHAR(50) NOT NULL DEFAULT '',
  "status" VARCHAR(20) NOT NULL DEFAULT 'new',
  "description" TEXT NOT NULL DEFAULT '',
  "converted_account_id" INTEGER REFERENCES "account" ("id") ON DELETE SET NULL,
  "converted_contact_id" INTEGER REFERENCES "contact" ("id") ON DELETE SET NULL,
  "converted_at" TIMESTAMP);

CREATE TABLE "opportunity" (
  "id" SERIAL PRIMARY KEY,
  "owner_id" INTEGER NOT NULL REFERENCES "user" ("id") ON DELETE RESTRICT,
  "team_id" INTEGER REFERENCES "team" ("id") ON DELETE SET NULL,
  "created_at" TIMESTAMP NOT NULL, "updated_at" TIMESTAMP NOT NULL, "deleted_at" TIMESTAMP,
  "name" VARCHAR(200) NOT NULL,
  "account_id" INTEGER REFERENCES "account" ("id") ON DELETE SET NULL,
  "contact_id" INTEGER REFERENCES "contact" ("id") ON DELETE SET NULL,
  "stage" VARCHAR(20) NOT NULL DEFAULT 'prospecting',
  "amount" NUMERIC(14, 2) NOT NULL DEFAULT 0,
  "currency" VARCHAR(3) NOT NULL DEFAULT 'CNY',
  "probability" SMALLINT NOT NULL DEFAULT 10 CHECK ("probability" BETWEEN 0 AND 100),
  "expected_close" DATE,
  "description" TEXT NOT NULL DEFAULT '',
  "lead_id" INTEGER REFERENCES "lead" ("id") ON DELETE SET NULL);
CREATE INDEX "opportunity_account_id" ON "opportunity" ("account_id");

CREATE TABLE "ticket" (
  "id" SERIAL PRIMARY KEY,
  "owner_id" INTEGER NOT NULL REFERENCES "user" ("id") ON DELETE RESTRICT,
  "team_id" INTEGER REFERENCES "team" ("id") ON DELETE SET NULL,
  "created_at" TIMESTAMP NOT NULL, "updated_at" TIMESTAMP NOT NULL, "deleted_at" TIMESTAMP,
  "subject" VARCHAR(200) NOT NULL,
  "description" TEXT NOT NULL DEFAULT '',
  "status" VARCHAR(20) NOT NULL DEFAULT 'new',
  "priority" VARCHAR(20) NOT NULL DEFAULT 'normal',
  "account_id" INTEGER REFERENCES "account" ("id") ON DELETE SET NULL,
  "contact_id" INTEGER REFERENCES "contact" ("id") ON DELETE SET NULL);
CREATE INDEX "ticket_account_id" ON "ticket" ("account_id");

CREATE TABLE "activity" (
  "id" SERIAL PRIMARY KEY,
  "owner_id" INTEGER NOT NULL REFERENCES "user" ("id") ON DELETE RESTRICT,
  "team_id" INTEGER REFERENCES "team" ("id") ON DELETE SET NULL,
  "created_at" TIMESTAMP NOT NULL, "updated_at" TIMESTAMP NOT NULL, "deleted_at" TIMESTAMP,
  "kind" VARCHAR(20) NOT NULL DEFAULT 'task',
  "subject" VARCHAR(200) NOT NULL,
  "due_at" TIMESTAMP,
  "status" VARCHAR(20) NOT NULL DEFAULT 'planned',
  "description" TEXT NOT NULL DEFAULT '',
  "parent_type" VARCHAR(20),
  "parent_id" INTEGER);
CREATE INDEX "activity_parent" ON "activity" ("parent_type", "parent_id");
CREATE INDEX "activity_owner_open" ON "activity" ("owner_id", "due_at") WHERE "status" = 'planned' AND "deleted_at" IS NULL;

CREATE TABLE "note" (
  "id" SERIAL PRIMARY KEY,
  "parent_type" VARCHAR(20) NOT NULL,
  "parent_id" INTEGER NOT NULL,
  "author_id" INTEGER NOT NULL REFERENCES "user" ("id") ON DELETE RESTRICT,
  "body" TEXT NOT NULL,
  "created_at" TIMESTAMP NOT NULL,
  "deleted_at" TIMESTAMP);
CREATE INDEX "note_parent" ON "note" ("parent_type", "parent_id", "created_at");
CREATE INDEX "note_author_id" ON "note" ("author_id");

CREATE TABLE "audit_log" (
  "id" BIGSERIAL PRIMARY KEY,
  "at" TIMESTAMP NOT NULL,
  "user_id" INTEGER REFERENCES "user" ("id") ON DELETE SET NULL,
  "actor" VARCHAR(254) NOT NULL,
  "ip" VARCHAR(45),
  "entity" VARCHAR(20) NOT NULL,
  "record_id" INTEGER NOT NULL,
  "action" VARCHAR(20) NOT NULL,
  "changes" JSONB NOT NULL DEFAULT '{}');
CREATE INDEX "audit_log_at" ON "audit_log" ("at", "id");
CREATE INDEX "audit_log_record" ON "audit_log" ("entity", "record_id", "at");
CREATE INDEX "audit_log_user" ON "audit_log" ("user_id", "at");

CREATE TABLE "login_log" (
  "id" BIGSERIAL PRIMARY KEY,
  "at" TIMESTAMP NOT NULL,
  "user_id" INTEGER REFERENCES "user" ("id") ON DELETE SET NULL,
  "email" VARCHAR(254) NOT NULL,
  "ip" VARCHAR(45),
  "user_agent" VARCHAR(300) NOT NULL DEFAULT '',
  "success" BOOLEAN NOT NULL,
  "reason" VARCHAR(50) NOT NULL);
CREATE INDEX "login_log_at" ON "login_log" ("at", "id");
CREATE INDEX "login_log_user" ON "login_log" ("user_id", "at");
"""

# The permission gate filters by owner or team, and lists page by (updated_at, id)
# without counting: one partial index per scope keeps every page an index scan.
RECORD_TABLES = ("account", "contact", "lead", "opportunity", "ticket", "activity")
SEARCH_COLUMNS = {
    "account": ("name", "email", "phone", "city"),
    "contact": ("first_name", "last_name", "email", "phone"),
    "lead": ("first_name", "last_name", "company", "email", "phone"),
    "opportunity": ("name",),
    "ticket": ("subject",),
    "activity": ("subject",),
}


def up(migrator, db):
    db.execute_sql(SCHEMA)
    for table in RECORD_TABLES:
        live = 'WHERE "deleted_at" IS NULL'
        db.execute_sql(f'CREATE INDEX "{table}_recent" ON "{table}" ("updated_at", "id") {live}')
        db.execute_sql(f'CREATE INDEX "{table}_owner" ON "{table}" ("owner_id", "updated_at", "id") {live}')
        db.execute_sql(f'CREATE INDEX "{table}_team" ON "{table}" ("team_id", "updated_at", "id") {live}')
        for column in SEARCH_COLUMNS[table]:
            db.execute_sql(
                f'CREATE INDEX "{table}_{column}_trgm" ON "{table}" USING GIN ("{column}" gin_trgm_ops)'
            )
    db.execute_sql('CREATE INDEX "opportunity_stage" ON "opportunity" ("stage", "updated_at", "id") WHERE "deleted_at" IS NULL')
