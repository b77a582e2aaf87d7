"""Attachment files and the attachment quota (R-9, R-15).

The bytes of every file are stored once, named by their SHA-256, under
``<data_dir>/attachments/<first two hex digits>/<sha256>``, and never changed: the backup
lists that directory at its start and copies the files that are there, so every file a
committed row names at the backup's point is in it (appliance/backup.py). A row in
``attachment`` puts a file on a record; two rows may share one file.

An upload is streamed to ``<data_dir>/incoming/`` while it is hashed and measured, never
held whole in memory (through the web, the form parser writes it there itself: ``spool``);
then, under one transaction-wide advisory lock (so that two uploads racing for the last
megabytes are decided one after the other), the quota is checked, the file is moved into
place and the row written. A refused or failed upload leaves nothing behind.

The quota is the licensed seats times ``[attachments] per_seat_mb`` (MB = 2^20 bytes).
It counts every attachment row until the row is destroyed: a deleted file, and a file on
a deleted record, stay on disk for ``[retention] undo_days`` so the boss can bring them
back, and the quota bounds the disk (the boss's Destroy frees their space at once).
Crossing 90% and 100% raises a notice to the boss (in the app, and by e-mail when SMTP is
set up).

Stored files are read-only (0400). Destroying a file's last row first renames the file out
of its hash name, then overwrites it with zeros before unlinking it (R-15).
"""

from __future__ import annotations

import hashlib
import logging
import os
import secrets
import time
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Iterable

from flask_babel import lazy_gettext as _l
from peewee import fn

from appliance.config import Settings
from appliance.errors import ApplianceError
from appliance.files import fsync_dir
from webapp.models import Attachment, CompanyProfile, User, database, get_state, set_state, utcnow

log = logging.getLogger(__name__)

MB = 1024 * 1024
CHUNK = 1024 * 1024
#: Advisory lock key (pg_advisory_xact_lock) serialising quota checks, placing and destroying files.
_QUOTA_LOCK = 0x41_54_54_51  # "ATTQ"
#: Percent levels of the quota at which the boss is told.
NOTICE_LEVELS = (90, 100)
_STATE_KEY = "attachments.quota_level"
#: How shred() names a file it has moved aside to overwrite.
_SHRED_PREFIX = ".shred-"
#: Incoming files older than this are left-overs of a killed process and are removed.
_STALE_INCOMING_SECONDS = 24 * 3600

