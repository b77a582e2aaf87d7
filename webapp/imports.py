"""Import records from a CSV or Excel file (R-14): upload, review the mapping and the dry run, import.

A thin layer over ``appliance.importer``. An upload is kept under
``<data_dir>/imports/<token>/`` (files 0600) with a JSON sidecar naming the seat that
uploaded it, the entity, and the mapping and duplicate rows of the dry run last shown
(an import that would differ from it writes nothing and shows the new one), and for a
workbook its parsed rows (``store_table``); any other seat's
request for that token answers 404. Uploads older than a day are removed whenever a new
import starts. The seat needs "create" on the entity, else every page answers 404.
"""

from __future__ import annotations

import json
import re
import secrets
import shutil
import time
from pathlib import Path

from flask import Blueprint, Response, abort, current_app, flash, g, redirect, render_template, request, url_for
from flask_babel import gettext as _
from flask_babel import ngettext
from flask_wtf import FlaskForm
from flask_wtf.file import FileField, FileRequired

from appliance import importer
from appliance.files import write_private
from appliance.importer import ImportChanged, ImportFileError
from webapp import permissions
from webapp.crud import MODULES
from webapp.i18n import lazy_gettext as _l

bp = Blueprint("imports", __name__, url_prefix="/import")

SHOWN_PROBLEMS = 200  # on the page; the report holds them all
KEEP_SECONDS = 24 * 3600
_TOKEN = re.compile(r"^[A-Za-z0-9_-]{32}$")
_SIDECAR = "import.json"
_PARSED = "rows.json"  # see store_table


class UploadForm(FlaskForm):
    file = FileField(_l("CSV or Excel file"), validators=[FileRequired(_l("Choose a file."))],
                     render_kw={"accept": ".csv,.xlsx"})


@bp.app_context_processor
def _importable():
    """Lets the list pages show their Import button."""
    return {"importable": importer.IMPORTABLE}


def _module_or_404(entity: str):
    """:raise 404: not importable, or the seat may not create such records."""
    if entity not in importer.IMPORTABLE or not permissions.can(g.user, entity, "create"):
        abort(404)
    return MODULES[entity]


def _imports_dir() -> Path:
    folder = current_app.extensions["crm_settings"].appliance.data_dir / "imports"
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    return folder


def _remove_stale(folder: Path) -> None:
    for job in folder.iterdir():
        try:
            if time.time() - job.stat().st_mtime > KEEP_SECONDS:
                shutil.rmtree(job, ignore_errors=True)
        except FileNotFoundError:  # another request removed it meanwhile
            continue


def _save_job(job: Path, meta: dict) -> None:
    write_private(job / _SIDECAR, json.dumps(meta, ensure_ascii=False).encode())


def store_table(job: Path, table: importer.Table) -> None:
    """Keep the rows of an uploaded workbook, parsed, beside it: reading a 100,000-row .xlsx
    takes 8-10 s, loading them again about 1 s (docs/data.md), and the review, the report and the import
    each need them (a CSV file parses as fast as this would load)."""
    write_private(job / _PARSED, json.dumps({"headers": table.headers, "rows": table.rows},
                                             ensure_ascii=False).encode())


def load_table(job: Path, meta: dict) -> importer.Table:
    """The upload's table: the parsed rows kept beside it, else the file read again.
    :raise ImportFileError, FileNotFoundError: see importer.read_table."""
    try:
        kept = json.loads((job / _PARSED).read_text())
        return importer.Table(headers=kept["headers"], rows=[(number, cells) for number, cells in kept["rows"]])
    except (FileNotFoundError, ValueError, KeyError, TypeError):
        return importer.read_table(job / meta["stored"], meta["filename"])


def _job_or_404(entity: str, token: str) -> tuple[Path, dict]:
    """The upload behind ``token``, if this seat made it for this entity. :raise 404: otherwise."""
    if not _TOKEN.match(token):
        abort(404)
    job = _imports_dir() / token
    try:
        meta = json.loads((job / _SIDECAR).read_text())
    except (FileNotFoundError, ValueError):
        abort(404)
    if meta.get("user_id") != g.user.id or meta.get("entity") != entity:
        abort(404)
    return job, meta


