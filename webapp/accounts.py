"""Accounts: the customer companies (R-5)."""

from webapp.crud import Column, Filter, Module, Related, make_blueprint
from webapp.forms import AccountForm
from webapp.i18n import lazy_gettext as _l
from webapp.models import Account, Contact, Opportunity, Ticket

module = Module(
    entity="account", model=Account, form=AccountForm, url_prefix="/accounts",
    columns=[Column("name", _l("Name"), sortable=True), Column("city", _l("City")),
             Column("industry", _l("Industry")), Column("phone", _l("Phone")),
             Column("owner", _l("Assigned to")), Column("updated_at", _l("Updated"), sortable=True)],
    search_fields=("name", "email", "phone", "city"),
    filters=[Filter("mine", _l("Only mine"), "owner")],
    detail_fields=[("name", _l("Name")), ("industry", _l("Industry")), ("website", _l("Website")),
                   ("email", _l("E-mail")), ("phone", _l("Phone")), ("city", _l("City")),
                   ("country", _l("Country")), ("owner", _l("Assigned to")), ("description", _l("Description"))],
    related=[Related("contact", Contact, "account"), Related("opportunity", Opportunity, "account"),
             Related("ticket", Ticket, "account")],
)
bp = make_blueprint(module)
