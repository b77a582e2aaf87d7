"""Notices for the boss: a row the web UI shows (Administration → Notices) and, when an
``[smtp]`` host is configured, an e-mail to every active boss seat.

A notice keeps a message id, an English template marked with :func:`N_` (so that
scripts/i18n.sh extracts it into the UI catalogue), and its ``%(name)s`` parameters: the page
shows it in the reader's language, the e-mail carries the English and the Chinese text. The
English text is kept in ``message`` too (the logs, the command line, rows from before).

The e-mail is best effort: a mail server that is down or refuses the message is logged and
never stops the caller (a scheduler job, a quota check). The notice row is the record.
"""

from __future__ import annotations

import functools
import logging
import smtplib
import ssl
from email.message import EmailMessage
from email.utils import formatdate, make_msgid
from pathlib import Path

from appliance.config import Settings

log = logging.getLogger(__name__)

LEVELS = ("info", "warning", "error")
TRANSLATIONS_DIR = Path(__file__).resolve().parent.parent / "webapp" / "translations"
#: The languages an e-mailed notice is written in, besides English.
MAIL_LOCALES = ("zh",)


def N_(message_id: str) -> str:
    """Mark a notice's message id for extraction; it is translated when shown, not here."""
    return message_id


@functools.lru_cache(maxsize=None)
def _catalogue(locale: str):
    from babel.support import Translations

    return Translations.load(str(TRANSLATIONS_DIR), [locale], domain="messages")


def render(message_id: str, params: dict | None, locale: str | None = None) -> str:
    """The notice's text in ``locale`` (None: English); a missing translation gives the English.
    Without parameters the text is taken as it is (as webapp.i18n does): a plain English text
    passed by a caller may hold a bare "%"."""
    template = _catalogue(locale).ugettext(message_id) if locale else message_id
    return template % params if params else template


def record_notice(level: str, source: str, message_id: str, params: dict | None = None):
    """Write the notice row, in the caller's transaction if there is one (the models must be
    bound to a connected database); :func:`mail_notice` it after the commit."""
    from webapp.models import Notice

    if level not in LEVELS:
        raise ValueError(f"level: expected one of {', '.join(LEVELS)}, found {level!r}")
    return Notice.create(level=level, source=source, message=render(message_id, params),
                         message_id=message_id, params=params or {})


def mail_notice(settings: Settings, notice) -> None:
    """E-mail a recorded notice to the bosses, in English and Chinese, when [smtp] names a host."""
    if not settings.smtp.host or notice is None:
        return
    recipients = boss_addresses()
    if not recipients:
        return
    footer = N_("The notice is also under Administration -> Notices in the CRM, where it is acknowledged.")
    parts = [notice.message, footer]
    if notice.message_id:
        for locale in MAIL_LOCALES:
            parts += [render(notice.message_id, notice.params, locale), render(footer, None, locale)]
    # A short subject stays on one header line; the body has the whole message.
    subject = f"[CRM {notice.level}] {notice.message}"
    send_mail(settings, recipients, subject if len(subject) <= 70 else subject[:69] + "…",
              "\n\n".join(parts) + f"\n\nSource: {notice.source}\nLevel: {notice.level}\n")


def raise_notice(settings: Settings, level: str, source: str, message_id: str, params: dict | None = None):
    """Record a notice and mail the bosses; returns the row. Inside a transaction, use
    :func:`record_notice` and mail after the commit instead."""
    notice = record_notice(level, source, message_id, params)
    mail_notice(settings, notice)
    return notice


def boss_addresses() -> list[str]:
    """E-mail addresses of the active seats whose role administers the appliance."""
    from webapp.models import Role, User

    query = (User.select(User.email).join(Role).where(User.active, Role.is_admin).order_by(User.email))
    return [user.email for user in query]


def send_mail(settings: Settings, recipients: list[str], subject: str, body: str) -> bool:
    """Send one plain-text message; False (logged) when the server cannot be reached or refuses it."""
    cfg = settings.smtp
    msg = EmailMessage()
    msg["From"] = cfg.from_address
    msg["To"] = ", ".join(recipients)
    msg["Subject"] = subject
    msg["Date"] = formatdate(localtime=False)
    msg["Message-ID"] = make_msgid(domain=cfg.from_address.rpartition("@")[2] or "localhost")
    msg.set_content(body)
    try:
        if cfg.security == "tls":
            server = smtplib.SMTP_SSL(cfg.host, cfg.port, timeout=cfg.timeout_seconds,
                                      context=ssl.create_default_context())
        else:
            server = smtplib.SMTP(cfg.host, cfg.port, timeout=cfg.timeout_seconds)
        with server:
            if cfg.security == "starttls":
                server.starttls(context=ssl.create_default_context())
            if cfg.user:
                server.login(cfg.user, cfg.password() or "")
            server.send_message(msg)
    except (OSError, smtplib.SMTPException) as exc:
        log.warning("notice e-mail to %s via %s:%s not sent: %s", ", ".join(recipients), cfg.host, cfg.port, exc)
        return False
    return True
