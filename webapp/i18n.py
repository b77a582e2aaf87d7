"""Language choice and the words shared by many templates (stage, status and entity names)."""

from __future__ import annotations

import datetime as dt
import decimal
import zoneinfo

from flask import current_app, g, has_request_context, request, session, url_for
from flask_babel import get_locale, get_translations
from flask_babel.speaklater import LazyString
from jinja2 import pass_context
from markupsafe import Markup

from webapp import permissions
from webapp.models import OwnedRecord, User


def page_translations():
    """The request's catalogue, looked up once per request: Flask-Babel looks the locale and
    the catalogue up again on every translation (six context-local reads each), and a page
    translates a few dozen labels and texts."""
    if not has_request_context():
        return get_translations()
    translations = g.get("page_translations")
    if translations is None:
        translations = g.page_translations = get_translations()
    return translations


def _translate(string: str, **variables) -> str:
    text = page_translations().ugettext(string)
    return text % variables if variables else text


def lazy_gettext(string: str, **variables) -> LazyString:
    """``flask_babel.lazy_gettext`` over ``page_translations``: for the labels (fields,
    columns, choices, entity names) that pages show by the dozen."""
    return LazyString(_translate, string, **variables)


_l = lazy_gettext


def select_locale() -> str:
    """The seat's choice, else this session's, else the browser's, else the configured default."""
    from webapp import LOCALES

    user = getattr(g, "user", None)
    if user is not None and user.locale in LOCALES:
        return user.locale
    if session.get("locale") in LOCALES:
        return session["locale"]
    return request.accept_languages.best_match(LOCALES) or current_app.config["BABEL_DEFAULT_LOCALE"]


ENTITY_NAMES = {
    "account": _l("Account"), "contact": _l("Contact"), "lead": _l("Lead"),
    "opportunity": _l("Opportunity"), "ticket": _l("Ticket"), "activity": _l("Activity"),
    "note": _l("Note"), "user": _l("Seat"),
    # audited besides the records: the files, the company, the boss's notices and exports
    "attachment": _l("Attachment"), "company": _l("Company profile"), "announcement": _l("Announcement"),
    "export": _l("Data export"), "appliance": _l("Appliance"),
}
ENTITY_PLURALS = {
    "account": _l("Accounts"), "contact": _l("Contacts"), "lead": _l("Leads"),
    "opportunity": _l("Opportunities"), "ticket": _l("Tickets"), "activity": _l("Activities"),
}

# Every value of every choice field, translated once.
CHOICE_LABELS = {
    # lead status
    "new": _l("New"), "contacted": _l("Contacted"), "qualified": _l("Qualified"),
    "converted": _l("Converted"), "lost": _l("Lost"),
    # opportunity stage
    "prospecting": _l("Prospecting"), "qualification": _l("Qualification"), "proposal": _l("Proposal"),
    "negotiation": _l("Negotiation"), "won": _l("Won"),
    # ticket status and priority
    "open": _l("Open"), "pending": _l("Pending"), "solved": _l("Solved"), "closed": _l("Closed"),
    "low": _l("Low"), "normal": _l("Normal"), "high": _l("High"), "urgent": _l("Urgent"),
    # activity kind and status
    "task": _l("Task"), "call": _l("Call"), "meeting": _l("Meeting"),
    "planned": _l("Planned"), "done": _l("Done"), "cancelled": _l("Cancelled"),
    # audit actions (AUDIT_ACTIONS)
    "create": _l("created"), "update": _l("changed"), "delete": _l("deleted"), "export": _l("exported"),
    "suspend": _l("suspended"), "reactivate": _l("reactivated"), "new_link": _l("issued a set-password link"),
    "remove": _l("removed, records handed over"), "restore": _l("restored"), "destroy": _l("destroyed"),
    "purge": _l("purged all customer data"), "export_all": _l("exported all data"), "download": _l("downloaded"),
    "certify": _l("certified"), "refused": _l("refused"), "withdraw": _l("withdrawn"),
    # permission levels
    "all": _l("all"), "team": _l("team"), "own": _l("own"), "none": _l("none"),
}

# What the audit log's rows say was done, in the order its filter offers them.
AUDIT_ACTIONS = ("create", "update", "delete", "restore", "destroy", "export", "export_all", "download", "suspend",
                 "reactivate", "new_link", "remove", "certify", "refused", "withdraw", "purge")


ROLE_NAMES = {"boss": _l("Boss"), "manager": _l("Manager"), "agent": _l("Agent")}
PERMISSION_ACTIONS = {"read": _l("Read"), "create": _l("Create"), "edit": _l("Edit"), "delete": _l("Delete"),
                      "export": _l("Export")}
