"""Versioned migrations: ordered, recorded, safe to run twice and concurrently, matching the models."""

from __future__ import annotations

import importlib
import re
import threading

from peewee import ForeignKeyField

from appliance.db import MIGRATIONS_DIR, migrate, migration_status
from webapp.models import ALL_MODELS


def test_second_run_applies_nothing(migrated_db):
    assert migrate(migrated_db) == []
    status = migration_status(migrated_db)
    assert status and all(applied for _, applied in status)
    assert [name for name, _ in status] == sorted(p.stem for p in MIGRATIONS_DIR.glob("[0-9]*.py"))


def test_concurrent_runs_wait_for_each_other(migrated_db):
    results, errors = [], []

    def run():
        try:
            results.append(migrate(migrated_db))
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)
        finally:
            migrated_db.close()

    threads = [threading.Thread(target=run) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and results == [[], [], []]


def test_every_model_column_exists_with_its_nullability(migrated_db):
    with migrated_db.connection_context():
        for model in ALL_MODELS:
            table = model._meta.table_name
            columns = {c.name: c for c in migrated_db.get_columns(table)}
            for field in model._meta.sorted_fields:
                assert field.column_name in columns, f"{table}.{field.column_name} missing: write a migration"
                assert columns[field.column_name].null == field.null, f"{table}.{field.column_name} nullability"


def test_every_foreign_key_the_models_index_has_an_index(migrated_db):
    """Found by the load test (bench/load): the contact page's related opportunities and tickets were
    read with a sequential scan, because the migrations had left out the indexes the models declare."""
    missing = []
    with migrated_db.connection_context():
        for model in ALL_MODELS:
            table = model._meta.table_name
            leading = {tuple(i.columns)[0] for i in migrated_db.get_indexes(table)}
            missing += [f"{table}.{f.column_name}" for f in model._meta.sorted_fields
                        if isinstance(f, ForeignKeyField) and f.index and f.column_name not in leading]
    assert missing == [], f"no index on {missing}: write a migration, or index=False on the field"


def test_fresh_database_migrates_from_zero(pg_cluster, secrets_dir, app_database):
    """A brand-new database gets the whole schema from the numbered files alone."""
    from appliance import config
    from appliance.db import open_database
    from tests.conftest import make_settings
    from webapp import models

    password = pg_cluster.create_app_database("crm_fresh", "crm_fresh")
    config.write_secret(secrets_dir / "fresh-password", password)
    settings = make_settings(pg_cluster, secrets_dir, database={"name": "crm_fresh", "user": "crm_fresh",
                                                                "password_file": str(secrets_dir / "fresh-password")})
    previous = models.database.obj
    db = open_database(settings)
    try:
        assert [n for n in migrate(db)] == [p.stem for p in sorted(MIGRATIONS_DIR.glob("[0-9]*.py"))]
        with db.connection_context():
            assert "pg_trgm" in [r[0] for r in db.execute_sql("SELECT extname FROM pg_extension").fetchall()]
    finally:
        db.close_all()
        models.database.initialize(previous)


def record_modules():
    """The record modules, registered as create_app registers them: by importing their views.
    Run alone, this file would otherwise loop over none and pass whatever the schema holds."""
    from webapp.crud import MODULES
    for name in ("accounts", "contacts", "leads", "opportunities", "tickets", "activities"):
        importlib.import_module(f"webapp.{name}")
    assert len(MODULES) >= 6, sorted(MODULES)
    return list(MODULES.values())


def test_the_search_column_holds_every_search_field_of_its_module(migrated_db):
    """``search_text`` (migration 0004) is what searches read: a module's search fields and
    the generated column must name the same columns."""
    with migrated_db.connection_context():
        for module in record_modules():
            table = module.model._meta.table_name
            expression = migrated_db.execute_sql(
                "SELECT generation_expression FROM information_schema.columns "
                "WHERE table_name = %s AND column_name = 'search_text'", (table,)).fetchone()[0]
            named = set(re.findall(r"COALESCE\(\(?(\w+)", expression, flags=re.I))
            assert named == set(module.search_fields), (table, expression)


def test_the_walk_indexes_hold_every_column_a_list_narrows_by(migrated_db):
    """A list walks ``{table}_owner`` or ``{table}_recent`` and asks for the page's ids alone
    (migration 0008): the walk reads no table row only while its index holds the search text,
    the gate's owner and team, and every choice filter of the module."""
    with migrated_db.connection_context():
        for module in record_modules():
            table = module.model._meta.table_name
            narrowed = {"search_text"} | {module.model._meta.fields[f.field].column_name
                                           for f in module.filters if f.values}
            for index, gate in ((f"{table}_owner", {"owner_id"}), (f"{table}_recent", {"owner_id", "team_id"})):
                columns = {name for (name,) in migrated_db.execute_sql(
                    "SELECT a.attname FROM pg_index i JOIN pg_attribute a ON a.attrelid = i.indrelid "
                    "AND a.attnum = ANY(i.indkey) WHERE i.indexrelid = %s::regclass", (index,)).fetchall()}
                assert narrowed | gate <= columns, (index, sorted((narrowed | gate) - columns))


def test_every_walked_table_is_vacuumed_after_a_thousand_changes(migrated_db):
    """Migration 0009: a list's index-only walk fetches from the table every row changed since the
    last VACUUM, and changed rows are the newest, the first a walk passes. PostgreSQL's default
    (a fifth of the table) would leave tens of thousands of them on a large table."""
    expected = {"autovacuum_vacuum_threshold": 1000, "autovacuum_vacuum_scale_factor": 0,
                "autovacuum_vacuum_insert_threshold": 1000, "autovacuum_vacuum_insert_scale_factor": 0}
    with migrated_db.connection_context():
        for module in record_modules():
            table = module.model._meta.table_name
            (options,) = migrated_db.execute_sql(
                "SELECT coalesce(reloptions, '{}') FROM pg_class WHERE oid = %s::regclass", (table,)).fetchone()
            settings = dict(option.split("=", 1) for option in options)
            assert {name: float(settings.get(name, "nan")) for name in expected} == expected, table
