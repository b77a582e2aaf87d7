"""Run the CRM under gunicorn with gthread workers, in the foreground."""

from __future__ import annotations

import logging
import re

from gunicorn.app.base import BaseApplication
from gunicorn.glogging import Logger

from appliance.config import Settings

log = logging.getLogger(__name__)


_SECRET_PATH = re.compile(r"(/auth/set-password/)[^/?\s]+")


class RedactingLogger(Logger):
    """gunicorn's logger with the one-time set-password token cut out of logged paths."""

    def atoms(self, resp, req, environ, request_time):
        atoms = super().atoms(resp, req, environ, request_time)
        for key in ("U", "r"):
            if isinstance(atoms.get(key), str):
                atoms[key] = _SECRET_PATH.sub(r"\1<redacted>", atoms[key])
        return atoms


class CrmServer(BaseApplication):
    """gunicorn configured from ``Settings``; each worker builds its own app and connection pool."""

    def __init__(self, settings: Settings, overrides: dict | None = None):
        self.settings = settings
        self.overrides = overrides or {}
        super().__init__()

    def load_config(self):
        web = self.settings.web
        options = {
            "bind": web.bind,
            "workers": web.workers,
            "threads": web.threads,
            "worker_class": "gthread",
            "timeout": 60,
            "graceful_timeout": 20,
            "keepalive": 5,
            # Recycle workers now and then so a slow leak can never grow for ever.
            "max_requests": 20000,
            "max_requests_jitter": 2000,
            "accesslog": "-",
            "errorlog": "-",
            # No query strings in the access log: search text is customer data.
            "access_log_format": '%(t)s %(h)s "%(m)s %(U)s" %(s)s %(B)s %(M)sms',
            "logger_class": "installer.serve.RedactingLogger",
            "proc_name": "crm-appliance-web",
        }
        options.update({k: v for k, v in self.overrides.items() if v is not None})
        for key, value in options.items():
            self.cfg.set(key, value)

    def load(self):
        from webapp import create_app

        return create_app(self.settings)


def serve(settings: Settings, **overrides) -> None:
    """Check the secret and the database first, so a bad setup fails before gunicorn forks."""
    from appliance.db import check_connection, open_database

    settings.web.secret_key()
    db = open_database(settings)
    check_connection(db, settings)
    db.close_all()
    log.info("serving on %s with %s workers x %s threads", overrides.get("bind") or settings.web.bind,
             overrides.get("workers") or settings.web.workers, overrides.get("threads") or settings.web.threads)
    CrmServer(settings, overrides).run()
