"""Notes on any record's timeline: added by whoever may read the record."""

from flask import Blueprint, abort, flash, g, redirect, request, url_for
from flask_babel import gettext as _

from webapp import audit, permissions
from webapp.crud import MODULES
from webapp.models import Note

bp = Blueprint("notes", __name__, url_prefix="/notes")

MAX_NOTE = 20_000


def _back_to(record):
    return redirect(url_for(f"{MODULES[record.entity].endpoint}.detail", record_id=record.id) + "#timeline")


@bp.route("/<entity>/<int:record_id>", methods=["POST"])
def add(entity: str, record_id: int):
    """:raise 404: the record is not visible to the seat."""
    parent = permissions.parent_or_404(g.user, entity, record_id)
    body = (request.form.get("body") or "").strip()
    if not body:
        flash(_("The note is empty; nothing was saved."), "error")
    elif len(body) > MAX_NOTE:
        flash(_("The note is longer than %(n)d characters; nothing was saved.", n=MAX_NOTE), "error")
    else:
        audit.add_note(g.user, parent, body)
        flash(_("Note added."), "success")
    return _back_to(parent)


@bp.route("/<int:note_id>/delete", methods=["POST"])
def delete(note_id: int):
    """:raise 404: no such note, or its record is not visible. :raise 403: not the author."""
    if not permissions.valid_id(note_id):
        abort(404)
    note = Note.get_or_none(Note.id == note_id, Note.deleted_at.is_null())
    if note is None:
        abort(404)
    parent = permissions.parent_or_404(g.user, note.parent_type, note.parent_id)
    if not permissions.may_delete_note(g.user, note, parent):
        abort(403)
    audit.delete_note(g.user, note, parent)
    flash(_("Note deleted."), "success")
    return _back_to(parent)
