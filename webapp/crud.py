"""List, detail, create, edit, delete and export pages, shared by every record module.

Each module (accounts.py, contacts.py, ...) describes itself with a ``Module`` and
gets a blueprint from ``make_blueprint``; it may add its own routes to it. Every
query here starts from ``permissions.visible`` and every write goes through
``audit``: no page reaches a record any other way.

Lists page by keyset on (sort column, id) and fetch one row more than they show,
so a page costs the same on the millionth row as on the first, and nothing is
counted.
"""

from __future__ import annotations

import base64
import csv
import datetime as dt
import decimal
import io
import json
import tempfile
import time
from dataclasses import dataclass, field
from typing import Callable

from flask import (Blueprint, Response, abort, current_app, flash, g, redirect, render_template, request,
                   stream_with_context, url_for)
from flask_babel import gettext as _
import peewee
from peewee import DateField, DateTimeField, DecimalField, IntegerField, Tuple

from webapp import audit, permissions
from webapp.i18n import choice_label
from webapp.models import Activity, AuditLog, Note, OwnedRecord, User, database
from webapp.prepared import Prepared, shaped

MAX_QUERY = 200  # longest search text accepted


@dataclass
class Column:
    name: str
    label: object
    sortable: bool = False
    #: how to show the value; default: the attribute, choice values translated
    render: Callable | None = None


@dataclass
class Filter:
    name: str
    label: object
    field: str
    values: tuple = ()  # allowed values; empty means an integer id


@dataclass
class Related:
    """A list of other records pointing at this one, e.g. an account's contacts."""
    entity: str
    model: type
    fk: str


@dataclass
class Module:
    entity: str
    model: type[OwnedRecord]
    form: type
    url_prefix: str
    columns: list[Column]
    search_fields: tuple[str, ...]  # the columns in search_text (migration 0004; a test keeps them equal)
    detail_fields: list[tuple[str, object]]
    filters: list[Filter] = field(default_factory=list)
    related: list[Related] = field(default_factory=list)
    default_sort: str = "updated_at"
    #: set by make_blueprint
    endpoint: str = ""

    @property
    def detail_links(self) -> list[str]:
        """The foreign keys a record page shows (loaded with the record in one query)."""
        return [name for name, _ in self.detail_fields]


MODULES: dict[str, Module] = {}


def cell(record, column: Column):
    if column.render is not None:
        return column.render(record)
    value = getattr(record, column.name)
    if isinstance(value, OwnedRecord):
        return value.title
    if isinstance(value, str):
        return choice_label(value) if column.name in ("status", "stage", "priority", "kind") else value
    return value


# ----------------------------------------------------------------------------- listing

@dataclass
class Page:
    rows: list
    next_cursor: str | None
    prev_cursor: str | None
    sort: str
    direction: str
    query: str
    filters: dict


def _encode_cursor(record, sort: str) -> str:
    value = getattr(record, sort)
    if isinstance(value, OwnedRecord):
        value = value.id
    value = audit.jsonable(value)
    return base64.urlsafe_b64encode(json.dumps([value, record.id]).encode()).decode().rstrip("=")


def _decode_cursor(text: str, sort_field):
    """(value, id) typed for ``sort_field``, or abort 400 for anything that is not a cursor we made."""
    damaged = _("The page link is damaged; go back to the first page.")
    try:
        raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
        value, rid = json.loads(raw)
        value = _typed(sort_field, value)
    except (ValueError, TypeError, ArithmeticError):
        abort(400, damaged)
    if not permissions.valid_id(rid):
        abort(400, damaged)
    return value, rid


def _typed(sort_field, value):
    """The cursor's value as the column's type, so a forged cursor cannot reach the database as SQL junk."""
    if isinstance(sort_field, DateTimeField):
        return dt.datetime.fromisoformat(value)
    if isinstance(sort_field, DateField):
        return dt.date.fromisoformat(value)
    if isinstance(sort_field, DecimalField):
        return decimal.Decimal(str(value))
    if isinstance(sort_field, IntegerField):
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError("not an integer")
        return value
    if not isinstance(value, str) or len(value) > 300:
        raise TypeError("not a short string")
    return value


