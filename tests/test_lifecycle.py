"""Deletion with undo, destruction, the purge, and the end of the licence (issue 6, R-15, R-16).

Real PostgreSQL and real files under the test data directory; the clock is a parameter
(``now``, ``today``) or the licence dates are set relative to the real today.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import io
import json
import os
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from appliance import attachments as store
from appliance import lifecycle
from appliance.backup import BackupInfo
from appliance.lifecycle import LifecycleError
from installer.cli import main
from tests.conftest import Browser
from webapp import audit
from webapp.models import (Account, Activity, Announcement, AppState, Attachment, AuditLog, CompanyProfile, Contact,
                           LoginLog, Note, Notice, Role, User, database, utcnow)

SECRET = b"%PDF-1.4 " + b"CONFIDENTIAL-PRICE-LIST " * 1000
SHARED = b"%PDF-1.4 " + b"same bytes on two records " * 100


@pytest.fixture
def clean_store(settings, db, tmp_path):
    """Settings whose backups are the test's own (none); the data directory is shared by the
    whole run, so every test starts with no files in it."""
    data = settings.appliance.data_dir
    for folder in (store.store_dir(settings), store.incoming_dir(settings), data / "exports", data / "imports"):
        shutil.rmtree(folder, ignore_errors=True)
    return _with(settings, backup={"dir": tmp_path / "backups", "wal_archive_dir": tmp_path / "wal"})


@pytest.fixture
def boss(make_seat):
    return make_seat("boss@corp.cn", role="boss").user


def _upload(settings, user, record, name: str, data: bytes) -> Attachment:
    incoming = store.receive(settings, io.BytesIO(data))
    return store.attach(settings, user, user, record.entity, record.id, name, incoming, is_boss=True)


def _with(settings, **sections):
    """``settings`` with some keys of some sections replaced: _with(s, seats={"expires": d})."""
    return dataclasses.replace(settings, **{name: dataclasses.replace(getattr(settings, name), **values)
                                            for name, values in sections.items()})


def _audit_text(entity: str, record_id: int) -> str:
    rows = AuditLog.select().where(AuditLog.entity == entity, AuditLog.record_id == record_id)
    return json.dumps([r.changes for r in rows], ensure_ascii=False)


# ----------------------------------------------------------------------------- undo


def test_the_boss_sees_who_deleted_what_and_undoes_it_within_the_window(clean_store, boss, make_seat):
    settings = clean_store
    agent = make_seat("a@corp.cn", role="agent").user
    acc = audit.create(agent, Account, {"name": "华信科技"})
    audit.delete(agent, acc)
    deleted_at = Account.get_by_id(acc.id).deleted_at

    [item] = lifecycle.deleted_items(settings)
    assert (item.entity, item.id, item.title, item.deleted_by) == ("account", acc.id, "华信科技", "a@corp.cn")
    assert item.destroy_after == deleted_at + dt.timedelta(days=30)

    with pytest.raises(LifecycleError, match="Only the boss"):
        lifecycle.undo(settings, agent, "account", acc.id)
    assert lifecycle.undo(settings, boss, "account", acc.id) == "华信科技"
    assert Account.get_by_id(acc.id).deleted_at is None
    restore = AuditLog.get(AuditLog.entity == "account", AuditLog.record_id == acc.id, AuditLog.action == "restore")
    assert restore.actor == "boss@corp.cn"
    assert lifecycle.deleted_items(settings) == []
    with pytest.raises(LifecycleError, match=f"no deleted account number {acc.id}"):
        lifecycle.undo(settings, boss, "account", acc.id)


def test_a_deleted_attachment_comes_back_through_the_quota_check(clean_store, boss):
    settings = clean_store
    acc = audit.create(boss, Account, {"name": "A"})
    row = _upload(settings, boss, acc, "price.pdf", SECRET)
    store.soft_delete(boss, row)
    assert [(i.entity, i.title) for i in lifecycle.deleted_items(settings)] == [("attachment", "price.pdf")]
    lifecycle.undo(settings, boss, "attachment", row.id)
    assert Attachment.get_by_id(row.id).deleted_at is None

    store.soft_delete(boss, row)
    destroyed = lifecycle.destroy(settings, boss, "attachment", row.id, "price.pdf")
    assert (destroyed.rows, destroyed.files) == ({"attachment": 1}, 1)
    assert Attachment.select().count() == 0 and not store.blob_path(settings, row.sha256).exists()
    assert Account.get_by_id(acc.id).deleted_at is None, "the record it was on stays"


# ----------------------------------------------------------------------------- destroy


def test_destroy_leaves_no_row_no_file_bytes_and_no_values_in_the_audit(clean_store, boss, tmp_path):
    settings = clean_store
    acc = audit.create(boss, Account, {"name": "华信科技", "phone": "+86 21 5555 0100"})
    other = audit.create(boss, Account, {"name": "Other Ltd"})
    contact = audit.create(boss, Contact, {"last_name": "王", "account": acc.id})
    act = audit.create(boss, Activity, {"subject": "Call 华信", "parent_type": "account", "parent_id": acc.id})
    note = audit.add_note(boss, acc, "华信 pays late")
    act_note = audit.add_note(boss, act, "华信 call notes")
    secret = _upload(settings, boss, acc, "price.pdf", SECRET)
    on_activity = _upload(settings, boss, act, "minutes.txt", "minutes of the call with 华信".encode())
    shared_here = _upload(settings, boss, acc, "shared.pdf", SHARED)
    shared_there = _upload(settings, boss, other, "shared.pdf", SHARED)
    # A second name for the secret file's inode shows what happened to the bytes themselves.
    witness = tmp_path / "witness"
    os.link(store.blob_path(settings, secret.sha256), witness)
    audit.delete(boss, acc)
    vacuumed_before = _last_vacuum("account")

    destroyed = lifecycle.destroy(settings, boss, "account", acc.id, "  华信科技 ")

    assert destroyed.rows == {"account": 1, "activity": 1, "note": 2, "attachment": 3}
    assert destroyed.files == 2  # the secret and the activity's file; the shared one is still named
    assert Account.get_or_none(Account.id == acc.id) is None
    assert Activity.get_or_none(Activity.id == act.id) is None
    assert Note.select().where(Note.id.in_([note.id, act_note.id])).count() == 0
    assert [a.id for a in Attachment.select()] == [shared_there.id]
    assert not store.blob_path(settings, secret.sha256).exists()
    assert not store.blob_path(settings, on_activity.sha256).exists()
    assert witness.read_bytes() == bytes(len(SECRET)), "overwritten with zeros before the unlink"
    assert store.blob_path(settings, shared_here.sha256).read_bytes() == SHARED, "the other record's file stays"
    assert Contact.get_by_id(contact.id).account_id is None, "a foreign key to it is set to NULL"
    assert Account.get_by_id(other.id).name == "Other Ltd"
    # The audit trail keeps who did what when, and no value of what was destroyed.
    for entity, record_id in (("account", acc.id), ("activity", act.id), ("note", note.id),
                              ("note", act_note.id), ("attachment", secret.id)):
        actions = [(r.action, r.changes) for r in AuditLog.select().where(
            AuditLog.entity == entity, AuditLog.record_id == record_id).order_by(AuditLog.id)]
        assert actions and all(c == {"destroyed": True} for a, c in actions if a != "destroy"), (entity, actions)
    assert [r.changes for r in AuditLog.select().where(AuditLog.action == "destroy")] == [{}]
    leaked = database.execute_sql("SELECT count(*) FROM audit_log WHERE changes::text LIKE %s", ("%华信%",))
    assert leaked.fetchone()[0] == 0
    assert "Other Ltd" in _audit_text("account", other.id), "other records' history is untouched"
    # The dead row versions were vacuumed right away rather than left to autovacuum.
    assert _last_vacuum("account") not in (None, vacuumed_before)


def _last_vacuum(table: str):
    return database.execute_sql("SELECT last_vacuum FROM pg_stat_user_tables WHERE relname = %s",
                                (table,)).fetchone()[0]


def test_a_wrong_name_or_a_live_record_is_refused_and_nothing_changes(clean_store, boss):
    settings = clean_store
    acc = audit.create(boss, Account, {"name": "华信科技"})
    audit.add_note(boss, acc, "keep me")
    with pytest.raises(LifecycleError, match=f"no deleted account number {acc.id}"):
        lifecycle.destroy(settings, boss, "account", acc.id, "华信科技")  # not deleted first
    audit.delete(boss, acc)
    before = [(r.id, r.action, r.changes) for r in AuditLog.select().order_by(AuditLog.id)]
    with pytest.raises(LifecycleError, match="type “华信科技” exactly"):
        lifecycle.destroy(settings, boss, "account", acc.id, "华信")
    with pytest.raises(LifecycleError, match="no kind of item called “user”"):
        lifecycle.destroy(settings, boss, "user", boss.id, boss.email)
    assert Account.get_by_id(acc.id).deleted_at is not None
    assert Note.select().count() == 1
    assert [(r.id, r.action, r.changes) for r in AuditLog.select().order_by(AuditLog.id)] == before


# ----------------------------------------------------------------------------- retention


def test_retention_destroys_only_what_waited_past_undo_days(clean_store, boss):
    settings = clean_store
    now = utcnow()
    old, recent = (audit.create(boss, Account, {"name": name}) for name in ("Old", "Recent"))
    old_file = _upload(settings, boss, recent, "old.pdf", SECRET)
    store.soft_delete(boss, old_file)
    old_note = audit.add_note(boss, recent, "deleted long ago")
    for record in (old, recent):
        audit.delete(boss, record)
    Account.update(deleted_at=now - dt.timedelta(days=31)).where(Account.id == old.id).execute()
    Account.update(deleted_at=now - dt.timedelta(days=29)).where(Account.id == recent.id).execute()
    Attachment.update(deleted_at=now - dt.timedelta(days=40)).where(Attachment.id == old_file.id).execute()
    Note.update(deleted_at=now - dt.timedelta(days=30, seconds=1)).where(Note.id == old_note.id).execute()

    summary = lifecycle.run_retention(settings, now=now)

    assert summary.startswith("destroyed 3 rows deleted more than 30 days ago, shredded 1 files; licence: perpetual")
    assert [a.name for a in Account.select()] == ["Recent"]
    assert Attachment.select().count() == 0 and Note.select().count() == 0
    assert not store.blob_path(settings, old_file.sha256).exists()
    assert [i.title for i in lifecycle.deleted_items(settings)] == ["Recent"]

    at_once = _with(settings, retention={"undo_days": 0})
    assert lifecycle.run_retention(at_once, now=utcnow()).startswith("destroyed 1 rows")
    assert Account.select().count() == 0


# ----------------------------------------------------------------------------- purge


def test_purge_all_leaves_no_customer_rows_or_files_and_keeps_the_seats(clean_store, boss, make_seat):
    settings = clean_store
    wal = settings.backup.wal_archive_dir
    wal.mkdir()
    segment = wal / "000000010000000000000003.gz.enc"
    segment.write_bytes(b"archived WAL")
    os.utime(segment, (1_767_225_600, 1_767_225_600))  # 2026-01-01 00:00 UTC
    make_seat("a@corp.cn", role="agent")
    acc = audit.create(boss, Account, {"name": "华信科技"})
    audit.add_note(boss, acc, "note")
    attached = _upload(settings, boss, acc, "price.pdf", SECRET)
    LoginLog.create(email="boss@corp.cn", success=True, reason="ok")
    CompanyProfile.create(id=1, name="华信")
    Announcement.create(message="hello", starts_at=utcnow(), ends_at=utcnow(), created_by="boss@corp.cn")
    for folder in ("exports", "imports", "incoming"):  # incoming: an upload arriving (or left by a crash)
        (settings.appliance.data_dir / folder).mkdir(parents=True, exist_ok=True)
        (settings.appliance.data_dir / folder / "customer.zip").write_bytes(b"customer data")
    seats_before = [(u.email, u.role.name) for u in User.select().order_by(User.email)]

    report = lifecycle.purge_all(settings, "cli:root")

    for table in lifecycle.PURGED_TABLES:
        count = database.execute_sql(f'SELECT count(*) FROM "{table}"').fetchone()[0]
        assert count == (1 if table == "audit_log" else 0), table
    assert AuditLog.get().action == "purge" and AuditLog.get().changes == {}
    assert [(u.email, u.role.name) for u in User.select().order_by(User.email)] == seats_before
    assert Role.select().count() >= 3
    assert not store.blob_path(settings, attached.sha256).exists()
    data = settings.appliance.data_dir
    assert [p for p in (data / "exports").rglob("*") if p.is_file()] == []
    assert [p for p in (data / "imports").rglob("*") if p.is_file()] == []
    assert [p for p in store.incoming_dir(settings).rglob("*") if p.is_file()] == []
    assert report.rows["account"] == 1 and report.rows["attachment"] == 1 and report.rows["login_log"] == 1
    assert report.files == 4
    assert report.backups == []
    assert report.wal_oldest == dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)
    assert report.wal_removed_on is None and "only once a base backup exists" in report.wal_condition
    assert "Backups still holding data: none. The WAL archive holds data from 2026-01-01 00:00 UTC on" in str(report)


def _backup(id_, kind, started, state="verified"):
    return BackupInfo(id=id_, kind=kind, path=None, state=state,
                      started_at=started and dt.datetime.fromisoformat(started).replace(tzinfo=dt.timezone.utc))


def test_the_report_says_which_backups_hold_data_and_when_retention_removes_them(settings):
    catalogue = [
        _backup("b1", "base", "2026-03-01T01:30:00"),
        _backup("b2", "base", "2026-03-05T01:30:00", state="unverified"),
        _backup("l1", "logical", "2026-03-06T02:30:00"),
        _backup("d1", "base", None, state="damaged"),
        _backup("b3", "base", "2026-03-10T01:30:00", state="unverified"),  # after the purge
    ]
    purged_at = dt.datetime(2026, 3, 8, 12, 0, tzinfo=dt.timezone.utc)
    held = {h.id: (h.removed_on and h.removed_on.isoformat(), h.condition)
            for h in lifecycle.backups_holding_data(catalogue, _with(settings, backup={"retention_days": 7}),
                                                    purged_at)}
    # 01:30 UTC is 09:30 in Shanghai: seven days on, the first prune (05:00 there) is the next morning's.
    assert held == {
        "b1": ("2026-03-09", "once a newer base backup is verified"),  # the newest verified base backup
        "b2": ("2026-03-13", ""),
        "l1": ("2026-03-14", "once a newer logical backup exists (the next one holds no customer data)"),
        "d1": (None, "never removed by retention (unreadable): delete it by hand"),
    }
    off = lifecycle.backups_holding_data(catalogue, _with(settings, schedule={"prune": None}), purged_at)
    assert {h.removed_on for h in off} == {None}


def test_the_report_gives_the_day_the_scheduled_prune_really_removes_a_backup(clean_store):
    from zoneinfo import ZoneInfo

    from appliance import backup, config

    settings = _with(clean_store, backup={"retention_days": 7})
    assert (settings.schedule.base_backup, settings.schedule.prune, settings.web.timezone) == (
        "30 1 * * *", "0 5 * * *", "Asia/Shanghai"), "the defaults"
    zone = ZoneInfo(settings.web.timezone)
    settings.backup.dir.mkdir(parents=True)
    for day in (1, 2, 20):  # three logical backups at 01:30 in Shanghai (17:30 UTC the day before)
        started = dt.datetime(2026, 3, day, 1, 30, tzinfo=zone).astimezone(dt.timezone.utc)
        path = settings.backup.dir / f"{started:%Y%m%dT%H%M%S}Z-logical"
        path.mkdir()
        (path / backup.MANIFEST).write_text(json.dumps({
            "format": backup.FORMAT_VERSION, "kind": "logical", "files": [],
            "started_at": started.isoformat().replace("+00:00", "Z")}))
    first = backup.list_backups(settings)[0]
    [held] = [h for h in lifecycle.backups_holding_data(backup.list_backups(settings), settings,
                                                        dt.datetime(2026, 3, 10, tzinfo=dt.timezone.utc))
              if h.id == first.id]
    prune_at = config.cron_trigger(settings.schedule.prune, settings.web.timezone)

    def pruned_on(day: dt.date) -> bool:
        """Run prune itself at its scheduled time on ``day``: did it delete the first backup?"""
        fire = prune_at.get_next_fire_time(None, dt.datetime.combine(day, dt.time(0, 0), zone))
        return first.id in backup.prune(settings, now=fire).deleted

    assert not pruned_on(held.removed_on - dt.timedelta(days=1)) and first.path.exists()
    assert pruned_on(held.removed_on) and not first.path.exists()
    assert held.removed_on == dt.date(2026, 3, 8)


# ----------------------------------------------------------------------------- the licence's timeline


def test_the_licence_states_by_date(settings):
    expires = dt.date(2026, 6, 30)
    lic = _with(settings, seats={"expires": expires, "grace_days": 30})
    states = {day: lifecycle.licence_state(lic, expires + dt.timedelta(days=day)).state
              for day in (-31, -30, 0, 1, 30, 31)}
    assert states == {-31: "active", -30: "expiring", 0: "expiring", 1: "grace", 30: "grace", 31: "ended"}
    assert lifecycle.licence_state(lic, expires).destroy_on == dt.date(2026, 7, 31)
    assert lifecycle.licence_state(settings, dt.date(2099, 1, 1)).state == "active"  # perpetual


def _job_at(settings, day: dt.date) -> list[str]:
    """Run the retention job at noon in Shanghai on ``day``; the notices it raised."""
    first = Notice.select().count()
    lifecycle.run_retention(settings, now=dt.datetime.combine(day, dt.time(4, 0)))
    return [n.message for n in Notice.select().order_by(Notice.id).offset(first)]


def test_the_grace_period_day_by_day_notices_once_then_destruction_once(clean_store, boss):
    expires = dt.date(2026, 6, 30)
    settings = _with(clean_store, seats={"expires": expires, "grace_days": 30})
    acc = audit.create(boss, Account, {"name": "华信科技"})
    told = {}
    for offset in range(-35, 34):
        day = expires + dt.timedelta(days=offset)
        if offset == 31:
            assert Account.get_by_id(acc.id).name == "华信科技", "kept through the last day of grace"
        messages = _job_at(settings, day)
        assert _job_at(settings, day) == [], f"a second run on day {offset} sends nothing again"
        if messages:
            told[offset] = messages
        if offset == 32:
            audit.create(boss, Account, {"name": "after the end"})  # a second purge would take it
    assert sorted(told) == [-30, -7, -1, 1, 24, 30, 31]
    assert all(len(m) == 1 for m in told.values())
    assert told[-30][0].startswith("The licence for 50 seats expires on 2026-06-30 (days left: 30). Then the CRM is "
                                   "read-only for 30 days, and all customer data is destroyed on 2026-07-31.")
    assert "(days left: 1)" in told[-1][0]
    assert told[1][0].startswith("All customer data will be destroyed on 2026-07-31 (days left: 30): the licence "
                                 "expired on 2026-06-30 and the CRM is read-only.")
    assert "(days left: 7)" in told[24][0] and "(days left: 1)" in told[30][0]
    assert told[31][0].startswith("The licence ended on 2026-06-30 and its grace period is over: all customer data "
                                  "was destroyed. No backup or archived WAL holds data")
    assert [a.name for a in Account.select()] == ["after the end"], "destroyed once, on 2026-07-31"
    assert AppState.get_by_id("licence.purged").value["expires"] == "2026-06-30"


def test_a_licence_renewed_in_grace_restores_service_and_warns_again_for_the_new_date(clean_store, boss):
    expires = dt.date(2026, 6, 30)
    settings = _with(clean_store, seats={"expires": expires})
    audit.create(boss, Account, {"name": "kept"})
    for offset in (-30, -7, -1, 1, 5):
        _job_at(settings, expires + dt.timedelta(days=offset))
    renewed = _with(settings, seats={"expires": dt.date(2027, 6, 30)})
    assert lifecycle.licence_state(renewed, dt.date(2026, 7, 6)).state == "active"
    assert _job_at(renewed, dt.date(2026, 7, 6)) == []
    assert _job_at(renewed, dt.date(2027, 5, 31))[0].startswith("The licence for 50 seats expires on 2027-06-30")
    for day in (dt.date(2026, 7, 31), dt.date(2026, 8, 1)):  # the old destruction date passes harmlessly
        _job_at(renewed, day)
    assert [a.name for a in Account.select()] == ["kept"]


def test_an_expiry_date_typed_in_the_past_costs_a_notice_and_a_day_not_the_data_at_once(clean_store, boss):
    settings = _with(clean_store, seats={"expires": dt.date(2020, 1, 31)})
    audit.create(boss, Account, {"name": "kept one more day"})
    [warning] = _job_at(settings, dt.date(2026, 3, 1))
    assert "will be destroyed at the retention job's next run (tomorrow)" in warning
    assert _job_at(settings, dt.date(2026, 3, 1)) == [], "run again the same day: said once, nothing destroyed"
    assert Account.select().count() == 1
    _job_at(settings, dt.date(2026, 3, 2))
    assert Account.select().count() == 0


def test_the_licence_notices_are_mailed_to_the_bosses(clean_store, boss, make_seat, smtp_server):
    import email
    from email import policy

    controller, inbox = smtp_server
    make_seat("a@corp.cn", role="agent")
    expires = dt.date(2026, 6, 30)
    settings = _with(clean_store, seats={"expires": expires},
                     smtp={"host": "127.0.0.1", "port": controller.port, "security": "none",
                           "from_address": "crm@corp.cn"})
    for offset in (-30, -30, 1, 31, 32):
        _job_at(settings, expires + dt.timedelta(days=offset))
    mails = [email.message_from_bytes(m.content, policy=policy.default) for m in inbox.messages]
    assert [m["To"] for m in mails] == ["boss@corp.cn"] * 3, "one mail per notice, to the boss only"
    assert [m["Subject"][:40] for m in mails] == ["[CRM warning] The licence for 50 seats e",
                                                   "[CRM warning] All customer data will be ",
                                                   "[CRM warning] The licence ended on 2026-"]
    bodies = [m.get_content() for m in mails]
    assert bodies[0].startswith("The licence for 50 seats expires on 2026-06-30 (days left: 30).")
    assert "all customer data was destroyed" in bodies[2] and "Source: licence" in bodies[2]


def test_a_renewal_the_scheduler_has_not_read_yet_destroys_nothing(clean_store, boss, tmp_path):
    from appliance import config

    expires = dt.date(2026, 6, 30)
    path = _config(tmp_path, clean_store, expires=expires.isoformat())
    started_with = config.load(path)  # what the daemon read when it started (re-read only on SIGHUP)
    destroy_on = lifecycle.licence_state(started_with, expires).destroy_on
    audit.create(boss, Account, {"name": "kept"})
    _job_at(started_with, destroy_on - dt.timedelta(days=1))  # the last day of grace: the destruction notice
    _config(tmp_path, clean_store, expires="2027-06-30")  # the operator renews; the scheduler is not told

    [renewed] = _job_at(started_with, destroy_on)
    assert renewed.startswith(f"The licence was renewed: {path} now says it expires on 2027-06-30.")
    assert "destroyed nothing" in renewed
    assert _job_at(started_with, destroy_on + dt.timedelta(days=1)) == [], "said once"
    assert [a.name for a in Account.select()] == ["kept"]
    assert AppState.get_or_none(AppState.key == "licence.purged") is None

    # A file that cannot be read confirms nothing: no destruction, and the boss is told once.
    Path(path).write_text("[seats\n")
    [unreadable] = _job_at(started_with, destroy_on + dt.timedelta(days=2))
    assert "the data was not destroyed: the configuration file" in unreadable and "cannot be read" in unreadable
    assert _job_at(started_with, destroy_on + dt.timedelta(days=3)) == [], "said once"
    assert [a.name for a in Account.select()] == ["kept"]

    _config(tmp_path, clean_store, expires=expires.isoformat())  # not renewed after all: the purge goes ahead
    [purged] = _job_at(started_with, destroy_on + dt.timedelta(days=4))
    assert "all customer data was destroyed" in purged and Account.select().count() == 0


def test_two_runs_of_the_licence_step_at_once_send_a_notice_once(clean_store, boss, db):
    import threading
    import time

    from appliance.db import open_database

    expires = dt.date(2026, 6, 30)
    settings = _with(clean_store, seats={"expires": expires})
    lifecycle.licence_tick(settings, expires - dt.timedelta(days=60))  # its state row exists, nothing due
    day = expires - dt.timedelta(days=30)

    def tick():
        database.connect(reuse_if_open=True)
        try:
            lifecycle.licence_tick(settings, day)
        finally:
            database.close()

    other = open_database(_with(settings, database={"pool_size": 1}), bind=False)

    def waiting(n: int) -> None:
        for _ in range(200):
            if other.execute_sql("SELECT count(*) FROM pg_locks WHERE NOT granted").fetchone()[0] >= n:
                return
            time.sleep(0.05)
        raise AssertionError(f"expected {n} sessions waiting for a lock")

    first, second = threading.Thread(target=tick), threading.Thread(target=tick)
    try:
        with other.connection_context(), other.atomic():
            # The first run pauses where it records what it sent, its notice already written.
            other.execute_sql("SELECT 1 FROM app_state WHERE key = 'licence.notices' FOR UPDATE")
            first.start()
            waiting(1)
            second.start()
            waiting(2)
    finally:
        first.join(30)
        second.join(30)
        other.close_all()
    assert [n.message[:40] for n in Notice.select()] == ["The licence for 50 seats expires on 2026"]


# ----------------------------------------------------------------------------- the web app


def _app_with(settings, db):
    from webapp import create_app

    app = create_app(settings, database=db)
    app.config.update(TESTING=True)
    return app


def _browser(app, email: str) -> Browser:
    b = Browser(app.test_client())
    assert b.login(email).status_code == 302
    return b


def _expiring_on(settings, offset_days: int):
    return _with(settings, seats={"expires": lifecycle.local_today(settings) + dt.timedelta(days=offset_days)})


def test_in_grace_every_write_is_refused_but_reading_login_and_export_work(clean_store, db, boss, make_seat,
                                                                         monkeypatch):
    from webapp import admin

    make_seat("a@corp.cn", role="agent")
    acc = audit.create(boss, Account, {"name": "华信科技"})
    settings = _expiring_on(clean_store, -3)
    destroy_on = lifecycle.licence_state(settings).destroy_on.isoformat()
    app = _app_with(settings, db)
    agent = _browser(app, "a@corp.cn")  # logging in is a POST, and works
    page = agent.get("/accounts/").get_data(as_text=True)
    assert f"all data will be destroyed on {destroy_on}" in page
    refused = agent.post("/accounts/new", {"name": "New Ltd"}, token_from="/accounts/")
    assert refused.status_code == 403
    assert f"The data is read-only and will be destroyed on {destroy_on}" in refused.get_data(as_text=True)
    assert Account.select().count() == 1
    monkeypatch.setattr(admin, "_run_export", lambda *args: None)  # no export thread at work in the test
    chief = _browser(app, "boss@corp.cn")
    assert chief.post(f"/accounts/{acc.id}/delete", token_from="/accounts/").status_code == 403
    assert chief.post("/admin/export", token_from="/admin/export").status_code == 302
    assert AuditLog.get(AuditLog.action == "export_all").actor == "boss@corp.cn", "the boss's export still starts"
    assert chief.post("/auth/logout", token_from="/accounts/").status_code == 302



# Every POST a read-only appliance still takes (the rest answer the licence's 403).
WRITABLE_IN_GRACE = {"auth.login", "auth.logout", "auth.locale", "auth.set_password", "admin.data_export",
                     "admin.suspend", "admin.acknowledge", "admin.change_seats"}


def _post_urls(app) -> dict[str, str]:
    """endpoint -> a URL of every POST route, its arguments filled in (numbers 1, names "account")."""
    from flask import url_for
    from werkzeug.routing import IntegerConverter

    urls = {}
    with app.test_request_context():
        for rule in app.url_map.iter_rules():
            if "POST" in rule.methods:
                urls[rule.endpoint] = url_for(rule.endpoint, **{
                    a: 1 if isinstance(rule._converters.get(a), IntegerConverter) else "account"
                    for a in rule.arguments})
    return urls


def test_in_grace_every_post_route_is_refused_but_the_boss_keeps_the_seats_safe(clean_store, db, boss, make_seat):
    from appliance.notices import record_notice

    thief = make_seat("stolen@corp.cn", role="agent").user
    leaver = make_seat("leaver@corp.cn", role="agent").user
    notice = record_notice("warning", "licence", "The licence ended on %(expires)s; the customer data was "
                           "destroyed on %(date)s.", {"expires": "x", "date": "y"})
    app = _app_with(_expiring_on(clean_store, -3), db)
    chief = _browser(app, "boss@corp.cn")
    token = chief.csrf("/accounts/")
    urls = _post_urls(app)
    assert len(urls) > 30 and WRITABLE_IN_GRACE <= set(urls)
    for endpoint, url in sorted(urls.items()):
        if endpoint in WRITABLE_IN_GRACE:
            continue
        refused = chief.client.post(url, data={"csrf_token": token, "action": "disable"})
        assert refused.status_code == 403, endpoint
        assert "The data is read-only" in refused.get_data(as_text=True), endpoint
    removing = chief.client.post(urls["admin.change_seats"], data={"csrf_token": token, "action": "remove",
                                                                  "seat": str(leaver.id), "heir": str(boss.id)})
    assert removing.status_code == 403 and User.get_by_id(leaver.id).active

    assert chief.client.post(f"/admin/seats/{thief.id}/suspend", data={"csrf_token": token}).status_code == 302
    assert chief.client.post("/admin/seats/change", data={"csrf_token": token, "action": "disable",
                                                          "seat": str(leaver.id)}).status_code == 302
    assert not User.get_by_id(thief.id).active and not User.get_by_id(leaver.id).active
    assert chief.client.post(f"/admin/notices/{notice.id}/acknowledge",
                             data={"csrf_token": token}).status_code == 302
    assert Notice.get_by_id(notice.id).acknowledged_at is not None


def test_in_grace_a_seat_gets_404_from_the_boss_pages_and_a_script_gets_json(clean_store, db, boss, make_seat):
    from webapp.models import Opportunity

    make_seat("a@corp.cn", role="agent")
    acc = audit.create(boss, Account, {"name": "华信科技"})
    audit.delete(boss, acc)
    opp = audit.create(boss, Opportunity, {"name": "Deal", "stage": "prospecting"})
    app = _app_with(_expiring_on(clean_store, -3), db)
    agent = _browser(app, "a@corp.cn")
    token = agent.csrf("/accounts/")
    for url in (f"/admin/deleted/account/{acc.id}/undo", f"/admin/deleted/account/{acc.id}/destroy",
                "/admin/seats/change", "/admin/company"):
        assert agent.client.post(url, data={"csrf_token": token}).status_code == 404, url
    chief = _browser(app, "boss@corp.cn")
    token = chief.csrf("/opportunities/board")
    moved = chief.client.post(f"/opportunities/{opp.id}/stage", data={"stage": "won", "csrf_token": token},
                              headers={"Accept": "application/json", "X-CSRFToken": token})
    assert moved.status_code == 403 and "will be destroyed on" in moved.get_json()["error"]


def test_after_grace_the_pages_say_whether_the_data_was_destroyed_yet(clean_store, db, boss, make_seat):
    make_seat("a@corp.cn", role="agent")
    settings = _expiring_on(clean_store, -40)
    ended = _app_with(settings, db)
    page = _browser(ended, "a@corp.cn").get("/").get_data(as_text=True)
    assert "will be destroyed at the scheduler&#39;s next retention run" in page, "the purge has not run"
    assert "was destroyed" not in page
    refused = _browser(ended, "a@corp.cn").post("/accounts/new", {"name": "x"}, token_from="/accounts/")
    assert refused.status_code == 403 and "next retention run" in refused.get_data(as_text=True)

    lic = lifecycle.licence_state(settings)
    today = lifecycle.local_today(settings)
    _job_at(settings, today - dt.timedelta(days=1))  # the last notice, a day late
    _job_at(settings, today)  # the purge
    assert lifecycle.purged_on(settings, lic) == today
    page = _browser(ended, "a@corp.cn").get("/").get_data(as_text=True)
    assert f"the customer data was destroyed on {today.isoformat()}" in page


def test_a_renewed_licence_lifts_the_read_only_mode(clean_store, db, boss):
    in_grace = _browser(_app_with(_expiring_on(clean_store, -3), db), "boss@corp.cn")
    assert in_grace.post("/accounts/new", {"name": "New Ltd"}, token_from="/accounts/new").status_code == 403
    # The operator types the new date and restarts the web service: an app on the renewed settings.
    renewed = _app_with(_expiring_on(clean_store, 365), db)
    b = _browser(renewed, "boss@corp.cn")
    assert "licence-banner" not in b.get("/accounts/").get_data(as_text=True)
    assert b.post("/accounts/new", {"name": "New Ltd"}, token_from="/accounts/new").status_code == 302
    assert Account.get(Account.name == "New Ltd")


def test_the_boss_alone_is_reminded_before_the_expiry(clean_store, db, boss, make_seat):
    make_seat("a@corp.cn", role="agent")
    app = _app_with(_expiring_on(clean_store, 10), db)
    assert "licence-banner" in _browser(app, "boss@corp.cn").get("/").get_data(as_text=True)
    assert "licence-banner" not in _browser(app, "a@corp.cn").get("/").get_data(as_text=True)


def test_the_deleted_items_page_undoes_and_destroys_after_the_name_is_typed(clean_store, boss, browser_for,
                                                                            make_seat):
    chief = browser_for(make_seat("chief@corp.cn", role="boss"))
    acc = audit.create(boss, Account, {"name": "华信科技"})
    back = audit.create(boss, Account, {"name": "Comes Back"})
    audit.delete(boss, acc)
    audit.delete(boss, back)
    page = chief.get("/admin/deleted/").get_data(as_text=True)
    assert "华信科技" in page and "Comes Back" in page and "boss@corp.cn" in page

    assert chief.post(f"/admin/deleted/account/{back.id}/undo", token_from="/admin/deleted/").status_code == 302
    assert Account.get_by_id(back.id).deleted_at is None

    form = f"/admin/deleted/account/{acc.id}/destroy"
    assert "Type the name exactly: 华信科技" in chief.get(form).get_data(as_text=True)
    wrong = chief.post(form, {"name": "华信"}, token_from=form)
    assert wrong.status_code == 400 and "Nothing was destroyed" in wrong.get_data(as_text=True)
    assert Account.get_by_id(acc.id).deleted_at is not None
    assert chief.post(form, {"name": "华信科技"}, token_from=form).status_code == 302
    assert Account.get_or_none(Account.id == acc.id) is None
    assert chief.get(form).status_code == 404  # gone: nothing left to destroy


@pytest.mark.parametrize("role", ["manager", "agent"])
def test_every_deleted_items_route_answers_404_to_anyone_but_the_boss(clean_store, boss, make_seat, browser_for,
                                                                      role):
    seat = make_seat(f"{role}@corp.cn", role=role, team="East")
    acc = audit.create(seat.user, Account, {"name": "Mine"})
    audit.delete(seat.user, acc)
    b = browser_for(seat)
    assert b.get("/admin/deleted/").status_code == 404
    assert b.post(f"/admin/deleted/account/{acc.id}/undo").status_code == 404
    assert b.get(f"/admin/deleted/account/{acc.id}/destroy").status_code == 404
    assert b.post(f"/admin/deleted/account/{acc.id}/destroy", {"name": "Mine"}).status_code == 404
    assert Account.get_by_id(acc.id).deleted_at is not None


# ----------------------------------------------------------------------------- the command line


def _config(tmp_path, settings, expires: str = "none") -> str:
    db = settings.database
    path = tmp_path / "appliance.toml"
    path.write_text(
        f'[web]\npublic_url = "https://crm.corp.lan"\nsecret_key_file = "{settings.web.secret_key_file}"\n'
        f'[seats]\nlicensed = 50\nexpires = "{expires}"\n'
        f'[appliance]\ndata_dir = "{settings.appliance.data_dir}"\nlog_dir = "{tmp_path / "log"}"\n'
        f'[backup]\ndir = "{tmp_path / "backups"}"\nwal_archive_dir = "{tmp_path / "wal"}"\n'
        f'[database]\nport = {db.port}\nname = "{db.name}"\nuser = "{db.user}"\npassword_file = "{db.password_file}"\n'
    )
    return str(path)


def test_purge_needs_all_and_a_yes(clean_store, boss, tmp_path):
    config = _config(tmp_path, clean_store)
    audit.create(boss, Account, {"name": "华信科技"})
    refused = CliRunner().invoke(main, ["--config", config, "purge", "--yes"])
    assert refused.exit_code == 2 and "purge destroys all customer data and needs --all" in refused.output
    declined = CliRunner().invoke(main, ["--config", config, "purge", "--all"], input="n\n")
    assert declined.exit_code == 1 and "Aborted" in declined.output
    assert Account.select().count() == 1
    done = CliRunner().invoke(main, ["--config", config, "purge", "--all", "--yes", "--json"])
    assert done.exit_code == 0, done.output
    report = json.loads(done.output)
    assert report["rows"]["account"] == 1 and report["backups"] == [] and report["wal_oldest"] is None
    assert Account.select().count() == 0
    assert AuditLog.get().actor.startswith("cli:")


def test_licence_deleted_and_undelete_commands(clean_store, boss, tmp_path):
    today = lifecycle.local_today(clean_store)
    expires = today - dt.timedelta(days=2)
    config = _config(tmp_path, clean_store, expires=expires.isoformat())
    status = CliRunner().invoke(main, ["--config", config, "licence", "--json"])
    assert status.exit_code == 0, status.output
    data = json.loads(status.output)
    assert (data["state"], data["read_only"], data["seats"], data["seats_in_use"]) == ("grace", True, 50, 1)
    assert data["destroy_on"] == (expires + dt.timedelta(days=31)).isoformat()
    text = CliRunner().invoke(main, ["--config", config, "licence"]).output
    assert f"destroyed:  {data['destroy_on']}" in text and "state:      grace (read-only)" in text

    acc = audit.create(boss, Account, {"name": "华信科技"})
    audit.delete(boss, acc)
    listed = CliRunner().invoke(main, ["--config", config, "deleted", "--json"])
    assert [(i["entity"], i["id"], i["title"]) for i in json.loads(listed.output)] == [("account", acc.id, "华信科技")]
    refused = CliRunner().invoke(main, ["--config", config, "undelete", "account", str(acc.id)])
    assert refused.exit_code == 1 and "undelete refused: the licence expired on" in refused.output
    assert "the data is read-only until it is destroyed on" in refused.output and "renew the licence" in refused.output
    assert Account.get_by_id(acc.id).deleted_at is not None
    # Customer IT may still announce the end to every seat; demo data is a write like any other.
    posted = CliRunner().invoke(main, ["--config", config, "announce", "post", "The CRM closes on Friday",
                                       "--to", "2099-01-01 00:00", "--no-email"])
    assert posted.exit_code == 0, posted.output
    assert Announcement.get().message == "The CRM closes on Friday"
    demo = CliRunner().invoke(main, ["--config", config, "demo-data", "--seats", "1", "--force"])
    assert demo.exit_code == 1 and "demo-data refused: the licence expired" in demo.output
    assert Account.select().count() == 1

    config = _config(tmp_path, clean_store, expires=(today + dt.timedelta(days=365)).isoformat())  # renewed
    back = CliRunner().invoke(main, ["--config", config, "undelete", "account", str(acc.id)])
    assert back.exit_code == 0 and "is back" in back.output
    assert Account.get_by_id(acc.id).deleted_at is None
    again = CliRunner().invoke(main, ["--config", config, "undelete", "account", str(acc.id)])
    assert again.exit_code == 1 and f"There is no deleted account number {acc.id}" in again.output
    assert "Traceback" not in again.output
