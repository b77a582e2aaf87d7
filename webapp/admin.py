"""Administration for the boss: seats, roles, the audit and login logs (R-6, R-7, R-10), and the
notices the appliance leaves (a failed scheduler job) with the scheduler's job history.

Every page here answers 404 to a seat without administration rights, as if it
did not exist.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import json
import logging
import os
import re
import threading
from pathlib import Path

import psutil
from flask import Blueprint, abort, current_app, flash, g, redirect, render_template, request, send_file, url_for
from flask_babel import gettext as _
from flask_babel import to_utc
from flask_wtf import FlaskForm
from flask_wtf.file import FileField
from wtforms import EmailField, SelectField, StringField, TextAreaField
from wtforms.fields.choices import SelectChoice
from wtforms.validators import DataRequired, Length, Optional

from appliance import seats
from appliance.attachments import shred
from appliance.files import write_private
from appliance.errors import SeatError
from webapp import audit, permissions
from webapp.crud import escape_like
from webapp.i18n import AUDIT_ACTIONS, ENTITY_NAMES
from webapp.i18n import lazy_gettext as _l
from webapp.models import AuditLog, JobRun, LoginLog, Notice, Role, Team, User, database, utcnow

bp = Blueprint("admin", __name__, url_prefix="/admin")
log = logging.getLogger(__name__)

PAGE = 100


@bp.before_request
def _admins_only():
    permissions.require_admin(g.user)


class SeatForm(FlaskForm):
    email = EmailField(_l("E-mail"), validators=[DataRequired(), Length(max=254)])
    name = StringField(_l("Name"), validators=[DataRequired(), Length(max=100)])
    role = SelectField(_l("Role"), validators=[DataRequired()])
    team = StringField(_l("Team"), validators=[Optional(), Length(max=100)])


def _role_choices():
    from webapp.i18n import ROLE_NAMES

    return [SelectChoice(r.name, ROLE_NAMES.get(r.name, r.name)) for r in Role.select().order_by(Role.name)]


def _settings():
    return current_app.extensions["crm_settings"]


@bp.route("/seats", methods=["GET", "POST"])
def seat_list():
    """All seats; add one (its set-password link is shown once, here)."""
    form = SeatForm()
    form.role.choices = _role_choices()
    new_link = None
    if form.validate_on_submit():
        try:
            created = seats.add_seat(_settings(), form.email.data, form.name.data, form.role.data, form.team.data)
        except SeatError as exc:
            form.email.errors.append(str(exc))
        else:
            audit.write_row(g.user, "user", created.user.id, "create",
                            {"email": [None, created.user.email], "role": [None, form.role.data]})
            new_link = {"email": created.user.email, "link": created.link, "expires_at": created.expires_at,
                        "new_teams": seats.new_teams([created])}
            form = SeatForm(formdata=None)
            form.role.choices = _role_choices()
    rows = seats.list_seats()
    licensed = _settings().seats.licensed
    active = sum(1 for r in rows if r["active"])
    return render_template("admin/seats.html", form=form, rows=rows, new_link=new_link, licensed=licensed,
                           active=active), 400 if form.errors else 200


class BulkSeatsForm(FlaskForm):
    text = TextAreaField(_l("Seats"), validators=[Optional(), Length(max=200_000)],
                         render_kw={"rows": 12, "placeholder": "email,name,role,team\nli.wei@example.cn,Li Wei,agent,East"})
    file = FileField(_l("Or a CSV file"), render_kw={"accept": ".csv,text/csv"})


MAX_SEATS_FILE = 1024 * 1024  # a hundred seats fit in a few kilobytes


@bp.route("/seats/bulk", methods=["GET", "POST"])
def bulk_seats():
    """Add up to 100 seats at once, pasted (CSV, or cells copied from a spreadsheet) or as a
    CSV file; all are added or none, and the links are shown once, here."""
    form = BulkSeatsForm()
    created, status = [], 200
    if form.validate_on_submit():
        upload = form.file.data
        uploaded = bool(upload and upload.filename)
        data = upload.read(MAX_SEATS_FILE + 1) if uploaded else (form.text.data or "").encode()
        source = upload.filename if uploaded else _("the pasted text")
        try:
            if uploaded and (form.text.data or "").strip():
                raise SeatError(_("You both pasted seats and chose a file: choose one, then add the seats again."))
            if len(data) > MAX_SEATS_FILE:
                raise SeatError(_("%(source)s is larger than 1 MB; a hundred seats fit in a few kilobytes",
                                  source=source))
            created = seats.add_seats(_settings(), seats.read_seat_rows(data, source))
        except SeatError as exc:
            form.text.errors.append(str(exc))
            status = 400
        else:
            for new in created:
                audit.write_row(g.user, "user", new.user.id, "create",
                                {"email": [None, new.user.email], "role": [None, new.user.role.name]})
            form = BulkSeatsForm(formdata=None)
    elif form.errors:
        status = 400
    return render_template("admin/seats_bulk.html", form=form, created=created, new_teams=seats.new_teams(created),
                           in_use=seats.in_use(),
                           licensed=_settings().seats.licensed, most=seats.MAX_BULK), status


def _seat_or_404(user_id: int) -> User:
    if not permissions.valid_id(user_id):
        abort(404)
    user = User.get_or_none(User.id == user_id)
    if user is None:
        abort(404)
    return user


@bp.route("/seats/<int:user_id>/suspend", methods=["POST"])
def suspend(user_id: int):
    """End the seat's sessions at once and refuse its logins (a stolen account, R-10)."""
    user = _seat_or_404(user_id)
    if user.id == g.user.id:
        flash(_("You cannot suspend your own seat."), "error")
    elif not user.active:
        flash(_("Seat %(email)s is not active; nothing was changed.", email=user.email), "error")
    else:
        try:
            with database.atomic():
                seats.suspend(user, (request.form.get("reason") or "suspended by the boss")[:200])
                audit.write_row(g.user, "user", user.id, "suspend", {"active": [True, False]})
        except SeatError as exc:
            flash(str(exc), "error")
        else:
            flash(_("Seat %(email)s suspended; its sessions have ended.", email=user.email), "success")
    return redirect(url_for("admin.seat_list"))


