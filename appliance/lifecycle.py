"""Deletion with undo, destruction, the purge of all data, and the end of the licence (R-15, R-16).

A deleted record (``deleted_at`` set by ``webapp.audit.delete``) or attachment stays for
``[retention] undo_days``: the boss can bring it back (:func:`undo`) or destroy it at once,
confirmed by typing its name (:func:`destroy`). The scheduler's retention job
(:func:`run_retention`) destroys what has waited longer, then walks the licence timeline.

Destroying removes the rows (the record, its notes, its attachments, the activities on it
with their notes and attachments), replaces the values in their audit rows by
``{"destroyed": true}`` and writes one "destroy" audit row naming only the entity and id.
Files no row names any more are overwritten with zeros and unlinked after the commit
(appliance/attachments.py). A plain VACUUM of the touched tables follows, outside the
transaction (PostgreSQL refuses VACUUM inside one): DELETE only marks a row version dead,
VACUUM takes it and its index entries out of the tables so that the space is reused.
docs/data.md says what PostgreSQL, the WAL and the backups still hold and for how long.

The licence (``[seats] expires``, the last licensed day, and ``[seats] grace_days``):

- active: no expiry, or more than 30 days to it; expiring: 30 days or fewer;
- grace: from the day after ``expires`` through ``expires + grace_days``: read-only, export allowed;
- ended: from ``expires + grace_days + 1`` (:attr:`Licence.destroy_on`): the job destroys all
  customer data once (:func:`purge_all`).

Notices (source "licence") go out 30, 7 and 1 days before the expiry and before the
destruction, each once per expiry date (remembered in ``app_state``), so a renewed licence
(a later ``expires``) starts afresh. The state comes from the settings and the date only:
the web app checks it on every request without a query.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from typing import Iterable
from zoneinfo import ZoneInfo

import peewee
from flask_babel import lazy_gettext as _l

from appliance import attachments, config
from appliance.config import Settings
from appliance.errors import ApplianceError, ConfigError
from webapp.models import (RECORD_MODELS, Activity, Attachment, AuditLog, Note, User, database, get_state, set_state,
                           utcnow)

log = logging.getLogger(__name__)

#: Days before the expiry and before the destruction at which the boss is told.
NOTICE_DAYS = (30, 7, 1)
EXPIRING_DAYS = 30
#: What the deleted-items list and destroy handle: every record kind, and attachments.
KINDS = (*RECORD_MODELS, "attachment")
_NOTICES_KEY = "licence.notices"
_PURGED_KEY = "licence.purged"
_CHUNK = 5000  # ids per IN (...) list; PostgreSQL takes at most 65535 parameters
# What purge_all empties: every table of customer data. Seats, roles, teams, set-password
# tokens and the appliance's own bookkeeping (job_run, notice, app_state, schema_migration) stay.
PURGED_TABLES = ("account", "contact", "lead", "opportunity", "ticket", "activity", "note", "attachment",
                 "audit_log", "login_log", "company_profile", "announcement")
# Folders of <data_dir> holding customer files besides the attachment store.
PURGED_FOLDERS = ("exports", "imports", "incoming")


class LifecycleError(ApplianceError):
    """Undo, destroy or purge refused: unknown kind, no such deleted item, the typed name does
    not match, not the boss, or a licence scan of a company certified since."""


# ============================================================================= deleted items


@dataclass(frozen=True)
class DeletedItem:
    entity: str
    id: int
    title: str
    deleted_at: dt.datetime  # naive UTC
    deleted_by: str | None  # the actor of the audit "delete" row
    destroy_after: dt.datetime  # the retention job destroys it at its first run after this (naive UTC)

    def to_json(self) -> dict:
        data = asdict(self)
        data["deleted_at"] = self.deleted_at.isoformat() + "Z"
        data["destroy_after"] = self.destroy_after.isoformat() + "Z"
        return data


def _model(entity: str):
    if entity == "attachment":
        return Attachment
    if entity in RECORD_MODELS:
        return RECORD_MODELS[entity]
    raise LifecycleError(_l("There is no kind of item called “%(entity)s”; expected one of: %(kinds)s.",
                            entity=entity, kinds=", ".join(KINDS)))


def _title(row) -> str:
    return row.filename if isinstance(row, Attachment) else row.title


def _chunks(ids: Iterable[int]) -> Iterable[list[int]]:
    ids = sorted(set(ids))
    for start in range(0, len(ids), _CHUNK):
        yield ids[start:start + _CHUNK]


def deleted_items(settings: Settings) -> list[DeletedItem]:
    """Every deleted record and attachment the boss can still undo, newest deletion first."""
    window = dt.timedelta(days=settings.retention.undo_days)
    items = []
    for entity in KINDS:
        model = _model(entity)
        rows = list(model.select().where(model.deleted_at.is_null(False)))
        by = _deleters(entity, [r.id for r in rows])
        items += [DeletedItem(entity, r.id, _title(r), r.deleted_at, by.get(r.id), r.deleted_at + window)
                  for r in rows]
    return sorted(items, key=lambda i: (i.deleted_at, i.entity, i.id), reverse=True)


def deleted_item(settings: Settings, entity: str, record_id: int) -> DeletedItem | None:
    """One deleted item, or None when the kind is unknown or the item is not (or no longer) deleted."""
    if entity not in KINDS:
        return None
    model = _model(entity)
    row = model.get_or_none(model.id == record_id, model.deleted_at.is_null(False))
    if row is None:
        return None
    window = dt.timedelta(days=settings.retention.undo_days)
    return DeletedItem(entity, row.id, _title(row), row.deleted_at, _deleters(entity, [row.id]).get(row.id),
                       row.deleted_at + window)


def _deleters(entity: str, ids: list[int]) -> dict[int, str]:
    """Who deleted each record: the actor of its latest audit "delete" row."""
    found = {}
    for chunk in _chunks(ids):
        rows = (AuditLog.select(AuditLog.record_id, AuditLog.actor)
                .where(AuditLog.entity == entity, AuditLog.record_id.in_(chunk), AuditLog.action == "delete")
                .order_by(AuditLog.at, AuditLog.id).tuples())
        found.update(rows)  # later rows overwrite earlier: the latest deletion wins
    return found


def _require_boss(actor: User | str) -> None:
    """A seat must administer the appliance; a label ("cli:root", "scheduler") is customer IT or a job."""
    if isinstance(actor, User) and not (actor.active and actor.role.is_admin):
        raise LifecycleError(_l("Only the boss can undo or destroy deleted items."))


def _deleted_row(entity: str, record_id: int):
    """The deleted item, locked until the caller's transaction ends."""
    model = _model(entity)
    row = model.select().where(model.id == record_id, model.deleted_at.is_null(False)).for_update().first()
    if row is None:
        raise LifecycleError(_l("There is no deleted %(entity)s number %(id)s: it was restored or destroyed "
                                "already, or never deleted.", entity=entity, id=record_id))
    return row


