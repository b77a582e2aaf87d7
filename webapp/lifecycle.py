"""Administration → Deleted items (R-15), and the read-only end of the licence (R-16).

The boss sees every deleted record and attachment still within ``[retention] undo_days``,
brings one back, or destroys it for good after typing its name. Every page here answers
404 to a seat without administration rights. The work is done by appliance/lifecycle.py.

While the licence is in its grace period (and after it), :func:`refuse_writes` turns every
POST away except logging in and out, the boss's data export and what keeps the seats safe
(suspending or disabling a seat, acknowledging a notice), and :func:`licence_banner` gives
every page the date the data is destroyed. Both read the settings and today's date only (after
the grace period, one query: whether the data was destroyed yet).
"""

from __future__ import annotations

from flask import Blueprint, abort, current_app, flash, g, jsonify, redirect, render_template, request, url_for
from flask_babel import gettext as _
from flask_wtf import FlaskForm
from wtforms import StringField
from wtforms.validators import DataRequired, Length

from appliance import lifecycle
from webapp import permissions
from webapp.i18n import lazy_gettext as _l

bp = Blueprint("lifecycle", __name__, url_prefix="/admin/deleted")

SHOWN = 500  # items on the page; retention keeps the list short
# What a read-only appliance still accepts: signing in and out, the language, the export, and
# the boss's seat safety (suspend a stolen seat, acknowledge notices; admin.change_seats with
# action=disable only: removing seats hands their records over).
WRITABLE_WHEN_READ_ONLY = {"auth.login", "auth.logout", "auth.locale", "auth.set_password", "admin.data_export",
                           "admin.suspend", "admin.acknowledge"}
# Blueprints only the boss sees: anyone else gets their 404 before the licence's 403.
ADMIN_BLUEPRINTS = ("admin", "company", "lifecycle", "sla")


def _settings():
    return current_app.extensions["crm_settings"]


@bp.before_request
def _admins_only():
    permissions.require_admin(g.user)


def kind_name(entity: str) -> str:
    from webapp.i18n import ENTITY_NAMES

    return str(ENTITY_NAMES.get(entity, entity))


@bp.route("/")
def index():
    """Deleted records and attachments, newest deletion first, each with Undo and Destroy."""
    items = lifecycle.deleted_items(_settings())
    return render_template("admin/deleted.html", items=items[:SHOWN], more=max(0, len(items) - SHOWN),
                           undo_days=_settings().retention.undo_days, kind_name=kind_name)


def _item_or_404(entity: str, record_id: int) -> lifecycle.DeletedItem:
    """:raise 404: unknown kind, or nothing deleted by that number."""
    item = lifecycle.deleted_item(_settings(), entity, record_id) if permissions.valid_id(record_id) else None
    if item is None:
        abort(404)
    return item


@bp.route("/<entity>/<int:record_id>/undo", methods=["POST"])
def undo(entity: str, record_id: int):
    """Bring the item back where it was; an attachment only if it still fits the quota."""
    item = _item_or_404(entity, record_id)
    try:
        lifecycle.undo(_settings(), g.user, entity, record_id)
    except lifecycle.LifecycleError as exc:
        flash(str(exc), "error")
    else:
        flash(_("%(kind)s “%(name)s” is back.", kind=kind_name(entity), name=item.title), "success")
    return redirect(url_for("lifecycle.index"))


class DestroyForm(FlaskForm):
    name = StringField(_l("Type the name to confirm"), validators=[DataRequired(), Length(max=300)],
                       render_kw={"autocomplete": "off"})


