"""The company profile with its business licence (R-11) and announcements to every seat
(R-2, R-13). Boss pages under /admin; everyone else gets 404.

Once the profile is marked certified, the fields printed on the business licence (name,
registration number, legal representative, address) are locked: a change is refused and
the attempt is written to the audit log. The other fields stay editable.

An announcement is a banner every seat sees from its start to its end (for example a
planned maintenance, with its window in the text), and is e-mailed once to every active
seat when ``[smtp]`` is set up.
"""

from __future__ import annotations

import datetime as dt
import logging
import threading
import time
import zoneinfo

from flask import Blueprint, abort, current_app, flash, g, redirect, render_template, request, url_for
from flask_babel import gettext as _
from flask_babel import to_utc
from flask_wtf import FlaskForm
from wtforms import BooleanField, DateTimeLocalField, StringField, TextAreaField
from wtforms.validators import DataRequired, Length, Optional, ValidationError

from appliance import attachments as store
from appliance.errors import ApplianceError
from webapp import audit, permissions
from webapp.attachments import send_stored
from webapp.i18n import lazy_gettext as _l
from webapp.models import Announcement, Attachment, CompanyProfile, User, database, utcnow

bp = Blueprint("company", __name__, url_prefix="/admin")
log = logging.getLogger(__name__)

#: The fields printed on the business licence: locked once certified.
CERTIFIED_FIELDS = ("name", "registration_number", "legal_representative", "address")
LICENCE_TYPES = ("pdf", "png", "jpg", "jpeg")
PROFILE_ID = 1


class AnnouncementError(ApplianceError):
    """An announcement cannot be posted as given."""


class CertifiedError(ApplianceError):
    """A change to what certification locks (the licence scan) is refused; the attempt is audited."""


@bp.before_request
def _admins_only():
    permissions.require_admin(g.user)


def _settings():
    return current_app.extensions["crm_settings"]


# ----------------------------------------------------------------------------- company profile

# The unified social credit code (统一社会信用代码, GB 32100-2015): 18 characters from this
# alphabet, the last a check character over the first 17.
_USCC_ALPHABET = "0123456789ABCDEFGHJKLMNPQRTUWXY"
_USCC_WEIGHTS = (1, 3, 9, 27, 19, 26, 16, 17, 20, 29, 25, 13, 8, 24, 10, 30, 28)


def uscc_is_valid(code: str) -> bool:
    if len(code) != 18 or any(ch not in _USCC_ALPHABET for ch in code):
        return False
    total = sum(_USCC_ALPHABET.index(ch) * w for ch, w in zip(code[:17], _USCC_WEIGHTS))
    return _USCC_ALPHABET[(31 - total % 31) % 31] == code[17]


def _registration_number(form, field):
    """An 18-character code must be a valid unified social credit code; anything else (a
    registration outside mainland China) is taken as written."""
    value = (field.data or "").strip().upper()
    field.data = value
    if len(value) == 18 and value.isalnum() and not uscc_is_valid(value):
        raise ValidationError(_l("This is not a valid unified social credit code: check each character "
                                 "against the business licence (the last one is a check character)."))


LABELS = {
    "name": _l("Company name"),
    "registration_number": _l("Registration number (unified social credit code)"),
    "legal_representative": _l("Legal representative"),
    "address": _l("Registered address"),
    "phone": _l("Phone"),
    "website": _l("Website"),
}


class ProfileForm(FlaskForm):
    name = StringField(LABELS["name"], validators=[DataRequired(), Length(max=200)])
    registration_number = StringField(LABELS["registration_number"],
                                      validators=[Optional(), Length(max=50), _registration_number])
    legal_representative = StringField(LABELS["legal_representative"], validators=[Optional(), Length(max=100)])
    address = StringField(LABELS["address"], validators=[Optional(), Length(max=300)])
    phone = StringField(LABELS["phone"], validators=[Optional(), Length(max=50)])
    website = StringField(LABELS["website"], validators=[Optional(), Length(max=200)])


def profile() -> CompanyProfile:
    found = CompanyProfile.get_or_none(CompanyProfile.id == PROFILE_ID)
    return found if found is not None else CompanyProfile(id=PROFILE_ID)


def licence_files() -> list[Attachment]:
    return list(Attachment.select().where(Attachment.parent_type == "company", Attachment.parent_id == PROFILE_ID,
                                          Attachment.deleted_at.is_null()).order_by(Attachment.id.desc()))


