"""Attachments, the company profile and announcements (issue 6, R-9, R-11, R-13, R-15).

Frozen SQL, like the other steps.

- ``attachment``: one row per file on a record (``parent_type``, ``parent_id``, as notes
  do). The bytes live once per content under ``<data_dir>/attachments/`` named by their
  SHA-256 (appliance/attachments.py); two rows may share one file. ``owner_id`` is the
  seat whose quota the file uses (the uploader; the heir when that seat is removed).
  ``deleted_at`` marks a soft delete the boss can undo; destroying removes the row and,
  with the last row naming it, overwrites and unlinks the file.
- ``company_profile``: one row (id 1). Once ``certified_at`` is set, the certified fields
  cannot change; the business licence scan is an attachment on ("company", 1).
- ``announcement``: a banner every seat sees between ``starts_at`` and ``ends_at`` (UTC).
- ``app_state``: small facts the jobs remember between runs (the quota level last
  reported, the licence-end notices already sent), one JSON value per key.
"""

SCHEMA = r"""
CREATE TABLE "attachment" (
  "id" SERIAL PRIMARY KEY,
  "parent_type" VARCHAR(20) NOT NULL,
  "parent_id" INTEGER NOT NULL,
  "owner_id" INTEGER NOT NULL REFERENCES "user" ("id") ON DELETE RESTRICT,
  "filename" VARCHAR(255) NOT NULL,
  "content_type" VARCHAR(100) NOT NULL,
  "size" BIGINT NOT NULL CHECK ("size" >= 0),
  "sha256" CHAR(64) NOT NULL CHECK ("sha256" ~ '^[0-9a-f]{64}$'),
  "created_at" TIMESTAMP NOT NULL,
  "deleted_at" TIMESTAMP);
CREATE INDEX "attachment_parent" ON "attachment" ("parent_type", "parent_id", "created_at");
CREATE INDEX "attachment_sha256" ON "attachment" ("sha256");
CREATE INDEX "attachment_owner" ON "attachment" ("owner_id") WHERE "deleted_at" IS NULL;

CREATE TABLE "company_profile" (
  "id" SMALLINT PRIMARY KEY CHECK ("id" = 1),
  "name" VARCHAR(200) NOT NULL DEFAULT '',
  "registration_number" VARCHAR(50) NOT NULL DEFAULT '',
  "legal_representative" VARCHAR(100) NOT NULL DEFAULT '',
  "address" VARCHAR(300) NOT NULL DEFAULT '',
  "phone" VARCHAR(50) NOT NULL DEFAULT '',
  "website" VARCHAR(200) NOT NULL DEFAULT '',
  "certified_at" TIMESTAMP,
  "certified_by" VARCHAR(254),
  "updated_at" TIMESTAMP NOT NULL DEFAULT (now() AT TIME ZONE 'utc'));

CREATE TABLE "announcement" (
  "id" SERIAL PRIMARY KEY,
  "message" TEXT NOT NULL CHECK (length("message") BETWEEN 1 AND 2000),
  "starts_at" TIMESTAMP NOT NULL,
  "ends_at" TIMESTAMP NOT NULL,
  "created_by" VARCHAR(254) NOT NULL,
  "created_at" TIMESTAMP NOT NULL DEFAULT (now() AT TIME ZONE 'utc'),
  "emailed_at" TIMESTAMP,
  "withdrawn_at" TIMESTAMP,
  CHECK ("ends_at" > "starts_at"));
CREATE TABLE "app_state" (
  "key" VARCHAR(100) PRIMARY KEY,
  "value" JSONB NOT NULL,
  "updated_at" TIMESTAMP NOT NULL DEFAULT (now() AT TIME ZONE 'utc'));

CREATE INDEX "announcement_current" ON "announcement" ("ends_at") WHERE "withdrawn_at" IS NULL;
"""


def up(migrator, db):
    db.execute_sql(SCHEMA)