def escape_like(text: str) -> str:
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


DIGITS = frozenset("0123456789")


def stored_form(text: str) -> str:
    """``text`` as ``search_text`` stores it: every character but a digit written three
    times (migrations 0004 and 0006)."""
    return "".join(ch if ch in DIGITS else ch * 3 for ch in text)


def index_segments(stored: str) -> list[str]:
    """The parts of a stored-form word worth asking the trigram index for, in order.

    A tripled letter's own trigram ("SSS", "mmm") stands for one character, which nearly
    every row holds: reading its posting list was most of a rare word's cost. Kept are the
    longest runs of the word whose every trigram spans two characters or three digits
    ("SSmm", "mii", ... for "Smith"; "12345" whole), not overlapping, so that LIKE finds
    them one after another. A word with none (a digit, two digits) has nothing to ask for.
    """
    def spans_one_letter(i: int) -> bool:
        return stored[i] == stored[i + 1] == stored[i + 2] and stored[i] not in DIGITS

    segments, i = [], 0
    while i + 3 <= len(stored):
        if spans_one_letter(i):
            i += 1
            continue
        end = i + 3
        while end < len(stored) and not spans_one_letter(end - 2):
            end += 1
        segments.append(stored[i:end])
        i = end
    return segments


def matches(model, text: str):
    """The record's search columns contain ``text``, case-insensitively.

    Read from the stored column ``search_text`` (migrations 0004, 0006, 0007): the columns
    lower-cased, with every character but a digit written three times, so that one- and
    two-character words have trigrams in its index too; the words are written the same way
    here (``stored_form``, then PostgreSQL's ``lower``, the function the column uses). Being
    a column, it has statistics, so the planner sees how common a word is: a common one
    ("王") is found by walking the newest rows, a rare one ("华信") in the trigram index.

    The index is asked only for the word's ``index_segments`` (a global search for "12345"
    at ten times the 50-seat data set: 160 ms of SQL when the index was asked for every
    trigram). Whether the row holds the word is then decided by ``strpos``, written
    ``<> 0`` so that the planner counts it as keeping nearly every row (its estimate for an
    unknown ``<>``) and estimates from the segments' LIKE alone: two LIKE conditions, or
    ``> 0`` (a third kept), would multiply into an estimate far too small, and a common
    word would look rare enough to read every match of it rather than walk the newest rows.
    """
    words = "".join(ch if ch.isprintable() else " " for ch in text)  # U+001F separates the columns
    column = peewee.Column(model, "search_text")
    stored = stored_form(words)
    segments = index_segments(stored)
    if segments in ([], [stored]):
        return column % peewee.fn.lower(f"%{escape_like(stored)}%")
    pattern = "%" + "%".join(escape_like(s) for s in segments) + "%"
    return (column % peewee.fn.lower(pattern)) & (peewee.fn.strpos(column, peewee.fn.lower(stored)) != 0)


def search_text(args) -> str:
    """The search text of a request's ``q``, trimmed to ``MAX_QUERY``."""
    return (args.get("q") or "").strip()[:MAX_QUERY]


def filtered(module: Module, user: User, args, action: str = "read"):
    """The module's visible records narrowed by the search text and filters in ``args``."""
    model = module.model
    text = search_text(args)
    conditions = [matches(model, text)] if text else []
    active, mine = {}, False
    for flt in module.filters:
        raw = (args.get(flt.name) or "").strip()
        if not raw:
            continue
        if flt.name == "mine" and raw == "1":
            mine = True  # narrows the gate itself (own_only)
        elif flt.values:
            if raw not in flt.values:
                abort(400, _("Unknown filter value."))
            conditions.append(getattr(model, flt.field) == raw)
        else:
            if not raw.isdigit() or not permissions.valid_id(int(raw)):
                abort(400, _("Unknown filter value."))
            conditions.append(getattr(model, flt.field) == int(raw))
        active[flt.name] = raw
    query = permissions.visible(user, model, action, own_only=mine)
    return (query.where(*conditions) if conditions else query), text, active