@bp.route("/seats/change", methods=["POST"])
def change_seats():
    """Disable, or remove (handing their records to another seat), up to 100 ticked seats."""
    raw_ids = request.form.getlist("seat")
    action = request.form.get("action")
    if action not in ("disable", "remove") or not all(r.isdigit() and permissions.valid_id(int(r)) for r in raw_ids):
        abort(400)
    ids = list(dict.fromkeys(int(r) for r in raw_ids))
    users = list(User.select().where(User.id.in_(ids))) if ids else []
    if not ids:
        flash(_("Tick the seats to change first."), "error")
    elif len(users) < len(ids):
        flash(_("%(n)d of the ticked seats do not exist (any more); nothing was changed. Reload the page and "
                "tick the seats again.", n=len(ids) - len(users)), "error")
    elif len(users) > seats.MAX_BULK:
        flash(_("One operation changes at most %(max)d seats.", max=seats.MAX_BULK), "error")
    elif any(u.id == g.user.id for u in users):
        flash(_("You cannot disable or remove your own seat."), "error")
    elif action == "disable":
        try:
            with database.atomic():
                changed = seats.disable_seats(users, "disabled by the boss")
                for user in changed:
                    audit.write_row(g.user, "user", user.id, "suspend", {"active": [True, False]})
        except SeatError as exc:
            flash(str(exc), "error")
        else:
            flash(_("Seats disabled: %(n)d; their sessions have ended.", n=len(changed)), "success")
    else:
        heir_raw = request.form.get("heir") or ""
        valid = heir_raw.isdigit() and permissions.valid_id(int(heir_raw))
        heir = User.get_or_none(User.id == int(heir_raw)) if valid else None
        if heir is None:
            flash(_("Choose the seat that takes over their records."), "error")
        else:
            try:
                moved = seats.remove_seats(users, heir, g.user)
            except SeatError as exc:
                flash(str(exc), "error")
            else:
                flash(_("Seats removed: %(n)d; records handed to %(email)s: %(records)d.", n=len(users),
                        records=sum(moved.values()), email=heir.email), "success")
    return redirect(url_for("admin.seat_list"))


