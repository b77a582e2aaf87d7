"""Activities: tasks, calls and meetings with a due time and status, linked to any record."""

from webapp.crud import Column, Filter, Module, make_blueprint
from webapp.forms import ActivityForm
from webapp.i18n import lazy_gettext as _l
from webapp.models import ACTIVITY_KINDS, ACTIVITY_STATUSES, Activity

module = Module(
    entity="activity", model=Activity, form=ActivityForm, url_prefix="/activities",
    columns=[Column("subject", _l("Subject"), sortable=True), Column("kind", _l("Type"), sortable=True),
             Column("status", _l("Status"), sortable=True), Column("due_at", _l("Due")),
             Column("owner", _l("Assigned to")), Column("updated_at", _l("Updated"), sortable=True)],
    search_fields=("subject",),
    filters=[Filter("mine", _l("Only mine"), "owner"), Filter("status", _l("Status"), "status", ACTIVITY_STATUSES),
             Filter("kind", _l("Type"), "kind", ACTIVITY_KINDS)],
    detail_fields=[("kind", _l("Type")), ("subject", _l("Subject")), ("due_at", _l("Due")),
                   ("status", _l("Status")), ("owner", _l("Assigned to")), ("description", _l("Description"))],
)
bp = make_blueprint(module)

