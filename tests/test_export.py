"""The whole-data export (issue 6, R-14/R-16): every table the customer owns, consistent,
readable by stock tools, no secrets, formula cells neutralised, never overwriting a file."""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import io
import json
import os
import re
import threading
import zipfile

import pytest
from click.testing import CliRunner

from appliance import export, seats
from installer.cli import main
from tests.conftest import PASSWORD
from tests.test_cli import _config_file
from webapp import audit
from webapp.models import Account, Contact, Note, User


def _read(path) -> tuple[dict, dict[str, list[dict]]]:
    with zipfile.ZipFile(path) as archive:
        manifest = json.loads(archive.read("manifest.json"))
        tables = {}
        for entry in manifest["files"]:
            data = archive.read(entry["path"])
            assert hashlib.sha256(data).hexdigest() == entry["sha256"] and len(data) == entry["bytes"]
            tables[entry["path"]] = list(csv.DictReader(io.StringIO(data.decode("utf-8-sig"))))
    return manifest, tables


def test_the_export_holds_every_record_and_no_secret(make_seat, tmp_path):
    boss = make_seat("boss@corp.cn", role="boss")
    acc = audit.create(boss.user, Account, {"name": "华信科技有限公司", "phone": "+86 21 5555 0100",
                                            "description": '=HYPERLINK("http://evil")'})
    contact = audit.create(boss.user, Contact, {"first_name": "伟", "last_name": "王", "account": acc.id})
    audit.add_note(boss.user, contact, "客户确认下周会议。")
    audit.delete(boss.user, audit.create(boss.user, Account, {"name": "Gone Ltd"}))

    result = export.export_all(tmp_path / "export.zip")
    assert result.path.stat().st_mode & 0o777 == 0o600
    manifest, tables = _read(result.path)
    assert manifest["schema"] and manifest["attachments"]["files"] == 0
    assert {e["path"]: e["rows"] for e in manifest["files"]}["data/account.csv"] == 2
    accounts = {r["name"]: r for r in tables["data/account.csv"]}
    assert accounts["华信科技有限公司"]["phone"] == "'+86 21 5555 0100"
    assert accounts["华信科技有限公司"]["description"] == "'=HYPERLINK(\"http://evil\")", "no formula runs"
    assert accounts["Gone Ltd"]["deleted_at"], "deleted (undoable) records are the customer's too"
    assert tables["data/contact.csv"][0]["account_id"] == str(acc.id)
    assert tables["data/note.csv"][0]["body"] == "客户确认下周会议。"
    assert {r["action"] for r in tables["data/audit_log.csv"]} >= {"create", "delete"}
    assert [r["email"] for r in tables["data/user.csv"]] == ["boss@corp.cn"]
    assert "password_hash" not in tables["data/user.csv"][0]
    with zipfile.ZipFile(result.path) as archive:
        everything = b"".join(archive.read(name) for name in archive.namelist())
    assert b"$argon2" not in everything and PASSWORD.encode() not in everything
    assert b"search_text" not in everything and "华华华".encode() not in everything
    assert not list(tmp_path.glob(".*partial")), "no temporary file left"


def test_the_export_is_one_moment_even_while_seats_keep_writing(make_seat, tmp_path, settings):
    """Rows written during the export are in none of its files, or consistently in all."""
    import psycopg2

    from webapp.models import database

    boss = make_seat("boss@corp.cn", role="boss")
    database.execute_sql("INSERT INTO account (owner_id, name, created_at, updated_at) "
                         "SELECT %s, 'Before ' || i, now(), now() FROM generate_series(1, 20000) AS i",
                         (boss.user.id,))
    stop, written = threading.Event(), []
    cfg = settings.database

    def writer() -> None:
        conn = psycopg2.connect(host=cfg.host, port=cfg.port, dbname=cfg.name, user=cfg.user,
                                password=cfg.password())
        conn.autocommit = True
        with conn.cursor() as cur:  # (not "with conn": that would be one transaction)
            while not stop.is_set():
                cur.execute("INSERT INTO account (owner_id, name, created_at, updated_at) "
                            "VALUES (%s, %s, now(), now()) RETURNING id", (boss.user.id, f"During {len(written)}"))
                written.append(cur.fetchone()[0])
        conn.close()

    thread = threading.Thread(target=writer)
    thread.start()
    while len(written) < 20:  # writing already when the export begins
        threading.Event().wait(0.01)
    try:
        result = export.export_all(tmp_path / "export.zip")
    finally:
        stop.set()
        thread.join()
    manifest, tables = _read(result.path)
    counted = {e["path"]: e["rows"] for e in manifest["files"]}["data/account.csv"]
    assert counted == len(tables["data/account.csv"]), "the count and the rows come from one snapshot"
    assert written, "the writer ran during the export: the test is not vacuous"


