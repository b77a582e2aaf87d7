"""The one permission gate (R-6): every query for customer records goes through here.

A role grants, for each entity and action, a level: ``all``, ``team``, ``own`` or
``none`` (as EspoCRM roles do). ``visible()`` turns the level into a WHERE clause,
so lists, search, the board, exports and related lists all share one filter, and
``get_or_404()`` makes a record outside the seat's level look exactly like a
missing one.
"""

from __future__ import annotations

from collections.abc import Iterable

from flask import abort
from peewee import JOIN, SQL, ForeignKeyField

from webapp import models
from webapp.models import Note, OwnedRecord, Role, User
from webapp.prepared import shaped

LEVELS = ("none", "own", "team", "all")
ACTIONS = ("read", "create", "edit", "delete", "export")
ENTITIES = tuple(models.RECORD_MODELS)  # account, contact, lead, opportunity, ticket, activity

# Ids are PostgreSQL integers: anything outside this range cannot exist.
_MAX_ID = 2**31 - 1


def _matrix(level: str, export: str | None = None) -> dict:
    return {entity: {action: (export if action == "export" and export else level) for action in ACTIONS}
            for entity in ENTITIES}


BUILTIN_ROLES = {
    # name: (permissions, administration)
    "boss": (_matrix("all"), True),
    "manager": (_matrix("team"), False),
    "agent": (_matrix("own"), False),
}


class PermissionDenied(Exception):
    """Raised by the write path when a seat tries an action its role does not allow."""


def ensure_builtin_roles() -> None:
    """Create or refresh the built-in roles; custom roles are left alone."""
    for name, (perms, is_admin) in BUILTIN_ROLES.items():
        role = Role.get_or_none(Role.name == name)
        if role is None:
            Role.create(name=name, permissions=perms, is_admin=is_admin, builtin=True)
        elif role.permissions != perms or role.is_admin != is_admin:
            role.permissions, role.is_admin, role.builtin = perms, is_admin, True
            role.save()


def level(user: User, entity: str, action: str) -> str:
    """The seat's level for one entity and action; unknown means none. Exporting is reading
    too: its level is the narrower of the role's export and read levels."""
    if user is None or not user.active:
        return "none"
    granted = (user.role.permissions or {}).get(entity, {})
    value = granted.get(action, "none")
    value = value if value in LEVELS else "none"
    if action == "export":
        read = granted.get("read", "none")
        value = min(value, read if read in LEVELS else "none", key=LEVELS.index)
    return value


def can(user: User, entity: str, action: str) -> bool:
    return level(user, entity, action) != "none"


def gate(user: User, entity: str, action: str = "read", own_only: bool = False) -> tuple[str, tuple]:
    """What the seat's level makes of a query: its shape (``none``, ``own``, ``team`` or
    ``all``) and the values it compares with (the seat's id, its team's id)."""
    lvl = level(user, entity, action)
    if lvl == "none":
        return "none", ()
    if own_only or lvl == "own" or (lvl == "team" and user.team_id is None):
        return "own", (user.id,)  # every level but none includes the seat's own records
    if lvl == "all":
        return "all", ()
    return "team", (user.id, user.team_id)


def gate_condition(model: type[OwnedRecord], shape: str, values: tuple):
    if shape == "none":
        return SQL("false")
    if shape == "all":
        return SQL("true")
    if shape == "own":
        return model.owner == values[0]
    return (model.team == values[1]) | (model.owner == values[0])


def visible_as(model: type[OwnedRecord], shape: str, values: tuple):
    """``visible`` for a gate already worked out: for statements prepared once per shape
    (``webapp/prepared.py``), built with stand-ins for the values."""
    return model.select().where(model.deleted_at.is_null(), gate_condition(model, shape, values))


