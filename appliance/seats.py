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
from appliance.errors import LastAdminError, SeatError
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
    new_team: bool = False  # its team was created by this add


def add_seat(settings: Settings, email: str, name: str, role: str, team: str | None = None) -> NewSeat:
    """Create one seat and its set-password link, within the licensed seat count."""
    return add_seats(settings, [SeatRow(1, email, name, role, team)])[0]


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


# A removed seat is a disabled one whose reason starts so (remove_seats writes it).
_REMOVED = "removed; "


def is_removed(user: User) -> bool:
    """Whether the seat was removed, its records handed to another seat."""
    return not user.active and (user.suspended_reason or "").startswith(_REMOVED)


def suspend(user: User, reason: str = "suspended", keep_an_admin: bool = True) -> None:
    """Stop a seat at once: its next request finds the session ended, and its unused
    set-password links stop working (R-10, stolen account). ``keep_an_admin=False`` (customer
    IT at the command line, asked explicitly) stops even the last seat with administration
    rights: a stolen boss account when no other boss exists."""
    with database.atomic():
        if keep_an_admin:
            _keep_an_admin(user)
        user.active = False
        user.suspended_reason = reason[:200]
        user.session_version += 1
        user.save()
        SetPasswordToken.delete().where(SetPasswordToken.user == user, SetPasswordToken.used_at.is_null()).execute()


def active_admins() -> int:
    """The active seats whose role has administration rights."""
    return User.select().join(Role).where(User.active, Role.is_admin).count()


def _keep_an_admin(user: User) -> None:
    """Refuse to stop the last active seat with administration rights that can log in: nobody
    could manage the seats on the web any more. Serialised, so that two bosses cannot stop each other at once."""
    admin_roles = Role.select(Role.id).where(Role.is_admin)
    if not user.active or not admin_roles.where(Role.id == user.role_id).exists():
        return
    _lock_seat_count()
    # An invited boss who never set a password cannot log in to manage anything yet.
    others = User.select().where(User.active, User.role.in_(admin_roles), User.id != user.id,
                                 User.password_hash.is_null(False))
    if not others.exists():
        raise LastAdminError(_l("nothing was changed: %(email)s is the last active seat with administration "
                                "rights that can log in; give another active seat a role with administration "
                                "rights (boss) first, and let it set its password", email=user.email))


def in_use() -> int:
    """Seats counted against the licence: the active ones."""
    return User.select().where(User.active).count()


def reactivate(settings: Settings, user: User) -> NewSeat:
    """Bring a suspended or removed seat back like a new seat: its old password, perhaps known
    to whoever stole the account, stops working, and the seat gets a new set-password link.
    A removed seat comes back without records: they stay with the seats that took them over."""
    with database.atomic():
        _lock_seat_count()
        if user.active:
            raise SeatError(_l("%(email)s is active already", email=user.email))
        taken = in_use()
        if taken >= settings.seats.licensed:
            raise SeatError(_l("the licence allows %(n)d seats and all are in use", n=settings.seats.licensed))
        user.active = True
        user.suspended_reason = None
        user.password_hash = None
        user.failed_logins = 0
        user.locked_until = None
        user.session_version += 1
        user.save()
        link, expires = issue_link(settings, user)
    return NewSeat(user=user, link=link, expires_at=expires)


def list_seats() -> list[dict]:
    rows = (User.select(User, Role, Team).join(Role).switch(User).join(Team, JOIN.LEFT_OUTER)
            .order_by(User.email))
    return [
        {"id": u.id, "email": u.email, "name": u.name, "role": u.role.name,
         "team": u.team.name if u.team_id else None, "active": u.active, "removed": is_removed(u),
         "password_set": bool(u.password_hash),
         "last_login_at": u.last_login_at.isoformat() if u.last_login_at else None}
        for u in rows
    ]


# ============================================================================= many seats at once

MAX_BULK = 100  # seats one operation adds, disables or removes
# The columns of a seats file, by their English or Chinese header.
_HEADERS = {"email": "email", "e-mail": "email", "邮箱": "email", "电子邮件": "email",
            "name": "name", "姓名": "name", "名字": "name",
            "role": "role", "角色": "role", "team": "team", "团队": "team"}


# The built-in roles as the Chinese UI shows them (webapp/i18n.py ROLE_NAMES, translated;
# tests/test_seats_bulk.py checks the two agree), as a boss writes them in a seats file.
_ROLE_NAMES_ZH = {"老板": "boss", "经理": "manager", "专员": "agent"}


@dataclass
class SeatRow:
    line: int  # in the file (the header is line 1), for messages
    email: str
    name: str
    role: str
    team: str | None = None