def undo(settings: Settings, actor: User | str, entity: str, record_id: int) -> str:
    """Bring a deleted record or attachment back; returns its title.

    :raise LifecycleError: not deleted, or a licence scan of a company certified since.
    """
    from webapp import audit

    _require_boss(actor)
    if entity == "attachment":
        try:
            with database.atomic():  # the row lock keeps the retention job from destroying it meanwhile
                row = _deleted_row(entity, record_id)
                attachments.undelete(settings, actor, row)
        except attachments.AttachmentError as exc:
            raise LifecycleError(str(exc)) from None
        return row.filename
    with database.atomic():
        row = _deleted_row(entity, record_id)
        deleted_at = row.deleted_at
        row.deleted_at, row.updated_at = None, utcnow()
        row.save()
        audit.write_row(actor, entity, row.id, "restore", {"deleted_at": [deleted_at.isoformat(), None]})
    return row.title


# ============================================================================= destroy


@dataclass
class Destroyed:
    """What one destroy (or one retention run) removed."""

    rows: dict[str, int] = field(default_factory=dict)  # entity -> rows removed
    hashes: set[str] = field(default_factory=set)  # attachment files to shred after the commit
    files: int = 0  # files overwritten and unlinked

    @property
    def total(self) -> int:
        return sum(self.rows.values())


