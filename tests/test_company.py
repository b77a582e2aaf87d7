"""The company profile with certification (R-11) and announcements (R-2, R-13): real
database, real files, the real pages, and a real SMTP server on 127.0.0.1 for the mail."""

from __future__ import annotations

import dataclasses
import datetime as dt
import io
import json
import shutil

import pytest

from appliance import attachments as store
from webapp import company
from webapp.models import Announcement, AuditLog, CompanyProfile, utcnow

PDF = b"%PDF-1.4 business licence scan"
# Published codes of real companies (Tencent, Xiaomi, Alibaba), and one character changed.
REAL_CODES = ("91440300708461136T", "91110108551385082Q", "91330100799655058B")


@pytest.fixture
def clean_store(settings, db):
    shutil.rmtree(store.store_dir(settings), ignore_errors=True)
    company._forget_cached()
    yield settings
    shutil.rmtree(store.store_dir(settings), ignore_errors=True)


def test_unified_social_credit_codes_are_checked():
    assert all(company.uscc_is_valid(code) for code in REAL_CODES)
    assert not company.uscc_is_valid("91440300708461136X")  # wrong check character
    assert not company.uscc_is_valid("91440300708461I36T")  # I is not in the alphabet
    assert not company.uscc_is_valid("9144030070846113")


def _fill(b, **values):
    data = {"name": "华信科技有限公司", "registration_number": REAL_CODES[0], "legal_representative": "王伟",
            "address": "上海市浦东新区世纪大道 100 号", "phone": "021-5555 0100", "website": ""}
    data.update(values)
    return b.post("/admin/company", data, token_from="/admin/company")


def _upload_licence(b, name="licence.pdf", data=PDF):
    return b.client.post("/admin/company/licence", content_type="multipart/form-data",
                         data={"csrf_token": b.csrf("/admin/company"), "file": (io.BytesIO(data), name)})


def test_certification_locks_the_licence_fields_and_audits_attempts(clean_store, make_seat, browser_for):
    boss = make_seat("boss@corp.cn", role="boss")
    b = browser_for(boss)
    assert _fill(b).status_code == 302
    # Not yet certifiable: the scan is missing, and the page says so.
    b.post("/admin/company/certify", token_from="/admin/company")
    assert CompanyProfile.get_by_id(1).certified_at is None
    assert "the business licence scan" in b.get("/admin/company").get_data(as_text=True)
    assert _upload_licence(b, "licence.exe", b"MZ").status_code == 302
    assert company.licence_files() == []
    assert _upload_licence(b).status_code == 302
    [scan] = company.licence_files()
    got = b.get(f"/admin/company/licence/{scan.id}")
    assert got.data == PDF and got.headers["Content-Type"] == "application/pdf"
    assert got.headers["Content-Disposition"].startswith("attachment;") and got.headers["Cache-Control"] == "no-store"
    assert got.headers["Content-Security-Policy"] == "sandbox; default-src 'none'"
    assert got.headers["X-Content-Type-Options"] == "nosniff"
    b.post("/admin/company/certify", token_from="/admin/company")
    profile = CompanyProfile.get_by_id(1)
    assert profile.certified_at is not None and profile.certified_by == "boss@corp.cn"

    # A changed name and address are refused (and audited); the phone still changes.
    resp = _fill(b, name="Other Ltd", address="elsewhere", phone="021-0000 0000")
    assert resp.status_code == 302
    page = b.get("/admin/company").get_data(as_text=True)
    assert "cannot be changed" in page and 'readonly' in page
    profile = CompanyProfile.get_by_id(1)
    assert (profile.name, profile.address, profile.phone) == ("华信科技有限公司", "上海市浦东新区世纪大道 100 号",
                                                              "021-0000 0000")
    refused = AuditLog.get(AuditLog.entity == "company", AuditLog.action == "refused")
    assert refused.changes == {"name": ["华信科技有限公司", "Other Ltd"],
                               "address": ["上海市浦东新区世纪大道 100 号", "elsewhere"]}
    # Replacing the scan is refused too, and audited with the file asked for.
    assert _upload_licence(b, "new.pdf").status_code == 302
    assert [f.filename for f in company.licence_files()] == ["licence.pdf"]
    assert "the business licence cannot be replaced" in b.get("/admin/company").get_data(as_text=True)
    [replace] = AuditLog.select().where(AuditLog.entity == "company", AuditLog.action == "refused",
                                        AuditLog.id > refused.id)
    assert replace.changes == {"licence": ["licence.pdf", "new.pdf"]} and replace.actor == "boss@corp.cn"
    assert list(store.incoming_dir(clean_store).glob("*")) == []  # the refused upload left nothing


