"""Seats (user accounts): add, list, suspend, and the one-time set-password links.

Nobody ever chooses or sees another person's password (R-10): a new seat gets a
link, valid for ``[web] set_password_link_hours``, on which its owner sets it.
Only the SHA-256 of the link's token is stored.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import re
import secrets
import threading
from dataclasses import dataclass

from argon2 import PasswordHasher
from peewee import JOIN
from argon2.exceptions import InvalidHashError, VerificationError
from flask_babel import lazy_gettext as _l

from appliance.config import Settings
from appliance.errors import SeatError
from webapp.models import Role, SetPasswordToken, Team, User, database, utcnow

_hasher = PasswordHasher()  # argon2id with the library's current recommended cost
# Each argon2 check holds 64 MiB (its memory cost) for about 0.15 s of CPU. With every
# thread of every worker checking at once, as when the whole team logs in at 9:00, the
# plan's 5 x 8 slots held up to 2.5 GiB (docs/performance.md); two at a time per process
# bound that to 5 x 2 x 64 MiB, and more would not finish sooner on the plan's cores.
_ARGON2_SLOTS = threading.BoundedSemaphore(2)
# Verified against when the e-mail is unknown, so both cases take the same time.
_DUMMY_HASH = _hasher.hash("not a real password")

EMAIL_RE = re.compile(r"^[^@\s]{1,64}@[^@\s]{1,190}\.[^@\s]{1,60}$")
MIN_PASSWORD = 10
MAX_PASSWORD = 256


def hash_password(password: str) -> str:
    with _ARGON2_SLOTS:
        return _hasher.hash(password)


def verify_password(user: User | None, password: str) -> bool:
    """Constant-effort check; also true only for a seat that has set a password."""
    stored = user.password_hash if user is not None and user.password_hash else None
    try:
        with _ARGON2_SLOTS:
            return _hasher.verify(stored or _DUMMY_HASH, password) and stored is not None
    except (VerificationError, InvalidHashError):
        return False


def password_problem(password: str, email: str = ""):
    """Why a new password is not acceptable (a lazily translated message), or None."""
    if len(password) < MIN_PASSWORD:
        return _l("Use at least %(n)d characters.", n=MIN_PASSWORD)
    if len(password) > MAX_PASSWORD:
        return _l("Use at most %(n)d characters.", n=MAX_PASSWORD)
    if email and password.strip().lower() == email.lower():
        return _l("The password must not be your e-mail address.")
    if len(set(password)) < 4:
        return _l("Use more different characters.")
    return None


def normalise_email(email: str) -> str:
    email = (email or "").strip().lower()
    if not EMAIL_RE.match(email) or len(email) > 254:
        raise SeatError(_l("%(email)s is not an e-mail address", email=repr(email)))
    return email


@dataclass
class NewSeat:
    user: User
    link: str
    expires_at: dt.datetime


def add_seat(settings: Settings, email: str, name: str, role: str, team: str | None = None) -> NewSeat:
    """Create one seat and its set-password link, within the licensed seat count."""
    email = normalise_email(email)
    name = (name or "").strip()
    if not name or len(name) > 100:
        raise SeatError(_l("a seat needs a name of 1 to 100 characters"))
    role_row = Role.get_or_none(Role.name == role)
    if role_row is None:
        names = ", ".join(r.name for r in Role.select().order_by(Role.name))
        raise SeatError(_l("unknown role %(role)s; expected one of: %(names)s", role=repr(role), names=names))
    with database.atomic():
        in_use = User.select().where(User.active).count()
        if in_use >= settings.seats.licensed:
            raise SeatError(_l("the licence allows %(n)d seats and all are in use; disable a seat or extend "
                                  "the licence", n=settings.seats.licensed))
        if User.select().where(User.email == email).exists():
            raise SeatError(_l("a seat with e-mail %(email)s already exists", email=email))
        team_row = None
        if team:
            team_row, _ = Team.get_or_create(name=team.strip()[:100])
        user = User.create(email=email, name=name, role=role_row, team=team_row)
        link, expires = issue_link(settings, user)
    return NewSeat(user=user, link=link, expires_at=expires)


def issue_link(settings: Settings, user: User) -> tuple[str, dt.datetime]:
    """A fresh one-time link for ``user``; earlier unused links stop working."""
    token = secrets.token_urlsafe(32)
    expires = utcnow() + dt.timedelta(hours=settings.web.set_password_link_hours)
    with database.atomic():
        SetPasswordToken.delete().where(SetPasswordToken.user == user, SetPasswordToken.used_at.is_null()).execute()
        SetPasswordToken.create(user=user, token_hash=_token_hash(token), expires_at=expires)
    base = settings.web.public_url.rstrip("/")
    return f"{base}/auth/set-password/{token}", expires


def _token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def find_token(token: str) -> SetPasswordToken | None:
    """The unused, unexpired token row for a link, or None."""
    if not token or len(token) > 100:
        return None
    row = SetPasswordToken.get_or_none(SetPasswordToken.token_hash == _token_hash(token))
    if row is None or row.used_at is not None or row.expires_at < utcnow() or not row.user.active:
        return None
    return row


def set_password(token_row: SetPasswordToken, password: str) -> User:
    """Use a link once: store the hash, clear the lock-out, end other sessions."""
    user = token_row.user
    with database.atomic():
        token_row.used_at = utcnow()
        token_row.save()
        user.password_hash = hash_password(password)
        user.failed_logins = 0
        user.locked_until = None
        user.session_version += 1
        user.save()
    return user


def suspend(user: User, reason: str = "suspended") -> None:
    """Stop a seat at once: its next request finds the session ended (R-10, stolen account)."""
    user.active = False
    user.suspended_reason = reason[:200]
    user.session_version += 1
    user.save()


def reactivate(settings: Settings, user: User) -> None:
    with database.atomic():
        in_use = User.select().where(User.active).count()
        if in_use >= settings.seats.licensed:
            raise SeatError(_l("the licence allows %(n)d seats and all are in use", n=settings.seats.licensed))
        user.active = True
        user.suspended_reason = None
        user.save()


def list_seats() -> list[dict]:
    rows = (User.select(User, Role, Team).join(Role).switch(User).join(Team, JOIN.LEFT_OUTER)
            .order_by(User.email))
    return [
        {"id": u.id, "email": u.email, "name": u.name, "role": u.role.name,
         "team": u.team.name if u.team_id else None, "active": u.active,
         "password_set": bool(u.password_hash),
         "last_login_at": u.last_login_at.isoformat() if u.last_login_at else None}
        for u in rows
    ]