def test_the_export_holds_the_attachment_files_checked_against_their_hashes(make_seat, settings, tmp_path):
    from appliance import attachments

    store = tmp_path / "attachments"  # a store of this test's own: the session's is shared
    own = dataclasses.replace(settings, appliance=dataclasses.replace(settings.appliance, data_dir=tmp_path))
    boss = make_seat("boss@corp.cn", role="boss")
    acc = audit.create(boss.user, Account, {"name": "华信"})
    long_name = "报价" * 120 + ".pdf"  # 244 characters, 724 bytes of UTF-8
    files = {"合同.pdf": b"%PDF-1.4 contract", "=cmd.txt": b"plain text", "gone.pdf": b"%PDF-1.4 lost",
             long_name: b"%PDF-1.4 long"}
    rows = {name: attachments.attach(own, boss.user, boss.user, "account", acc.id, name,
                                     attachments.receive(own, io.BytesIO(data))) for name, data in files.items()}
    attachments.blob_path(own, rows["gone.pdf"].sha256).unlink()  # damaged store: the rest still exports

    result = export.export_all(tmp_path / "export.zip", attachments_dir=store)
    manifest, tables = _read(result.path)
    assert result.attachments == 3 and manifest["attachments"]["files"] == 3
    assert manifest["attachments"]["missing"] == [
        {"id": rows["gone.pdf"].id, "path": f"attachments/{rows['gone.pdf'].id}-gone.pdf",
         "reason": "not in the attachment store"}]
    with zipfile.ZipFile(result.path) as archive:
        for name in ("合同.pdf", "=cmd.txt"):
            entry = f"attachments/{rows[name].id}-{name}"
            assert archive.read(entry) == files[name]
            assert {"id": rows[name].id, "path": entry, "bytes": len(files[name]),
                    "sha256": hashlib.sha256(files[name]).hexdigest()} in manifest["attachments"]["files_list"]
        # A name too long for a Linux file system is shortened before its extension, so the
        # archive unpacks; the list keeps the whole name.
        entry = next(n for n in archive.namelist() if n.startswith(f"attachments/{rows[long_name].id}-"))
        assert len(entry.rpartition("/")[2].encode()) <= 255 and entry.endswith(".pdf")
        assert long_name.startswith(entry.rpartition("/")[2].split("-", 1)[1][:-len(".pdf")])
        assert archive.read(entry) == files[long_name]
        archive.extract(entry, tmp_path / "unpacked")  # the file system takes the name
    listed = {r["id"]: r["filename"] for r in tables["data/attachment.csv"]}
    assert listed[str(rows["=cmd.txt"].id)] == "'=cmd.txt"  # the list is neutralised like every CSV
    assert listed[str(rows[long_name].id)] == long_name


def test_every_formula_start_is_neutralised_in_the_whole_data_export(make_seat, tmp_path):
    boss = make_seat("boss@corp.cn", role="boss")
    values = ["=1+2", "+86 123", "-2+3", "@SUM(A1)", "\t=cmd", "\r=cmd", "plain"]
    for n, value in enumerate(values):
        audit.create(boss.user, Account, {"name": f"Formula {n}", "description": value})
    _, tables = _read(export.export_all(tmp_path / "export.zip").path)
    exported = {r["name"]: r["description"] for r in tables["data/account.csv"]}
    assert [exported[f"Formula {n}"] for n in range(len(values))] == ["'" + v for v in values[:-1]] + ["plain"]


