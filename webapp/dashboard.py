"""The seat's start page: open activities and tickets, pipeline by stage, recent changes."""

import heapq

from flask import Blueprint, g, render_template
from peewee import fn

from webapp import permissions
from webapp.crud import MODULES
from webapp.models import OPPORTUNITY_STAGES, RECORD_MODELS, Activity, Opportunity, Ticket

bp = Blueprint("dashboard", __name__)


def my_open_activities(user, limit=10):
    return list(permissions.visible(user, Activity)
                .where(Activity.owner == user.id, Activity.status == "planned")
                .order_by(Activity.due_at.asc(nulls="LAST"), Activity.id).limit(limit))


def my_open_tickets(user, limit=10):
    return list(permissions.visible(user, Ticket)
                .where(Ticket.owner == user.id, Ticket.status.not_in(("solved", "closed")))
                .order_by(Ticket.updated_at.desc()).limit(limit))


def my_pipeline(user) -> list[dict]:
    rows = {r.stage: r for r in permissions.visible(user, Opportunity)
            .select(Opportunity.stage, fn.COUNT(Opportunity.id).alias("n"), fn.SUM(Opportunity.amount).alias("total"))
            .where(Opportunity.owner == user.id).group_by(Opportunity.stage)}
    return [{"stage": s, "count": rows[s].n if s in rows else 0,
             "total": rows[s].total if s in rows else 0} for s in OPPORTUNITY_STAGES]


def recent_changes(user, limit=10) -> list:
    """The most recently changed records the seat can read, across modules."""
    per_module = []
    for entity, model in RECORD_MODELS.items():
        if permissions.can(user, entity, "read"):
            per_module.append(permissions.visible(user, model).order_by(model.updated_at.desc()).limit(limit))
    merged = heapq.merge(*[list(q) for q in per_module], key=lambda r: r.updated_at, reverse=True)
    return [r for _, r in zip(range(limit), merged)]


@bp.route("/")
def index():
    return render_template("dashboard.html", activities=my_open_activities(g.user), tickets=my_open_tickets(g.user),
                           pipeline=my_pipeline(g.user), recent=recent_changes(g.user), modules=MODULES)
