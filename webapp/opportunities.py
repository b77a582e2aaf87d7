"""Opportunities and the pipeline board by stage (R-5).

On the board a card moves by drag and drop (``static/app.js`` posts the same
form a plain browser submits), so the board works without JavaScript too.
"""

from flask import abort, flash, g, jsonify, redirect, render_template, request, url_for
from flask_babel import gettext as _
from peewee import fn

from webapp import audit, permissions
from webapp.crud import Column, Filter, Module, make_blueprint
from webapp.forms import OpportunityForm
from webapp.i18n import lazy_gettext as _l
from webapp.models import OPPORTUNITY_STAGES, Opportunity

module = Module(
    entity="opportunity", model=Opportunity, form=OpportunityForm, url_prefix="/opportunities",
    columns=[Column("name", _l("Name"), sortable=True), Column("account", _l("Account")),
             Column("stage", _l("Stage"), sortable=True), Column("amount", _l("Amount"), sortable=True),
             Column("currency", _l("Currency")), Column("expected_close", _l("Expected close")),
             Column("owner", _l("Assigned to")), Column("updated_at", _l("Updated"), sortable=True)],
    search_fields=("name",),
    filters=[Filter("mine", _l("Only mine"), "owner"), Filter("stage", _l("Stage"), "stage", OPPORTUNITY_STAGES),
             Filter("account", _l("Account"), "account")],
    detail_fields=[("name", _l("Name")), ("account", _l("Account")), ("contact", _l("Contact")),
                   ("stage", _l("Stage")), ("amount", _l("Amount")), ("currency", _l("Currency")),
                   ("probability", _l("Probability (%)")), ("expected_close", _l("Expected close")),
                   ("owner", _l("Assigned to")), ("description", _l("Description"))],
)
bp = make_blueprint(module)

CARDS_PER_STAGE = 50
# Closing an opportunity settles its probability.
_SETTLED_PROBABILITY = {"won": 100, "lost": 0}


def board_columns(user, only_mine: bool = False) -> list[dict]:
    """Per stage: the newest visible cards, and count and total of all visible ones."""
    base = permissions.visible(user, Opportunity, own_only=only_mine)
    totals = {row.stage: (row.n, row.total) for row in
              base.select(Opportunity.stage, fn.COUNT(Opportunity.id).alias("n"),
                          fn.SUM(Opportunity.amount).alias("total")).group_by(Opportunity.stage)}
    columns = []
    for stage in OPPORTUNITY_STAGES:
        cards = list(base.where(Opportunity.stage == stage)
                     .order_by(Opportunity.updated_at.desc(), Opportunity.id.desc()).limit(CARDS_PER_STAGE))
        count, total = totals.get(stage, (0, 0))
        columns.append({"stage": stage, "cards": cards, "count": count, "total": total or 0})
    return columns


@bp.route("/board")
def board():
    if not permissions.can(g.user, "opportunity", "read"):
        abort(404)
    only_mine = request.args.get("mine") == "1"
    return render_template("board.html", columns=board_columns(g.user, only_mine), stages=OPPORTUNITY_STAGES,
                           only_mine=only_mine, cards_per_stage=CARDS_PER_STAGE)


@bp.route("/<int:record_id>/stage", methods=["POST"])
def move(record_id: int):
    """Move a card to another stage. JSON for the board's script, a redirect for a plain form.

    :raise 404: not visible. :raise 403: not editable. :raise 400: unknown stage.
    """
    record = permissions.get_or_404(g.user, Opportunity, record_id, "edit")
    stage = request.form.get("stage", "")
    wants_json = request.accept_mimetypes.best == "application/json"
    if stage not in OPPORTUNITY_STAGES:
        if wants_json:
            return jsonify(error=_("Unknown stage.")), 400
        abort(400, _("Unknown stage."))
    values = {"stage": stage}
    if stage in _SETTLED_PROBABILITY:
        values["probability"] = _SETTLED_PROBABILITY[stage]
    audit.update(g.user, record, values)
    if wants_json:
        return jsonify(id=record.id, stage=record.stage)
    flash(_("Moved."), "success")
    return redirect(request.form.get("back") == "detail" and url_for("opportunities.detail", record_id=record.id)
                    or url_for("opportunities.board"))