def first_rows(matching, order: tuple, limit: int, columns: list):
    """The first ``limit`` rows of ``matching`` (a query of one model) in ``order``, read as
    ``columns``: their ids first, then those rows.

    Asking for the ids alone lets a walk over a seat's newest rows test the search word and
    the filters in the walk's index (migration 0008) instead of fetching each row it passes
    from the table: an agent's search for a common word passes hundreds of rows, scattered
    over the table. ``= ANY(ARRAY(...))`` rather than ``IN (...)``: the same plan (the ids,
    then the rows by primary key) at half the planning time, as the planner weighs no joins.
    """
    model = matching.model
    return rows_by_ids(model, matching.select(model.id).order_by(*order).limit(limit), order, columns)


def rows_by_ids(model, ids, order: tuple, columns: list):
    """The rows of ``model`` whose ids the subquery ``ids`` gives, read as ``columns``, in ``order``."""
    return model.select(*columns).where(model.id == peewee.fn.ANY(peewee.fn.ARRAY(ids))).order_by(*order)


#: How many of a table's newest live rows a newest-first search walks for a manager or the
#: boss before it asks the trigram index for the older matches (``newest_matching``).
SEARCH_WALK_ROWS = 20_000
#: A word found among those rows, a third of a page or more but short of it, walks on at most
#: to the table's this many newest rows (as dense further back, it fills the page within two
#: more bounds) before the rest of its matches are read from the index: its matches may lie
#: anywhere in time, and an open walk passed a whole table (the boss's contacts at ten times the
#: 50-seat data set: 80,000 blocks, 2.3 s; docs/performance.md).
SEARCH_WALK_ON_ROWS = 3 * SEARCH_WALK_ROWS
#: Tables with fewer rows (by the planner's estimate) are walked whole: a walk passes ~5 entries
#: a microsecond, so at most ~20 ms, less than a second statement for every rare word costs.
BOUNDED_FROM_ROWS = 5 * SEARCH_WALK_ROWS
#: How long a process keeps a table's walk boundary: rows changed since then only lengthen
#: the walk a little (50 seats at the load test's pace change a few thousand in 15 minutes), any
#: boundary splits the rows exactly, and a lookup after many changes fetches the changed rows
#: from the table (4 ms on a quiet 200,000-row table, 8 ms after 5,000 changes).
WALK_BOUNDARY_SECONDS = 900.0
_walk_boundaries: dict = {}  # (database name, model, rows) -> (monotonic expiry, (updated_at, id) or None)


def walk_boundary(model, rows: int | None = None):
    """(updated_at, id) of the table's ``rows``-th newest live row (``SEARCH_WALK_ROWS`` unless
    given), or None for a table under ``BOUNDED_FROM_ROWS`` or with fewer rows; looked up at
    most every 15 minutes per process and database."""
    rows = rows or SEARCH_WALK_ROWS
    now = time.monotonic()
    database = model._meta.database
    key = (database.database, model, rows)  # a benchmark may open two data sets in one process
    kept = _walk_boundaries.get(key)
    if kept is not None and kept[0] > now:
        return kept[1]
    (estimated_rows,) = database.execute_sql("SELECT reltuples FROM pg_class WHERE oid = %s::regclass",
                                             (model._meta.table_name,)).fetchone()
    edge = None
    if estimated_rows >= max(BOUNDED_FROM_ROWS, rows):  # -1 for a table never analysed
        edge = (model.select(model.updated_at, model.id).where(model.deleted_at.is_null())
                .order_by(model.updated_at.desc(), model.id.desc())
                .offset(rows - 1).limit(1).tuples().first())
    _walk_boundaries[key] = (now + WALK_BOUNDARY_SECONDS, edge)
    return edge


def walks_everyones_rows(user: User, entity: str, text: str, mine: bool = False) -> bool:
    """Whether a newest-first search for ``text`` walks the newest rows of everyone (a manager
    or the boss; an agent's walk passes its own rows only) and the word has a trigram for
    the index to be asked about older matches (``newest_matching``)."""
    return (len(stored_form(text)) >= 3
            and permissions.gate(user, entity, "read", own_only=mine)[0] in ("team", "all"))