# Why a login failed or succeeded, as stored in the login log.
LOGIN_REASONS = {
    "ok": _l("Logged in"), "wrong password": _l("Wrong password"), "unknown user": _l("Unknown e-mail"),
    "no password set": _l("No password set yet"), "wrong password, locked": _l("Wrong password; account locked"),
    "locked": _l("Account locked"), "suspended": _l("Seat suspended"),
}
NOTICE_LEVELS = {"info": _l("Information"), "warning": _l("Warning"), "error": _l("Error")}
JOB_OUTCOMES = {"running": _l("Running"), "ok": _l("Succeeded"), "failed": _l("Failed")}


def choice_label(value) -> str:
    return CHOICE_LABELS.get(value, value if value is not None else "")


def template_globals() -> dict:
    """Helpers every template may call; set once on the Jinja environment, not per page."""
    from webapp.crud import MODULES  # crud imports this module

    return {
        "may_read": lambda record: permissions.allows(g.user, record, "read"),
        "modules": MODULES,
        "getattr": getattr,
        "entity_name": lambda e: ENTITY_NAMES.get(e, e),
        "entity_plural": lambda e: ENTITY_PLURALS.get(e, e),
        "choice_label": choice_label,
        "role_name": lambda name: ROLE_NAMES.get(name, name),
        "permission_action": lambda name: PERMISSION_ACTIONS.get(name, name),
        "login_reason": lambda reason: LOGIN_REASONS.get(reason, reason),
        "notice_level": lambda level: NOTICE_LEVELS.get(level, level),
        "job_outcome": lambda outcome: JOB_OUTCOMES.get(outcome, outcome),
        "file_size": file_size,
        "show_value": show_value,
    }


def template_locale() -> dict:
    """The page's language and its catalogue (a context processor: they change per request).

    Jinja's ``_()`` and ``ngettext()`` find these before the ones Flask-Babel installs, which
    look the request's locale and catalogue up again on every call (six context-local reads
    each, a record page makes some thirty calls).
    """
    translations = page_translations()
    return {"current_locale": str(get_locale() or "en"),
            "gettext": _page_gettext(translations.ugettext), "ngettext": _page_ngettext(translations.ungettext)}


def _page_gettext(translate):
    """A template's ``gettext`` over a catalogue's lookup, as Jinja's i18n extension makes
    it with ``newstyle``: the text escaped for the page, its ``%(name)s`` filled in."""

    @pass_context
    def gettext(context, string: str, **variables):
        text = translate(string)
        return (Markup(text) if context.eval_ctx.autoescape else text) % variables

    return gettext


def _page_ngettext(translate):
    @pass_context
    def ngettext(context, singular: str, plural: str, num: int, **variables):
        variables.setdefault("num", num)
        text = translate(singular, plural, num)
        return (Markup(text) if context.eval_ctx.autoescape else text) % variables

    return ngettext


_CHOICE_FIELDS = ("status", "stage", "priority", "kind")


def show_value(value, name: str = ""):
    """How a value is shown on a page (templates call it as ``show_value``).

    Python rather than a Jinja macro: a list page shows hundreds of values, and a macro
    call costs several times a function call. A linked record outside the seat's read
    level shows as its number only, never its name.
    """
    from webapp.crud import MODULES  # crud imports this module

    if value is None or value == "":
        return Markup('<span class="muted">—</span>')
    if isinstance(value, OwnedRecord):
        if permissions.allows(g.user, value, "read"):
            href = url_for(MODULES[value.entity].endpoint + ".detail", record_id=value.id)
            return Markup('<a href="%s">%s</a>') % (href, value.title)
        return Markup('<span class="muted">#%s</span>') % value.id
    if isinstance(value, User):
        return value.name
    if isinstance(value, dt.datetime):
        return local_minutes(value)
    if isinstance(value, dt.date):
        return value.isoformat()
    if isinstance(value, decimal.Decimal):
        return "{:,.2f}".format(value)
    if name in _CHOICE_FIELDS:
        return Markup('<span class="tag tag-%s">%s</span>') % (value, choice_label(value))
    return value


def local_minutes(value: dt.datetime) -> str:
    """A stored time (naive means UTC) as seats read it: in [web] timezone, to the minute.

    The same text as ``format_datetime(value, "yyyy-MM-dd HH:mm")`` (a test compares them,
    across daylight-saving changes) at a tenth of its cost: a list page shows dozens.
    """
    if value.tzinfo is None:
        value = value.replace(tzinfo=dt.timezone.utc)
    t = value.astimezone(zoneinfo.ZoneInfo(current_app.config["BABEL_DEFAULT_TIMEZONE"]))  # ZoneInfo caches
    return f"{t.year:04d}-{t.month:02d}-{t.day:02d} {t.hour:02d}:{t.minute:02d}"


def file_size(n: int) -> str:
    """Bytes as people read them, in the page's number format: 512 B, 1.5 MB."""
    from flask_babel import format_decimal

    value = float(n)
    for unit in ("B", "KB", "MB", "GB"):
        if value < 1024 or unit == "GB":
            return f"{int(value)} B" if unit == "B" else f"{format_decimal(round(value, 1))} {unit}"
        value /= 1024
    return f"{n} B"
