"""Attachments and the quota (issue 6, R-9, R-15): real files under a real data directory,
rows in real PostgreSQL, uploads through the real Flask routes."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import os
import shutil
import stat
import threading
from pathlib import Path

import pytest

from appliance import attachments as store
from appliance import seats
from webapp import audit
from webapp.models import Account, Attachment, AuditLog, Notice, get_state

PDF = b"%PDF-1.7\n" + b"x" * 100
PNG = b"\x89PNG\r\n\x1a\n" + b"\x00" * 100


@pytest.fixture
def clean_store(settings, db):
    """The data directory is shared by the whole run: every test starts with no files."""
    for folder in (store.store_dir(settings), store.incoming_dir(settings)):
        shutil.rmtree(folder, ignore_errors=True)
    yield settings
    for folder in (store.store_dir(settings), store.incoming_dir(settings)):
        shutil.rmtree(folder, ignore_errors=True)


def _with_quota(settings, quota_bytes: int):
    """Settings whose quota is ``quota_bytes``: one licensed seat, sized to it (MB units)."""
    assert quota_bytes % store.MB == 0
    return dataclasses.replace(
        settings,
        seats=dataclasses.replace(settings.seats, licensed=1),
        attachments=dataclasses.replace(settings.attachments, per_seat_mb=quota_bytes // store.MB))


def _upload(settings, seat_user, record, name: str, data: bytes, is_boss=False):
    incoming = store.receive(settings, io.BytesIO(data))
    return store.attach(settings, seat_user, seat_user, record.entity, record.id, name, incoming, is_boss=is_boss)


def _files(settings) -> list[str]:
    root = store.store_dir(settings)
    return sorted(p.name for p in root.rglob("*") if p.is_file()) if root.exists() else []


def _incoming(settings) -> list[str]:
    root = store.incoming_dir(settings)
    return sorted(p.name for p in root.iterdir()) if root.exists() else []


def _filler(size: int) -> bytes:
    """A PDF of exactly ``size`` bytes, different for every size."""
    head = b"%PDF-1.4\n" + str(size).encode() + b"\n"
    return head + b"0" * (size - len(head))


def test_a_file_is_stored_once_by_content_and_audited(clean_store, make_seat):
    settings = clean_store
    boss = make_seat("boss@corp.cn", role="boss")
    acc = audit.create(boss.user, Account, {"name": "华信"})
    first = _upload(settings, boss.user, acc, "合同.pdf", PDF)
    second = _upload(settings, boss.user, acc, "copy.pdf", PDF)
    sha = hashlib.sha256(PDF).hexdigest()
    assert (first.sha256, second.sha256) == (sha, sha)
    assert _files(settings) == [sha]  # one file for both rows
    assert store.blob_path(settings, sha).read_bytes() == PDF
    assert (first.filename, first.content_type, first.size) == ("合同.pdf", "application/pdf", len(PDF))
    assert _incoming(settings) == []
    rows = list(AuditLog.select().where(AuditLog.entity == "attachment").order_by(AuditLog.id))
    assert [(r.record_id, r.action, r.changes["filename"][1]) for r in rows] == [
        (first.id, "create", "合同.pdf"), (second.id, "create", "copy.pdf")]


@pytest.mark.parametrize("name,data,problem", [
    ("report.exe", b"MZ\x90\x00", "cannot be attached"),
    ("notes.pdf", b"MZ\x90\x00" + b"\x00" * 50, "program"),
    ("photo.pdf", PNG, "not PDF"),
    ("sheet.xlsx", PDF, "not XLSX"),
    ("readme.txt", b"plain\x00binary", "not text"),
    ("noextension", b"hello", "cannot be attached"),
    ("", b"hello", "cannot be attached"),
])
def test_a_refused_type_leaves_nothing(clean_store, make_seat, name, data, problem):
    settings = clean_store
    boss = make_seat("boss@corp.cn", role="boss")
    acc = audit.create(boss.user, Account, {"name": "A"})
    with pytest.raises(store.AttachmentError, match=problem):
        _upload(settings, boss.user, acc, name, data)
    assert _files(settings) == [] and _incoming(settings) == []
    assert Attachment.select().count() == 0


def test_a_path_in_the_name_is_dropped():
    assert store.check_name("../../etc/passwd.txt") == ("passwd.txt", "text/plain")
    assert store.check_name("C:\\Users\\li\\报价单.XLSX")[0] == "报价单.XLSX"


def test_a_long_name_is_shortened_before_its_extension():
    name, content_type = store.check_name("报" * 300 + ".PDF")
    assert (name, content_type) == ("报" * 251 + ".PDF", "application/pdf") and len(name) == 255
    assert store.check_name("a" * 255 + ".txt")[0] == "a" * 251 + ".txt"
    assert store.check_name("a" * 251 + ".txt")[0] == "a" * 251 + ".txt"  # 255 already: unchanged


def test_an_upload_over_the_size_limit_stops_early_and_leaves_nothing(clean_store):
    settings = clean_store
    with pytest.raises(store.AttachmentError, match="larger than 1 MB"):
        store.receive(settings, io.BytesIO(b"x" * (store.MB + 1)), max_bytes=store.MB)
    assert _incoming(settings) == []


def test_quota_edges_exactly_full_then_one_byte_over(clean_store, make_seat):
    settings = _with_quota(clean_store, 2 * store.MB)
    boss = make_seat("boss@corp.cn", role="boss")
    agent = make_seat("agent@corp.cn", role="agent")
    acc = audit.create(agent.user, Account, {"name": "A"})
    _upload(settings, agent.user, acc, "a.pdf", _filler(store.MB))
    # Exactly at the limit: accepted.
    _upload(settings, agent.user, acc, "b.pdf", _filler(store.MB))
    assert store.usage(settings).used == 2 * store.MB and store.usage(settings).free == 0
    before = _files(settings)
    # One byte over: refused, without figures for an agent, with them for the boss.
    with pytest.raises(store.QuotaExceeded) as refused:
        _upload(settings, agent.user, acc, "c.txt", b"x")
    assert "Ask your administrator" in str(refused.value) and "MB" not in str(refused.value)
    with pytest.raises(store.QuotaExceeded) as told:
        _upload(settings, boss.user, acc, "c.txt", b"x", is_boss=True)
    assert "0 B of 2 MB" in str(told.value)
    assert _files(settings) == before and _incoming(settings) == []
    assert Attachment.select().count() == 2


def test_the_boss_sees_two_different_figures_when_one_byte_is_missing(clean_store, make_seat):
    settings = _with_quota(clean_store, 2 * store.MB)
    boss = make_seat("boss@corp.cn", role="boss")
    acc = audit.create(boss.user, Account, {"name": "A"})
    _upload(settings, boss.user, acc, "a.pdf", _filler(store.MB))
    with pytest.raises(store.QuotaExceeded) as told:
        _upload(settings, boss.user, acc, "b.pdf", _filler(store.MB + 1), is_boss=True)
    # Rounded, both are "1 MB": the message gives the bytes instead.
    assert "The file (1,048,577 B) does not fit: 1,048,576 B of 2 MB attachment space is left." in str(told.value)
    with pytest.raises(store.QuotaExceeded) as rounded:
        _upload(settings, boss.user, acc, "c.pdf", _filler(store.MB + store.MB // 2), is_boss=True)
    assert "The file (1.5 MB) does not fit: 1 MB of 2 MB" in str(rounded.value)  # figures differ: kept short


def test_two_uploads_racing_for_the_last_space_one_wins(clean_store, make_seat, migrated_db):
    """Each fits alone, not both: exactly one is stored, the other refused and gone."""
    settings = _with_quota(clean_store, 2 * store.MB)
    agent = make_seat("agent@corp.cn", role="agent")
    acc = audit.create(agent.user, Account, {"name": "A"})
    _upload(settings, agent.user, acc, "base.pdf", _filler(store.MB))
    arrived = [store.receive(settings, io.BytesIO(_filler(store.MB - n))) for n in (10, 20)]
    barrier = threading.Barrier(2)
    outcomes = []

    def upload(incoming):
        with migrated_db.connection_context():
            barrier.wait()
            try:
                store.attach(settings, agent.user, agent.user, "account", acc.id, "race.pdf", incoming)
                outcomes.append("stored")
            except store.QuotaExceeded:
                outcomes.append("refused")

    threads = [threading.Thread(target=upload, args=(i,)) for i in arrived]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(outcomes) == ["refused", "stored"]
    assert store.usage(settings).used <= 2 * store.MB
    assert len(_files(settings)) == 2 and _incoming(settings) == []


def test_the_boss_is_told_at_90_and_100_percent_once_each(clean_store, make_seat):
    settings = _with_quota(clean_store, 10 * store.MB)
    agent = make_seat("agent@corp.cn", role="agent")
    acc = audit.create(agent.user, Account, {"name": "A"})

    def quota_notices():
        return [n.message for n in Notice.select().where(Notice.source == "quota").order_by(Notice.id)]

    _upload(settings, agent.user, acc, "a.pdf", _filler(8 * store.MB))
    assert quota_notices() == []
    _upload(settings, agent.user, acc, "b.pdf", _filler(store.MB))  # 90%
    _upload(settings, agent.user, acc, "c.pdf", _filler(store.MB // 2))  # 95%: still the 90% level
    assert len(quota_notices()) == 1 and "90% used" in quota_notices()[0]
    last = _upload(settings, agent.user, acc, "d.pdf", _filler(store.MB // 2))  # exactly 100%
    assert len(quota_notices()) == 2 and "full" in quota_notices()[1]
    assert get_state("attachments.quota_level") == 100
    # Deleting frees nothing (the file stays on disk); destroying does. Falling below and
    # crossing again tells again; the hourly check sees nothing new meanwhile.
    store.soft_delete(agent.user, last)
    assert "100% level" in store.check_quota(settings)
    with store.database.atomic():
        store.shred_unnamed(settings, store.destroy_rows([Attachment.get_by_id(last.id)]))
    assert "90% level" in store.check_quota(settings)
    assert len(quota_notices()) == 2
    _upload(settings, agent.user, acc, "d.pdf", _filler(store.MB // 2))
    assert len(quota_notices()) == 3


def test_deleted_files_count_until_destroyed(clean_store, make_seat):
    """Upload-and-delete cycles cannot fill the disk: a deleted file stays on disk for the undo
    window, so it counts until it is destroyed; bringing it back then needs no new space."""
    settings = _with_quota(clean_store, 2 * store.MB)
    boss = make_seat("boss@corp.cn", role="boss")
    acc = audit.create(boss.user, Account, {"name": "A"})
    gone = _upload(settings, boss.user, acc, "a.pdf", _filler(store.MB + 5))
    store.soft_delete(boss.user, gone)
    assert store.blob_path(settings, gone.sha256).exists()
    used = store.usage(settings)
    assert (used.used, used.deleted, used.per_seat[0][3]) == (store.MB + 5, store.MB + 5, store.MB + 5)
    with pytest.raises(store.QuotaExceeded) as refused:
        _upload(settings, boss.user, acc, "b.pdf", _filler(store.MB), is_boss=True)
    assert "Deleted files count until they are destroyed" in str(refused.value)
    assert "Administration → Deleted items → Destroy" in str(refused.value)
    store.undelete(settings, boss.user, Attachment.get_by_id(gone.id))  # takes no new space: always fits
    assert Attachment.get_by_id(gone.id).deleted_at is None and store.usage(settings).deleted == 0
    store.soft_delete(boss.user, Attachment.get_by_id(gone.id))
    with store.database.atomic():
        store.shred_unnamed(settings, store.destroy_rows([Attachment.get_by_id(gone.id)]))
    assert store.usage(settings).used == 0
    _upload(settings, boss.user, acc, "b.pdf", _filler(store.MB), is_boss=True)  # the space is free again


def test_destroying_the_last_row_overwrites_the_file(clean_store, make_seat, tmp_path):
    settings = clean_store
    boss = make_seat("boss@corp.cn", role="boss")
    acc = audit.create(boss.user, Account, {"name": "A"})
    secret = b"%PDF-1.4 " + b"CONFIDENTIAL-PRICE-LIST " * 1000
    one = _upload(settings, boss.user, acc, "a.pdf", secret)
    two = _upload(settings, boss.user, acc, "b.pdf", secret)
    path = store.blob_path(settings, one.sha256)
    # A second name for the same inode shows what happened to the bytes themselves.
    witness = store.store_dir(settings) / "witness"
    os.link(path, witness)
    with store.database.atomic():
        hashes = store.destroy_rows([one])
    assert store.shred_unnamed(settings, hashes) == 0  # the other row still names it
    assert path.read_bytes() == secret
    with store.database.atomic():
        hashes = store.destroy_rows([Attachment.get_by_id(two.id)])
    assert store.shred_unnamed(settings, hashes) == 1
    assert not path.exists() and Attachment.select().count() == 0
    assert witness.read_bytes() == bytes(len(secret))  # overwritten with zeros before unlinking
    witness.unlink()


def test_a_stored_file_is_read_only_and_an_interrupted_shred_never_poisons_a_new_upload(clean_store, make_seat,
                                                                                          monkeypatch):
    settings = clean_store
    boss = make_seat("boss@corp.cn", role="boss")
    acc = audit.create(boss.user, Account, {"name": "A"})
    secret = b"%PDF-1.4 " + b"CONFIDENTIAL " * 1000
    row = _upload(settings, boss.user, acc, "a.pdf", secret)
    path = store.blob_path(settings, row.sha256)
    assert path.stat().st_mode & 0o777 == 0o400
    real_fsync = os.fsync

    def power_cut(fd):
        if stat.S_ISREG(os.fstat(fd).st_mode):  # the file's zeros, not a directory's entries
            raise OSError("power cut while shredding")
        real_fsync(fd)

    # The shred is killed after its zeros are written, before they are flushed and unlinked.
    with store.database.atomic():
        hashes = store.destroy_rows([row])
    monkeypatch.setattr(store.os, "fsync", power_cut)
    with pytest.raises(OSError, match="power cut"):
        store.shred_unnamed(settings, hashes)
    monkeypatch.undo()
    [aside] = [p for p in path.parent.iterdir()]
    assert not path.exists() and aside.name.startswith(".shred-") and aside.read_bytes() == bytes(len(secret))

    again = _upload(settings, boss.user, acc, "a.pdf", secret)  # the same content: a good copy is stored
    assert again.sha256 == row.sha256 and path.read_bytes() == secret
    assert path.stat().st_mode & 0o777 == 0o400
    assert store.shred_unnamed(settings) == 1  # the sweep finishes the left-over, keeps the new copy
    assert [p.name for p in path.parent.iterdir()] == [row.sha256] and path.read_bytes() == secret


def test_the_sweep_shreds_files_no_row_names(clean_store, make_seat):
    settings = clean_store
    boss = make_seat("boss@corp.cn", role="boss")
    acc = audit.create(boss.user, Account, {"name": "A"})
    kept = _upload(settings, boss.user, acc, "a.pdf", PDF)
    orphan = store.blob_path(settings, "ab" * 32)
    orphan.parent.mkdir(parents=True, exist_ok=True)
    orphan.write_bytes(b"left by a destroy killed before its shredding")
    store.blob_path(settings, kept.sha256).chmod(0o600)  # stored before files were kept read-only
    assert store.shred_unnamed(settings) == 1
    assert not orphan.exists() and store.blob_path(settings, kept.sha256).exists()
    assert store.blob_path(settings, kept.sha256).stat().st_mode & 0o777 == 0o400, "made read-only by the sweep"


def test_a_removed_seat_hands_its_files_to_the_heir(clean_store, make_seat):
    settings = clean_store
    boss = make_seat("boss@corp.cn", role="boss")
    agent = make_seat("agent@corp.cn", role="agent")
    acc = audit.create(agent.user, Account, {"name": "A"})
    _upload(settings, agent.user, acc, "a.pdf", PDF)
    moved = seats.remove_seats([agent.user], boss.user, boss.user)
    assert moved["attachment"] == 1
    assert [(uid, used) for uid, _e, _n, used in store.usage(settings).per_seat] == [(boss.user.id, len(PDF))]


# ----------------------------------------------------------------------------- the web

def _post_file(browser, record_path: str, upload_path: str, name: str, data: bytes):
    token = browser.csrf(record_path)
    return browser.client.post(upload_path, data={"csrf_token": token, "file": (io.BytesIO(data), name)},
                               content_type="multipart/form-data")


def test_upload_download_delete_through_the_pages(clean_store, make_seat, browser_for):
    agent = make_seat("agent@corp.cn", role="agent")
    acc = audit.create(agent.user, Account, {"name": "A"})
    b = browser_for(agent)
    resp = _post_file(b, f"/accounts/{acc.id}", f"/attachments/account/{acc.id}", "报价单.pdf", PDF)
    assert resp.status_code == 302 and resp.headers["Location"].endswith(f"/accounts/{acc.id}#attachments")
    row = Attachment.get()
    page = b.get(f"/accounts/{acc.id}").get_data(as_text=True)
    assert "报价单.pdf" in page and f"/attachments/{row.id}" in page
    got = b.get(f"/attachments/{row.id}")
    assert got.status_code == 200 and got.data == PDF
    assert got.headers["Content-Type"] == "application/pdf"
    assert got.headers["Content-Disposition"].startswith("attachment;")
    assert "sandbox" in got.headers["Content-Security-Policy"] and got.headers["Cache-Control"] == "no-store"
    assert got.headers["X-Content-Type-Options"] == "nosniff"
    stale = Attachment.get_by_id(row.id)  # as a second tab read it, before the delete
    resp = b.post(f"/attachments/{row.id}/delete", token_from=f"/accounts/{acc.id}")
    assert resp.status_code == 302 and Attachment.get_by_id(row.id).deleted_at is not None
    deleted_at = Attachment.get_by_id(row.id).deleted_at
    store.soft_delete(agent.user, stale)  # the form sent twice: nothing more happens
    assert Attachment.get_by_id(row.id).deleted_at == deleted_at
    assert AuditLog.select().where(AuditLog.entity == "attachment", AuditLog.record_id == row.id,
                                   AuditLog.action == "delete").count() == 1
    assert b.get(f"/attachments/{row.id}").status_code == 404
    assert "报价单.pdf" not in b.get(f"/accounts/{acc.id}").get_data(as_text=True)


def test_a_refused_upload_is_explained_on_the_record_page(clean_store, make_seat, browser_for):
    agent = make_seat("agent@corp.cn", role="agent")
    acc = audit.create(agent.user, Account, {"name": "A"})
    b = browser_for(agent)
    resp = _post_file(b, f"/accounts/{acc.id}", f"/attachments/account/{acc.id}", "tool.pdf", b"MZ\x90\x00")
    assert resp.status_code == 302
    page = b.get(f"/accounts/{acc.id}").get_data(as_text=True)
    assert "programs cannot be attached" in page and Attachment.select().count() == 0


def test_another_agents_files_are_out_of_reach(clean_store, make_seat, browser_for):
    settings = clean_store
    owner = make_seat("a@corp.cn", role="agent", team="East")
    other = make_seat("b@corp.cn", role="agent", team="East")
    acc = audit.create(owner.user, Account, {"name": "A"})
    row = _upload(settings, owner.user, acc, "a.pdf", PDF)
    b = browser_for(other)
    assert b.get(f"/attachments/{row.id}").status_code == 404
    assert b.post(f"/attachments/{row.id}/delete").status_code == 404
    resp = _post_file(b, "/accounts/", f"/attachments/account/{acc.id}", "x.pdf", PDF)
    assert resp.status_code == 404
    assert b.get("/admin/quota").status_code == 404
    assert Attachment.select().count() == 1 and Attachment.get().deleted_at is None


def test_a_manager_can_read_a_team_file_and_remove_it(clean_store, make_seat, browser_for):
    settings = clean_store
    agent = make_seat("a@corp.cn", role="agent", team="East")
    manager = make_seat("m@corp.cn", role="manager", team="East")
    acc = audit.create(agent.user, Account, {"name": "A"})
    row = _upload(settings, agent.user, acc, "a.pdf", PDF)
    b = browser_for(manager)
    assert b.get(f"/attachments/{row.id}").data == PDF
    assert b.post(f"/attachments/{row.id}/delete", token_from=f"/accounts/{acc.id}").status_code == 302
    assert Attachment.get_by_id(row.id).deleted_at is not None


def test_the_boss_sees_used_and_remaining_space_per_seat(clean_store, make_seat, browser_for):
    settings = clean_store
    boss = make_seat("boss@corp.cn", role="boss")
    agent = make_seat("agent@corp.cn", role="agent")
    acc = audit.create(agent.user, Account, {"name": "A"})
    _upload(settings, agent.user, acc, "a.pdf", _filler(3 * 1024 * 1024 // 2))
    page = browser_for(boss).get("/admin/quota").get_data(as_text=True)
    assert (settings.seats.licensed, settings.attachments.per_seat_mb) == (50, 50)
    assert "1.5 MB of 2.4 GB used, 2.4 GB left" in page
    assert "agent@corp.cn" in page and "1.5 MB" in page
    assert 'id="quota-deleted"' not in page
    store.soft_delete(agent.user, Attachment.get())
    page = browser_for(boss).get("/admin/quota").get_data(as_text=True)
    assert "1.5 MB of 2.4 GB used" in page and "Deleted files waiting to be destroyed: 1.5 MB." in page


# ----------------------------------------------------------------------------- refusals through the web

ZH = {"Accept-Language": "zh-CN,zh;q=0.9"}


def _browser_with(settings, db, seat):
    """A logged-in browser on an app built with ``settings`` (a small quota or upload limit)."""
    from tests.conftest import Browser
    from webapp import create_app

    app = create_app(settings, database=db)
    app.config.update(TESTING=True)
    b = Browser(app.test_client())
    assert b.login(seat.email, seat.password).status_code == 302
    return b


def _flashed(browser, path, headers=None) -> str:
    return browser.get(path, headers=headers or {}).get_data(as_text=True)


def test_a_web_upload_over_the_quota_gives_figures_to_the_boss_only(clean_store, make_seat, db):
    settings = _with_quota(clean_store, store.MB)
    boss, agent = make_seat("boss@corp.cn", role="boss"), make_seat("agent@corp.cn", role="agent")
    acc = audit.create(agent.user, Account, {"name": "A"})
    _upload(settings, agent.user, acc, "a.pdf", _filler(store.MB - 1000))
    record, target = f"/accounts/{acc.id}", f"/attachments/account/{acc.id}"
    for seat, headers in ((agent, {}), (agent, ZH), (boss, {}), (boss, ZH)):
        b = _browser_with(settings, db, seat)
        token = b.csrf(record)
        resp = b.client.post(target, data={"csrf_token": token, "file": (io.BytesIO(_filler(5000)), "b.pdf")},
                             content_type="multipart/form-data", headers=headers)
        assert resp.status_code == 302
        page = _flashed(b, record, headers)
        if seat is agent:
            told = ("附件空间不足以存放此文件，未保存任何内容。请联系管理员。" if headers else
                    "There is not enough attachment space left for this file; nothing was stored.")
            assert told in page
            # Neither the space left (1000 B), the quota (1 MB) nor the file's size leaks.
            for figure in ("1000 B", "1,000 B", "1 MB", "4.9 KB", "5,000 B", "1,048,576"):
                assert figure not in page, (figure, headers)
        else:
            assert "4.9 KB" in page and "1000 B" in page and "1 MB" in page, headers
    assert Attachment.select().count() == 1 and _incoming(settings) == []


def test_quota_notices_are_mailed_to_the_boss_only(clean_store, make_seat, smtp_server):
    controller, inbox = smtp_server
    settings = _with_quota(clean_store, 10 * store.MB)
    settings = dataclasses.replace(settings, smtp=dataclasses.replace(
        settings.smtp, host="127.0.0.1", port=controller.port, security="none"))
    make_seat("boss@corp.cn", role="boss")
    make_seat("manager@corp.cn", role="manager")
    agent = make_seat("agent@corp.cn", role="agent")
    acc = audit.create(agent.user, Account, {"name": "A"})
    _upload(settings, agent.user, acc, "a.pdf", _filler(8 * store.MB))
    assert inbox.messages == []
    _upload(settings, agent.user, acc, "b.pdf", _filler(store.MB))  # 90%
    _upload(settings, agent.user, acc, "c.pdf", _filler(store.MB))  # 100%
    assert [m.rcpt_tos for m in inbox.messages] == [["boss@corp.cn"], ["boss@corp.cn"]]
    bodies = [m.content.decode() for m in inbox.messages]
    assert "90% used" in bodies[0] and "Attachment space is full" in bodies[1]


def test_a_web_upload_over_the_size_limit_is_a_clear_413_and_leaves_nothing(clean_store, make_seat, db):
    settings = dataclasses.replace(clean_store, attachments=dataclasses.replace(clean_store.attachments,
                                                                                max_upload_mb=1))
    boss = make_seat("boss@corp.cn", role="boss")
    acc = audit.create(boss.user, Account, {"name": "A"})
    b = _browser_with(settings, db, boss)
    big = _filler(2 * store.MB + 1)  # over the request limit (the upload limit plus 1 MB for the form)
    for record, target in ((f"/accounts/{acc.id}", f"/attachments/account/{acc.id}"),
                           ("/admin/company", "/admin/company/licence")):
        token = b.csrf(record)
        resp = b.client.post(target, data={"csrf_token": token, "file": (io.BytesIO(big), "big.pdf")},
                             content_type="multipart/form-data")
        assert resp.status_code == 413, target
        assert "The file is larger than 1 MB; nothing was stored." in resp.get_data(as_text=True)
    # Between the limit and the request limit the file is refused while it arrives, with the same words.
    resp = _post_file(b, f"/accounts/{acc.id}", f"/attachments/account/{acc.id}", "big.pdf", _filler(store.MB + 1))
    assert resp.status_code == 302
    assert "The file is larger than 1 MB; nothing was stored." in _flashed(b, f"/accounts/{acc.id}")
    assert Attachment.select().count() == 0 and _files(settings) == [] and _incoming(settings) == []


def test_upload_and_delete_without_a_csrf_token_are_refused(clean_store, make_seat, browser_for):
    agent = make_seat("agent@corp.cn", role="agent")
    acc = audit.create(agent.user, Account, {"name": "A"})
    row = _upload(clean_store, agent.user, acc, "a.pdf", PDF)
    b = browser_for(agent)
    for data in ({}, {"csrf_token": "forged"}):
        resp = b.client.post(f"/attachments/account/{acc.id}", content_type="multipart/form-data",
                             data={**data, "file": (io.BytesIO(PNG), "b.png")})
        assert resp.status_code == 400 and "Form expired" in resp.get_data(as_text=True)
        assert b.client.post(f"/attachments/{row.id}/delete", data=data).status_code == 400
    assert [(r.id, r.deleted_at) for r in Attachment.select()] == [(row.id, None)]
    assert _files(clean_store) == [row.sha256] and _incoming(clean_store) == []
    assert AuditLog.select().where(AuditLog.entity == "attachment").count() == 1


def test_a_web_upload_is_written_once_into_incoming_and_taken_into_the_store(clean_store, make_seat, browser_for,
                                                                            monkeypatch):
    """The form parser writes the upload into <data_dir>/incoming (not /tmp) and the store takes
    that very file by rename: the stored file is the spooled inode."""
    agent = make_seat("agent@corp.cn", role="agent")
    acc = audit.create(agent.user, Account, {"name": "A"})
    spooled, real_spool = [], store.spool

    def watched_spool(settings):
        part = real_spool(settings)
        spooled.append((Path(part.name), os.fstat(part.fileno()).st_ino))
        return part

    monkeypatch.setattr(store, "spool", watched_spool)
    b = browser_for(agent)
    data = _filler(2 * store.MB)  # large enough that Werkzeug would have used a file in /tmp
    resp = _post_file(b, f"/accounts/{acc.id}", f"/attachments/account/{acc.id}", "big.pdf", data)
    assert resp.status_code == 302
    [(path, inode)] = spooled
    assert path.parent == store.incoming_dir(clean_store)
    stored = store.blob_path(clean_store, hashlib.sha256(data).hexdigest())
    assert stored.read_bytes() == data and stored.stat().st_ino == inode
    assert _incoming(clean_store) == []
    # Refused after it arrived (a program): the spooled file is gone too.
    _post_file(b, f"/accounts/{acc.id}", f"/attachments/account/{acc.id}", "tool.pdf", b"MZ" + data)
    assert len(spooled) == 2 and _incoming(clean_store) == [] and Attachment.select().count() == 1
