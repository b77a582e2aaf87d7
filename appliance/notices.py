"""Notices for the boss: a row the web UI shows (Administration → Notices) and, when an
``[smtp]`` host is configured, an e-mail to every active boss seat.

The e-mail is best effort: a mail server that is down or refuses the message is logged and
never stops the caller (a scheduler job, a quota check). The notice row is the record.
"""

from __future__ import annotations

import logging
import smtplib
import ssl
from email.message import EmailMessage
from email.utils import formatdate, make_msgid

from appliance.config import Settings

log = logging.getLogger(__name__)

LEVELS = ("info", "warning", "error")


def raise_notice(settings: Settings, level: str, source: str, message: str) -> None:
    """Record a notice (the models must be bound to a connected database) and mail the bosses."""
    from webapp.models import Notice

    if level not in LEVELS:
        raise ValueError(f"level: expected one of {', '.join(LEVELS)}, found {level!r}")
    Notice.create(level=level, source=source, message=message)
    if settings.smtp.host:
        recipients = boss_addresses()
        if recipients:
            # A short subject stays on one header line; the body has the whole message.
            subject = f"[CRM {level}] {message}"
            send_mail(settings, recipients, subject if len(subject) <= 70 else subject[:69] + "…",
                      f"{message}\n\nSource: {source}\nLevel: {level}\n\n"
                      f"The notice is also under Administration -> Notices in the CRM, where it is acknowledged.\n")


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
