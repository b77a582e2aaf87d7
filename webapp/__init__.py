"""The seat users' CRM: a Flask app built by ``create_app(settings)``; no module-level app."""

from __future__ import annotations

import datetime as dt
import logging

from flask import Flask, g, render_template, request, session
from flask_babel import Babel
from flask_wtf.csrf import CSRFError, CSRFProtect
from werkzeug.middleware.proxy_fix import ProxyFix

from appliance.config import Settings
from webapp.i18n import lazy_gettext as _l

log = logging.getLogger(__name__)

csrf = CSRFProtect()
babel = Babel()

LOCALES = ("en", "zh")


def create_app(settings: Settings, database=None) -> Flask:
    """Build the app for ``settings``; ``database`` (an open peewee pool) is made from them if not given.

    Refuses to start without a readable secret key of at least 32 characters.
    """
    from appliance.db import open_database
    from webapp import models
    from webapp import (accounts, activities, admin, attachments, auth, company, contacts, dashboard, health, imports, leads,
                        lifecycle, notes, opportunities, search, sla, tickets)
    from webapp.i18n import select_locale, template_globals, template_locale

    app = Flask(__name__)
    web = settings.web
    app.config.update(
        SECRET_KEY=web.secret_key(),
        SESSION_COOKIE_NAME="crm_session",
        SESSION_COOKIE_HTTPONLY=True,
        SESSION_COOKIE_SAMESITE="Lax",
        SESSION_COOKIE_SECURE=web.public_url.lower().startswith("https://"),
        PERMANENT_SESSION_LIFETIME=dt.timedelta(hours=web.session_hours),
        # Not on every response: signing the cookie cost 5% of the app's CPU under load.
        # auth.load_user re-issues it every few minutes instead, which keeps the lifetime
        # counting from the seat's last activity.
        SESSION_REFRESH_EACH_REQUEST=False,
        # The CSRF token lives as long as the session that holds it.
        WTF_CSRF_TIME_LIMIT=None,
        MAX_CONTENT_LENGTH=(settings.attachments.max_upload_mb + 1) * 1024 * 1024,
        # A form's text fields in memory (Flask's default is 500 KB): the forms' own limits
        # decide, e.g. 200,000 pasted characters of Chinese are 600 KB. Over it Flask answers
        # 413, whose page speaks of the upload limit.
        MAX_FORM_MEMORY_SIZE=2 * 1024 * 1024,
        BABEL_DEFAULT_LOCALE=web.default_locale,
        BABEL_DEFAULT_TIMEZONE=web.timezone,
        BABEL_TRANSLATION_DIRECTORIES="translations",
    )
    app.extensions["crm_settings"] = settings
    # Every upload (attachments, the licence scan, imports) is spooled into <data_dir>/incoming.
    app.request_class = attachments.UploadRequest
    if web.trusted_proxies:
        app.wsgi_app = ProxyFix(app.wsgi_app, x_for=web.trusted_proxies, x_proto=web.trusted_proxies,
                                x_host=web.trusted_proxies)

    if database is None:
        db = open_database(settings)
    else:
        db = database
        models.database.initialize(db)
    app.extensions["crm_db"] = db

    @app.before_request
    def _connect():
        # Health probes connect on their own, so that a database outage is their answer, not a 500.
        if request.blueprint != "health":
            db.connect(reuse_if_open=True)

    @app.teardown_request
    def _release(exc):
        if not db.is_closed():
            db.close()  # back to the pool

    csrf.init_app(app)
    _reuse_signed_csrf_tokens(app)
    babel.init_app(app, locale_selector=select_locale)
    app.jinja_env.globals.update(template_globals())
    app.context_processor(template_locale)

    for module in (auth, dashboard, accounts, contacts, leads, opportunities, tickets, activities,
                   notes, attachments, search, admin, company, sla, health, imports, lifecycle):
        app.register_blueprint(module.bp)
    auth.init_app(app)
    # After the licence's end the data is read-only: from the settings and the date, no query.
    app.before_request(lifecycle.refuse_writes)
    app.context_processor(lifecycle.licence_banner)

    @app.after_request
    def _security_headers(response):
        response.headers.setdefault("X-Content-Type-Options", "nosniff")
        response.headers.setdefault("X-Frame-Options", "DENY")
        response.headers.setdefault("Referrer-Policy", "same-origin")
        response.headers.setdefault(
            "Content-Security-Policy",
            "default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; "
            "frame-ancestors 'none'; form-action 'self'",
        )
        if request.endpoint != "static":
            response.headers.setdefault("Cache-Control", "no-store")
        return response

    def _error(code: int, title: str, message: str = ""):
        def handler(exc):
            # Our own aborts carry a translated description; Werkzeug's stock English ones are replaced.
            description = getattr(exc, "description", "")
            if description == getattr(type(exc), "description", None):
                description = ""
            return render_template("error.html", code=code, title=title,
                                   message=description or message), code
        return handler

    app.register_error_handler(400, _error(400, _l("Bad request"),
                                           _l("The request could not be understood. Go back and try again.")))
    app.register_error_handler(403, _error(403, _l("Not allowed"),
                                           _l("Your role does not allow this action on this record.")))
    app.register_error_handler(404, _error(404, _l("Not found"),
                                           _l("There is no such page or record, or it is not yours to see.")))
    app.register_error_handler(405, _error(405, _l("Method not allowed"),
                                           _l("This address does not accept that kind of request.")))
    # MAX_CONTENT_LENGTH stops the request before it is read; say the limit, as for a file
    # refused while it arrives.
    app.register_error_handler(413, _error(413, _l("Too large"), _l(
        "The file is larger than %(mb)d MB; nothing was stored.", mb=settings.attachments.max_upload_mb)))
    app.register_error_handler(CSRFError, _error(
        400, _l("Form expired"), _l("The form was too old or not sent from this site. Go back, reload the page and try again.")))

    @app.errorhandler(500)
    def _internal(exc):
        log.exception("unhandled error on %s %s", request.method, request.path)
        return render_template("error.html", code=500, title=_l("Something went wrong"),
                               message=_l("The error was logged. Please try again.")), 500

    return app


def _reuse_signed_csrf_tokens(app) -> None:
    """Sign each session's CSRF token once per process instead of on every page.

    Flask-WTF signs the session's token anew for each request that renders a form (an HMAC
    with a timestamp, 3-4% of the app's CPU under load). The tokens here have no time limit
    (WTF_CSRF_TIME_LIMIT = None), so a token signed earlier is exactly as valid; Flask-WTF
    uses ``g.csrf_token`` when it is set.
    """
    signed_tokens: dict[tuple[str, str], str] = {}

    @app.before_request
    def _reuse_signed_token():
        raw = session.get("csrf_token")
        if raw is not None and (signed := signed_tokens.get((app.secret_key, raw))) is not None:
            g.csrf_token = signed

    @app.after_request
    def _remember_signed_token(response):
        raw, signed = session.get("csrf_token"), g.get("csrf_token")
        if raw is not None and signed is not None:
            if len(signed_tokens) >= 10_000:  # a bound: one entry per session seen by this process
                signed_tokens.clear()
            signed_tokens[(app.secret_key, raw)] = signed
        return response