@bp.route("/seats/<int:user_id>/reactivate", methods=["POST"])
def reactivate(user_id: int):
    """Bring a seat back with a new set-password link, shown once, here: its old password ends."""
    user = _seat_or_404(user_id)
    removed, had_password = seats.is_removed(user), bool(user.password_hash)
    try:
        with database.atomic():
            new = seats.reactivate(_settings(), user)
            audit.write_row(g.user, "user", user.id, "reactivate",
                            {"active": [False, True], "password_set": [had_password, False]})
    except SeatError as exc:
        flash(str(exc), "error")
        return redirect(url_for("admin.seat_list"))
    if removed:
        flash(_("Seat %(email)s is active again, without records: those it had stay with the seats that took "
                "them over. Its old password no longer works.", email=user.email), "success")
    else:
        flash(_("Seat %(email)s is active again. Its old password no longer works.", email=user.email), "success")
    return render_template("admin/link.html", seat=user, link=new.link, expires_at=new.expires_at)


@bp.route("/seats/<int:user_id>/link", methods=["POST"])
def new_link(user_id: int):
    """A fresh one-time set-password link (the old one stops working); the password is never shown."""
    user = _seat_or_404(user_id)
    if not user.active:  # its link would not work (find_token): Reactivate issues one
        flash(_("Seat %(email)s is not active; nothing was changed.", email=user.email), "error")
        return redirect(url_for("admin.seat_list"))
    link, expires = seats.issue_link(_settings(), user)
    audit.write_row(g.user, "user", user.id, "new_link", {})
    return render_template("admin/link.html", seat=user, link=link, expires_at=expires)


# ----------------------------------------------------------------------------- the whole-data export

EXPORTS_KEPT = 3  # older exports are shredded: each holds all the customer's data
_EXPORT_NAME = re.compile(r"^crm-export-\d{8}T\d{6}Z\.zip$")
# The last export's state: {"file", "state": running|done|failed, "pid", "pid_started", "started_at",
# "finished_at", "reason"}.
# One export runs at a time, so the last one is the one that matters.
_STATUS = "export-status.json"


def _export_dir() -> Path:
    folder = _settings().appliance.data_dir / "exports"
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    return folder


def _write_status(folder: Path, status: dict) -> None:
    write_private(folder / _STATUS, json.dumps(status).encode())


def _process_identity() -> dict:
    """This process, as the export's state names it: its pid and when it started, since after
    a reboot another worker may well get the same pid."""
    return {"pid": os.getpid(), "pid_started": psutil.Process().create_time()}


def _still_running(status: dict) -> bool:
    try:
        return psutil.Process(int(status["pid"])).create_time() == status.get("pid_started")
    except (psutil.Error, KeyError, TypeError, ValueError):
        return False


