"""Global search across modules, and the name lookups behind the record and seat pickers."""

from flask import Blueprint, abort, g, jsonify, render_template, request

from peewee import fn

from webapp import permissions
from webapp.crud import MODULES, filtered, newest_matching, search_text, walks_everyones_rows
from webapp.forms import picker_label, seat_label
from webapp.models import User

bp = Blueprint("search", __name__, url_prefix="/search")

PER_MODULE = 10


def newest_matches(module, text: str, limit: int) -> list:
    """The seat's newest visible records of ``module`` matching ``text``, each read as a link
    (id, title, the gate's columns), no more."""
    model = module.model
    query, text, _ = filtered(module, g.user, {"q": text})  # the text as searched: trimmed
    return newest_matching(query, limit, permissions.link_columns(model, model),
                           bounded=walks_everyones_rows(g.user, module.entity, text))


@bp.route("/")
def index():
    """Up to ten matches per module, each module through the permission gate."""
    text = search_text(request.args)
    results = []
    if text:
        for entity, module in MODULES.items():
            if not permissions.can(g.user, entity, "read"):
                continue
            rows = newest_matches(module, text, PER_MODULE + 1)
            if rows:
                results.append({"module": module, "rows": rows[:PER_MODULE], "more": len(rows) > PER_MODULE})
    return render_template("search.html", q=text, results=results)


@bp.route("/lookup/<entity>")
def lookup(entity: str):
    """JSON [{id, label}] of visible records matching ``q``, for the autocomplete pickers."""
    module = MODULES.get(entity)
    if module is None or not permissions.can(g.user, entity, "read"):
        abort(404)
    rows = newest_matches(module, request.args.get("q", ""), 10)
    return jsonify([{"id": r.id, "label": picker_label(r.title, r.id)} for r in rows])


@bp.route("/seats")
def seats():
    """JSON [{id, label}] of active seats whose name holds ``q``, for the "Assigned to" picker.

    Any seat may assign a record to any active seat, so every seat may look them up; names
    only, as the lists show them (no e-mail addresses).
    """
    text = search_text(request.args)
    if not text:
        return jsonify([])
    rows = (User.select(User.id, User.name)
            .where(User.active & (fn.STRPOS(fn.LOWER(User.name), text.lower()) > 0))
            .order_by(User.name, User.id).limit(10))
    return jsonify([{"id": u.id, "label": seat_label(u)} for u in rows])