def _locked_profile() -> CompanyProfile:
    """The profile row, locked (FOR UPDATE) until the caller's transaction ends, and created
    empty if there is none yet: a save, a certification and a change of the licence scan are
    decided one after the other, each on the row as the one before left it."""
    CompanyProfile.insert(id=PROFILE_ID).on_conflict_ignore().execute()
    return CompanyProfile.select().where(CompanyProfile.id == PROFILE_ID).for_update().get()


def save_profile(actor: User, values: dict) -> tuple[dict, list[str]]:
    """Apply the changes allowed: returns (changes made, certified fields whose change was refused).

    A refused change is audited as such, with the value that was asked for.
    """
    with database.atomic():
        record = _locked_profile()
        locked = record.certified_at is not None
        changes, refused = {}, []
        for name, value in values.items():
            old = getattr(record, name) or ""
            if value == old:
                continue
            if locked and name in CERTIFIED_FIELDS:
                refused.append(name)
                continue
            changes[name] = [old, value]
            setattr(record, name, value)
        if changes:
            record.updated_at = utcnow()
            record.save()
            audit.write_row(actor, "company", PROFILE_ID, "update", changes)
        if refused:
            audit.write_row(actor, "company", PROFILE_ID, "refused",
                            {name: [getattr(record, name), values[name]] for name in refused})
    return changes, refused


@bp.route("/company", methods=["GET", "POST"])
def company():
    record = profile()
    form = ProfileForm(obj=record)
    status = 200
    if form.validate_on_submit():
        values = {name: (form[name].data or "").strip() for name in form.data if name != "csrf_token"}
        changes, refused = save_profile(g.user, values)
        if refused:
            flash(_("The company is certified: %(fields)s cannot be changed. The attempt was recorded in the "
                    "audit log.", fields=", ".join(str(LABELS[n]) for n in refused)), "error")
        if changes:
            flash(_("Saved."), "success")
        elif not refused:
            flash(_("Nothing changed."), "success")
        return redirect(url_for("company.company"))
    if form.errors:
        status = 400
    return render_template("admin/company.html", form=form, record=record, files=licence_files(),
                           locked=CERTIFIED_FIELDS if record.certified_at else (),
                           can_certify=_missing_for_certification(record)), status


def _missing_for_certification(record: CompanyProfile) -> list[str]:
    """What still has to be filled in before the profile can be certified (empty: ready)."""
    missing = [str(LABELS[n]) for n in CERTIFIED_FIELDS if not getattr(record, n)]
    if not licence_files():
        missing.append(str(_l("the business licence scan")))
    return missing


def add_licence_scan(settings, actor: User, filename: str, stream) -> Attachment:
    """Keep an uploaded scan of the business licence on the profile, unless it is certified.

    :raise CertifiedError: certified (the attempt is audited, nothing is stored).
    :raise AttachmentError: type or quota refused.
    """
    incoming = store.receive(settings, stream)  # before the row lock: an upload may take a while
    row = None
    try:
        with database.atomic():
            record = _locked_profile()
            if record.certified_at is None:
                row = store.attach(settings, actor, actor, "company", PROFILE_ID, filename, incoming, is_boss=True)
            else:
                audit.write_row(actor, "company", PROFILE_ID, "refused",
                                {"licence": [_scan_names(), filename[:255]]})
    finally:
        incoming.path.unlink(missing_ok=True)  # attach() consumed it, or it was refused
    if row is not None:
        store.tell_boss(settings, row.pending_notice)  # committed now: no mail about a rolled-back scan
        return row
    raise CertifiedError(_l("The company is certified: the business licence cannot be replaced. The attempt "
                            "was recorded in the audit log."))


def remove_licence_scan(actor: User, row: Attachment) -> None:
    """Delete a wrongly uploaded scan (to Deleted items, like any file), unless certified.

    :raise CertifiedError: certified (the attempt is audited, the scan stays).
    """
    with database.atomic():
        if _locked_profile().certified_at is None:
            store.soft_delete(actor, row)
            return
        audit.write_row(actor, "company", PROFILE_ID, "refused", {"licence": [_scan_names(), None]})
    raise CertifiedError(_l("The company is certified: the business licence scan cannot be removed. The attempt "
                            "was recorded in the audit log."))


def _scan_names() -> str:
    return ", ".join(f.filename for f in licence_files())


def _licence_file_or_404(attachment_id: int) -> Attachment:
    if not permissions.valid_id(attachment_id):
        abort(404)
    row = Attachment.get_or_none(Attachment.id == attachment_id, Attachment.parent_type == "company",
                                 Attachment.deleted_at.is_null())
    if row is None:
        abort(404)
    return row