def _decode(data: bytes, source: str) -> str:
    """UTF-8 (with or without BOM), else GBK, as spreadsheets on Chinese desktops save CSV.

    Refused rather than decoded wrongly: UTF-8 with a damaged byte (decoded as GBK, all its
    Chinese would become nonsense), and Windows-1252/Latin-1 text, which GBK mostly decodes
    without error ("Müller" as "M黮ler").
    """
    def line_of(text: str, index: int) -> tuple[int, str]:
        """(line number, its text cut to 60 characters) of the character at ``index``."""
        begin = text.rfind("\n", 0, index) + 1
        end = text.find("\n", index)
        return text.count("\n", 0, index) + 1, text[begin:end if end != -1 else len(text)].strip()[:60]

    marked_utf8 = data.startswith(b"\xef\xbb\xbf")  # the BOM
    body = data[3:] if marked_utf8 else data
    try:
        return body.decode("utf-8")
    except UnicodeDecodeError as exc:
        damage = exc
    if not marked_utf8:
        try:
            text = body.decode("gbk")
        except UnicodeDecodeError:
            pass  # UTF-8 Chinese with a damaged byte practically never decodes as GBK
        else:
            latin = _latin_read_as_gbk(text)
            if latin is None:
                return text
            line, sample = line_of(text, latin)
            raise SeatError(_l("%(source)s is neither UTF-8 nor GBK Chinese text (line %(line)d reads as "
                               "“%(text)s”); save it as CSV (UTF-8)", source=source, line=line, text=sample))
    if marked_utf8 or any(byte > 0x7F for byte in body[:damage.start]):
        whole = body.decode("utf-8", errors="replace")
        line, sample = line_of(whole, len(body[:damage.start].decode("utf-8")))
        raise SeatError(_l("%(source)s is UTF-8 text with a damaged byte (%(byte)s, shown as �) on line "
                           "%(line)d: “%(text)s”; correct that character, then save the file as CSV (UTF-8) again",
                           source=source, byte=f"0x{body[damage.start]:02X}", line=line, text=sample))
    raise SeatError(_l("%(source)s is neither UTF-8 nor GBK text; save it as CSV (UTF-8)", source=source))


def _latin_read_as_gbk(text: str) -> int | None:
    """Where GBK read Windows-1252/Latin-1 text, or None. An accented letter there is one byte
    of 0x80 or more, and GBK takes it with the ASCII letter after it as one character, whose
    second byte is then under 0x80: right after another ASCII letter ("M黮ler" for "Müller",
    "Fran鏾is"). Chinese text hardly ever puts such a character (the rarer ones: 喆, 珺, 玥)
    straight after a Latin letter."""
    for index in range(1, len(text)):
        char = text[index]
        if char > "\x7f" and text[index - 1].isascii() and text[index - 1].isalpha():
            encoded = char.encode("gbk")
            if len(encoded) == 2 and encoded[1] < 0x80:
                return index
    return None


def _csv_lines(data: bytes, source: str) -> list[tuple[int, list[str]]]:
    """The non-empty rows of a CSV file (or of cells pasted from a spreadsheet), each with its
    line number in the file, so that messages name the line an editor shows."""
    import csv
    import io

    text = _decode(data, source)
    # Cells copied from a spreadsheet arrive separated by tabs.
    dialect = "excel-tab" if "\t" in text.split("\n", 1)[0] else "excel"
    reader = csv.reader(io.StringIO(text), dialect=dialect)
    rows = []
    for row in reader:
        if any(cell.strip() for cell in row):
            rows.append((reader.line_num, row))
    return rows


def _header_columns(row: list[str]) -> dict[str, int]:
    """{column: index} for the known headers in ``row`` (empty if it is not a header row)."""
    columns: dict[str, int] = {}
    for index, header in enumerate(row):
        key = _HEADERS.get(header.strip().lower())
        if key and key not in columns:
            columns[key] = index
    return columns


def read_seat_rows(data: bytes, source: str) -> list[SeatRow]:
    """The seats in a CSV file with a header row: email, name, role and optionally team."""
    rows = _csv_lines(data, source)
    if not rows:
        raise SeatError(_l("%(source)s is empty; expected a header row: email,name,role,team", source=source))
    columns = _header_columns(rows[0][1])
    missing = [c for c in ("email", "name", "role") if c not in columns]
    if missing:
        raise SeatError(_l("%(source)s: the header row lacks %(missing)s; expected email,name,role,team "
                           "(or 邮箱,姓名,角色,团队)", source=source, missing=", ".join(missing)))
    seats = []
    for line, row in rows[1:]:
        cell = lambda key: row[columns[key]].strip() if key in columns and columns[key] < len(row) else ""  # noqa: E731
        seats.append(SeatRow(line, cell("email"), cell("name"), cell("role"), cell("team") or None))
    if not seats:
        raise SeatError(_l("%(source)s has a header row but no seats", source=source))
    if len(seats) > MAX_BULK:
        raise SeatError(_l("%(source)s holds %(n)d seats; one operation adds at most %(max)d: split the file",
                           source=source, n=len(seats), max=MAX_BULK))
    return seats