def newest_matching(matching, limit: int, columns: list, bounded: bool, wrap: Callable = lambda q: q) -> list:
    """The first ``limit`` rows of ``matching`` newest first (updated_at, id), read as
    ``columns`` through ``wrap``; with ``bounded``, a walk of at most ``SEARCH_WALK_ROWS``,
    or ``SEARCH_WALK_ON_ROWS`` for a word found there but short of a page.

    The planner finds a common word by walking the newest rows and testing each: it counts on
    the matches being spread evenly over time. Words whose matches all lie in old rows (a
    number's first digits, "contact42" in addresses numbered as they were made) break that:
    the walk passed every row of the table (a manager's global search at ten times the
    50-seat data set: 400 ms, against 6 ms in the trigram index; docs/performance.md). So the
    walk is bounded: first the matches among the table's newest rows (``walk_boundary``),
    walked or looked up as the planner likes. If they fill the page, that is the one
    statement, as before. If they hold none, the older matches are all read from the index
    (a materialized CTE has no order for the planner to walk in), then sorted. If they hold
    a third of a page or more, the word is likely spread over time and walking on finds the
    rest sooner than reading all its older matches would (a manager's leads "Apex": 9 ms
    walked, 84 ms from the index), but only so far: a word still short of a page at
    ``SEARCH_WALK_ON_ROWS`` is rare, and its remaining matches come from the index. If they hold
    fewer, walking on would pass many bounds' worth of rows (a touched old row among the newest
    is enough to start it; the whole table for the boss's contacts in the load test), so the
    older matches come from the index at once. The rows are exactly those of the one statement.
    """
    model = matching.model
    order = (model.updated_at.desc(), model.id.desc())
    edge = walk_boundary(model) if bounded else None
    if edge is None:
        return list(wrap(first_rows(matching, order, limit, columns)))
    key = Tuple(model.updated_at, model.id)
    rows = list(wrap(first_rows(matching.where(key >= Tuple(*edge)), order, limit, columns)))
    if len(rows) == limit:
        return rows
    if rows and limit - len(rows) <= 2 * len(rows):  # as dense further back: full within two bounds
        on = matching.where(key < Tuple(*edge))
        far_edge = walk_boundary(model, SEARCH_WALK_ON_ROWS)
        if far_edge is None:  # the table ends first
            return rows + list(wrap(first_rows(on, order, limit - len(rows), columns)))
        rows.extend(wrap(first_rows(on.where(key >= Tuple(*far_edge)), order, limit - len(rows), columns)))
        if len(rows) == limit:
            return rows
        edge = far_edge
    older = matching.where(key < Tuple(*edge)).select(model.id, model.updated_at).cte("older", materialized=True)
    ids = older.select_from(older.c.id).order_by(older.c.updated_at.desc(), older.c.id.desc()).limit(limit - len(rows))
    return rows + list(wrap(rows_by_ids(model, ids, order, columns)))