def _remove(targets: dict[str, set[int]]) -> Destroyed:
    """Delete the rows of ``targets`` ({entity: ids}) with their notes, attachments and the
    activities on them, and scrub their audit rows. Inside the caller's transaction."""
    targets = {entity: set(ids) for entity, ids in targets.items() if ids}
    # The activities on a destroyed record go with it (one level: an activity is not a parent).
    for entity, ids in list(targets.items()):
        if entity in RECORD_MODELS and entity != "activity":
            for chunk in _chunks(ids):
                targets.setdefault("activity", set()).update(
                    a for (a,) in Activity.select(Activity.id)
                    .where(Activity.parent_type == entity, Activity.parent_id.in_(chunk)).tuples())
    gone: dict[str, set[int]] = defaultdict(set)
    out = Destroyed()
    for entity, ids in targets.items():
        if entity not in RECORD_MODELS:
            continue
        for chunk in _chunks(ids):
            for model, kind in ((Note, "note"), (Attachment, "attachment")):
                rows = list(model.select().where(model.parent_type == entity, model.parent_id.in_(chunk)))
                gone[kind].update(r.id for r in rows)
                if kind == "attachment":
                    out.hashes |= attachments.destroy_rows(rows)
                elif rows:
                    Note.delete().where(Note.id.in_([r.id for r in rows])).execute()
            RECORD_MODELS[entity].delete().where(RECORD_MODELS[entity].id.in_(chunk)).execute()
        gone[entity].update(ids)
    for chunk in _chunks(targets.get("attachment", ())):
        out.hashes |= attachments.destroy_rows(Attachment.select().where(Attachment.id.in_(chunk)))
        gone["attachment"].update(chunk)
    for chunk in _chunks(targets.get("note", ())):
        Note.delete().where(Note.id.in_(chunk)).execute()
        gone["note"].update(chunk)
    # The audit trail keeps who did what when, but none of the values.
    for entity, ids in gone.items():
        for chunk in _chunks(ids):
            (AuditLog.update(changes={"destroyed": True})
             .where(AuditLog.entity == entity, AuditLog.record_id.in_(chunk)).execute())
    out.rows = {entity: len(ids) for entity, ids in gone.items() if ids}
    return out


def _vacuum(tables: Iterable[str]) -> None:
    """Take the dead row versions (and their index entries) out of the tables now, rather
    than whenever autovacuum's thresholds are reached. Outside any transaction; best effort."""
    for table in sorted(set(tables)):
        try:
            database.execute_sql(f'VACUUM (INDEX_CLEANUP ON) "{table}"')
        except peewee.DatabaseError as exc:  # e.g. called inside a transaction: autovacuum will do it
            log.warning("VACUUM %s not run: %s", table, exc)


def _finish(settings: Settings, destroyed: Destroyed) -> None:
    """After the commit: shred the files no row names any more, vacuum the touched tables."""
    destroyed.files = attachments.shred_unnamed(settings, destroyed.hashes)
    _vacuum([*(_table(e) for e in destroyed.rows), "audit_log"])


def _table(entity: str) -> str:
    return {"note": Note, "attachment": Attachment, **RECORD_MODELS}[entity]._meta.table_name


def destroy(settings: Settings, actor: User | str, entity: str, record_id: int, typed_name: str) -> Destroyed:
    """Destroy one deleted record or attachment for good, confirmed by its name typed exactly.

    :raise LifecycleError: not the boss, not deleted (delete it first), or the name differs
        (then nothing changes).
    """
    from webapp import audit

    _require_boss(actor)
    with database.atomic():
        row = _deleted_row(entity, record_id)
        name = _title(row).strip()
        if (typed_name or "").strip() != name:
            raise LifecycleError(_l("The name typed does not match: type “%(name)s” exactly to destroy it. "
                                    "Nothing was destroyed.", name=name))
        destroyed = _remove({entity: {row.id}})
        audit.write_row(actor, entity, row.id, "destroy", {})
    _finish(settings, destroyed)
    log.info("destroyed %s %s: %s", entity, record_id, destroyed.rows)
    return destroyed


