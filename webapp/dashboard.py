"""The seat's start page: open activities and tickets, pipeline by stage, recent changes."""

import functools
import operator

from flask import Blueprint, g, render_template
from peewee import SQL, Value, fn

from webapp import permissions
from webapp.crud import MODULES
from webapp.models import OPPORTUNITY_STAGES, RECORD_MODELS, Activity, Opportunity, Ticket

bp = Blueprint("dashboard", __name__)


def my_open_activities(user, limit=10):
    return list(permissions.visible(user, Activity, own_only=True)
                .where(Activity.status == "planned")
                .order_by(Activity.due_at.asc(nulls="LAST"), Activity.id).limit(limit))


def my_open_tickets(user, limit=10):
    return list(permissions.visible(user, Ticket, own_only=True)
                .where(Ticket.status.not_in(("solved", "closed")))
                .order_by(Ticket.updated_at.desc()).limit(limit))


def my_pipeline(user) -> list[dict]:
    rows = {r.stage: r for r in permissions.visible(user, Opportunity, own_only=True)
            .select(Opportunity.stage, fn.COUNT(Opportunity.id).alias("n"), fn.SUM(Opportunity.amount).alias("total"))
            .group_by(Opportunity.stage)}
    return [{"stage": s, "count": rows[s].n if s in rows else 0,
             "total": rows[s].total if s in rows else 0} for s in OPPORTUNITY_STAGES]


def recent_changes(user, limit=10) -> list:
    """The most recently changed records the seat can read, across modules, newest first.

    One statement: each module's newest ``limit`` through the gate, as links (id, title and
    the gate's columns), joined with UNION ALL and cut to ``limit`` by PostgreSQL.
    """
    parts = []
    for entity, model in RECORD_MODELS.items():
        if not permissions.can(user, entity, "read"):
            continue
        first, *rest = model.title_fields
        columns = (*(getattr(model, name) for name in permissions.GATE_FIELDS), model.updated_at,
                   getattr(model, first).alias("title_1"),
                   (getattr(model, rest[0]) if rest else Value("")).alias("title_2"), Value(entity).alias("entity"))
        parts.append(permissions.visible(user, model).select(*columns).order_by(model.updated_at.desc()).limit(limit))
    if not parts:
        return []
    newest = functools.reduce(operator.add, parts).order_by(SQL("updated_at").desc()).limit(limit)
    records = []
    for *gate_values, updated_at, title_1, title_2, entity in newest.tuples():
        model = RECORD_MODELS[entity]
        records.append(model(**dict(zip(permissions.GATE_FIELDS, gate_values)), updated_at=updated_at,
                             **dict(zip(model.title_fields, (title_1, title_2)))))
    return records


@bp.route("/")
def index():
    return render_template("dashboard.html", activities=my_open_activities(g.user), tickets=my_open_tickets(g.user),
                           pipeline=my_pipeline(g.user), recent=recent_changes(g.user), modules=MODULES)