def test_an_existing_file_is_never_overwritten_and_a_missing_directory_is_named(db, tmp_path):
    target = tmp_path / "export.zip"
    target.write_bytes(b"keep me")
    with pytest.raises(export.ExportError, match="already exists; choose another --output"):
        export.export_all(target)
    assert target.read_bytes() == b"keep me"
    with pytest.raises(export.ExportError, match="is not a directory"):
        export.export_all(tmp_path / "nowhere" / "export.zip")


def test_the_export_command(tmp_path, settings, db):
    seats.add_seat(settings, "boss@corp.cn", "Boss", "boss")
    config = _config_file(tmp_path, settings)
    out = tmp_path / "all.zip"
    result = CliRunner().invoke(main, ["--config", config, "export", "--output", str(out)])
    assert result.exit_code == 0, result.output
    assert f"files to {out}" in result.output and "keep it safe" in result.output
    again = CliRunner().invoke(main, ["--config", config, "export", "--output", str(out)])
    assert again.exit_code == 1 and "already exists" in again.output and "Traceback" not in again.output
    assert Note.select().count() == 0 and User.select().count() == 1
    # Every export is audited, the command line's as "cli:<OS user>", as its other audit rows.
    from installer.cli import _os_user
    from webapp.models import AuditLog

    rows = list(AuditLog.select().where(AuditLog.action == "export_all").order_by(AuditLog.id))
    assert [(r.actor, r.user_id, r.entity, r.changes["file"]) for r in rows] == [
        (f"cli:{_os_user()}", None, "export", [None, str(out)])], "the second run, refused before reading, is none"


# ----------------------------------------------------------------------------- the boss's page


def test_the_boss_exports_everything_from_the_page_and_downloads_it(make_seat, browser_for):
    import time

    from webapp.models import AuditLog

    boss = make_seat("boss@corp.cn", role="boss")
    audit.create(boss.user, Account, {"name": "Exported Ltd"})
    b = browser_for(boss)
    assert b.post("/admin/export", token_from="/admin/export").status_code == 302
    deadline, name = time.monotonic() + 60, None
    while name is None and time.monotonic() < deadline:
        found = re.search(r'href="/admin/export/(crm-export-\d{8}T\d{6}Z\.zip)"', b.get("/admin/export").get_data(
            as_text=True))
        name = found.group(1) if found else time.sleep(0.2)
    assert name, "the export appeared on the page"
    resp = b.get(f"/admin/export/{name}")
    assert resp.status_code == 200 and resp.mimetype == "application/zip"
    with zipfile.ZipFile(io.BytesIO(resp.get_data())) as archive:
        assert "Exported Ltd" in archive.read("data/account.csv").decode("utf-8-sig")
    assert [r.action for r in AuditLog.select().where(AuditLog.entity == "export").order_by(AuditLog.id)] == [
        "export_all", "download"]
    for bad in ("../../etc/passwd", "crm-export-x.zip", ".crm-export-20261130T000000Z.zip.partial"):
        assert b.get(f"/admin/export/{bad}").status_code == 404


def test_only_the_boss_reaches_the_export(make_seat, browser_for):
    make_seat("boss@corp.cn", role="boss")
    manager = browser_for(make_seat("m@corp.cn", role="manager"))
    assert manager.get("/admin/export").status_code == 404
    assert manager.post("/admin/export").status_code == 404
    assert manager.get("/admin/export/crm-export-20261130T000000Z.zip").status_code == 404


@pytest.fixture
def exports(settings):
    """The exports folder, empty (the settings, and so the folder, are shared by the tests)."""
    import shutil

    folder = settings.appliance.data_dir / "exports"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(mode=0o700, parents=True)
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


def _wait_for_export(b, timeout: float = 60.0) -> str:
    """The page once no export is running any more."""
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        html = b.get("/admin/export").get_data(as_text=True)
        if "An export is being written" not in html:
            return html
        time.sleep(0.2)
    raise AssertionError("the export did not finish")