def destroy_expired(settings: Settings, now: dt.datetime | None = None, actor: str = "scheduler:retention") -> Destroyed:
    """Destroy what was deleted more than ``[retention] undo_days`` ago (0: everything deleted),
    and notes deleted as long ago (nobody can bring those back)."""
    from webapp import audit

    cutoff = (now or utcnow()) - dt.timedelta(days=settings.retention.undo_days)
    with database.atomic():
        targets = {entity: set() for entity in (*KINDS, "note")}
        for entity in targets:
            model = Note if entity == "note" else _model(entity)
            # FOR UPDATE: an undo that commits first takes its row out of this set.
            targets[entity] = {i for (i,) in model.select(model.id)
                               .where(model.deleted_at.is_null(False), model.deleted_at <= cutoff)
                               .for_update().tuples()}
        destroyed = _remove(targets)
        for entity, ids in targets.items():
            for record_id in sorted(ids):
                audit.write_row(actor, entity, record_id, "destroy", {})
    _finish(settings, destroyed)
    return destroyed


# ============================================================================= the licence


@dataclass(frozen=True)
class Licence:
    state: str  # active, expiring, grace, ended
    seats: int
    expires: dt.date | None  # the last licensed day; None: perpetual
    grace_days: int
    today: dt.date

    @property
    def destroy_on(self) -> dt.date | None:
        """The day the scheduler destroys the data: the day after the grace period."""
        return self.expires + dt.timedelta(days=self.grace_days + 1) if self.expires else None

    @property
    def days_to_expiry(self) -> int | None:
        return (self.expires - self.today).days if self.expires else None

    @property
    def days_to_destruction(self) -> int | None:
        return (self.destroy_on - self.today).days if self.expires else None

    @property
    def read_only(self) -> bool:
        return self.state in ("grace", "ended")

    def to_json(self) -> dict:
        return {"state": self.state, "seats": self.seats, "today": self.today.isoformat(),
                "expires": self.expires.isoformat() if self.expires else None, "grace_days": self.grace_days,
                "destroy_on": self.destroy_on.isoformat() if self.destroy_on else None,
                "days_to_expiry": self.days_to_expiry, "days_to_destruction": self.days_to_destruction,
                "read_only": self.read_only}


def local_today(settings: Settings, now: dt.datetime | None = None) -> dt.date:
    """Today in ``[web] timezone`` (``now`` naive UTC, default the clock): licence dates are local dates."""
    now = now or utcnow()
    return now.replace(tzinfo=dt.timezone.utc).astimezone(ZoneInfo(settings.web.timezone)).date()


def licence_state(settings: Settings, today: dt.date | None = None) -> Licence:
    """Where the licence stands on ``today`` (default: today in [web] timezone). No database."""
    today = today or local_today(settings)
    cfg = settings.seats
    lic = Licence("active", cfg.licensed, cfg.expires, cfg.grace_days, today)
    if cfg.expires is None:
        return lic
    if today > cfg.expires + dt.timedelta(days=cfg.grace_days):
        state = "ended"
    elif today > cfg.expires:
        state = "grace"
    elif lic.days_to_expiry <= EXPIRING_DAYS:
        state = "expiring"
    else:
        state = "active"
    return Licence(state, cfg.licensed, cfg.expires, cfg.grace_days, today)


def refuse_when_read_only(settings: Settings, what: str) -> None:
    """For the command line's writes (seats add and remove, undelete, demo-data), as the web
    app's refuse_writes: :raise LifecycleError: the licence is in grace or ended, so the data
    is read-only."""
    lic = licence_state(settings)
    if lic.read_only:
        raise LifecycleError(
            f"{what} refused: the licence expired on {lic.expires} and the data is read-only"
            + (f" until it is destroyed on {lic.destroy_on}" if lic.state == "grace" else "")
            + f". To change data, renew the licence: set [seats] expires in {settings.source} to the new last "
              f"day, then restart the services (docs/data.md). 'crm-appliance export' still exports the data, "
              f"and 'crm-appliance seats disable' still stops a seat.")


def purged_on(settings: Settings, lic: Licence) -> dt.date | None:
    """The local date the retention job destroyed the data at the end of ``lic``, or None while
    it has not (the scheduler stopped, an expiry date typed late): one query."""
    purged = get_state(_PURGED_KEY) if lic.expires else None
    if not purged or purged.get("expires") != lic.expires.isoformat():
        return None
    return local_today(settings, dt.datetime.fromisoformat(purged["at"].removesuffix("Z")))


