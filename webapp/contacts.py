"""Contacts: the people at accounts (R-5)."""

from webapp.crud import Column, Filter, Module, Related, make_blueprint
from webapp.forms import ContactForm
from webapp.i18n import lazy_gettext as _l
from webapp.models import Contact, Opportunity, Ticket

module = Module(
    entity="contact", model=Contact, form=ContactForm, url_prefix="/contacts",
    columns=[Column("last_name", _l("Last name"), sortable=True), Column("first_name", _l("First name")),
             Column("account", _l("Account")), Column("email", _l("E-mail")), Column("phone", _l("Phone")),
             Column("owner", _l("Assigned to")), Column("updated_at", _l("Updated"), sortable=True)],
    search_fields=("first_name", "last_name", "email", "phone"),
    filters=[Filter("mine", _l("Only mine"), "owner"), Filter("account", _l("Account"), "account")],
    detail_fields=[("first_name", _l("First name")), ("last_name", _l("Last name")),
                   ("title_text", _l("Job title")), ("account", _l("Account")), ("email", _l("E-mail")),
                   ("phone", _l("Phone")), ("owner", _l("Assigned to")), ("description", _l("Description"))],
    related=[Related("opportunity", Opportunity, "contact"), Related("ticket", Ticket, "contact")],
)
bp = make_blueprint(module)
