"""Leads, and their conversion into account + contact + opportunity in one transaction (R-5)."""

from flask import abort, flash, g, redirect, render_template, url_for
from flask_babel import gettext as _
from flask_wtf import FlaskForm
from wtforms import BooleanField, DecimalField, SelectField, StringField
from wtforms.validators import Length, NumberRange, Optional, ValidationError

from webapp import audit, permissions
from webapp.crud import Column, Filter, Module, make_blueprint
from webapp.forms import LeadForm, LookupField, account_named, choices
from webapp.i18n import lazy_gettext as _l
from webapp.models import (CURRENCIES, LEAD_STATUSES, OPPORTUNITY_STAGES, Account, Contact, Lead, Opportunity,
                           database, utcnow)

module = Module(
    entity="lead", model=Lead, form=LeadForm, url_prefix="/leads",
    columns=[Column("last_name", _l("Last name"), sortable=True), Column("first_name", _l("First name")),
             Column("company", _l("Company"), sortable=True), Column("status", _l("Status"), sortable=True),
             Column("owner", _l("Assigned to")), Column("updated_at", _l("Updated"), sortable=True)],
    search_fields=("first_name", "last_name", "company", "email", "phone"),
    filters=[Filter("mine", _l("Only mine"), "owner"), Filter("status", _l("Status"), "status", LEAD_STATUSES)],
    detail_fields=[("first_name", _l("First name")), ("last_name", _l("Last name")), ("company", _l("Company")),
                   ("email", _l("E-mail")), ("phone", _l("Phone")), ("source", _l("Source")),
                   ("status", _l("Status")), ("owner", _l("Assigned to")), ("converted_account", _l("Account")),
                   ("converted_contact", _l("Contact")), ("description", _l("Description"))],
)
bp = make_blueprint(module)


class ConvertForm(FlaskForm):
    existing_account = LookupField(_l("Existing account (leave empty to create one)"), Account, account_named)
    account_name = StringField(_l("New account name"), validators=[Optional(), Length(max=200)])
    create_opportunity = BooleanField(_l("Also create an opportunity"), default=True)
    opportunity_name = StringField(_l("Opportunity name"), validators=[Optional(), Length(max=200)])
    amount = DecimalField(_l("Amount"), places=2, default=0,
                          validators=[Optional(), NumberRange(min=0, max=999_999_999_999)])
    currency = SelectField(_l("Currency"), choices=choices(CURRENCIES, label=str), default="CNY")
    stage = SelectField(_l("Stage"), choices=choices(s for s in OPPORTUNITY_STAGES if s not in ("won", "lost")),
                        default="qualification")

    def validateaccount_named(self, field):
        if not self.existing_account.data and not (field.data or "").strip():
            raise ValidationError(_l("Name the new account, or choose an existing one."))

    def validate_opportunity_name(self, field):
        if self.create_opportunity.data and not (field.data or "").strip():
            raise ValidationError(_l("Name the opportunity."))


def convert_lead(user, lead: Lead, form: ConvertForm) -> tuple[Account, Contact, Opportunity | None]:
    """Create (or reuse) the account, create the contact and the opportunity, mark the lead:
    all in one transaction, every step audited; any failure leaves nothing behind."""
    with database.atomic():
        chosen = form.existing_account.selected_id  # already checked visible by the form
        account = Account.get_by_id(chosen) if chosen else None
        if account is None:
            account = audit.create(user, Account, {"name": form.account_name.data.strip(), "owner": lead.owner_id,
                                                   "email": lead.email, "phone": lead.phone})
        contact = audit.create(user, Contact, {
            "first_name": lead.first_name, "last_name": lead.last_name, "email": lead.email,
            "phone": lead.phone, "account": account.id, "owner": lead.owner_id})
        opportunity = None
        if form.create_opportunity.data:
            opportunity = audit.create(user, Opportunity, {
                "name": form.opportunity_name.data.strip(), "account": account.id, "contact": contact.id,
                "amount": form.amount.data or 0, "currency": form.currency.data, "stage": form.stage.data,
                "lead": lead.id, "owner": lead.owner_id})
        audit.update(user, lead, {"status": "converted", "converted_account": account.id,
                                  "converted_contact": contact.id, "converted_at": utcnow()})
    return account, contact, opportunity


@bp.route("/<int:record_id>/convert", methods=["GET", "POST"])
def convert(record_id: int):
    """:raise 404: lead not visible or the seat may not create accounts, contacts and opportunities."""
    lead = permissions.get_or_404(g.user, Lead, record_id, "edit")
    if not all(permissions.can(g.user, e, "create") for e in ("account", "contact", "opportunity")):
        abort(403)
    if lead.status == "converted":
        flash(_("This lead was already converted."), "info")
        return redirect(url_for("leads.detail", record_id=lead.id))
    form = ConvertForm()
    if not form.is_submitted():
        form.account_name.data = lead.company or lead.title
        form.opportunity_name.data = lead.company or lead.title
    if form.validate_on_submit():
        account, contact, opportunity = convert_lead(g.user, lead, form)
        flash(_("Lead converted."), "success")
        if opportunity is not None:
            return redirect(url_for("opportunities.detail", record_id=opportunity.id))
        return redirect(url_for("accounts.detail", record_id=account.id))
    return render_template("convert.html", lead=lead, form=form), 400 if form.errors else 200