def test_a_wrong_scan_can_be_removed_until_certification(clean_store, make_seat, browser_for):
    from appliance import lifecycle
    from webapp import audit
    from webapp.models import Account, Attachment

    boss = make_seat("boss@corp.cn", role="boss")
    b = browser_for(boss)
    _fill(b)
    _upload_licence(b, "wrong.pdf", PDF + b" of another company")
    [wrong] = company.licence_files()
    resp = b.post(f"/admin/company/licence/{wrong.id}/delete", token_from="/admin/company")
    assert resp.status_code == 302 and company.licence_files() == []
    assert "wrong.pdf deleted." in b.get("/admin/company").get_data(as_text=True)
    assert Attachment.get_by_id(wrong.id).deleted_at is not None  # in Deleted items, like any file
    assert AuditLog.get(AuditLog.entity == "attachment", AuditLog.record_id == wrong.id).action == "create"
    assert AuditLog.select().where(AuditLog.entity == "attachment", AuditLog.action == "delete").count() == 1
    # Only company files go through this route: an account's file answers 404 and stays.
    acc = audit.create(boss.user, Account, {"name": "A"})
    other = store.attach(clean_store, boss.user, boss.user, "account", acc.id, "a.pdf",
                         store.receive(clean_store, io.BytesIO(PDF)))
    assert b.post(f"/admin/company/licence/{other.id}/delete", token_from="/admin/company").status_code == 404
    assert Attachment.get_by_id(other.id).deleted_at is None

    _upload_licence(b)
    [scan] = company.licence_files()
    b.post("/admin/company/certify", token_from="/admin/company")
    assert CompanyProfile.get_by_id(1).certified_at is not None
    assert 'licence/%d/delete' % scan.id not in b.get("/admin/company").get_data(as_text=True)
    # Certified: removing is refused and audited, and the scan deleted before cannot come back.
    resp = b.post(f"/admin/company/licence/{scan.id}/delete", token_from="/admin/company")
    assert resp.status_code == 302 and [f.id for f in company.licence_files()] == [scan.id]
    assert "the business licence scan cannot be removed" in b.get("/admin/company").get_data(as_text=True)
    refused = AuditLog.get(AuditLog.entity == "company", AuditLog.action == "refused")
    assert refused.changes == {"licence": ["licence.pdf", None]}
    with pytest.raises(lifecycle.LifecycleError, match="cannot be brought back"):
        lifecycle.undo(clean_store, boss.user, "attachment", wrong.id)
    assert Attachment.get_by_id(wrong.id).deleted_at is not None


def test_a_mistyped_credit_code_is_a_field_error(clean_store, make_seat, browser_for):
    b = browser_for(make_seat("boss@corp.cn", role="boss"))
    resp = _fill(b, registration_number="91440300708461136x".replace("x", "Y"))
    assert resp.status_code == 400
    assert "not a valid unified social credit code" in resp.get_data(as_text=True)
    assert CompanyProfile.get_or_none(CompanyProfile.id == 1) is None
    assert _fill(b, registration_number="HRB 12345 (Berlin)").status_code == 302  # not a mainland code


def test_only_the_boss_reaches_the_company_and_announcement_pages(clean_store, make_seat, browser_for):
    b = browser_for(make_seat("m@corp.cn", role="manager"))
    for path in ("/admin/company", "/admin/announcements", "/admin/company/licence/1"):
        assert b.get(path).status_code == 404, path
    for path in ("/admin/company", "/admin/company/certify", "/admin/company/licence", "/admin/company/licence/1/delete",
                 "/admin/announcements", "/admin/announcements/1/withdraw"):
        assert b.post(path).status_code == 404, path
    assert CompanyProfile.select().count() == 0


