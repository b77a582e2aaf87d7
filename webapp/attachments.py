"""Attachments on any record (R-9): upload, download, delete.

Every route reaches the record through the permission gate first: a file on a record
the seat cannot see answers 404, like the record. Uploading needs the right to edit the
record; reading it is enough to download. The quota is checked by appliance/attachments.py;
only the boss is told the figures (R-9), everyone else whether the file fits.
"""

from __future__ import annotations

from pathlib import Path

from flask import Blueprint, Request, abort, current_app, flash, g, redirect, request, send_file, url_for
from flask_babel import gettext as _

from appliance import attachments as store
from webapp import permissions
from webapp.crud import MODULES
from webapp.models import Attachment, User
from webapp.prepared import Prepared

bp = Blueprint("attachments", __name__, url_prefix="/attachments")


class UploadRequest(Request):
    """Uploaded files go to ``<data_dir>/incoming`` (appliance.attachments.spool), not to
    Werkzeug's temporary files in /tmp: written once, on the store's file system, taken into
    the store by rename. What the request did not store is removed when it ends."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._spooled: list[Path] = []

    def _get_file_stream(self, total_content_length, content_type, filename=None, content_length=None):
        part = store.spool(_settings())
        self._spooled.append(Path(part.name))
        return part

    def close(self) -> None:
        try:
            super().close()
        finally:
            for path in self._spooled:
                path.unlink(missing_ok=True)  # gone already when the store took it


def _settings():
    return current_app.extensions["crm_settings"]


def _back_to(record):
    return redirect(url_for(f"{MODULES[record.entity].endpoint}.detail", record_id=record.id) + "#attachments")


# On every record page: built once (webapp/prepared.py).
_FOR_RECORD = Prepared(lambda entity, record_id: (
    Attachment.select(Attachment, *permissions.seat_columns()).join(User, on=(Attachment.owner == User.id))
    .where(Attachment.parent_type == entity, Attachment.parent_id == record_id, Attachment.deleted_at.is_null())
    .order_by(Attachment.created_at.desc(), Attachment.id.desc())))


def for_record(user: User, record) -> list[dict]:
    """The record's files, newest first, each with whether the seat may delete it."""
    return [{"row": row, "can_delete": may_delete(user, row, record)}
            for row in _FOR_RECORD.rows(record.entity, record.id)]


def may_delete(user: User, row: Attachment, parent) -> bool:
    """Whoever attached the file may remove it, and so may whoever may delete the record."""
    return row.owner_id == user.id or permissions.allows(user, parent, "delete")


def _attachment_and_parent(attachment_id: int, action: str = "read"):
    """:raise 404: no such live file, or its record is not visible to the seat."""
    if not permissions.valid_id(attachment_id):
        abort(404)
    row = Attachment.get_or_none(Attachment.id == attachment_id, Attachment.deleted_at.is_null())
    if row is None:
        abort(404)
    return row, permissions.parent_or_404(g.user, row.parent_type, row.parent_id, action)



@bp.route("/<entity>/<int:record_id>", methods=["POST"])
def upload(entity: str, record_id: int):
    """:raise 404: the record is not visible. :raise 403: visible, not editable."""
    parent = permissions.parent_or_404(g.user, entity, record_id, "edit")
    upload_file = request.files.get("file")
    if upload_file is None or not upload_file.filename:
        flash(_("Choose a file to attach."), "error")
        return _back_to(parent)
    settings = _settings()
    try:
        incoming = store.receive(settings, upload_file.stream)
        row = store.attach(settings, g.user, g.user, parent.entity, parent.id, upload_file.filename, incoming,
                           is_boss=g.user.role.is_admin)
    except store.AttachmentError as exc:
        flash(str(exc), "error")
    else:
        flash(_("%(name)s attached.", name=row.filename), "success")
    return _back_to(parent)


@bp.route("/<int:attachment_id>")
def download(attachment_id: int):
    row, _parent = _attachment_and_parent(attachment_id)
    return send_stored(row)


def send_stored(row: Attachment):
    """A stored file, always as a download (never shown inline), with the type its name was
    checked for: for attachments and the company's licence scan alike.

    :raise 404: the file is missing from the store (the message says to restore it).
    """
    try:
        path = store.open_file(_settings(), row)
    except store.AttachmentError as exc:
        abort(404, str(exc))
    response = send_file(path, mimetype=row.content_type, as_attachment=True, download_name=row.filename,
                         conditional=True, etag=row.sha256)
    response.headers["Cache-Control"] = "no-store"  # customer data: not kept by browsers or proxies
    # Opened from the disk by mistake, the file still cannot run script in the CRM's name;
    # and no browser guesses another type than the one checked.
    response.headers["Content-Security-Policy"] = "sandbox; default-src 'none'"
    response.headers["X-Content-Type-Options"] = "nosniff"
    return response


@bp.route("/<int:attachment_id>/delete", methods=["POST"])
def delete(attachment_id: int):
    """:raise 404: not visible. :raise 403: neither its uploader nor allowed to delete the record."""
    row, parent = _attachment_and_parent(attachment_id)
    if not may_delete(g.user, row, parent):
        abort(403)
    store.soft_delete(g.user, row)
    flash(_("%(name)s deleted.", name=row.filename), "success")
    return _back_to(parent)