def read_seat_emails(data: bytes, source: str) -> dict[str, int]:
    """The e-mails in a file naming seats to disable or remove: one per line, or the e-mail
    column of a CSV file (its first column, or the one its optional header row names).

    Returns {e-mail: line}. Every other non-empty line is refused by number, so that a typo
    cannot leave a seat active unnoticed.
    """
    rows = _csv_lines(data, source)
    if not rows:
        raise SeatError(_l("%(source)s names no seat; expected one e-mail per line", source=source))
    column = _header_columns(rows[0][1]).get("email")
    if column is None:
        column = 0  # no header row: the first column
    else:
        rows = rows[1:]
    found: dict[str, int] = {}
    problems = []
    for line, row in rows:
        cell = row[column].strip() if column < len(row) else ""
        try:
            found.setdefault(normalise_email(cell), line)
        except SeatError as exc:
            problems.append((line, str(exc)))
    if problems:
        raise SeatError(_l("nothing was changed: %(n)d lines of %(source)s are wrong: %(shown)s", n=len(problems),
                           source=source, shown=_shown(problems)))
    if not found:
        raise SeatError(_l("%(source)s names no seat; expected one e-mail per line", source=source))
    return found


def _shown(problems: list[tuple[int, str]]) -> str:
    """The first 20 (line, problem) pairs, for a message."""
    return "; ".join(str(_l("line %(line)d: %(problem)s", line=line, problem=text)) for line, text in problems[:20])


def _roles_by_name() -> dict[str, Role]:
    """Every role by its name, then in lower case, and the built-in ones by their Chinese names
    too: look a name up as written, then in lower case."""
    roles = {r.name: r for r in Role.select()}
    for role in list(roles.values()):
        roles.setdefault(role.name.lower(), role)
    for shown, name in _ROLE_NAMES_ZH.items():
        if name in roles:
            roles.setdefault(shown, roles[name])
    return roles


def _lock_seat_count() -> None:
    """Serialise the seat-count checks of concurrent adds (two boss tabs, the CLI)."""
    database.execute_sql("SELECT pg_advisory_xact_lock(hashtext('crm-appliance seats'))")


def add_seats(settings: Settings, rows: list[SeatRow]) -> list[NewSeat]:
    """Add every seat or none: each row is checked, and the licence must have room for all.

    Raises SeatError listing every bad line (up to 20), or saying how many seats are free.
    """
    if len(rows) > MAX_BULK:
        raise SeatError(_l("one operation adds at most %(max)d seats; this one adds %(n)d", max=MAX_BULK,
                           n=len(rows)))
    roles = _roles_by_name()
    problems, seen, clean = [], {}, []
    for row in rows:
        try:
            email = normalise_email(row.email)
            name = (row.name or "").strip()
            if not name or len(name) > 100:
                raise SeatError(_l("a seat needs a name of 1 to 100 characters"))
            written = (row.role or "").strip()
            role = roles.get(written) or roles.get(written.lower())
            if role is None:
                raise SeatError(_l("unknown role %(role)s; expected one of: %(names)s", role=repr(row.role),
                                   names=", ".join(sorted({r.name for r in roles.values()}))))
            team = (row.team or "").strip()
            if len(team) > 100:
                raise SeatError(_l("the team name %(team)s is longer than 100 characters", team=repr(team)))
            if email in seen:
                raise SeatError(_l("%(email)s is also on line %(line)d", email=email, line=seen[email]))
            seen[email] = row.line
            clean.append(SeatRow(row.line, email, name, role.name, team or None))
        except SeatError as exc:
            problems.append((row.line, str(exc)))
    with database.atomic():
        _lock_seat_count()
        existing = {u.email for u in User.select(User.email).where(User.email.in_(list(seen)))}
        problems += [(r.line, str(_l("a seat with e-mail %(email)s already exists", email=r.email)))
                     for r in clean if r.email in existing]
        if problems:
            problems.sort()
            if len(rows) == 1:
                raise SeatError(problems[0][1])
            raise SeatError(_l("no seat was added: %(n)d lines are wrong: %(shown)s", n=len(problems),
                               shown=_shown(problems)))
        taken = in_use()
        free = settings.seats.licensed - taken
        if len(clean) > free:
            if len(rows) == 1:
                raise SeatError(_l("the licence allows %(n)d seats and all are in use; disable a seat or extend "
                                   "the licence", n=settings.seats.licensed))
            raise SeatError(_l("no seat was added: the licence allows %(licensed)d seats, %(in_use)d are in use, "
                               "so %(free)d are free, and this adds %(n)d; add fewer, disable seats or extend "
                               "the licence", licensed=settings.seats.licensed, in_use=taken, free=max(free, 0),
                               n=len(clean)))
        created = []
        for row in clean:
            team, new_team = Team.get_or_create(name=row.team) if row.team else (None, False)
            user = User.create(email=row.email, name=row.name, role=roles[row.role], team=team)
            link, expires = issue_link(settings, user)
            created.append(NewSeat(user=user, link=link, expires_at=expires, new_team=new_team))
    return created