def visible(user: User, model: type[OwnedRecord], action: str = "read", own_only: bool = False):
    """A SELECT of the live records of ``model`` the seat may ``action``; with ``own_only``,
    of those the seat owns.

    Every level but ``none`` includes the seat's own records, so ``own_only`` replaces the
    level's condition instead of adding to it: ``(team_id = 3 OR owner_id = 7) AND owner_id
    = 7`` says the same, but the planner multiplies the two into an estimate of almost no
    rows and reads every record the seat owns from the table instead of walking the newest
    in the index (a manager's "mine" search at ten times the 50-seat data set: 136 ms
    against 0.6 ms, docs/performance.md).
    """
    return visible_as(model, *gate(user, model.entity, action, own_only))


def allows(user: User, record: OwnedRecord, action: str) -> bool:
    """Whether the seat may ``action`` this already-loaded record."""
    if record.deleted_at is not None:
        return False
    lvl = level(user, record.entity, action)
    if lvl == "all":
        return True
    if lvl == "team":
        return record.owner_id == user.id or (user.team_id is not None and record.team_id == user.team_id)
    if lvl == "own":
        return record.owner_id == user.id
    return False


def valid_id(record_id) -> bool:
    return isinstance(record_id, int) and 0 < record_id <= _MAX_ID


def seat_columns(user_model=User) -> tuple:
    """The columns of a seat that a page showing it needs."""
    return (user_model.id, user_model.name)


#: A record's id and what ``allows`` decides on: every record a page loads has these.
GATE_FIELDS = ("id", "owner", "team", "deleted_at")


def link_columns(alias, model: type[OwnedRecord]) -> tuple:
    """The columns of a record that a page showing it as a link needs: its id and title, and
    what the gate decides on (``allows``)."""
    return tuple(getattr(alias, name) for name in (*GATE_FIELDS, *model.title_fields))


def with_related(query, model, names):
    """Load the records that the named foreign keys point at in the same query (no query per row).

    A seat comes with its id and name only: that is all a page shows of it, and its password
    hash has no business leaving the database. A record comes with what shows it as a link.
    """
    for name in names:
        fk = model._meta.fields.get(name)
        if isinstance(fk, ForeignKeyField):
            target = fk.rel_model.alias()
            if fk.rel_model is User:
                columns = seat_columns(target)
            elif issubclass(fk.rel_model, OwnedRecord):
                columns = link_columns(target, fk.rel_model)
            else:
                columns = (target,)
            query = (query.select_extend(*columns)
                     .join_from(model, target, JOIN.LEFT_OUTER, on=(fk == target.id), attr=name))
    return query


# A record page's record, through the gate: one prepared statement per model, gate shape and
# related records (webapp/prepared.py).
_RECORD_BY_ID: dict = {}


def get_or_404(user: User, model: type[OwnedRecord], record_id: int, action: str = "read",
               related: Iterable[str] = ()) -> OwnedRecord:
    """Load one record the seat may read, else 404 as if it did not exist; the records its
    ``related`` foreign keys point at come in the same query.

    :raise 404: missing, deleted, or outside the seat's read level.
    :raise 403: readable, but the seat may not ``action`` it.
    """
    if not valid_id(record_id):
        abort(404)
    shape, values = gate(user, model.entity)
    related = tuple(related)
    statement = shaped(_RECORD_BY_ID, (model, shape, related), lambda *v: (
        with_related(visible_as(model, shape, v[:-1]), model, related).where(model.id == v[-1]).limit(1)))
    record = statement.first(*values, record_id)
    if record is None:
        abort(404)
    if action != "read" and not allows(user, record, action):
        abort(403)
    return record


def parent_or_404(user: User, parent_type: str, parent_id: int, action: str = "read") -> OwnedRecord:
    """The record a note or activity hangs on, through the same gate."""
    model = models.RECORD_MODELS.get(parent_type)
    if model is None:
        abort(404)
    return get_or_404(user, model, parent_id, action)


def may_delete_note(user: User, note: Note, parent: OwnedRecord) -> bool:
    """A note's author may remove it, and so may whoever may delete the record it is on."""
    return note.author_id == user.id or allows(user, parent, "delete")


def require_admin(user: User) -> None:
    """:raise 404: the seat has no administration rights (the page is not there for it)."""
    if user is None or not user.active or not user.role.is_admin:
        abort(404)