def list_page(module: Module, user: User, args, page_size: int) -> Page:
    model = module.model
    query, text, active = filtered(module, user, args)
    sortable = {c.name for c in module.columns if c.sortable} | {module.default_sort}
    sort = args.get("sort") if args.get("sort") in sortable else module.default_sort
    direction = args.get("dir") if args.get("dir") in ("asc", "desc") else (
        "desc" if sort == module.default_sort else "asc")
    sort_field = getattr(model, sort)
    key = Tuple(sort_field, model.id)
    after, before = args.get("after"), args.get("before")
    forward = not before
    if after or before:
        value, rid = _decode_cursor(after or before, sort_field)
        going_up = (direction == "asc") == forward
        query = query.where(key > Tuple(value, rid)) if going_up else query.where(key < Tuple(value, rid))
    ascending = (direction == "asc") == forward
    order = (sort_field.asc(), model.id.asc()) if ascending else (sort_field.desc(), model.id.desc())
    # The columns the page shows, its title, its paging key and the gate's: not descriptions.
    shown = {*permissions.GATE_FIELDS, sort, *model.title_fields, *(c.name for c in module.columns)}
    columns = [f for name, f in model._meta.fields.items() if name in shown]

    def related(rows_query):
        return permissions.with_related(rows_query, model, [c.name for c in module.columns])

    if text and sort == "updated_at" and not ascending:
        rows = newest_matching(query, page_size + 1, columns, wrap=related,
                               bounded=walks_everyones_rows(user, module.entity, text, "mine" in active))
    elif text or active:
        rows = list(related(first_rows(query, order, page_size + 1, columns)))
    else:  # nothing to test on the way: the walk reads just the page's rows
        rows = list(related(query.select(*columns).order_by(*order).limit(page_size + 1)))
    more = len(rows) > page_size
    rows = rows[:page_size]
    if not forward:
        rows.reverse()
    next_cursor = prev_cursor = None
    if rows:
        if (forward and more) or (not forward and before):
            next_cursor = _encode_cursor(rows[-1], sort)
        if (forward and after) or (not forward and more):
            prev_cursor = _encode_cursor(rows[0], sort)
    return Page(rows, next_cursor, prev_cursor, sort, direction, text, active)


# ----------------------------------------------------------------------------- detail

# What a record page shows besides the record: its notes, activities (through the gate, one
# statement per gate shape), audit entries and related lists, each built once (webapp/prepared.py).
_ACTIVITIES: dict = {}
_RELATED: dict = {}
_NOTES = Prepared(lambda entity, record_id, limit: (
    Note.select(Note, *permissions.seat_columns()).join(User)
    .where(Note.parent_type == entity, Note.parent_id == record_id, Note.deleted_at.is_null())
    .order_by(Note.created_at.desc()).limit(limit)))
_AUDIT = Prepared(lambda entity, record_id, limit: (
    AuditLog.select().where(AuditLog.entity == entity, AuditLog.record_id == record_id)
    .order_by(AuditLog.at.desc()).limit(limit)))


def timeline(user: User, record: OwnedRecord, limit: int = 50) -> list[dict]:
    """Notes, activities (through the gate) and audit entries of one record, newest first."""
    items = []
    for note in _NOTES.rows(record.entity, record.id, limit):
        items.append({"kind": "note", "at": note.created_at, "note": note,
                      "can_delete": permissions.may_delete_note(user, note, record)})
    shape, values = permissions.gate(user, "activity")
    acts = shaped(_ACTIVITIES, shape, lambda *v: (
        permissions.visible_as(Activity, shape, v[:-3])
        .select(*permissions.link_columns(Activity, Activity), Activity.kind, Activity.status, Activity.updated_at)
        .where(Activity.parent_type == v[-3], Activity.parent_id == v[-2])
        .order_by(Activity.updated_at.desc()).limit(v[-1])))
    for act in acts.rows(*values, record.entity, record.id, limit):
        items.append({"kind": "activity", "at": act.updated_at, "activity": act})
    rows = _AUDIT.rows(record.entity, record.id, limit)
    changes = audit.readable_changes(rows)
    for row in rows:
        items.append({"kind": "audit", "at": row.at, "audit": row, "changes": changes[row.id]})
    items.sort(key=lambda i: i["at"], reverse=True)
    return items[:limit]


def _related_rows(rel: Related, shape: str):
    """The statement of one related list for one gate shape: (*gate values, record id)."""
    def build(*values):
        model = rel.model
        shown = [getattr(model, name) for name in ("stage", "status") if name in model._meta.fields]
        return (permissions.visible_as(model, shape, values[:-1])
                .select(*permissions.link_columns(model, model), *shown)
                .where(getattr(model, rel.fk) == values[-1]).order_by(model.updated_at.desc()).limit(21))

    return shaped(_RELATED, (rel.entity, rel.fk, shape), build)