@bp.route("/company/licence", methods=["POST"])
def upload_licence():
    """The scan of the business licence: PDF or an image, kept as an attachment on the profile."""
    upload = request.files.get("file")
    if upload is None or not upload.filename:
        flash(_("Choose a file to attach."), "error")
    elif upload.filename.rpartition(".")[2].lower() not in LICENCE_TYPES:
        flash(_("The business licence must be a PDF, PNG or JPEG file."), "error")
    else:
        try:
            row = add_licence_scan(_settings(), g.user, upload.filename, upload.stream)
        except ApplianceError as exc:  # certified, or the type or quota refused
            flash(str(exc), "error")
        else:
            flash(_("%(name)s attached.", name=row.filename), "success")
    return redirect(url_for("company.company"))


@bp.route("/company/licence/<int:attachment_id>")
def licence_file(attachment_id: int):
    return send_stored(_licence_file_or_404(attachment_id))


@bp.route("/company/licence/<int:attachment_id>/delete", methods=["POST"])
def delete_licence_file(attachment_id: int):
    row = _licence_file_or_404(attachment_id)
    try:
        remove_licence_scan(g.user, row)
    except CertifiedError as exc:
        flash(str(exc), "error")
    else:
        flash(_("%(name)s deleted.", name=row.filename), "success")
    return redirect(url_for("company.company"))


def certify_profile(actor: User) -> list[str]:
    """Mark the profile certified, unless it already is; returns what is still missing
    (nothing: certified). Decided on the locked row, so a save that read the profile before
    cannot write the certification back out."""
    with database.atomic():
        record = _locked_profile()
        missing = _missing_for_certification(record)
        if record.certified_at is None and not missing:
            record.certified_at, record.certified_by = utcnow(), actor.email
            record.save()
            audit.write_row(actor, "company", PROFILE_ID, "certify",
                            {n: [None, getattr(record, n)] for n in CERTIFIED_FIELDS})
    return missing


@bp.route("/company/certify", methods=["POST"])
def certify():
    """Mark the profile certified: from then on the licence fields are locked (R-11)."""
    if profile().certified_at is not None:
        flash(_("The company is already certified."), "success")
    elif missing := certify_profile(g.user):
        flash(_("Fill in %(fields)s before certifying.", fields=", ".join(missing)), "error")
    else:
        flash(_("The company is certified; its licence details are now locked."), "success")
    return redirect(url_for("company.company"))


# ----------------------------------------------------------------------------- announcements

class AnnouncementForm(FlaskForm):
    message = TextAreaField(_l("Message"), validators=[DataRequired(), Length(max=2000)],
                            render_kw={"rows": 3, "maxlength": 2000})
    starts_at = DateTimeLocalField(_l("Shown from"), format="%Y-%m-%dT%H:%M", validators=[DataRequired()])
    ends_at = DateTimeLocalField(_l("Shown until"), format="%Y-%m-%dT%H:%M", validators=[DataRequired()])
    email = BooleanField(_l("Also send it by e-mail to every active seat"), default=True)

    def validate_ends_at(self, field):
        if self.starts_at.data and field.data and field.data <= self.starts_at.data:
            raise ValidationError(_l("The end must be after the start."))


_current_cache: dict = {"at": 0.0, "rows": []}
_CACHE_SECONDS = 15  # every page shows the banner: one query per process every 15 s, not per page


def current_announcements() -> list[Announcement]:
    """The announcements to show now (each web process re-reads them every few seconds)."""
    if time.monotonic() - _current_cache["at"] > _CACHE_SECONDS:
        now = utcnow()
        _current_cache["rows"] = list(Announcement.select().where(
            Announcement.withdrawn_at.is_null(), Announcement.ends_at > now).order_by(Announcement.starts_at))
        _current_cache["at"] = time.monotonic()
    now = utcnow()
    return [a for a in _current_cache["rows"] if a.starts_at <= now < a.ends_at]


def _forget_cached() -> None:
    _current_cache["at"] = 0.0


def post_announcement(settings, actor: User | str, message: str, starts_at: dt.datetime, ends_at: dt.datetime,
                      email: bool, wait: bool = False) -> Announcement:
    """Record an announcement (times in naive UTC) and, if asked and SMTP is set up, mail it to
    every active seat: in the background (the page does not wait for the mail server) unless
    ``wait``. :raise AnnouncementError: empty, too long, or ending before it starts."""
    message = (message or "").strip()
    if not message or len(message) > 2000:
        raise AnnouncementError(_l("The message must have 1 to 2000 characters."))
    if ends_at <= starts_at:
        raise AnnouncementError(_l("The end must be after the start."))
    with database.atomic():
        row = Announcement.create(message=message, starts_at=starts_at, ends_at=ends_at,
                                  created_by=actor.email if isinstance(actor, User) else str(actor))
        audit.write_row(actor, "announcement", row.id, "create",
                        {"message": [None, row.message], "starts_at": [None, audit.jsonable(starts_at)],
                         "ends_at": [None, audit.jsonable(ends_at)]})
    _forget_cached()
    if email and settings.smtp.host:
        if wait:
            mail_announcement(settings, row.id)
        else:
            threading.Thread(target=_mail_in_background, args=(settings, row.id), name="announcement-mail",
                             daemon=True).start()
    return row


