"""Log in, log out, set a password from a one-time link, choose the UI language.

Every page needs a logged-in, active seat except the few in ``PUBLIC_ENDPOINTS``:
the check runs before every request (deny by default), not per view. A seat whose
``session_version`` changed (suspended, password set) is logged out at its next request.
"""

from __future__ import annotations

import datetime as dt
import time
from urllib.parse import urlsplit

from flask import (Blueprint, current_app, flash, g, redirect, render_template, request, session,
                   url_for)
from flask_babel import gettext as _
from flask_wtf import FlaskForm
from wtforms import EmailField, PasswordField
from wtforms.validators import DataRequired, EqualTo, Length

from appliance import seats
from appliance.errors import SeatError
from webapp.i18n import lazy_gettext as _l
from webapp.models import LoginLog, Role, User, utcnow
from webapp.prepared import Prepared

bp = Blueprint("auth", __name__, url_prefix="/auth")

PUBLIC_ENDPOINTS = {"auth.login", "auth.set_password", "auth.locale", "static", "health.healthz", "health.readyz"}


class LoginForm(FlaskForm):
    email = EmailField(_l("E-mail"), validators=[DataRequired(), Length(max=254)])
    password = PasswordField(_l("Password"), validators=[DataRequired(), Length(max=seats.MAX_PASSWORD)])


class SetPasswordForm(FlaskForm):
    password = PasswordField(_l("New password"), validators=[DataRequired(), Length(max=seats.MAX_PASSWORD)])
    confirm = PasswordField(_l("Repeat the password"),
                            validators=[DataRequired(), EqualTo("password", message=_l("The two passwords differ."))])


def init_app(app) -> None:
    app.before_request(load_user)


# How often an active seat's session cookie is re-issued (its lifetime, [web] session_hours,
# counts from the last re-issue), instead of on every response.
SESSION_REFRESH_SECONDS = 300


# What a request needs of its seat (g.user): not the password hash, lock-out counters or
# login times, which only the login and the administration pages read (from their own queries).
SESSION_USER_COLUMNS = (User.id, User.email, User.name, User.role, User.team, User.locale, User.active,
                        User.session_version)


# Every request reads its seat: the statement's text is built once (webapp/prepared.py).
_SESSION_USER = Prepared(lambda uid: User.select(*SESSION_USER_COLUMNS, Role).join(Role)
                         .where(User.id == uid).limit(1))


def load_user():
    """Put the session's seat in ``g.user``; send anyone else to the login page."""
    g.user = None
    uid, version = session.get("uid"), session.get("v")
    if uid is not None:
        user = _SESSION_USER.first(uid) if type(uid) is int else None
        if user is not None and user.active and user.session_version == version:
            g.user = user
            now = int(time.time())
            if now - session.get("t", 0) >= SESSION_REFRESH_SECONDS:
                session["t"] = now  # a changed session is signed and sent again, with its lifetime
        else:
            session.clear()
    if g.user is None and request.endpoint not in PUBLIC_ENDPOINTS and request.endpoint is not None:
        if request.method == "GET":
            return redirect(url_for("auth.login", next=request.full_path.rstrip("?")))
        return redirect(url_for("auth.login"))
    return None


def _safe_next(target: str | None) -> str:
    """Only a path on this site: no scheme, no host, no protocol-relative //."""
    if not target or len(target) > 2000:
        return url_for("dashboard.index")
    parts = urlsplit(target)
    if parts.scheme or parts.netloc or not target.startswith("/") or target.startswith("//") or "\\" in target:
        return url_for("dashboard.index")
    return target


# Logged instead of what was typed in the e-mail field when it is no e-mail address: often a
# password typed in the wrong field, which the login log (kept, shown, exported) must not hold.
NOT_AN_EMAIL = "(not an e-mail address)"


def _log_attempt(email: str, user: User | None, success: bool, reason: str) -> None:
    try:
        email = seats.normalise_email(email)
    except SeatError:
        email = NOT_AN_EMAIL
    LoginLog.create(user=user.id if user else None, email=email, ip=request.remote_addr,
                    user_agent=(request.user_agent.string or "")[:300], success=success, reason=reason)


@bp.route("/login", methods=["GET", "POST"])
def login():
    """Check the password; lock the seat after repeated failures; log every attempt."""
    if g.user is not None:
        return redirect(url_for("dashboard.index"))
    form = LoginForm()
    if not form.is_submitted():
        form.email.data = (request.args.get("email") or "")[:254]
    error = None
    if form.validate_on_submit():
        settings = current_app.extensions["crm_settings"]
        email = form.email.data.strip().lower()
        user = User.get_or_none(User.email == email)
        now = utcnow()
        error = _("Wrong e-mail or password.")
        if user is not None and user.locked_until and user.locked_until > now:
            seats.verify_password(None, form.password.data)  # same effort as a real check
            minutes = int((user.locked_until - now).total_seconds() // 60) + 1
            error = _("Too many failed attempts. Try again in %(minutes)d minutes.", minutes=minutes)
            _log_attempt(email, user, False, "locked")
        elif not seats.verify_password(user, form.password.data):
            reason = "unknown user" if user is None else (
                "no password set" if not user.password_hash else "wrong password")
            if user is not None:
                user.failed_logins += 1
                if user.failed_logins >= settings.web.login_max_failures:
                    user.locked_until = now + dt.timedelta(minutes=settings.web.login_lockout_minutes)
                    user.failed_logins = 0
                    reason = "wrong password, locked"
                user.save()
            _log_attempt(email, user, False, reason)
        elif not user.active:
            error = _("This account is suspended. Ask your administrator.")
            _log_attempt(email, user, False, "suspended")
        else:
            user.failed_logins = 0
            user.locked_until = None
            user.last_login_at = now
            user.save()
            _log_attempt(email, user, True, "ok")
            session.clear()  # a fresh session: nothing carried over from before login
            session.permanent = True
            session["uid"], session["v"] = user.id, user.session_version
            if user.locale:
                session["locale"] = user.locale
            return redirect(_safe_next(request.args.get("next")))
    elif request.method == "POST":
        error = _("Enter your e-mail and password.")
    status = 200 if error is None else 401
    return render_template("login.html", form=form, error=error), status


@bp.route("/logout", methods=["POST"])
def logout():
    session.clear()
    flash(_("You are logged out."), "info")
    return redirect(url_for("auth.login"))


@bp.route("/set-password/<token>", methods=["GET", "POST"])
def set_password(token: str):
    """The one-time link a new seat receives; after use it no longer works."""
    row = seats.find_token(token)
    if row is None:
        return render_template("error.html", code=404, title=_("Link not valid"),
                               message=_("This link was already used or has expired. "
                                         "Ask your administrator for a new one.")), 404
    form = SetPasswordForm()
    if form.validate_on_submit():
        problem = seats.password_problem(form.password.data, row.user.email)
        if problem:
            form.password.errors.append(problem)
        else:
            user = seats.set_password(row, form.password.data)
            session.clear()
            flash(_("Your password is set. Log in with it now."), "success")
            return redirect(url_for("auth.login", email=user.email))
    return render_template("set_password.html", form=form, seat=row.user,
                           min_length=seats.MIN_PASSWORD), 200 if not form.errors else 400


@bp.route("/locale", methods=["POST"])
def locale():
    """Switch the UI language; remembered for the seat, or the session before login."""
    from webapp import LOCALES

    choice = request.form.get("locale", "")
    if choice in LOCALES:
        session["locale"] = choice
        if g.user is not None:
            User.update(locale=choice).where(User.id == g.user.id).execute()
    return redirect(_safe_next(request.form.get("next")))