def related_lists(module: Module, user: User, record) -> list[dict]:
    out = []
    for rel in module.related:
        shape, values = permissions.gate(user, rel.entity)
        rows = _related_rows(rel, shape).rows(*values, record.id)
        out.append({"entity": rel.entity, "rows": rows[:20], "more": len(rows) > 20, "fk": rel.fk,
                    "module": MODULES[rel.entity]})
    return out


# ----------------------------------------------------------------------------- export

# A spreadsheet may run a cell starting with one of these as a formula.
FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


def neutralise(value) -> str:
    """A cell a spreadsheet will not run as a formula (CSV/formula injection)."""
    text = "" if value is None else str(value)
    return "'" + text if text.startswith(FORMULA_STARTS) else text


def _export_records(module: Module, user: User, args):
    """Record the export in the audit log, then yield the header and each record's values of
    the filtered list within the seat's export level.

    The audit row comes first, with the number of rows the list holds: a download aborted
    halfway has still let records out.
    """
    query, text, active = filtered(module, user, args, action="export")
    with database.atomic():
        audit.write_row(user, module.entity, 0, "export", {"rows": [None, query.count()], "search": [None, text],
                                                           "filters": [None, active]})
    fields = [n for n in module.model._meta.sorted_field_names if n not in ("deleted_at",)]
    yield fields
    for record in query.order_by(module.model.id).iterator():
        yield [audit.jsonable(record.__data__.get(n)) for n in fields]


def export_rows(module: Module, user: User, args):
    """Yield CSV text of the filtered list (see _export_records), formula cells neutralised."""
    buf = io.StringIO()
    writer = csv.writer(buf)
    buf.write("\ufeff")  # lets Excel read UTF-8 (Chinese names) correctly
    for count, values in enumerate(_export_records(module, user, args)):
        writer.writerow([neutralise(v) for v in values])
        if count % 500 == 0:
            yield buf.getvalue()
            buf.seek(0)
            buf.truncate()
    yield buf.getvalue()


def export_xlsx(module: Module, user: User, args, out) -> None:
    """Write the filtered list (see _export_records) as an Excel workbook to ``out``.

    Every text goes in as a string cell, which Excel never evaluates: a value such as
    "=HYPERLINK(...)" stays the text it is, without the apostrophe the CSV needs.
    """
    from openpyxl import Workbook
    from openpyxl.cell import WriteOnlyCell

    book = Workbook(write_only=True)
    sheet = book.create_sheet(module.url_prefix.strip("/")[:31])
    for values in _export_records(module, user, args):
        row = []
        for value in values:
            cell = WriteOnlyCell(sheet, value=_xlsx_value(value))
            if isinstance(cell.value, str):
                cell.data_type = "s"  # openpyxl would take a leading "=" for a formula
            row.append(cell)
        sheet.append(row)
    book.save(out)


def _xlsx_value(value):
    """What a spreadsheet cell can hold: numbers and dates as such, the rest as text."""
    if value is None or isinstance(value, (bool, int, float, decimal.Decimal, dt.date, dt.datetime)):
        return float(value) if isinstance(value, decimal.Decimal) else value
    text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
    return "".join(ch for ch in text if ch in "\t\n\r" or ord(ch) >= 32)  # XML 1.0 has no other controls


# ----------------------------------------------------------------------------- blueprint