@contextlib.contextmanager
def _export_lock(folder: Path):
    """Held while the state is read or a run started: two tabs (or workers) asking at once
    start one export, and no partial file is taken for a dead run's while a new run starts."""
    with open(folder / ".export.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def _export_status(folder: Path) -> dict | None:
    """The last export's state (see _STATUS), or None before the first; call it under _export_lock.

    A running export whose process is gone (the web server recycled its worker) is failed:
    its partial file is shredded. So is any other partial file of the page's exports, which no
    running export writes.
    """
    try:
        status = json.loads((folder / _STATUS).read_text())
    except (FileNotFoundError, ValueError):
        status = None
    if status and status.get("state") == "running" and not _still_running(status):
        status.update(state="failed", reason="", finished_at=utcnow().isoformat())
        _write_status(folder, status)
    writing = f".{status['file']}.partial" if status and status.get("state") == "running" else None
    for partial in folder.glob(".crm-export-*.zip.partial"):
        if partial.name != writing:
            shred(partial)
    return status


def _run_export(path: Path, settings, status: dict) -> None:
    """Write the export to ``path``, then record its end in ``status`` (as the page started it)."""
    from appliance import attachments, export

    try:
        export.export_all(path, attachments_dir=attachments.store_dir(settings))
    except Exception as exc:  # noqa: BLE001 - a thread of its own: the page shows the reason
        log.exception("the whole-data export to %s failed", path)
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
        status.update(state="failed", reason=reason)
    else:
        status.update(state="done")
    _write_status(path.parent, dict(status, finished_at=utcnow().isoformat()))
    finished = sorted((p for p in path.parent.iterdir() if _EXPORT_NAME.match(p.name)), reverse=True)
    for old in finished[EXPORTS_KEPT:]:
        shred(old)


@bp.route("/export", methods=["GET", "POST"])
def data_export():
    """All the customer's data in one ZIP (as ``crm-appliance export``), built in the
    background under the data directory, then downloaded from here; the newest few are kept."""
    folder = _export_dir()
    if request.method == "POST":
        with _export_lock(folder):
            status = _export_status(folder)
            if status and status["state"] == "running":
                flash(_("An export is being written already; it appears below when it is complete."), "error")
            else:
                name = f"crm-export-{utcnow():%Y%m%dT%H%M%SZ}.zip"
                audit.write_row(g.user, "export", 0, "export_all", {"file": [None, name]})
                # Written before the thread starts, so that the next request sees it running.
                status = {"file": name, "state": "running", **_process_identity(), "started_at": utcnow().isoformat()}
                _write_status(folder, status)
                threading.Thread(target=_run_export, args=(folder / name, _settings(), status), name="data-export",
                                 daemon=True).start()
                flash(_("The export is being written; reload this page in a minute to download it."), "success")
        return redirect(url_for("admin.data_export"))
    with _export_lock(folder):
        status = _export_status(folder)
    files = [{"name": p.name, "bytes": p.stat().st_size,
              "at": dt.datetime.fromtimestamp(p.stat().st_mtime, dt.timezone.utc).replace(tzinfo=None)}
             for p in sorted(folder.iterdir(), reverse=True) if _EXPORT_NAME.match(p.name)]
    return render_template("admin/export.html", files=files, running=bool(status and status["state"] == "running"),
                           failed=dict(status, at=dt.datetime.fromisoformat(status["started_at"]))
                           if status and status["state"] == "failed" else None)


@bp.route("/export/<name>")
def download_export(name: str):
    if not _EXPORT_NAME.match(name):
        abort(404)
    path = _export_dir() / name
    if not path.is_file():
        abort(404)
    audit.write_row(g.user, "export", 0, "download", {"file": [None, name]})
    return send_file(path, as_attachment=True, download_name=name, mimetype="application/zip")


@bp.route("/quota")
def quota():
    """Attachment space: used, remaining, and use per seat (R-9: the boss alone sees these)."""
    from appliance import attachments

    settings = _settings()
    return render_template("admin/quota.html", usage=attachments.usage(settings),
                           licensed=settings.seats.licensed, per_seat_mb=settings.attachments.per_seat_mb)


@bp.route("/roles")
def roles():
    return render_template("admin/roles.html", roles=list(Role.select().order_by(Role.name)),
                           entities=permissions.ENTITIES, actions=permissions.ACTIONS,
                           teams=list(Team.select().order_by(Team.name)))


def _date_arg(name: str, end_of_day: bool = False) -> dt.datetime | None:
    """A YYYY-MM-DD filter in the appliance's time zone, as naive UTC; None if absent, 400 if malformed."""
    raw = (request.args.get(name) or "").strip()
    if not raw:
        return None
    try:
        day = dt.date.fromisoformat(raw[:10])
    except ValueError:
        abort(400, _("Dates are written like 2026-01-31."))
    start = dt.datetime.combine(day, dt.time.min)
    if end_of_day:
        start += dt.timedelta(days=1)
    return to_utc(start)


def _log_page(query, model) -> dict:
    """Apply the from/to dates and the ``before`` id of a log page; newest first, one page."""
    since, until = _date_arg("from"), _date_arg("to", end_of_day=True)
    if since:
        query = query.where(model.at >= since)
    if until:
        query = query.where(model.at < until)
    raw = request.args.get("before", "")
    if raw:
        if not raw.isdigit() or int(raw) > 2**63 - 1:
            abort(400, _("The page link is damaged; go back to the first page."))
        query = query.where(model.id < int(raw))
    rows = list(query.order_by(model.id.desc()).limit(PAGE + 1))
    more = len(rows) > PAGE
    return {"rows": rows[:PAGE], "more": more, "next_before": rows[PAGE - 1].id if more else None}


@bp.route("/audit")
def audit_log():
    """Filter the audit log by actor, entity, record, action and dates; newest first, paged by id."""
    query = AuditLog.select()
    args = request.args
    if args.get("actor"):
        query = query.where(AuditLog.actor ** f"%{escape_like(args['actor'][:254])}%")
    if args.get("entity"):
        query = query.where(AuditLog.entity == args["entity"][:20])
    if args.get("record_id"):
        if not args["record_id"].isdigit() or not permissions.valid_id(int(args["record_id"])):
            abort(400, _("A record number is a positive whole number."))
        query = query.where(AuditLog.record_id == int(args["record_id"]))
    if args.get("action"):
        query = query.where(AuditLog.action == args["action"][:20])
    page = _log_page(query, AuditLog)
    return render_template("admin/audit.html", **page, changes=audit.readable_changes(page["rows"]),
                           entities=sorted(ENTITY_NAMES), actions=AUDIT_ACTIONS)


@bp.route("/logins")
def login_log():
    """Filter the login log by e-mail, outcome and dates (R-7: login logs for audits)."""
    query = LoginLog.select()
    args = request.args
    if args.get("email"):
        query = query.where(LoginLog.email ** f"%{escape_like(args['email'][:254])}%")
    if args.get("outcome") in ("ok", "failed"):
        query = query.where(LoginLog.success == (args["outcome"] == "ok"))
    return render_template("admin/logins.html", **_log_page(query, LoginLog))


@bp.app_context_processor
def _open_notices():
    """How many notices wait for the boss, for the navigation (one indexed count, admins only)."""
    user = g.get("user")
    if user is None or not user.role.is_admin:
        return {}
    return {"open_notices": Notice.select().where(Notice.acknowledged_at.is_null()).count()}


@bp.route("/notices")
def notices():
    """Open notices first, then the last acknowledged ones; and the scheduler's latest job runs."""
    open_rows = list(Notice.select().where(Notice.acknowledged_at.is_null()).order_by(Notice.created_at.desc()))
    done = list(Notice.select().where(Notice.acknowledged_at.is_null(False))
                .order_by(Notice.acknowledged_at.desc()).limit(20))
    jobs = list(JobRun.select().order_by(JobRun.started_at.desc(), JobRun.id.desc()).limit(30))
    return render_template("admin/notices.html", open_rows=open_rows, done=done, jobs=jobs)


@bp.route("/notices/<int:notice_id>/acknowledge", methods=["POST"])
def acknowledge(notice_id: int):
    if not permissions.valid_id(notice_id):
        abort(404)
    notice = Notice.get_or_none(Notice.id == notice_id)
    if notice is None:
        abort(404)
    if notice.acknowledged_at is None:
        notice.acknowledged_at, notice.acknowledged_by = utcnow(), g.user
        notice.save()
        flash(_("Notice acknowledged."), "success")
    return redirect(url_for("admin.notices"))