def licence_status(settings: Settings, today: dt.date | None = None) -> dict:
    """The licence for ``crm-appliance licence``: its state and dates, seats in use, the purge if done."""
    from appliance.seats import in_use

    lic = licence_state(settings, today)
    return {**lic.to_json(), "seats_in_use": in_use(), "purged": get_state(_PURGED_KEY)}


def _reached(days_left: int, sent: set[str], prefix: str) -> int | None:
    """The most urgent notice day reached and not yet sent; the less urgent ones count as sent
    (a scheduler that was down for a week sends one notice, not three)."""
    reached = [d for d in NOTICE_DAYS if 0 <= days_left <= d]
    if not reached or f"{prefix}-{min(reached)}" in sent:
        return None
    sent.update(f"{prefix}-{d}" for d in reached)
    return min(reached)


@contextlib.contextmanager
def _licence_lock():
    """One licence step at a time (the daemon's retention job and a manual ``crm-appliance
    scheduler run retention``): the second waits, then finds the notices already recorded.
    A session lock, not a transaction's: purge_all commits before it shreds the files."""
    database.execute_sql("SELECT pg_advisory_lock(hashtext('crm-appliance licence'))")
    try:
        yield
    finally:
        database.execute_sql("SELECT pg_advisory_unlock(hashtext('crm-appliance licence'))")


def _settings_on_disk(settings: Settings) -> Settings:
    """The configuration file as it is now: the daemon keeps the settings it started with until
    SIGHUP, but a renewal typed since then must stop the purge. Settings built in memory
    (tests, no file) are their own source. :raise ConfigError: the file is unreadable or invalid."""
    if settings.source.startswith("<"):
        return settings
    return config.load(settings.source)


def licence_tick(settings: Settings, today: dt.date | None = None) -> str:
    """The retention job's licence step: due notices, and the purge once the grace period is over.

    The purge needs a destruction notice for this expiry date sent on an earlier day: an
    expiry date typed wrong (in the past) costs a notice and a day, not the data at once.
    Right before the purge the configuration file is read again: a licence renewed there
    since the scheduler started destroys nothing.
    """
    with _licence_lock():
        return _licence_tick(settings, today)


def _licence_tick(settings: Settings, today: dt.date | None) -> str:
    from appliance.notices import N_, raise_notice

    lic = licence_state(settings, today)
    if lic.expires is None:
        return "licence: perpetual"
    key = lic.expires.isoformat()
    record = get_state(_NOTICES_KEY) or {}
    if record.get("expires") != key:  # a new (renewed) expiry date: its notices start afresh
        record = {"expires": key, "sent": [], "destroy_warned_on": None}
    sent = set(record["sent"])
    said = []
    dates = {"seats": lic.seats, "expires": key, "grace_days": lic.grace_days,
             "destroy_on": lic.destroy_on.isoformat()}
    if lic.state in ("active", "expiring"):
        day = _reached(lic.days_to_expiry, sent, "expiry")
        if day is not None:
            raise_notice(settings, "error" if day == 1 else "warning", "licence", N_(
                "The licence for %(seats)s seats expires on %(expires)s (days left: %(days)s). Then the CRM is "
                "read-only for %(grace_days)s days, and all customer data is destroyed on %(destroy_on)s. Renew "
                "the licence to keep working; if you will not, export the data (Administration → Export all "
                "data, or crm-appliance export)."), {**dates, "days": lic.days_to_expiry})
            said.append(f"expiry notice ({day} days)")
    if lic.state != "ended":
        day = _reached(lic.days_to_destruction, sent, "destroy")
        if day is not None:
            if lic.state == "grace":
                message = N_("All customer data will be destroyed on %(destroy_on)s (days left: %(days)s): the "
                             "licence expired on %(expires)s and the CRM is read-only. Export the data now "
                             "(Administration → Export all data, or crm-appliance export) or renew the licence.")
            else:
                message = N_("All customer data will be destroyed on %(destroy_on)s (days left: %(days)s): the "
                             "licence expires on %(expires)s. Export the data now (Administration → Export all "
                             "data, or crm-appliance export) or renew the licence.")
            raise_notice(settings, "error" if day <= 7 else "warning", "licence", message,
                         {**dates, "days": lic.days_to_destruction})
            record["destroy_warned_on"] = record.get("destroy_warned_on") or lic.today.isoformat()
            said.append(f"destruction notice ({day} days)")
    outcome = f"licence {lic.state}" + (f", expires {lic.expires}" if lic.state in ("active", "expiring")
                                        else f", data destroyed on {lic.destroy_on}")
    if lic.state == "ended":
        purged = get_state(_PURGED_KEY)
        warned = record.get("destroy_warned_on")
        if purged and purged.get("expires") == key:
            pass
        elif warned and warned < lic.today.isoformat() and (current := _still_ended(settings, lic, sent, said)):
            report = purge_all(current, "scheduler:licence")
            set_state(_PURGED_KEY, {"expires": key, "at": report.purged_at.isoformat() + "Z"})
            # The backups' part stays English: it is the purge report, also in crm-appliance licence.
            raise_notice(settings, "warning", "licence", N_(
                "The licence ended on %(expires)s and its grace period is over: all customer data was destroyed. "
                "%(backups)s"), {**dates, "backups": report.backups_summary()})
            said.append("purged all customer data")
        elif not warned:
            raise_notice(settings, "error", "licence", N_(
                "The licence ended on %(expires)s and its grace period is over: all customer data will be "
                "destroyed at the retention job's next run (tomorrow). Export it now or renew the licence."), dates)
            record["destroy_warned_on"] = lic.today.isoformat()
            said.append("last destruction notice")
    record["sent"] = sorted(sent)
    set_state(_NOTICES_KEY, record)
    return outcome + (": " + ", ".join(said) if said else "")