@bp.route("/<entity>", methods=["GET", "POST"])
def upload(entity: str):
    """The upload form; a readable file goes on to the review. :raise 404: see _module_or_404."""
    module = _module_or_404(entity)
    form = UploadForm()
    if form.validate_on_submit():
        folder = _imports_dir()
        _remove_stale(folder)
        filename = Path(form.file.data.filename or "upload.csv").name[-200:]
        stored = "upload.xlsx" if filename.lower().endswith(".xlsx") else "upload.csv"
        token = secrets.token_urlsafe(24)
        job = folder / token
        job.mkdir(mode=0o700)
        write_private(job / stored, form.file.data.read())
        try:
            table = importer.read_table(job / stored, filename)
        except ImportFileError as exc:
            shutil.rmtree(job, ignore_errors=True)
            form.file.errors.append(str(exc))
        else:
            if stored.endswith(".xlsx"):
                store_table(job, table)
            _save_job(job, {"user_id": g.user.id, "entity": entity, "filename": filename, "stored": stored,
                            "mapping": importer.guess_mapping(table.headers, entity), "skip_duplicates": True})
            return redirect(url_for(".review", entity=entity, token=token))
    return render_template("import_upload.html", module=module, form=form, fields=importer.FIELDS[entity],
                           max_rows=importer.MAX_ROWS), 400 if form.errors else 200


@bp.route("/<entity>/<token>", methods=["GET", "POST"])
def review(entity: str, token: str):
    """The mapping and the dry run's result; POST with action=import imports, all rows or none.

    An import asked for with a mapping other than the one whose dry run was shown runs the
    dry run instead, so nobody imports what they have not seen.
    :raise 404: not this seat's upload, or see _module_or_404.
    """
    module = _module_or_404(entity)
    job, meta = _job_or_404(entity, token)
    try:
        table = load_table(job, meta)
    except (ImportFileError, FileNotFoundError):
        abort(404)
    status = 200
    if request.method == "POST":
        mapping = [request.form.get(f"column-{i}", "") for i in range(len(table.headers))]
        skip = request.form.get("skip_duplicates") == "1"
        shown = mapping == meta["mapping"] and skip == meta["skip_duplicates"]
        meta.update(mapping=mapping, skip_duplicates=skip)
        _save_job(job, meta)
        if request.form.get("action") == "import" and shown:
            try:
                plan = importer.import_table(table, mapping, entity, g.user, skip, meta.get("reviewed_duplicates"))
            except ImportChanged as exc:
                flash(str(exc), "error")
                plan, status = exc.plan, 409
            except ImportFileError as exc:
                flash(_("Nothing was imported: the file has problems, listed below."), "error")
                plan, status = exc.plan, 400
            else:
                shutil.rmtree(job, ignore_errors=True)
                flash(ngettext("Imported %(num)d record.", "Imported %(num)d records.", len(plan.records)), "success")
                return redirect(url_for(module.endpoint + ".index"))
        else:
            if request.form.get("action") == "import":
                flash(_("The mapping changed: check the result below, then import."), "info")
            plan = importer.validate(table, mapping, entity, g.user, skip)
    else:
        plan = importer.validate(table, meta["mapping"], entity, g.user, meta["skip_duplicates"])
    # What this page shows is what an import from it must find again (importer.import_table).
    meta["reviewed_duplicates"] = [p.row for p in plan.duplicates]
    _save_job(job, meta)
    problems = sorted(plan.problems, key=lambda p: (p.row, p.duplicate))
    return render_template("import_review.html", module=module, token=token, filename=meta["filename"],
                           columns=list(zip(importer.column_names(table), plan.mapping,
                                            _samples(table))),
                           fields=importer.FIELDS[entity], plan=plan, problems=problems[:SHOWN_PROBLEMS],
                           more=max(0, len(problems) - SHOWN_PROBLEMS)), status


def _samples(table, count: int = 3) -> list[str]:
    """A few values of each column, to help choose its field."""
    out = []
    for index in range(len(table.headers)):
        values = [cells[index] for _, cells in table.rows[:50] if index < len(cells) and cells[index]]
        out.append(", ".join(v[:40] for v in values[:count]))
    return out


@bp.route("/<entity>/<token>/report.csv")
def report(entity: str, token: str):
    """Every problem and duplicate of the dry run with the mapping last shown, as CSV."""
    _module_or_404(entity)
    job, meta = _job_or_404(entity, token)
    try:
        table = load_table(job, meta)
    except (ImportFileError, FileNotFoundError):
        abort(404)
    plan = importer.validate(table, meta["mapping"], entity, g.user, meta["skip_duplicates"])
    name = f"import-problems-{Path(meta['filename']).stem[:50]}.csv".encode("ascii", "replace").decode()
    name = re.sub(r"[^\w.-]", "_", name)
    return Response(importer.report_csv(plan), mimetype="text/csv",
                    headers={"Content-Disposition": f'attachment; filename="{name}"'})