def test_a_failed_export_shows_its_reason_on_the_page(make_seat, browser_for, db, exports):
    boss = make_seat("boss@corp.cn", role="boss")
    b = browser_for(boss)
    # A real failure: a table the export reads is missing.
    db.execute_sql("ALTER TABLE login_log RENAME TO login_log_away")
    try:
        assert b.post("/admin/export", token_from="/admin/export").status_code == 302
        html = _wait_for_export(b)
    finally:
        db.execute_sql("ALTER TABLE login_log_away RENAME TO login_log")
    assert re.search(r'role="alert">The export crm-export-\d{8}T\d{6}Z\.zip, started [\d-]+ [\d:]+, failed: '
                     r'relation &#34;login_log&#34; does not exist', html), html
    assert not [p.name for p in exports.iterdir() if p.name.endswith((".zip", ".partial"))], "nothing kept"
    # The next export runs, and succeeds.
    assert b.post("/admin/export", token_from="/admin/export").status_code == 302
    html = _wait_for_export(b)
    assert "failed" not in html and re.search(r'href="/admin/export/crm-export-', html)


def test_an_export_whose_worker_died_is_failed_and_its_partial_file_shredded(make_seat, browser_for, exports):
    import subprocess

    from webapp import admin

    b = browser_for(make_seat("boss@corp.cn", role="boss"))
    folder = exports
    gone = subprocess.Popen(["true"])
    gone.wait()  # a worker recycled mid-export: its pid names no process any more
    name = "crm-export-20261130T000000Z.zip"
    partial = folder / f".{name}.partial"
    partial.write_bytes(b"half of the customer data")
    admin._write_status(folder, {"file": name, "state": "running", "pid": gone.pid, "pid_started": 0,
                                 "started_at": "2026-11-30T00:00:00"})
    html = b.get("/admin/export").get_data(as_text=True)
    assert "the process writing it stopped before it finished" in html and "being written" not in html
    assert not partial.exists()
    assert json.loads((folder / admin._STATUS).read_text())["state"] == "failed"
    # After a reboot a new worker may have the dead one's pid: its start time tells them apart.
    admin._write_status(folder, {"file": name, "state": "running", "pid": os.getpid(),
                                 "pid_started": admin._process_identity()["pid_started"] - 3600,
                                 "started_at": "2026-11-30T00:00:00"})
    partial.write_bytes(b"half of the customer data")
    assert "the process writing it stopped" in b.get("/admin/export").get_data(as_text=True)
    assert not partial.exists()
    # While its process lives, it is running: the page says so and a second export is refused.
    admin._write_status(folder, {"file": name, "state": "running", **admin._process_identity(),
                                 "started_at": "2026-11-30T00:00:00"})
    partial.write_bytes(b"being written")
    resp = b.post("/admin/export", token_from="/admin/export", follow_redirects=True)
    assert "An export is being written already" in resp.get_data(as_text=True) and partial.exists()


def test_exports_rotated_out_are_shredded(make_seat, browser_for, settings, exports):
    boss = make_seat("boss@corp.cn", role="boss")
    audit.create(boss.user, Account, {"name": "Rotated Ltd"})
    b = browser_for(boss)
    folder = exports
    old = [folder / f"crm-export-2026110{day}T000000Z.zip" for day in (1, 2, 3)]
    for path in old:
        path.write_bytes(b"customer data " * 100)
    # A second name for the oldest file's blocks shows whether they were overwritten or only unlinked.
    witness = settings.appliance.data_dir / "witness"
    os.link(old[0], witness)
    assert b.post("/admin/export", token_from="/admin/export").status_code == 302
    _wait_for_export(b)
    kept = sorted(p.name for p in folder.iterdir() if p.name.endswith(".zip"))
    assert len(kept) == 3 and old[0].name not in kept and old[1].name in kept
    assert witness.read_bytes() == bytes(1400), "overwritten with zeros before the unlink"