def _mail_in_background(settings, announcement_id: int) -> None:
    try:
        with database.connection_context():
            mail_announcement(settings, announcement_id)
    except Exception:  # noqa: BLE001 - a thread of its own: log it; the banner is shown regardless
        log.exception("announcement %s could not be mailed", announcement_id)


def mail_announcement(settings, announcement_id: int) -> bool:
    """Mail one announcement to every active seat; True (and emailed_at set) once sent."""
    from appliance.notices import send_mail

    row = Announcement.get_by_id(announcement_id)
    recipients = [u.email for u in User.select(User.email).where(User.active).order_by(User.email)]
    subject = " ".join(row.message.split())
    subject = f"[CRM] {subject if len(subject) <= 60 else subject[:59] + '…'}"
    zone = zoneinfo.ZoneInfo(settings.web.timezone)

    def local(at: dt.datetime) -> str:
        return at.replace(tzinfo=dt.timezone.utc).astimezone(zone).strftime("%Y-%m-%d %H:%M")

    body = (f"{row.message}\n\n(Shown in the CRM from {local(row.starts_at)} to {local(row.ends_at)}, "
            f"{settings.web.timezone} time.)\n")
    if not recipients or not send_mail(settings, recipients, subject, body):
        return False
    row.emailed_at = utcnow()
    row.save()
    return True


@bp.route("/announcements", methods=["GET", "POST"])
def announcements():
    form = AnnouncementForm()
    status = 200
    if request.method == "GET":
        # Shown from now (in the seat's zone, minutes only) for a day, unless changed.
        from flask_babel import to_user_timezone

        start = to_user_timezone(dt.datetime.now(dt.timezone.utc)).replace(second=0, microsecond=0, tzinfo=None)
        form.starts_at.data, form.ends_at.data = start, start + dt.timedelta(days=1)
    elif form.validate_on_submit():
        starts = to_utc(form.starts_at.data).replace(tzinfo=None)
        ends = to_utc(form.ends_at.data).replace(tzinfo=None)
        post_announcement(_settings(), g.user, form.message.data, starts, ends, form.email.data)
        flash(_("Announcement posted."), "success")
        return redirect(url_for("company.announcements"))
    else:
        status = 400
    rows = list(Announcement.select().order_by(Announcement.created_at.desc()).limit(50))
    return render_template("admin/announcements.html", form=form, rows=rows, now=utcnow(),
                           smtp=bool(_settings().smtp.host)), status


@bp.route("/announcements/<int:announcement_id>/withdraw", methods=["POST"])
def withdraw(announcement_id: int):
    if not permissions.valid_id(announcement_id):
        abort(404)
    if Announcement.get_or_none(Announcement.id == announcement_id) is None:
        abort(404)
    withdraw_announcement(g.user, announcement_id)
    flash(_("Announcement withdrawn."), "success")
    return redirect(url_for("company.announcements"))


def withdraw_announcement(actor: User | str, announcement_id: int) -> Announcement:
    """Take a banner down (audited); withdrawing twice changes nothing.

    :raise AnnouncementError: no such announcement."""
    row = Announcement.get_or_none(Announcement.id == announcement_id)
    if row is None:
        raise AnnouncementError(_l("There is no announcement %(id)d; list them with: crm-appliance announce list",
                                   id=announcement_id))
    if row.withdrawn_at is None:
        with database.atomic():
            row.withdrawn_at = utcnow()
            row.save()
            audit.write_row(actor, "announcement", row.id, "withdraw",
                            {"withdrawn_at": [None, audit.jsonable(row.withdrawn_at)]})
        _forget_cached()
    return row


@bp.app_context_processor
def banner_context() -> dict:
    """For every page: the announcements to show (seat users only; not on the login page)."""
    user = g.get("user")
    if user is None:
        return {}
    try:
        return {"announcements": current_announcements()}
    except Exception:  # noqa: BLE001 - a banner must never take a page down with it
        log.exception("announcements could not be read")
        return {}
