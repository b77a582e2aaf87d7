"""Notices in the boss's language (appliance/notices.py): the row keeps a message id and its
parameters, the page translates it for the reader, the e-mail carries English and Chinese.

Real PostgreSQL, the real UI catalogue (webapp/translations) and a real SMTP server. The
message id used here is one the catalogue already translates.
"""

from __future__ import annotations

import dataclasses
import email
from email import policy

import pytest

from appliance import attachments, notices
from webapp.models import Notice, database, get_state

TRANSLATED = "The licence ended on %(expires)s; the customer data was destroyed on %(date)s."
PARAMS = {"expires": "2026-06-30", "date": "<b>2026-07-31</b>"}
ENGLISH = "The licence ended on 2026-06-30; the customer data was destroyed on <b>2026-07-31</b>."
CHINESE = "许可证已于 2026-06-30 到期；客户数据已于 <b>2026-07-31</b> 销毁。"


def test_a_notice_is_shown_in_the_readers_language_and_an_old_row_as_it_was(db, make_seat, browser_for):
    notices.record_notice("warning", "licence", TRANSLATED, PARAMS)
    Notice.create(level="error", source="job:prune", message="prune failed: written before migration 0010")
    row = Notice.get(Notice.source == "licence")
    assert (row.message, row.message_id, row.params) == (ENGLISH, TRANSLATED, PARAMS)

    chinese = make_seat("boss@corp.cn", role="boss")
    chinese.user.locale = "zh"
    chinese.user.save()
    page = browser_for(chinese).get("/admin/notices").get_data(as_text=True)
    assert CHINESE.replace("<b>", "&lt;b&gt;").replace("</b>", "&lt;/b&gt;") in page, "translated, values escaped"
    assert "prune failed: written before migration 0010" in page
    english = make_seat("chief@corp.cn", role="boss")
    english.user.locale = "en"
    english.user.save()
    assert "the customer data was destroyed on &lt;b&gt;2026-07-31" in browser_for(english).get(
        "/admin/notices").get_data(as_text=True)


def test_the_mail_carries_the_english_and_the_chinese_text(settings, db, make_seat, smtp_server):
    controller, inbox = smtp_server
    make_seat("boss@corp.cn", role="boss")
    mailing = dataclasses.replace(settings, smtp=dataclasses.replace(
        settings.smtp, host="127.0.0.1", port=controller.port, security="none", from_address="crm@corp.cn"))
    notices.raise_notice(mailing, "warning", "licence", TRANSLATED, PARAMS)
    [envelope] = inbox.messages
    body = email.message_from_bytes(envelope.content, policy=policy.default).get_content()
    assert ENGLISH in body and CHINESE in body and body.index(ENGLISH) < body.index(CHINESE)
    assert "Administration -> Notices" in body and "Source: licence" in body


def test_a_quota_crossing_and_its_notice_commit_together_and_mail_comes_after(settings, db):
    with pytest.raises(RuntimeError):
        with database.atomic():
            attachments._new_level(settings, 95, 100)
            raise RuntimeError("killed before the commit")
    assert get_state("attachments.quota_level") is None and Notice.select().count() == 0, "neither kept"

    with database.atomic():
        notice = attachments._new_level(settings, 95, 100)
    # Committed, and nothing mailed yet: the level and the notice are both there.
    assert get_state("attachments.quota_level") == 90
    [row] = Notice.select()
    assert row.id == notice.id and row.level == "warning" and row.source == "quota"
    assert row.message == "Attachment space is 90% used: 95 B of 100 B, 5 B left."
    assert row.params["level"] == 90 and "%(level)s%% used" in row.message_id
    assert attachments._new_level(settings, 96, 100) is None, "the same level: no second notice"