def _still_ended(settings: Settings, lic: Licence, sent: set[str], said: list[str]) -> Settings | None:
    """The settings to purge with, read from the configuration file now; None (logged, and a
    notice once) when the file no longer ends the licence on ``lic.expires`` or cannot be read."""
    from appliance.notices import N_, raise_notice

    try:
        current = _settings_on_disk(settings)
    except ConfigError as exc:
        log.error("licence: nothing destroyed: the configuration file cannot be read to confirm the end: %s", exc)
        said.append("nothing destroyed: the configuration file cannot be read")
        if "unreadable" not in sent:  # once: the banner keeps saying the data goes at the next run
            sent.add("unreadable")
            raise_notice(settings, "error", "licence", N_(
                "The licence ended on %(expires)s and its grace period is over, but the data was not destroyed: "
                "the configuration file %(file)s cannot be read to confirm the end (%(reason)s). Correct the "
                "file; the retention job destroys the data at its next run after that, unless the licence was "
                "renewed there."), {"expires": lic.expires.isoformat(), "file": settings.source, "reason": str(exc)})
        return None
    now = licence_state(current, lic.today)
    if now.state == "ended" and now.expires == lic.expires:
        return current
    log.warning("licence: nothing destroyed: %s now says expires = %s (%s); the scheduler still had %s",
                settings.source, now.expires or "none", now.state, lic.expires)
    said.append(f"nothing destroyed: the licence was renewed (expires {now.expires or 'never'})")
    key = f"renewed-{now.expires or 'none'}"
    if key not in sent:
        sent.add(key)
        if now.expires:
            message = N_("The licence was renewed: %(file)s now says it expires on %(expires)s. The scheduler "
                         "still had the old date (%(old)s) and destroyed nothing. Restart it (systemctl restart "
                         "crm-appliance-scheduler) or send it SIGHUP so that it reads the new date.")
        else:
            message = N_("The licence was renewed: %(file)s now says it does not expire. The scheduler still had "
                         "the old date (%(old)s) and destroyed nothing. Restart it (systemctl restart "
                         "crm-appliance-scheduler) or send it SIGHUP so that it reads the new date.")
        raise_notice(settings, "info", "licence", message,
                     {"file": settings.source, "expires": now.expires and now.expires.isoformat(),
                      "old": lic.expires.isoformat()})
    return None


# ============================================================================= purge


@dataclass(frozen=True)
class BackupHolding:
    """A backup taken before the purge, which still holds the data, and when retention removes it."""

    id: str
    kind: str
    taken_at: dt.datetime | None
    removed_on: dt.date | None  # None: retention never removes it (damaged: delete it by hand)
    condition: str = ""  # a further condition, e.g. "once a newer base backup is verified"

    def to_json(self) -> dict:
        return {"id": self.id, "kind": self.kind, "taken_at": self.taken_at.isoformat() if self.taken_at else None,
                "removed_on": self.removed_on.isoformat() if self.removed_on else None, "condition": self.condition}


