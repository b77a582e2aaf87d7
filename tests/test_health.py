"""/healthz and /readyz: no login, no customer data, 200 or 503 with a JSON body."""

from __future__ import annotations

import os
import time

from webapp import audit
from webapp.models import Account


def test_healthz_and_readyz_answer_without_login_and_without_data(app, make_seat):
    seat = make_seat("a@corp.cn")
    audit.create(seat.user, Account, {"name": "Secret Customer Ltd"})
    client = app.test_client()
    for path in ("/healthz", "/readyz"):
        resp = client.get(path)
        assert resp.status_code == 200, resp.get_json()
        assert "Secret Customer" not in resp.get_data(as_text=True) and "a@corp.cn" not in resp.get_data(as_text=True)
        assert "Set-Cookie" not in resp.headers
    body = client.get("/healthz").get_json()
    assert body["status"] == "ok" and body["checks"]["database"]["ok"] is True
    assert body["checks"]["scheduler"] == {"ok": True, "state": "absent"}, "no scheduler yet is not a failure"
    assert client.get("/readyz").get_json()["pending_migrations"] == []


def test_a_stale_scheduler_heartbeat_fails_health(app, settings):
    beat = settings.appliance.data_dir / "scheduler.heartbeat"
    beat.parent.mkdir(parents=True, exist_ok=True)
    beat.touch()
    try:
        assert app.test_client().get("/healthz").get_json()["checks"]["scheduler"]["state"] == "running"
        old = time.time() - 3600
        os.utime(beat, (old, old))
        resp = app.test_client().get("/healthz")
        assert resp.status_code == 503 and resp.get_json()["checks"]["scheduler"]["state"] == "stale"
    finally:
        beat.unlink()


def test_database_down_is_a_503_not_a_crash(pg_cluster, secrets_dir, db):
    from appliance.db import open_database
    from tests.conftest import make_settings
    from webapp import create_app

    broken = make_settings(pg_cluster, secrets_dir, database={"port": 1})
    app = create_app(broken, database=open_database(broken))
    client = app.test_client()
    resp = client.get("/healthz")
    assert resp.status_code == 503
    assert resp.get_json()["checks"]["database"] == {"ok": False, "error": "OperationalError"}
    assert client.get("/readyz").status_code == 503