def test_an_announcement_is_shown_to_every_seat_in_its_window_and_withdrawn(clean_store, make_seat, browser_for):
    boss = browser_for(make_seat("boss@corp.cn", role="boss"))
    agent = browser_for(make_seat("agent@corp.cn", role="agent"))
    resp = boss.post("/admin/announcements", {"message": "周六 22:00-23:00 系统升级", "starts_at": "2020-01-01T00:00",
                                              "ends_at": "2099-01-01T00:00"}, token_from="/admin/announcements")
    assert resp.status_code == 302
    assert "周六 22:00-23:00 系统升级" in agent.get("/").get_data(as_text=True)
    later = company.post_announcement(clean_store, "cli:root", "Not yet", utcnow() + dt.timedelta(hours=1),
                                      utcnow() + dt.timedelta(hours=2), email=False)
    assert "Not yet" not in agent.get("/").get_data(as_text=True)
    row = Announcement.get(Announcement.message == "周六 22:00-23:00 系统升级")
    assert row.starts_at == dt.datetime(2019, 12, 31, 16, 0)  # entered in Asia/Shanghai, kept in UTC
    boss.post(f"/admin/announcements/{row.id}/withdraw", token_from="/admin/announcements")
    assert "系统升级" not in agent.get("/").get_data(as_text=True)
    assert [r.action for r in AuditLog.select().where(AuditLog.entity == "announcement").order_by(AuditLog.id)] == [
        "create", "create", "withdraw"]
    assert later.created_by == "cli:root"


def test_a_bad_announcement_is_refused_with_its_reason(clean_store, make_seat, browser_for):
    boss = browser_for(make_seat("boss@corp.cn", role="boss"))
    resp = boss.post("/admin/announcements", {"message": "x", "starts_at": "2026-12-01T10:00",
                                              "ends_at": "2026-12-01T09:00"}, token_from="/admin/announcements")
    assert resp.status_code == 400 and "The end must be after the start." in resp.get_data(as_text=True)
    with pytest.raises(company.AnnouncementError, match="1 to 2000"):
        company.post_announcement(clean_store, "cli:root", "  ", utcnow(), utcnow() + dt.timedelta(hours=1), False)
    assert Announcement.select().count() == 0


def test_an_announcement_is_mailed_to_every_active_seat(clean_store, make_seat, smtp_server):
    import email
    from email import policy

    controller, inbox = smtp_server
    make_seat("boss@corp.cn", role="boss")
    make_seat("agent@corp.cn", role="agent")
    settings = dataclasses.replace(clean_store, smtp=dataclasses.replace(
        clean_store.smtp, host="127.0.0.1", port=controller.port, security="none"))
    row = company.post_announcement(settings, "cli:root", "Planned maintenance\nSaturday 22:00",
                                    utcnow(), utcnow() + dt.timedelta(hours=1), email=True, wait=True)
    [envelope] = inbox.messages
    assert sorted(envelope.rcpt_tos) == ["agent@corp.cn", "boss@corp.cn"]
    mail = email.message_from_bytes(envelope.content, policy=policy.default)
    assert mail["Subject"] == "[CRM] Planned maintenance Saturday 22:00"
    body = mail.get_content().replace("\r\n", "\n")
    assert body.startswith("Planned maintenance\nSaturday 22:00\n")
    shown_from = (row.starts_at + dt.timedelta(hours=8)).strftime("%Y-%m-%d %H:%M")  # Asia/Shanghai: UTC+8
    assert f"from {shown_from} to" in body and "Asia/Shanghai time" in body
    assert Announcement.get_by_id(row.id).emailed_at is not None


def test_customer_it_announces_from_the_command_line(clean_store, db, tmp_path):
    from click.testing import CliRunner

    from installer.cli import main
    from tests.test_cli import _config_file

    config = _config_file(tmp_path, clean_store)
    runner = CliRunner()
    posted = runner.invoke(main, ["--config", config, "announce", "post", "Upgrade Saturday 22:00-23:00",
                                  "--from", "2026-12-05 21:00", "--to", "2026-12-05 23:00"])
    assert posted.exit_code == 0, posted.output
    assert "shown from 2026-12-05 21:00 to 2026-12-05 23:00 Asia/Shanghai; not mailed" in posted.output
    row = Announcement.get()
    assert (row.starts_at, row.ends_at) == (dt.datetime(2026, 12, 5, 13, 0), dt.datetime(2026, 12, 5, 15, 0))
    assert row.created_by.startswith("cli:")
    listed = runner.invoke(main, ["--config", config, "announce", "list", "--json"])
    assert [r["message"] for r in json.loads(listed.output)] == ["Upgrade Saturday 22:00-23:00"]
    assert runner.invoke(main, ["--config", config, "announce", "withdraw", str(row.id)]).exit_code == 0
    assert Announcement.get_by_id(row.id).withdrawn_at is not None

    bad = runner.invoke(main, ["--config", config, "announce", "post", "x", "--to", "Saturday"])
    assert bad.exit_code == 2 and 'expected a local time like "2026-03-01 22:00"' in bad.output
    gone = runner.invoke(main, ["--config", config, "announce", "withdraw", "999"])
    assert gone.exit_code == 1 and "no announcement 999" in gone.output
    backwards = runner.invoke(main, ["--config", config, "announce", "post", "x", "--from", "2026-12-05 21:00",
                                     "--to", "2026-12-05 20:00"])
    assert backwards.exit_code == 1 and "The end must be after the start." in backwards.output
    assert Announcement.select().count() == 1