def backups_holding_data(backups, settings: Settings, purged_at: dt.datetime) -> list[BackupHolding]:
    """Which of ``backups`` (appliance.backup.list_backups) were taken before ``purged_at``
    (aware UTC) and on which date (in [web] timezone) ``backup.prune`` removes each.

    prune deletes a backup started more than ``[backup] retention_days`` before it runs, except
    the newest and the newest verified backup of each kind, which stay until a newer one
    (verified) exists; damaged and unreadable backups are never pruned.
    """
    out = []
    usable = [b for b in backups if b.state not in ("damaged", "incompatible") and b.started_at is not None]
    for b in backups:
        if b.started_at is not None and b.started_at >= purged_at:
            continue  # taken after the purge: no customer data
        if b.id not in {u.id for u in usable}:
            out.append(BackupHolding(b.id, b.kind, b.started_at, None,
                                     "never removed by retention (unreadable): delete it by hand"))
            continue
        of_kind = [u for u in usable if u.kind == b.kind]
        verified = [u for u in of_kind if u.state == "verified"]
        condition = ""
        if of_kind[-1].id == b.id:
            condition = f"once a newer {b.kind} backup exists (the next one holds no customer data)"
        elif verified and verified[-1].id == b.id:
            condition = f"once a newer {b.kind} backup is verified"
        removed = _first_prune(settings, b.started_at)
        if removed is None:
            condition = "never removed by retention ([schedule] prune is off): delete it by hand"
        out.append(BackupHolding(b.id, b.kind, b.started_at, removed, condition))
    return out


def _first_prune(settings: Settings, started_at: dt.datetime) -> dt.date | None:
    """The local date of the first scheduled prune that removes a backup started at
    ``started_at`` (aware): prune keeps what started at or after its own time minus
    retention_days, so the first run strictly after start + retention. None: prune is off."""
    if settings.schedule.prune is None:
        return None
    zone = ZoneInfo(settings.web.timezone)
    trigger = config.cron_trigger(settings.schedule.prune, settings.web.timezone)
    after = (started_at + dt.timedelta(days=settings.backup.retention_days, microseconds=1)).astimezone(zone)
    return trigger.get_next_fire_time(None, after).astimezone(zone).date()


@dataclass
class PurgeReport:
    purged_at: dt.datetime  # naive UTC
    rows: dict[str, int]  # table -> rows destroyed
    files: int  # files overwritten and unlinked
    backups: list[BackupHolding]
    wal_oldest: dt.datetime | None  # the oldest WAL file still archived (it holds data from before the purge)
    wal_removed_on: dt.date | None  # when prune removes the WAL from before the purge
    wal_condition: str = ""
    catalogue_error: str = ""  # the backup catalogue could not be read: say so rather than "none"

    def backups_summary(self) -> str:
        if self.catalogue_error:
            return f"The backup catalogue could not be read ({self.catalogue_error}): check the backups by hand."
        if not self.backups and self.wal_oldest is None and not self.wal_condition:
            return "No backup or archived WAL holds data from before the purge."
        parts = [f"{b.id} ({b.kind}, taken {b.taken_at:%Y-%m-%d %H:%M} UTC) "
                 + (f"is removed by retention on {b.removed_on}" if b.removed_on else "")
                 + (f" {b.condition}" if b.condition else "") for b in self.backups]
        text = "Backups still holding data: " + ("; ".join(parts) if parts else "none") + "."
        if self.wal_oldest is not None:
            text += (f" The WAL archive holds data from {self.wal_oldest:%Y-%m-%d %H:%M} UTC on; "
                     + (f"retention removes it on {self.wal_removed_on}" if self.wal_removed_on else "")
                     + (f" {self.wal_condition}" if self.wal_condition else "") + ".")
        elif self.wal_condition:
            text += f" Archived WAL: {self.wal_condition}."
        return text

    def to_json(self) -> dict:
        return {"purged_at": self.purged_at.isoformat() + "Z", "rows": self.rows, "files": self.files,
                "backups": [b.to_json() for b in self.backups],
                "wal_oldest": self.wal_oldest.isoformat() if self.wal_oldest else None,
                "wal_removed_on": self.wal_removed_on.isoformat() if self.wal_removed_on else None,
                "wal_condition": self.wal_condition, "catalogue_error": self.catalogue_error or None}

    def __str__(self) -> str:
        return (f"Destroyed {sum(self.rows.values()):,} rows of customer data and {self.files} files. "
                + self.backups_summary())