def new_teams(created: list[NewSeat]) -> list[str]:
    """The teams an add created, for its message: a typo ("Eats" for "East") shows at once."""
    return sorted({c.user.team.name for c in created if c.new_team})


def find_seats(emails: list[str], lines: dict[str, int] | None = None) -> list[User]:
    """The seats with these e-mails, in the given order; SeatError naming any that is unknown
    (with its line in the file, if ``lines`` maps e-mails to lines)."""
    wanted = [normalise_email(e) for e in emails]
    if not wanted:
        raise SeatError(_l("name at least one seat by its e-mail"))
    if len(wanted) > MAX_BULK:
        raise SeatError(_l("one operation changes at most %(max)d seats; this one names %(n)d", max=MAX_BULK,
                           n=len(wanted)))
    found = {u.email: u for u in User.select().where(User.email.in_(wanted))}
    unknown = [e for e in wanted if e not in found]
    if unknown:
        lines = lines or {}
        unknown = [str(_l("%(email)s (line %(line)d)", email=e, line=lines[e])) if e in lines else e for e in unknown]
        raise SeatError(_l("no seat has the e-mail %(emails)s; nothing was changed", emails=", ".join(unknown)))
    return [found[e] for e in dict.fromkeys(wanted)]


def disable_seats(users: list[User], reason: str = "disabled", keep_an_admin: bool = True) -> list[User]:
    """Disable seats at once (their sessions end at their next request); returns those that
    were active (the others stay as they were). ``keep_an_admin``: see :func:`suspend`."""
    with database.atomic():
        changed = [u for u in users if u.active]
        for user in changed:
            suspend(user, reason, keep_an_admin)
    return changed


def remove_seats(users: list[User], heir: User, actor) -> dict[str, int]:
    """Disable seats for good and hand every record they own to ``heir``, audited per record.

    Nothing is left without an owner. The seats' rows stay (as removed, not counted against
    the licence), so that their notes and the audit trail still name their authors.
    Returns {entity: records handed over}.
    """
    from webapp import audit
    from webapp.models import RECORD_MODELS, Attachment

    if not heir.active:
        raise SeatError(_l("%(email)s is not an active seat; choose an active seat to take over the records",
                           email=heir.email))
    if any(u.id == heir.id for u in users):
        raise SeatError(_l("%(email)s cannot take over its own records: it is being removed", email=heir.email))
    moved: dict[str, int] = {}
    ids = [u.id for u in users]
    actor_id, actor_name = (actor.id, actor.email) if isinstance(actor, User) else (None, str(actor))
    with database.atomic():
        for entity, model in RECORD_MODELS.items():
            table = model._meta.table_name
            now = utcnow()
            # One audit row per record, written by the database from the rows themselves.
            cursor = database.execute_sql(
                f'INSERT INTO audit_log (at, user_id, actor, ip, entity, record_id, action, changes) '
                f"SELECT %s, %s, %s, %s, %s, id, 'update', jsonb_build_object("
                f"'owner', jsonb_build_array(owner_id, %s), 'team', jsonb_build_array(team_id, %s)) "
                f'FROM "{table}" WHERE owner_id = ANY(%s)',
                (now, actor_id, actor_name, audit.client_ip(), entity, heir.id, heir.team_id, ids))
            if cursor.rowcount:
                model.update(owner=heir.id, team=heir.team_id, updated_at=now).where(model.owner.in_(ids)).execute()
                moved[entity] = cursor.rowcount
        # Their files now count in the heir's share of the attachment space.
        files = Attachment.update(owner=heir.id).where(Attachment.owner.in_(ids)).execute()
        if files:
            moved["attachment"] = files
        for user in users:
            was_active = user.active
            suspend(user, f"{_REMOVED}records handed to {heir.email}")
            audit.write_row(actor, "user", user.id, "remove", {"active": [was_active, False],
                                                               "records_to": [None, heir.email]})
    return moved
