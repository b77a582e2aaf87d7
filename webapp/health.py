"""Health endpoints for probes, the installer and monitoring: no login, no customer data.

``/healthz`` answers whether the appliance can serve seat users now: the web process,
the database, free disk for the data directory, and the scheduler's heartbeat (reported
"absent" while no scheduler runs, which does not fail the check). ``/readyz`` answers
whether this process should get traffic: the database answers and no migration is
pending. Both give 200 or 503 with a small JSON body.
"""

from __future__ import annotations

import shutil
import time

from flask import Blueprint, current_app, jsonify

from appliance.scheduler import HEARTBEAT_FILE

bp = Blueprint("health", __name__)

# Below either bound the disk check fails: writes (attachments, WAL, backups) would soon stop.
MIN_FREE_BYTES = 1024**3
MIN_FREE_FRACTION = 0.05
# The scheduler touches its heartbeat file (appliance.scheduler.HEARTBEAT_FILE) every 30 s.
HEARTBEAT_STALE_SECONDS = 300


def _database() -> dict:
    db = current_app.extensions["crm_db"]
    started = time.perf_counter()
    try:
        db.execute_sql("SELECT 1")
    except Exception as exc:  # any driver error means "not healthy", with its class for the log
        return {"ok": False, "error": type(exc).__name__}
    return {"ok": True, "ms": round((time.perf_counter() - started) * 1000, 1)}


def _disk() -> dict:
    data_dir = current_app.extensions["crm_settings"].appliance.data_dir
    probe = data_dir if data_dir.exists() else data_dir.parent
    try:
        usage = shutil.disk_usage(probe)
    except OSError as exc:
        return {"ok": False, "error": exc.strerror}
    fraction = usage.free / usage.total if usage.total else 0.0
    return {"ok": usage.free >= MIN_FREE_BYTES and fraction >= MIN_FREE_FRACTION,
            "free_bytes": usage.free, "free_fraction": round(fraction, 4)}


def _scheduler() -> dict:
    beat = current_app.extensions["crm_settings"].appliance.data_dir / HEARTBEAT_FILE
    try:
        age = time.time() - beat.stat().st_mtime
    except FileNotFoundError:
        return {"ok": True, "state": "absent"}
    except OSError as exc:
        return {"ok": False, "state": "unreadable", "error": exc.strerror}
    fresh = age <= HEARTBEAT_STALE_SECONDS
    return {"ok": fresh, "state": "running" if fresh else "stale", "age_seconds": round(age)}


@bp.route("/healthz")
def healthz():
    checks = {"web": {"ok": True}, "database": _database(), "disk": _disk(), "scheduler": _scheduler()}
    ok = all(check["ok"] for check in checks.values())
    return jsonify(status="ok" if ok else "fail", checks=checks), 200 if ok else 503


@bp.route("/readyz")
def readyz():
    from appliance.db import pending_migrations

    database = _database()
    pending = None
    if database["ok"]:
        try:
            pending = pending_migrations(current_app.extensions["crm_db"])
        except Exception as exc:  # the migration table unreadable: not ready
            database = {"ok": False, "error": type(exc).__name__}
    ok = database["ok"] and pending == []
    return jsonify(status="ok" if ok else "fail", database=database, pending_migrations=pending), \
        200 if ok else 503