def _wal_holding(settings: Settings, holdings: list[BackupHolding]) -> tuple[dt.datetime | None, dt.date | None, str]:
    """(oldest archived WAL file's time, the day prune removes the WAL from before the purge, condition).

    prune deletes the WAL older than the oldest base backup it keeps: the WAL from before the
    purge goes with the last base backup taken before it."""
    from appliance import backup

    try:
        times = [p.stat().st_mtime for name, p in backup._archive_files(settings.backup.wal_archive_dir).items()
                 if backup.WAL_SEGMENT.match(name)]
    except OSError as exc:
        return None, None, f"the WAL archive {settings.backup.wal_archive_dir} could not be read ({exc.strerror})"
    if not times:
        return None, None, ""
    oldest = dt.datetime.fromtimestamp(min(times), dt.timezone.utc)
    if settings.schedule.prune is None:
        return oldest, None, "never removed by retention ([schedule] prune is off): delete it by hand"
    bases = [h for h in holdings if h.kind == "base"]
    if not bases:
        return oldest, None, "only once a base backup exists (without one, prune keeps all WAL)"
    if any(h.removed_on is None for h in bases):
        return oldest, None, "only once the unreadable base backups are deleted by hand"
    last = max(bases, key=lambda h: h.removed_on)
    return oldest, last.removed_on, f"with base backup {last.id}" + (f", {last.condition}" if last.condition else "")


def purge_all(settings: Settings, actor: User | str) -> PurgeReport:
    """Destroy all customer data: every record, note, attachment (rows and files), the audit and
    login logs, the company profile, announcements, and the files under <data_dir>/exports,
    imports and incoming. Seats, roles and the appliance's bookkeeping stay.

    TRUNCATE gives each table new, empty files and removes the old ones (no dead rows are left
    for VACUUM). Returns what was destroyed and which backups still hold the data, until when.
    """
    from appliance import backup
    from webapp import audit

    _require_boss(actor)
    tables = ", ".join(f'"{t}"' for t in PURGED_TABLES)
    with database.atomic():
        rows = {t: database.execute_sql(f'SELECT count(*) FROM "{t}"').fetchone()[0] for t in PURGED_TABLES}
        database.execute_sql(f"TRUNCATE {tables}")
        purged_at = utcnow()
        audit.write_row(actor, "appliance", 0, "purge", {})  # the only row the new audit log starts with
    data_dir = settings.appliance.data_dir
    files = attachments.shred_tree(attachments.store_dir(settings))
    files += sum(attachments.shred_tree(data_dir / folder) for folder in PURGED_FOLDERS)
    report = PurgeReport(purged_at, {t: n for t, n in rows.items() if n}, files, [], None, None)
    try:
        catalogue = backup.list_backups(settings)
    except OSError as exc:  # the data is gone already: report what cannot be known, do not fail
        report.catalogue_error = f"{settings.backup.dir}: {exc.strerror}"
    else:
        report.backups = backups_holding_data(catalogue, settings, purged_at.replace(tzinfo=dt.timezone.utc))
        report.wal_oldest, report.wal_removed_on, report.wal_condition = _wal_holding(settings, report.backups)
    log.warning("purged all customer data: %s", report)
    return report


# ============================================================================= the job


def run_retention(settings: Settings, now: dt.datetime | None = None) -> str:
    """The scheduler's retention job: destroy what waited past undo_days, shred files no row
    names (also finishing a destroy killed between its commit and its shredding), then the
    licence's notices and end. ``now``: naive UTC, for tests."""
    now = now or utcnow()
    destroyed = destroy_expired(settings, now)
    swept = attachments.shred_unnamed(settings)
    licence = licence_tick(settings, local_today(settings, now))
    return (f"destroyed {destroyed.total} rows deleted more than {settings.retention.undo_days} days ago, "
            f"shredded {destroyed.files + swept} files; {licence}")
