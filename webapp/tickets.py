"""Tickets: created by hand, assigned, handed between agents, with the status flow of R-5."""

from flask import flash, g, redirect, render_template, url_for
from flask_babel import gettext as _
from flask_wtf import FlaskForm
from wtforms import TextAreaField
from wtforms.validators import Length, Optional, ValidationError

from webapp import audit, permissions
from webapp.crud import Column, Filter, Module, make_blueprint
from webapp.forms import SeatField, TicketForm
from webapp.i18n import lazy_gettext as _l
from webapp.models import TICKET_PRIORITIES, TICKET_STATUSES, Ticket, User, database

module = Module(
    entity="ticket", model=Ticket, form=TicketForm, url_prefix="/tickets",
    columns=[Column("subject", _l("Subject"), sortable=True), Column("status", _l("Status"), sortable=True),
             Column("priority", _l("Priority"), sortable=True), Column("account", _l("Account")),
             Column("owner", _l("Assigned to")), Column("updated_at", _l("Updated"), sortable=True)],
    search_fields=("subject",),
    filters=[Filter("mine", _l("Only mine"), "owner"), Filter("status", _l("Status"), "status", TICKET_STATUSES),
             Filter("priority", _l("Priority"), "priority", TICKET_PRIORITIES),
             Filter("account", _l("Account"), "account")],
    detail_fields=[("subject", _l("Subject")), ("status", _l("Status")), ("priority", _l("Priority")),
                   ("account", _l("Account")), ("contact", _l("Contact")), ("owner", _l("Assigned to")),
                   ("description", _l("Description"))],
)
bp = make_blueprint(module)


class TransferForm(FlaskForm):
    to_user = SeatField(_l("Hand over to"))
    comment = TextAreaField(_l("Note for the new agent"), validators=[Optional(), Length(max=5000)])

    def validate_to_user(self, field):
        if field.selected_id == self._current_owner:
            raise ValidationError(_l("The ticket is already assigned to this seat."))


def transfer_ticket(user, ticket: Ticket, to_user_id: int, comment: str) -> None:
    """Reassign the ticket (its team follows the new owner), with the comment on its timeline.

    The note is written first, while the sender still may read the ticket.
    """
    with database.atomic():
        if comment:
            audit.add_note(user, ticket, comment)
        audit.update(user, ticket, {"owner": to_user_id})


@bp.route("/<int:record_id>/transfer", methods=["GET", "POST"])
def transfer(record_id: int):
    """:raise 404: not visible. :raise 403: not editable."""
    ticket = permissions.get_or_404(g.user, Ticket, record_id, "edit")
    form = TransferForm()
    form._current_owner = ticket.owner_id
    if form.validate_on_submit():
        target = User.get_by_id(form.to_user.selected_id)
        transfer_ticket(g.user, ticket, target.id, (form.comment.data or "").strip())
        flash(_("Ticket handed over to %(name)s.", name=target.name), "success")
        if permissions.allows(g.user, ticket, "read"):
            return redirect(url_for("tickets.detail", record_id=ticket.id))
        return redirect(url_for("tickets.index"))
    return render_template("transfer.html", ticket=ticket, form=form), 400 if form.errors else 200
