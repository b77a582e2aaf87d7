"""Fixtures: one real PostgreSQL cluster per test run, a clean database per test.

The cluster starts on a free 127.0.0.1 port and is removed at the end. Between
tests every table is emptied (TRUNCATE is fast) and the built-in roles come back.
"""

from __future__ import annotations

import os
import re
import secrets
from dataclasses import dataclass
from pathlib import Path

import pytest

from appliance import config
from tests.pgcluster import start_cluster


@pytest.fixture(scope="session")
def pg_cluster():
    cluster = start_cluster()
    try:
        yield cluster
    finally:
        cluster.stop_and_remove()


@pytest.fixture(scope="session")
def secrets_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("etc")
    os.chmod(path, 0o700)
    return path


@pytest.fixture(scope="session")
def app_database(pg_cluster, secrets_dir):
    """Name and password of the test database, owned by a non-superuser role like production."""
    password = pg_cluster.create_app_database("crm_test", "crm")
    config.write_secret(secrets_dir / "db-password", password)
    config.write_secret(secrets_dir / "secret-key", secrets.token_urlsafe(48))
    return "crm_test"


def make_settings(pg_cluster, secrets_dir, **overrides) -> config.Settings:
    data = {
        "appliance": {"data_dir": str(secrets_dir / "data"), "log_dir": str(secrets_dir / "log")},
        "database": {"host": "127.0.0.1", "port": pg_cluster.port, "name": "crm_test", "user": "crm",
                     "password_file": str(secrets_dir / "db-password"), "pool_size": 20},
        "web": {"public_url": "http://127.0.0.1:5000", "secret_key_file": str(secrets_dir / "secret-key"),
                "page_size": 10},
        "seats": {"licensed": 50},
    }
    for section, values in overrides.items():
        data.setdefault(section, {}).update(values)
    return config.from_mapping(data, source="<test settings>")


@pytest.fixture(scope="session")
def settings(pg_cluster, secrets_dir, app_database) -> config.Settings:
    return make_settings(pg_cluster, secrets_dir)


@pytest.fixture(scope="session")
def migrated_db(settings):
    from appliance.db import migrate, open_database

    db = open_database(settings)
    migrate(db)
    yield db
    db.close_all()


_TABLES = ("attachment", "company_profile", "announcement", "app_state", "job_run", "notice", "audit_log", "login_log", "note", "activity", "ticket", "opportunity", "lead", "contact", "account",
           "set_password_token", "user", "team", "role")


@pytest.fixture
def db(migrated_db):
    """A clean database with the built-in roles, connected for the test's thread."""
    from webapp import models
    from webapp.permissions import ensure_builtin_roles

    # A test (the CLI's, say) may have bound the models elsewhere: bind them back.
    models.database.initialize(migrated_db)
    migrated_db.connect(reuse_if_open=True)
    migrated_db.execute_sql("TRUNCATE " + ", ".join(f'"{t}"' for t in _TABLES) + " RESTART IDENTITY CASCADE")
    ensure_builtin_roles()
    yield migrated_db
    if not migrated_db.is_closed():
        migrated_db.close()


@pytest.fixture
def app(settings, db):
    from webapp import create_app

    flask_app = create_app(settings, database=db)
    flask_app.config.update(TESTING=True)
    return flask_app


PASSWORD = "correct horse battery staple"


@dataclass
class Seat:
    user: object
    email: str
    password: str = PASSWORD


@pytest.fixture
def make_seat(settings, db):
    """Create a seat with a password already set: make_seat("a@x.cn", role="agent", team="East")."""
    from appliance import seats

    def _make(email: str, role: str = "agent", team: str | None = None, name: str | None = None) -> Seat:
        created = seats.add_seat(settings, email, name or email.split("@")[0].title(), role, team)
        token = created.link.rsplit("/", 1)[1]
        user = seats.set_password(seats.find_token(token), PASSWORD)
        return Seat(user=user, email=user.email)

    return _make


class Browser:
    """A test client that logs in through the real form, CSRF token included."""

    def __init__(self, client):
        self.client = client

    def csrf(self, path: str = "/auth/login") -> str:
        html = self.client.get(path).get_data(as_text=True)
        match = re.search(r'name="csrf_token" (?:type="hidden" )?value="([^"]+)"', html)
        assert match, f"no CSRF token on {path}"
        return match.group(1)

    def login(self, email: str, password: str = PASSWORD):
        token = self.csrf()
        return self.client.post("/auth/login", data={"email": email, "password": password, "csrf_token": token})

    def post(self, path: str, data: dict | None = None, token_from: str | None = None, **kwargs):
        data = dict(data or {})
        data.setdefault("csrf_token", self.csrf(token_from or "/"))
        return self.client.post(path, data=data, **kwargs)

    def get(self, path: str, **kwargs):
        return self.client.get(path, **kwargs)


@pytest.fixture
def browser_for(app):
    """browser_for(seat) -> a logged-in Browser; browser_for(None) -> anonymous."""

    def _make(seat: Seat | None = None) -> Browser:
        b = Browser(app.test_client())
        if seat is not None:
            resp = b.login(seat.email, seat.password)
            assert resp.status_code == 302, resp.get_data(as_text=True)[:500]
        return b

    return _make


@pytest.fixture
def smtp_server():
    """A real SMTP server (aiosmtpd) on a free 127.0.0.1 port, keeping what it receives."""
    from aiosmtpd.controller import Controller
    from tests.pgcluster import free_port

    class Keep:
        def __init__(self):
            self.messages = []

        async def handle_DATA(self, server, session, envelope):
            self.messages.append(envelope)
            return "250 OK"

    handler = Keep()
    controller = Controller(handler, hostname="127.0.0.1", port=free_port())
    controller.start()
    try:
        yield controller, handler
    finally:
        controller.stop()