def test_a_save_that_read_the_profile_before_a_certification_cannot_undo_it(clean_store, make_seat, migrated_db,
                                                                            monkeypatch):
    """The save pauses inside its transaction, after reading the profile, while the
    certification runs: without the row lock the save would write certified_at back to NULL."""
    import threading
    import time

    boss = make_seat("boss@corp.cn", role="boss")
    company.save_profile(boss.user, {"name": "华信科技有限公司", "registration_number": REAL_CODES[0],
                                     "legal_representative": "王伟", "address": "上海市浦东新区世纪大道 100 号"})
    store.attach(clean_store, boss.user, boss.user, "company", company.PROFILE_ID, "licence.pdf",
                 store.receive(clean_store, io.BytesIO(PDF)), is_boss=True)
    save_has_read, certify_done, outcomes = threading.Event(), threading.Event(), {}
    real_utcnow = company.utcnow

    def pausing_utcnow():
        # The save calls it after reading the row and before writing it.
        if threading.current_thread().name == "save" and not save_has_read.is_set():
            save_has_read.set()
            certify_done.wait(2)  # with the lock the certification waits for the save instead
            time.sleep(0.2)
        return real_utcnow()

    monkeypatch.setattr(company, "utcnow", pausing_utcnow)

    def run(name, work):
        with migrated_db.connection_context():
            try:
                outcomes[name] = work()
            finally:
                if name == "certify":
                    certify_done.set()

    save = threading.Thread(target=run, name="save",
                            args=("save", lambda: company.save_profile(boss.user, {"phone": "021-0000 0000"})))
    certify = threading.Thread(target=run, name="certify", args=("certify", lambda: company.certify_profile(boss.user)))
    save.start()
    assert save_has_read.wait(10)
    certify.start()
    save.join()
    certify.join()
    assert outcomes == {"save": ({"phone": ["", "021-0000 0000"]}, []), "certify": []}
    record = CompanyProfile.get_by_id(company.PROFILE_ID)
    assert record.certified_at is not None and record.certified_by == "boss@corp.cn"
    assert record.phone == "021-0000 0000"


def test_a_licence_scan_crossing_the_quota_is_mailed_after_its_commit(clean_store, make_seat, smtp_server,
                                                                      monkeypatch):
    """The scan is attached inside the profile's locked transaction: the quota notice must not
    be mailed from in there (the quota lock held through the SMTP talk, and a mail about a
    scan that might still roll back). A second connection looks when the mail goes out."""
    import psycopg2

    from appliance import notices
    from tests.test_attachments import _with_quota

    controller, inbox = smtp_server
    settings = _with_quota(clean_store, store.MB)
    settings = dataclasses.replace(settings, smtp=dataclasses.replace(
        settings.smtp, host="127.0.0.1", port=controller.port, security="none"))
    boss = make_seat("boss@corp.cn", role="boss")
    db = settings.database
    seen = []
    real_send = notices.send_mail

    def send_and_look(*args, **kwargs):
        other = psycopg2.connect(host=db.host, port=db.port, dbname=db.name, user=db.user,
                                 password=db.password_file.read_text().strip())
        other.autocommit = True
        with other, other.cursor() as cur:
            cur.execute("SELECT pg_try_advisory_lock(%s)", (store._QUOTA_LOCK,))
            lock_free = cur.fetchone()[0]
            cur.execute("SELECT count(*) FROM notice WHERE source = 'quota'")
            seen.append((lock_free, cur.fetchone()[0]))
        other.close()
        return real_send(*args, **kwargs)

    monkeypatch.setattr(notices, "send_mail", send_and_look)
    row = company.add_licence_scan(settings, boss.user, "licence.pdf",
                                   io.BytesIO(PDF + b" " * int(0.95 * store.MB)))
    assert row.id and seen == [(True, 1)], "mailed once, after the commit, with the quota lock free"
    assert [m.rcpt_tos for m in inbox.messages] == [["boss@corp.cn"]]
