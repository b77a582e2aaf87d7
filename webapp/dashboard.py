"""The seat's start page: open activities and tickets, pipeline by stage, recent changes."""

import functools
import operator

from flask import Blueprint, g, render_template
from peewee import SQL, Value, fn

from webapp import permissions
from webapp.crud import MODULES
from webapp.models import OPPORTUNITY_STAGES, RECORD_MODELS, Activity, Opportunity, Ticket
from webapp.prepared import shaped

bp = Blueprint("dashboard", __name__)


# The dashboard is the second most frequent page: its statements are built once per process
# and gate shape (webapp/prepared.py); recent changes once per combination of the modules'
# shapes, which depends on the seat's role only.
_OPEN_ACTIVITIES: dict = {}
_OPEN_TICKETS: dict = {}
_PIPELINE: dict = {}
_RECENT: dict = {}


def my_open_activities(user, limit=10):
    shape, values = permissions.gate(user, "activity", own_only=True)
    return shaped(_OPEN_ACTIVITIES, shape, lambda *v: (
        permissions.visible_as(Activity, shape, v[:-1])
        .where(Activity.status == "planned")
        .order_by(Activity.due_at.asc(nulls="LAST"), Activity.id).limit(v[-1]))).rows(*values, limit)


def my_open_tickets(user, limit=10):
    shape, values = permissions.gate(user, "ticket", own_only=True)
    return shaped(_OPEN_TICKETS, shape, lambda *v: (
        permissions.visible_as(Ticket, shape, v[:-1])
        .where(Ticket.status.not_in(("solved", "closed")))
        .order_by(Ticket.updated_at.desc()).limit(v[-1]))).rows(*values, limit)


def my_pipeline(user) -> list[dict]:
    shape, values = permissions.gate(user, "opportunity", own_only=True)
    statement = shaped(_PIPELINE, shape, lambda *v: (
        permissions.visible_as(Opportunity, shape, v)
        .select(Opportunity.stage, fn.COUNT(Opportunity.id).alias("n"), fn.SUM(Opportunity.amount).alias("total"))
        .group_by(Opportunity.stage)))
    rows = {r.stage: r for r in statement.rows(*values)}
    return [{"stage": s, "count": rows[s].n if s in rows else 0,
             "total": rows[s].total if s in rows else 0} for s in OPPORTUNITY_STAGES]


def recent_changes(user, limit=10) -> list:
    """The most recently changed records the seat can read, across modules, newest first.

    One statement: each module's newest ``limit`` through the gate, as links (id, title and
    the gate's columns), joined with UNION ALL and cut to ``limit`` by PostgreSQL; prepared
    once per combination of the modules' gate shapes.
    """
    gates = [(entity, *permissions.gate(user, entity)) for entity in RECORD_MODELS]
    gates = [(entity, shape, values) for entity, shape, values in gates if shape != "none"]
    if not gates:
        return []

    def build(*stand_ins):
        parts, left = [], list(stand_ins[:-1])
        for entity, shape, values in gates:
            model = RECORD_MODELS[entity]
            first, *rest = model.title_fields
            columns = (*(getattr(model, name) for name in permissions.GATE_FIELDS), model.updated_at,
                       getattr(model, first).alias("title_1"),
                       (getattr(model, rest[0]) if rest else Value("")).alias("title_2"), Value(entity).alias("entity"))
            mine, left = left[:len(values)], left[len(values):]  # a shape compares with as many values for every seat
            parts.append(permissions.visible_as(model, shape, mine).select(*columns)
                         .order_by(model.updated_at.desc()).limit(stand_ins[-1]))
        return functools.reduce(operator.add, parts).order_by(SQL("updated_at").desc()).limit(stand_ins[-1]).tuples()

    statement = shaped(_RECENT, tuple((entity, shape) for entity, shape, _ in gates), build)
    records = []
    for *gate_values, updated_at, title_1, title_2, entity in statement.rows(
            *(v for _, _, values in gates for v in values), limit):
        model = RECORD_MODELS[entity]
        records.append(model(**dict(zip(permissions.GATE_FIELDS, gate_values)), updated_at=updated_at,
                             **dict(zip(model.title_fields, (title_1, title_2)))))
    return records


@bp.route("/")
def index():
    return render_template("dashboard.html", activities=my_open_activities(g.user), tickets=my_open_tickets(g.user),
                           pipeline=my_pipeline(g.user), recent=recent_changes(g.user), modules=MODULES)
