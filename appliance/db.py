"""The database connection pool and the schema migrations, for the web app and the CLI."""

from __future__ import annotations

import logging
from pathlib import Path

import peewee
from playhouse.migrations import MigrationError, Runner
from playhouse.postgres_ext import PooledPostgresqlExtDatabase

from appliance.config import Settings
from appliance.errors import DatabaseError
import webapp.models as models

log = logging.getLogger(__name__)

MIGRATIONS_DIR = Path(models.__file__).resolve().parent / "migrations"
# Any constant works; it only has to be the same for every migrating process.
_MIGRATION_LOCK = 0x43524D01


def open_database(settings: Settings, bind: bool = True) -> PooledPostgresqlExtDatabase:
    """Create the pool and (unless ``bind`` is false) bind the models to it. Connections are opened lazily."""
    cfg = settings.database
    db = PooledPostgresqlExtDatabase(
        cfg.name,
        host=cfg.host,
        port=cfg.port,
        user=cfg.user,
        password=cfg.password(),
        connect_timeout=cfg.connect_timeout_seconds,
        max_connections=cfg.pool_size,
        stale_timeout=300,
        timeout=10,  # wait this long for a free pooled connection before failing
        register_hstore=False,
        application_name="crm-appliance",
    )
    if bind:
        models.database.initialize(db)
    return db


def check_connection(db: peewee.Database, settings: Settings) -> None:
    """Connect once, turning a driver error into a message naming host, port and database."""
    cfg = settings.database
    try:
        with db.connection_context():
            db.execute_sql("SELECT 1")
    except peewee.OperationalError as exc:
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DatabaseError(
            f"cannot connect to PostgreSQL at {cfg.host}:{cfg.port} database {cfg.name!r} "
            f"as {cfg.user!r}: {first_line}; check that the cluster runs and the [database] "
            f"settings in {settings.source}"
        ) from None


def migrate(db: peewee.Database) -> list[str]:
    """Apply every pending migration in order; returns the names applied (none when up to date).

    Safe to run twice and from two processes at once: a PostgreSQL advisory lock
    makes the second wait, then find nothing left to do.
    """
    runner = Runner(db, str(MIGRATIONS_DIR), table_name="schema_migration")
    with db.connection_context():
        db.execute_sql("SELECT pg_advisory_lock(%s)", (_MIGRATION_LOCK,))
        try:
            applied = runner.up()
        except MigrationError as exc:
            raise DatabaseError(f"migration failed: {exc}") from None
        finally:
            db.execute_sql("SELECT pg_advisory_unlock(%s)", (_MIGRATION_LOCK,))
    for name in applied:
        log.info("applied migration %s", name)
    return applied


def pending_migrations(db: peewee.Database) -> list[str]:
    """Names of the migration files not yet applied, in order."""
    return [name for name, applied in migration_status(db) if not applied]


def migration_status(db: peewee.Database) -> list[tuple[str, bool]]:
    """(name, applied?) for every migration file, in order."""
    runner = Runner(db, str(MIGRATIONS_DIR), table_name="schema_migration")
    with db.connection_context():
        return [(m.name, m.applied is not None) for m in runner.status() if m.path]
