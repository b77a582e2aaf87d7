"""The one audit hook (R-7), and the single write path every change goes through.

``create``, ``update`` and ``delete`` check the permission gate, change the row
and write its audit row in the same transaction: either both land or neither.
Audit rows hold no foreign key to the record, so they outlive its deletion.
"""

from __future__ import annotations

import datetime as dt
import decimal

from flask import has_request_context, request
from peewee import ForeignKeyField

from webapp import permissions
from webapp.models import AuditLog, Note, OwnedRecord, User, database, utcnow

# Bookkeeping columns whose change is implied by the audit row itself.
_UNTRACKED = {"id", "created_at", "updated_at", "deleted_at"}


def jsonable(value):
    if isinstance(value, (dt.datetime, dt.date)):
        return value.isoformat()
    if isinstance(value, decimal.Decimal):
        return format(value.normalize(), "f")  # 100.00 and 100 are the same amount
    return value


def snapshot(record) -> dict:
    """The tracked fields of a record as JSON-ready values (foreign keys as ids)."""
    out = {}
    for name, field in record._meta.fields.items():
        if name in _UNTRACKED:
            continue
        # A foreign key is recorded as the id it holds, without loading the related row.
        value = record.__data__.get(name) if isinstance(field, ForeignKeyField) else getattr(record, name)
        out[name] = jsonable(value)
    return out


def readable_changes(rows) -> dict[int, list[tuple[str, object, object]]]:
    """Per audit row id: (field, old, new), with seat ids shown as seat names (one query per page)."""
    user_ids = {v for row in rows for v in row.changes.get("owner", ()) if isinstance(v, int)}
    names = dict(User.select(User.id, User.name).where(User.id.in_(user_ids)).tuples()) if user_ids else {}

    def shown(key, value):
        return names.get(value, value) if key == "owner" else value

    return {row.id: [(key, shown(key, old), shown(key, new)) for key, (old, new) in row.changes.items()]
            for row in rows}


def client_ip() -> str | None:
    return request.remote_addr if has_request_context() else None


def write_row(actor: User | str, entity: str, record_id: int, action: str, changes: dict) -> AuditLog:
    """Append one audit row. ``actor`` is a seat, or a label such as "cli:root"."""
    if isinstance(actor, User):
        return AuditLog.create(user=actor.id, actor=actor.email, ip=client_ip(), entity=entity,
                               record_id=record_id, action=action, changes=changes)
    return AuditLog.create(user=None, actor=str(actor), ip=client_ip(), entity=entity,
                           record_id=record_id, action=action, changes=changes)


def _owner_team(owner_id: int):
    return User.select(User.team).where(User.id == owner_id).scalar()


def create(actor: User, model: type[OwnedRecord], values: dict) -> OwnedRecord:
    """Create a record owned by ``values['owner']`` (default: the actor), audited."""
    if not permissions.can(actor, model.entity, "create"):
        raise permissions.PermissionDenied(f"{actor.email} may not create {model.entity}")
    values = dict(values)
    owner_id = values.pop("owner", None) or actor.id
    owner_id = owner_id.id if isinstance(owner_id, User) else owner_id
    now = utcnow()
    with database.atomic():
        record = model.create(owner=owner_id, team=_owner_team(owner_id), created_at=now,
                              updated_at=now, **values)
        after = snapshot(record)
        write_row(actor, model.entity, record.id, "create", {k: [None, v] for k, v in after.items()})
    return record


def update(actor: User, record: OwnedRecord, values: dict) -> dict:
    """Apply field changes; returns {field: [old, new]} (empty when nothing changed)."""
    if not permissions.allows(actor, record, "edit"):
        raise permissions.PermissionDenied(f"{actor.email} may not edit {record.entity} {record.id}")
    before = snapshot(record)
    for name, value in values.items():
        setattr(record, name, value)
    if "owner" in values:
        record.team = _owner_team(record.owner_id)
    after = snapshot(record)
    changes = {k: [before[k], after[k]] for k in after if before.get(k) != after[k]}
    if not changes:
        return {}
    with database.atomic():
        record.updated_at = utcnow()
        record.save()
        write_row(actor, record.entity, record.id, "update", changes)
    return changes


def delete(actor: User, record: OwnedRecord) -> None:
    """Mark a record deleted; its audit history stays."""
    if not permissions.allows(actor, record, "delete"):
        raise permissions.PermissionDenied(f"{actor.email} may not delete {record.entity} {record.id}")
    with database.atomic():
        record.deleted_at = record.updated_at = utcnow()
        record.save()
        write_row(actor, record.entity, record.id, "delete", {k: [v, None] for k, v in snapshot(record).items()})


def add_note(actor: User, parent: OwnedRecord, body: str) -> Note:
    """A note on a record the actor may read."""
    if not permissions.allows(actor, parent, "read"):
        raise permissions.PermissionDenied(f"{actor.email} may not read {parent.entity} {parent.id}")
    with database.atomic():
        note = Note.create(parent_type=parent.entity, parent_id=parent.id, author=actor.id, body=body)
        write_row(actor, "note", note.id, "create",
                  {"parent": [None, f"{parent.entity}:{parent.id}"], "body": [None, body]})
    return note


def delete_note(actor: User, note: Note, parent: OwnedRecord) -> None:
    if not permissions.may_delete_note(actor, note, parent):
        raise permissions.PermissionDenied(f"{actor.email} may not delete note {note.id}")
    with database.atomic():
        note.deleted_at = utcnow()
        note.save()
        write_row(actor, "note", note.id, "delete",
                  {"parent": [f"{parent.entity}:{parent.id}", None], "body": [note.body, None]})