# What may be uploaded: extension -> (content type, the file's first bytes, or None when the
# format has no fixed signature). The type stored and served comes from here, never from the
# browser; a file whose first bytes are not the format's is refused.
_ZIP = (b"PK\x03\x04", b"PK\x05\x06")
_OLE = (b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1",)
ALLOWED_TYPES: dict[str, tuple[str, tuple[bytes, ...] | None]] = {
    "pdf": ("application/pdf", (b"%PDF-",)),
    "png": ("image/png", (b"\x89PNG\r\n\x1a\n",)),
    "jpg": ("image/jpeg", (b"\xff\xd8\xff",)),
    "jpeg": ("image/jpeg", (b"\xff\xd8\xff",)),
    "gif": ("image/gif", (b"GIF87a", b"GIF89a")),
    "webp": ("image/webp", (b"RIFF",)),
    "txt": ("text/plain", None),
    "csv": ("text/csv", None),
    "md": ("text/markdown", None),
    "eml": ("message/rfc822", None),
    "rtf": ("application/rtf", (b"{\\rtf",)),
    "doc": ("application/msword", _OLE),
    "xls": ("application/vnd.ms-excel", _OLE),
    "ppt": ("application/vnd.ms-powerpoint", _OLE),
    "msg": ("application/vnd.ms-outlook", _OLE),
    "docx": ("application/vnd.openxmlformats-officedocument.wordprocessingml.document", _ZIP),
    "xlsx": ("application/vnd.openxmlformats-officedocument.spreadsheetml.sheet", _ZIP),
    "pptx": ("application/vnd.openxmlformats-officedocument.presentationml.presentation", _ZIP),
    "odt": ("application/vnd.oasis.opendocument.text", _ZIP),
    "ods": ("application/vnd.oasis.opendocument.spreadsheet", _ZIP),
    "odp": ("application/vnd.oasis.opendocument.presentation", _ZIP),
    "zip": ("application/zip", _ZIP),
}
# Programs are refused under any name: a Windows or Linux executable, a script.
_PROGRAM_STARTS = (b"MZ", b"\x7fELF", b"#!")


class AttachmentError(ApplianceError):
    """An upload is refused (type, size, quota) or a file cannot be stored or read."""


class QuotaExceeded(AttachmentError):
    """The upload does not fit in the remaining attachment space; nothing was stored."""

    def __init__(self, message, *, size: int, free: int):
        super().__init__(message)
        self.size = size
        self.free = free


@dataclass(frozen=True)
class Incoming:
    """An uploaded file on disk, hashed and measured, not yet placed."""

    path: Path
    size: int
    sha256: str
    head: bytes  # the first bytes, for the type check


@dataclass(frozen=True)
class Usage:
    quota: int
    used: int  # every file not yet destroyed, deleted ones included
    deleted: int  # of which in deleted files, waiting for the retention job or the boss's Destroy
    per_seat: list[tuple[int, str, str, int]]  # (user id, e-mail, name, bytes), largest first

    @property
    def free(self) -> int:
        return max(0, self.quota - self.used)

    @property
    def percent(self) -> float:
        return 100.0 * self.used / self.quota if self.quota else 100.0


# ----------------------------------------------------------------------------- paths

def store_dir(settings: Settings) -> Path:
    return settings.appliance.data_dir / "attachments"


def incoming_dir(settings: Settings) -> Path:
    """Where uploads are written while they arrive: on the same file system as the store, so
    placing a file is a rename, and outside it, so a backup never copies a half upload."""
    return settings.appliance.data_dir / "incoming"


def blob_path(settings: Settings, sha256: str) -> Path:
    return store_dir(settings) / sha256[:2] / sha256


# ----------------------------------------------------------------------------- quota

def quota_bytes(settings: Settings) -> int:
    return settings.seats.licensed * settings.attachments.per_seat_mb * MB


def _used(deleted_only: bool = False) -> int:
    """Bytes counted against the quota: every row until it is destroyed, since its file stays
    on disk until then."""
    query = Attachment.select(fn.COALESCE(fn.SUM(Attachment.size), 0))
    if deleted_only:
        query = query.where(Attachment.deleted_at.is_null(False))
    return int(query.scalar())


def usage(settings: Settings) -> Usage:
    """Total use against the quota and use per seat (for the boss only)."""
    per_seat = (Attachment.select(User.id, User.email, User.name, fn.SUM(Attachment.size))
                .join(User, on=(Attachment.owner == User.id))
                .group_by(User.id).order_by(fn.SUM(Attachment.size).desc(), User.email).tuples())
    rows = [(uid, email, name, int(total)) for uid, email, name, total in per_seat]
    return Usage(quota=quota_bytes(settings), used=sum(r[3] for r in rows), deleted=_used(deleted_only=True),
                 per_seat=rows)


def _level(used: int, quota: int) -> int:
    """The highest notice level reached (0, 90 or 100)."""
    reached = [lvl for lvl in NOTICE_LEVELS if quota and used * 100 >= quota * lvl]
    return max(reached, default=0)


def _new_level(settings: Settings, used: int, quota: int):
    """Remember the quota level now reached; when it is a level not yet reported, write the
    notice for the boss in the same transaction (a crash cannot keep the level and lose the
    notice) and return it, for :func:`tell_boss` to mail after the commit. A fall below a
    level is remembered too, so crossing it again is reported again. Call inside the quota lock."""
    from appliance.notices import N_, record_notice

    level = _level(used, quota)
    last = int(get_state(_STATE_KEY, 0) or 0)
    if level != last:
        set_state(_STATE_KEY, level)
    if level <= last:
        return None
    sizes = {"used": _size(used), "quota": _size(quota), "left": _size(max(0, quota - used)), "level": level}
    if level >= 100:
        return record_notice("error", "quota", N_(
            "Attachment space is full: %(used)s of %(quota)s used. Uploads are refused until files are destroyed "
            "(Administration → Deleted items: deleted files count until then) or seats are added to the licence."), sizes)
    return record_notice("warning", "quota", N_("Attachment space is %(level)s%% used: %(used)s of %(quota)s, "
                                                "%(left)s left."), sizes)


def tell_boss(settings: Settings, notice) -> None:
    """Mail the notice :func:`_new_level` wrote (None: nothing), once its transaction has committed."""
    from appliance.notices import mail_notice

    mail_notice(settings, notice)


def check_quota(settings: Settings) -> str:
    """The scheduler's quota_check: report a crossing that came from elsewhere than an upload
    (seats taken off the licence, files restored)."""
    with database.atomic():
        database.execute_sql("SELECT pg_advisory_xact_lock(%s)", (_QUOTA_LOCK,))
        used, quota = _used(), quota_bytes(settings)
        message = _new_level(settings, used, quota)
    tell_boss(settings, message)
    return f"attachments use {_size(used)} of {_size(quota)} ({_level(used, quota)}% level)"


# ----------------------------------------------------------------------------- upload

def check_name(filename: str) -> tuple[str, str]:
    """(a safe file name to keep, its content type); refuses a type we do not take."""
    name = os.path.basename((filename or "").replace("\\", "/")).strip()
    name = "".join(ch for ch in name if ch.isprintable() and ch not in '"<>|:*?')
    stem, dot, ext = name.rpartition(".")
    ext = ext.lower() if dot else ""
    if len(name) > 255 and ext in ALLOWED_TYPES:
        name = stem[:255 - len(ext) - 1] + name[len(stem):]  # the column's limit; keep the extension
    if not name or ext not in ALLOWED_TYPES:
        raise AttachmentError(_l("Files of this type cannot be attached. Allowed: %(types)s.",
                                 types=", ".join(sorted(ALLOWED_TYPES))))
    return name, ALLOWED_TYPES[ext][0]


def spool(settings: Settings) -> BinaryIO:
    """A new file in the incoming directory for the web's form parser to write an upload into,
    instead of a temporary file in /tmp: ``receive`` then hashes it where it is and the store
    takes it by rename, so the bytes are written once and never left outside the data
    directory. The web request removes it at its end if it is still there."""
    return open(_new_part(settings), "r+b")


def receive(settings: Settings, stream: BinaryIO, max_bytes: int | None = None) -> Incoming:
    """Copy an upload to the incoming directory in chunks, hashing it on the way; a file
    ``spool`` made is only read and hashed, where it is.

    :raise AttachmentError: larger than ``[attachments] max_upload_mb`` (the part written is removed).
    """
    limit = max_bytes if max_bytes is not None else settings.attachments.max_upload_mb * MB
    spooled = getattr(stream, "name", None)
    spooled = Path(spooled) if isinstance(spooled, str) and Path(spooled).parent == incoming_dir(settings) else None
    path = spooled or _new_part(settings)
    try:
        if spooled:
            stream.flush()
            os.fsync(stream.fileno())
            with open(path, "rb") as data:
                size, sha256, head = _measure(data, limit)
        else:
            with open(path, "wb") as out:
                size, sha256, head = _measure(stream, limit, out)
                out.flush()
                os.fsync(out.fileno())
    except BaseException:
        path.unlink(missing_ok=True)
        raise
    return Incoming(path=path, size=size, sha256=sha256, head=head)


def _new_part(settings: Settings) -> Path:
    """A new empty file, readable by the appliance only, in the incoming directory."""
    folder = incoming_dir(settings)
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    _remove_stale(folder)
    path = folder / f"{secrets.token_hex(16)}.part"
    os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    return path


def _measure(source: BinaryIO, limit: int, copy_to: BinaryIO | None = None) -> tuple[int, str, bytes]:
    """(size, SHA-256, first bytes) of a stream read in chunks, copied to ``copy_to`` if given.

    :raise AttachmentError: larger than ``limit`` bytes.
    """
    digest, size, head = hashlib.sha256(), 0, b""
    while chunk := source.read(CHUNK):
        size += len(chunk)
        if size > limit:
            raise AttachmentError(_l("The file is larger than %(mb)d MB; nothing was stored.", mb=limit // MB or 1))
        if len(head) < 64:
            head += chunk[:64 - len(head)]
        digest.update(chunk)
        if copy_to is not None:
            copy_to.write(chunk)
    return size, digest.hexdigest(), head


def _check_content(name: str, head: bytes) -> None:
    ext = name.rpartition(".")[2].lower()
    if head.startswith(_PROGRAM_STARTS):
        raise AttachmentError(_l("The file is a program or script; programs cannot be attached."))
    starts = ALLOWED_TYPES[ext][1]
    if starts is not None and not head.startswith(starts):
        raise AttachmentError(_l("The file's content is not %(ext)s, though its name says so; "
                                 "nothing was stored.", ext=ext.upper()))
    if starts is None and b"\x00" in head:
        raise AttachmentError(_l("The file's content is not text, though its name says so; nothing was stored."))


def attach(settings: Settings, actor: User | str, owner: User, parent_type: str, parent_id: int, filename: str,
           incoming: Incoming, is_boss: bool = False) -> Attachment:
    """Put an arrived upload on a record: check its type and the quota, place the file, write
    the row and its audit row. The incoming file is consumed either way.

    The caller has checked that ``actor`` may attach to the record. ``owner`` is the seat
    whose quota the file uses. ``is_boss`` puts figures in the quota message: only the boss
    may learn the used and remaining space (R-9).

    :raise AttachmentError: type refused. :raise QuotaExceeded: does not fit.
    """
    from webapp import audit

    placed = None
    # Inside a caller's transaction (the licence scan locks the company profile) nothing is
    # committed here: the caller mails the notice (tell_boss(row.pending_notice)) after its commit.
    in_callers_transaction = database.in_transaction()
    try:
        name, content_type = check_name(filename)
        _check_content(name, incoming.head)
        with database.atomic():
            database.execute_sql("SELECT pg_advisory_xact_lock(%s)", (_QUOTA_LOCK,))
            quota, used = quota_bytes(settings), _used()
            if used + incoming.size > quota:
                free = max(0, quota - used)
                if is_boss:
                    size, left = _sizes_apart(incoming.size, free)
                    message = _l("The file (%(size)s) does not fit: %(free)s of %(quota)s attachment space is "
                                 "left. Deleted files count until they are destroyed: Administration → Deleted "
                                 "items → Destroy frees their space at once. Or add seats to the licence.",
                                 size=size, free=left, quota=_size(quota))
                else:
                    message = _l("There is not enough attachment space left for this file; nothing was stored. "
                                 "Ask your administrator.")
                raise QuotaExceeded(message, size=incoming.size, free=free)
            target = blob_path(settings, incoming.sha256)
            if not target.exists():
                target.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
                os.chmod(incoming.path, 0o400)  # never changed once stored; shred() alone opens it to write
                os.replace(incoming.path, target)
                placed = target
                fsync_dir(target.parent)
            row = Attachment.create(parent_type=parent_type, parent_id=parent_id, owner=owner.id, filename=name,
                                    content_type=content_type, size=incoming.size, sha256=incoming.sha256,
                                    created_at=utcnow())
            audit.write_row(actor, "attachment", row.id, "create",
                            {"parent": [None, f"{parent_type}:{parent_id}"], "filename": [None, name],
                             "size": [None, incoming.size], "sha256": [None, incoming.sha256]})
            message = _new_level(settings, used + incoming.size, quota)
        placed = None  # committed (or the caller's to commit): the file is now named by a row
        if in_callers_transaction:
            row.pending_notice = message
        else:
            tell_boss(settings, message)
        return row
    finally:
        incoming.path.unlink(missing_ok=True)
        if placed is not None:
            placed.unlink(missing_ok=True)  # the row never committed: no file without a row


def open_file(settings: Settings, row: Attachment) -> Path:
    """The stored file of a row. :raise AttachmentError: missing on disk (say restore it)."""
    path = blob_path(settings, row.sha256)
    if not path.is_file():
        raise AttachmentError(_l("The file %(name)s is missing from the attachment store; restore it from a backup.",
                                 name=row.filename))
    return path


# ----------------------------------------------------------------------------- delete, undo, destroy

def soft_delete(actor: User | str, row: Attachment) -> None:
    """Hide a file; the boss can undo it until the retention job destroys it, and until then
    it still counts against the quota (its bytes are still on disk)."""
    from webapp import audit

    with database.atomic():
        now = utcnow()
        # Only a file not deleted meanwhile (a form sent twice): one delete, one audit row.
        changed = (Attachment.update(deleted_at=now)
                   .where(Attachment.id == row.id, Attachment.deleted_at.is_null()).execute())
        if not changed:
            return
        row.deleted_at = now
        audit.write_row(actor, "attachment", row.id, "delete",
                        {"parent": [f"{row.parent_type}:{row.parent_id}", None], "filename": [row.filename, None]})


def undelete(settings: Settings, actor: User | str, row: Attachment) -> None:
    """Bring a deleted file back. No quota check: a deleted file still counts against the
    quota (its bytes are still on disk), so bringing it back takes no new space.

    :raise AttachmentError: a licence scan of a company profile certified since (R-11).
    """
    from webapp import audit

    with database.atomic():
        if row.parent_type == "company":
            # Locked like the company pages lock it, so a certification cannot slip in between.
            profile = CompanyProfile.select().where(CompanyProfile.id == row.parent_id).for_update().first()
            if profile is not None and profile.certified_at is not None:
                raise AttachmentError(_l("The company is certified: a business licence scan deleted before "
                                         "cannot be brought back."))
        row.deleted_at = None
        row.save()
        audit.write_row(actor, "attachment", row.id, "restore",
                        {"parent": [None, f"{row.parent_type}:{row.parent_id}"], "filename": [None, row.filename]})


def destroy_rows(rows: Iterable[Attachment]) -> set[str]:
    """Delete attachment rows for good, inside the caller's transaction; returns their files'
    hashes, for ``shred_unnamed`` to overwrite once that transaction has committed."""
    rows = list(rows)
    if rows:
        Attachment.delete().where(Attachment.id.in_([r.id for r in rows])).execute()
    return {r.sha256 for r in rows}


def shred_unnamed(settings: Settings, hashes: Iterable[str] | None = None) -> int:
    """Overwrite and unlink the stored files no row names: those of ``hashes``, or with None
    every file in the store (the retention job's sweep, which also finishes a destroy
    that was killed between its commit and its shredding). Under the quota lock, so an
    upload of the same content cannot be placed in between. Returns files shredded.
    """
    with database.atomic():
        database.execute_sql("SELECT pg_advisory_xact_lock(%s)", (_QUOTA_LOCK,))
        if hashes is None:
            root = store_dir(settings)
            found = [p for p in root.glob("??/*") if p.is_file()] if root.exists() else []
            leftovers, candidates = 0, set()
            for path in found:
                if path.name.startswith(_SHRED_PREFIX):  # a shred killed after its rename: finish it
                    leftovers += shred(path)
                elif not path.name.startswith("."):
                    candidates.add(path.name)
                    if path.stat().st_mode & 0o777 != 0o400:  # stored before files were kept read-only
                        os.chmod(path, 0o400)
        else:
            leftovers = 0
            candidates = set(hashes)
        named = set()
        listed = sorted(candidates)
        for start in range(0, len(listed), 5000):
            named |= {sha for (sha,) in Attachment.select(Attachment.sha256)
                      .where(Attachment.sha256.in_(listed[start:start + 5000])).tuples()}
        return leftovers + sum(1 for sha in sorted(candidates - named) if shred(blob_path(settings, sha)))


def shred(path: Path) -> bool:
    """Overwrite a file with zeros, flush it to disk, unlink it; False when it was not there.

    The file is first renamed aside (a unique name in its directory, starting with a dot so
    backups skip it): killed half way, it never sits half-zeroed under its hash name, where
    an upload of the same content would take it for the stored copy. The retention sweep
    finishes such a left-over. On a copy-on-write or journalling-data file system the old
    blocks may survive the overwrite; docs/data.md says so, and what encrypting the disk adds.
    """
    aside = path.with_name(f"{_SHRED_PREFIX}{secrets.token_hex(8)}")
    try:
        os.rename(path, aside)
    except FileNotFoundError:
        return False
    fsync_dir(path.parent)
    os.chmod(aside, 0o600)  # stored files are read-only
    fd = os.open(aside, os.O_WRONLY)
    try:
        remaining = os.fstat(fd).st_size
        zeros = bytes(CHUNK)
        while remaining > 0:
            remaining -= os.write(fd, zeros[:min(CHUNK, remaining)])
        os.fsync(fd)
    finally:
        os.close(fd)
    aside.unlink()
    fsync_dir(path.parent)
    return True


def shred_tree(root: Path) -> int:
    """Shred every file under ``root`` and remove its folders (purge of all data); returns files shredded."""
    count = 0
    if not root.exists():
        return 0
    for folder, _dirs, files in os.walk(root, topdown=False):
        for name in files:
            if shred(Path(folder) / name):
                count += 1
        if Path(folder) != root:
            os.rmdir(folder)
    return count


# ----------------------------------------------------------------------------- helpers

def _remove_stale(folder: Path) -> None:
    cutoff = time.time() - _STALE_INCOMING_SECONDS
    for path in folder.glob("*.part"):
        try:
            if path.stat().st_mtime < cutoff:
                path.unlink()
        except FileNotFoundError:
            pass



def _sizes_apart(size: int, free: int) -> tuple[str, str]:
    """Two sizes as people read them, or in bytes when rounding would show them alike (a file
    refused for one byte must not read "the file (1 MB) does not fit: 1 MB is left")."""
    shown = _size(size), _size(free)
    return shown if shown[0] != shown[1] else (f"{size:,} B", f"{free:,} B")


def _size(n: int) -> str:
    """Bytes as people read them: 0 B, 512 KB, 49.9 MB, 2.5 GB (powers of 1024)."""
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}".replace(".0 ", " ")
        n /= 1024
    return f"{n} GB"