def make_blueprint(module: Module) -> Blueprint:
    bp = Blueprint(module.url_prefix.strip("/"), __name__, url_prefix=module.url_prefix)
    module.endpoint = bp.name
    MODULES[module.entity] = module
    model = module.model

    @bp.route("/")
    def index():
        """The list: search, filters, sort, keyset pages."""
        if not permissions.can(g.user, module.entity, "read"):
            abort(404)
        size = current_app.extensions["crm_settings"].web.page_size
        page = list_page(module, g.user, request.args, size)
        return render_template("list.html", module=module, page=page, cell=cell,
                               can_create=permissions.can(g.user, module.entity, "create"),
                               can_export=permissions.can(g.user, module.entity, "export"))

    @bp.route("/new", methods=["GET", "POST"])
    def new():
        """:raise 404: the seat may not create this kind of record."""
        if not permissions.can(g.user, module.entity, "create"):
            abort(404)
        form = module.form()
        form.prepare(None)
        if not form.is_submitted():
            _prefill(form, request.args)
        if form.validate_on_submit():
            record = audit.create(g.user, model, form.record_values())
            flash(_("Saved."), "success")
            return redirect(url_for(f"{bp.name}.detail", record_id=record.id))
        return render_template("form.html", module=module, form=form, record=None), 400 if form.errors else 200

    @bp.route("/<int:record_id>")
    def detail(record_id: int):
        """:raise 404: missing, deleted or not visible to the seat."""
        from webapp import attachments

        record = permissions.get_or_404(g.user, model, record_id, related=module.detail_links)
        return render_template("detail.html", module=module, record=record,
                               attachments=attachments.for_record(g.user, record),
                               max_upload_mb=current_app.extensions["crm_settings"].attachments.max_upload_mb,
                               related=related_lists(module, g.user, record),
                               timeline=timeline(g.user, record),
                               can_edit=permissions.allows(g.user, record, "edit"),
                               can_delete=permissions.allows(g.user, record, "delete"),
                               can_add_activity=permissions.can(g.user, "activity", "create"))

    @bp.route("/<int:record_id>/edit", methods=["GET", "POST"])
    def edit(record_id: int):
        """:raise 404: not visible. :raise 403: visible but not editable."""
        record = permissions.get_or_404(g.user, model, record_id, "edit")
        form = module.form(obj=record)
        form.prepare(record)
        if form.validate_on_submit():
            changes = audit.update(g.user, record, form.record_values())
            flash(_("Saved.") if changes else _("Nothing changed."), "success")
            return redirect(url_for(f"{bp.name}.detail", record_id=record.id))
        return render_template("form.html", module=module, form=form, record=record), 400 if form.errors else 200

    @bp.route("/<int:record_id>/delete", methods=["GET", "POST"])
    def delete(record_id: int):
        """GET asks for confirmation; POST deletes. :raise 404: not visible. :raise 403: not deletable."""
        record = permissions.get_or_404(g.user, model, record_id, "delete")
        if request.method == "POST":
            audit.delete(g.user, record)
            flash(_("Deleted."), "success")
            return redirect(url_for(f"{bp.name}.index"))
        return render_template("confirm_delete.html", module=module, record=record)

    @bp.route("/export.xlsx")
    def export_excel():
        """The current filtered list as an Excel workbook, within the seat's export level."""
        if not permissions.can(g.user, module.entity, "export"):
            abort(404)
        stamp = dt.datetime.now().strftime("%Y%m%d-%H%M")
        with tempfile.SpooledTemporaryFile(max_size=8 * 1024 * 1024) as spool:
            export_xlsx(module, g.user, request.args, spool)
            spool.seek(0)
            data = spool.read()
        return Response(data, mimetype="application/vnd.openxmlformats-officedocument.spreadsheetml.sheet",
                        headers={"Content-Disposition":
                                 f'attachment; filename="{module.url_prefix.strip("/")}-{stamp}.xlsx"'})

    @bp.route("/export.csv")
    def export():
        """The current filtered list as CSV, within the seat's export level."""
        if not permissions.can(g.user, module.entity, "export"):
            abort(404)
        stamp = dt.datetime.now().strftime("%Y%m%d-%H%M")
        return Response(stream_with_context(export_rows(module, g.user, request.args)),
                        mimetype="text/csv",
                        headers={"Content-Disposition": f'attachment; filename="{module.url_prefix.strip("/")}-{stamp}.csv"'})

    return bp


def _prefill(form, args) -> None:
    """``?account=ID`` (from an account's page) pre-selects that account, if the seat can see it."""
    for name in getattr(form, "lookups", ()):
        raw = args.get(name, "")
        if raw.isdigit() and permissions.valid_id(int(raw)):
            target = form[name].model
            record = permissions.visible(g.user, target).where(target.id == int(raw)).first()
            if record is not None:
                form[name].set_record(record)

