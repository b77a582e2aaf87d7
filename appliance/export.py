"""The whole-data export: everything the customer owns, in one archive stock tools open
(R-14, R-16: the data file promised after termination).

One ZIP file: ``data/<table>.csv`` for every module, the notes, attachments (the list),
the company profile, announcements, seats, teams and roles, the audit and the login logs;
the attachment files themselves as ``attachments/<id>-<file name>``; and ``manifest.json``
(appliance version, schema level, time, and per file its rows, bytes, SHA-256 and what it
holds). All tables are read in one
REPEATABLE READ transaction, so the files agree with each other as of one moment. The CSV
is UTF-8 with a byte-order mark, so that Excel shows Chinese correctly, and a text cell
that starts with ``=``, ``+``, ``-``, ``@``, a tab or a carriage return is prefixed with an
apostrophe, as in the per-module export, so that no spreadsheet runs it as a formula.

Left out on purpose: password hashes, set-password tokens, the search column (derived),
and the appliance's own records (scheduler history, notices). The file is written under
a temporary name with mode 0600 and renamed when complete; an existing file is never
overwritten.

Attachment files are immutable and named by their SHA-256, so the files of the rows read
in the transaction are copied after it, each checked against its hash; one destroyed
meanwhile (or damaged on disk) is listed under ``attachments.missing`` instead of stopping
the export of everything else.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import hashlib
import json
import os
import time
import zipfile
from pathlib import Path
from typing import Callable

from peewee import CharField, Field, ForeignKeyField, TextField

import appliance
from appliance.errors import ExportError
from webapp.crud import FORMULA_STARTS
from webapp.models import (Account, Activity, Announcement, Attachment, AuditLog, CompanyProfile, Contact, Lead,
                           LoginLog, Note, Opportunity, Role, Team, Ticket, User, database)


# (model, what the file holds, columns left out)
TABLES: list[tuple[type, str, tuple[str, ...]]] = [
    (Account, "accounts (companies)", ()),
    (Contact, "contacts (people)", ()),
    (Lead, "leads", ()),
    (Opportunity, "opportunities", ()),
    (Ticket, "tickets", ()),
    (Activity, "activities (calls, meetings, tasks)", ()),
    (Note, "notes on records (parent_type and parent_id name the record)", ()),
    (Attachment, "attachments on records; the files are under attachments/<id>-<filename>", ()),
    (CompanyProfile, "the company profile (certified fields locked once certified_at is set)", ()),
    (Announcement, "announcements shown to every seat", ()),
    (User, "seats; passwords are not exported", ("password_hash", "failed_logins", "locked_until",
                                                 "session_version")),
    (Team, "teams", ()),
    (Role, "roles and their permissions", ()),
    (AuditLog, "audit log: every create, update and delete, with the changes", ()),
    (LoginLog, "login log", ()),
]


@dataclasses.dataclass
class ExportResult:
    path: Path
    files: list[dict]
    bytes: int
    seconds: float
    attachments: int = 0
    missing: list = dataclasses.field(default_factory=list)

    @property
    def rows(self) -> int:
        return sum(f["rows"] for f in self.files)


_FORMULA_STARTS_SQL = ", ".join(f"chr({ord(ch)})" for ch in FORMULA_STARTS)


def _column_sql(field: Field) -> str:
    column = f'"{field.column_name}"'
    if isinstance(field, (CharField, TextField)) and not isinstance(field, ForeignKeyField):
        # Neutralised like webapp.crud.neutralise: a leading formula character gets an apostrophe.
        return (f"CASE WHEN left({column}, 1) IN ({_FORMULA_STARTS_SQL}) "
                f"THEN '''' || {column} ELSE {column} END AS {column}")
    return column


class _Sink:
    """A file-like for COPY: writes into the archive member, counting bytes and hashing."""

    def __init__(self, member):
        self.member, self.sha256, self.bytes = member, hashlib.sha256(), 0

    def write(self, data) -> int:
        data = data.encode("utf-8") if isinstance(data, str) else data
        self.member.write(data)
        self.sha256.update(data)
        self.bytes += len(data)
        return len(data)


def check_output(output: Path) -> None:
    """:raise ExportError: ``output`` exists (an export never overwrites a file) or its folder does not."""
    if output.exists():
        raise ExportError(f"{output} already exists; choose another --output (an export never overwrites a file)")
    if not output.parent.is_dir():
        raise ExportError(f"{output.parent} is not a directory; create it or choose another --output")


def export_all(output: Path, progress: Callable[[str], None] = lambda message: None,
               attachments_dir: Path | None = None) -> ExportResult:
    """Write every table the customer owns, and the attachment files from ``attachments_dir``
    (appliance.attachments.store_dir), into the ZIP file ``output`` (see the module doc).

    Needs the models bound to a database (``appliance.db.open_database``).
    """
    from appliance.db import migration_status

    started = time.monotonic()
    output = Path(output)
    check_output(output)
    tmp = output.with_name(f".{output.name}.partial")
    files: list[dict] = []
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)  # customer data: owner only
        with open(fd, "wb") as raw, zipfile.ZipFile(raw, "w", compression=zipfile.ZIP_DEFLATED,
                                                      compresslevel=1) as archive:
            with database.connection_context(), database.atomic():
                database.execute_sql("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
                schema = [name for name, applied in migration_status(database) if applied]
                at = database.execute_sql("SELECT now() AT TIME ZONE 'UTC'").fetchone()[0]
                cursor = database.cursor()
                for model, what, left_out in TABLES:
                    table = model._meta.table_name
                    fields = [f for f in model._meta.sorted_fields if f.column_name not in left_out]
                    columns = ", ".join(_column_sql(f) for f in fields)
                    name = f"data/{table}.csv"
                    progress(f"Exporting {table} ...")
                    with archive.open(name, "w", force_zip64=True) as member:
                        sink = _Sink(member)
                        sink.write("\ufeff")  # Excel reads UTF-8 (Chinese names) correctly with a BOM
                        cursor.copy_expert(f'COPY (SELECT {columns} FROM "{table}" ORDER BY "id") '
                                           f"TO STDOUT WITH (FORMAT csv, HEADER true)", sink)
                    rows = database.execute_sql(f'SELECT count(*) FROM "{table}"').fetchone()[0]
                    files.append({"path": name, "rows": rows, "bytes": sink.bytes,
                                  "sha256": sink.sha256.hexdigest(), "holds": what,
                                  "columns": [f.column_name for f in fields]})
                attached = list(Attachment.select(Attachment.id, Attachment.filename, Attachment.sha256,
                                                  Attachment.size).order_by(Attachment.id).tuples())
            copied, missing = _copy_attachments(archive, attached, attachments_dir, progress)
            manifest = {
                "format": "crm-appliance export 1",
                "appliance_version": appliance.__version__,
                "schema": schema[-1] if schema else None,
                "exported_at": at.replace(tzinfo=dt.timezone.utc).isoformat(),
                "consistent": "all tables read in one REPEATABLE READ transaction",
                "csv": "UTF-8 with BOM, RFC 4180, header row; a text cell starting with = + - @ tab or CR has an "
                       "apostrophe prepended (formula injection)",
                "left_out": "password hashes, set-password tokens, the derived search column, the appliance's "
                            "own scheduler history and notices",
                "attachments": {"files": len(copied), "bytes": sum(f["bytes"] for f in copied),
                                "listed_in": "data/attachment.csv", "files_list": copied, "missing": missing},
                "files": files,
            }
            archive.writestr("manifest.json", json.dumps(manifest, indent=2, ensure_ascii=False))
            raw.flush()
            os.fsync(raw.fileno())
        try:
            os.link(tmp, output)  # unlike rename, never replaces a file that appeared meanwhile
        except FileExistsError:
            raise ExportError(f"{output} appeared while exporting; choose another --output") from None
        tmp.unlink()
    except BaseException:
        from appliance.attachments import shred

        with contextlib.suppress(OSError):
            shred(tmp)  # the part written holds customer data: overwritten, not only unlinked
        raise
    return ExportResult(path=output, files=files, bytes=output.stat().st_size,
                        seconds=round(time.monotonic() - started, 2), attachments=len(copied), missing=missing)


NAME_MAX = 255  # bytes in one file name on ext4, XFS, btrfs: what unpacking the archive must create


def _file_name(att_id: int, filename: str) -> str:
    """``<id>-<file name>``, shortened before its extension to NAME_MAX bytes of UTF-8 (a
    255-character Chinese name is 765 bytes, which no Linux file system takes); the id keeps
    it unique and attachment.csv keeps the whole name."""
    name = f"{att_id}-{filename}"
    if len(name.encode()) <= NAME_MAX:
        return name
    stem, dot, ext = name.rpartition(".")
    ext = dot + ext if dot and len(ext.encode()) < 20 else ""
    stem = name[:len(name) - len(ext)]
    while len((stem + ext).encode()) > NAME_MAX:
        stem = stem[:-1]
    return stem + ext


def _copy_attachments(archive, attached, root: Path | None, progress) -> tuple[list[dict], list[dict]]:
    """Copy each listed file into the archive, checking it against its SHA-256 on the way."""
    from appliance.attachments import CHUNK

    copied, missing = [], []
    if attached:
        progress(f"Exporting {len(attached)} attachment files ...")
    for att_id, filename, sha256, size in attached:
        source = root / sha256[:2] / sha256 if root is not None else None
        name = f"attachments/{_file_name(att_id, filename)}"
        if source is None or not source.is_file():
            missing.append({"id": att_id, "path": name, "reason": "not in the attachment store"})
            continue
        digest = hashlib.sha256()
        with open(source, "rb") as src, archive.open(name, "w", force_zip64=True) as member:
            while chunk := src.read(CHUNK):
                digest.update(chunk)
                member.write(chunk)
        if digest.hexdigest() != sha256:
            missing.append({"id": att_id, "path": name, "reason": "its content no longer matches its SHA-256"})
            continue
        copied.append({"id": att_id, "path": name, "bytes": size, "sha256": sha256})
    return copied, missing