@bp.route("/<entity>/<int:record_id>/destroy", methods=["GET", "POST"])
def destroy(entity: str, record_id: int):
    """Destroy the item for good once its name is typed exactly; a wrong name changes nothing."""
    item = _item_or_404(entity, record_id)
    form = DestroyForm()
    status = 200
    if form.validate_on_submit():
        try:
            destroyed = lifecycle.destroy(_settings(), g.user, entity, record_id, form.name.data)
        except lifecycle.LifecycleError as exc:
            form.name.errors.append(str(exc))
            status = 400
        else:
            flash(_("%(kind)s “%(name)s” was destroyed: %(rows)d rows removed, %(files)d files overwritten.",
                    kind=kind_name(entity), name=item.title, rows=destroyed.total, files=destroyed.files), "success")
            return redirect(url_for("lifecycle.index"))
    elif form.errors:
        status = 400
    return render_template("admin/destroy.html", form=form, item=item, kind_name=kind_name), status


# ----------------------------------------------------------------------------- the licence's end


def _writable_when_read_only() -> bool:
    if request.endpoint in WRITABLE_WHEN_READ_ONLY:
        return True
    return request.endpoint == "admin.change_seats" and request.form.get("action") == "disable"


def refuse_writes():
    """Before every request: while the licence is in grace or ended, a POST other than those of
    :data:`WRITABLE_WHEN_READ_ONLY` gets a 403 saying why (JSON to a script asking for it).
    None lets the request through."""
    if request.method in ("GET", "HEAD", "OPTIONS") or request.endpoint is None:  # no such page: its 404
        return None
    lic = lifecycle.licence_state(_settings())
    if not lic.read_only:
        return None
    if request.blueprint in ADMIN_BLUEPRINTS:
        permissions.require_admin(g.user)  # as outside grace: not there for anyone but the boss
    if _writable_when_read_only():
        return None
    if lic.state == "grace":
        message = _("The licence ended on %(expires)s. The data is read-only and will be destroyed on %(date)s. "
                    "The boss can still export all data (Administration → Export all data).",
                    expires=lic.expires.isoformat(), date=lic.destroy_on.isoformat())
    elif (purged := lifecycle.purged_on(_settings(), lic)) is not None:
        message = _("The licence ended on %(expires)s and its grace period is over: the customer data was "
                    "destroyed on %(date)s. Nothing can be changed.",
                    expires=lic.expires.isoformat(), date=purged.isoformat())
    else:
        message = _("The licence ended on %(expires)s and its grace period is over: the data is read-only and "
                    "will be destroyed at the scheduler's next retention run. The boss can still export all "
                    "data (Administration → Export all data).", expires=lic.expires.isoformat())
    if request.accept_mimetypes.best == "application/json":  # the pipeline board's card move
        return jsonify(error=message), 403
    return render_template("error.html", code=403, title=_("The licence has ended"), message=message), 403


def licence_banner() -> dict:
    """``licence_banner``: the text every page shows while the licence is in grace or ended,
    and the boss's reminder in the last 30 days before it expires."""
    lic = lifecycle.licence_state(_settings())
    if lic.state == "grace":
        text = _("The licence ended on %(expires)s: the CRM is read-only, and all data will be destroyed on "
                 "%(date)s. The boss can export it until then.",
                 expires=lic.expires.isoformat(), date=lic.destroy_on.isoformat())
    elif lic.state == "ended" and (purged := lifecycle.purged_on(_settings(), lic)) is not None:
        text = _("The licence ended on %(expires)s; the customer data was destroyed on %(date)s.",
                 expires=lic.expires.isoformat(), date=purged.isoformat())
    elif lic.state == "ended":
        text = _("The licence ended on %(expires)s and its grace period is over: the CRM is read-only, and the "
                 "customer data will be destroyed at the scheduler's next retention run.",
                 expires=lic.expires.isoformat())
    elif lic.state == "expiring" and getattr(g, "user", None) is not None and g.user.role.is_admin:
        text = _("The licence expires on %(expires)s. Then the CRM becomes read-only, and the data is destroyed "
                 "on %(date)s unless the licence is renewed.",
                 expires=lic.expires.isoformat(), date=lic.destroy_on.isoformat())
    else:
        return {}
    return {"licence_banner": text}
