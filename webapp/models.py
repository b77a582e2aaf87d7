"""The CRM's tables, as peewee models bound at runtime to one ``DatabaseProxy``.

Schema changes are made by numbered migrations in ``webapp/migrations``; a test
checks that the migrated database has every column these models declare.

Customer records (Account, Contact, Lead, Opportunity, Ticket, Activity) share
``OwnedRecord``: an owner seat, the owner's team (copied at assignment so that
the permission gate filters on one indexed column), timestamps and a soft-delete
mark. Notes and activities attach to any record through (parent_type, parent_id).
"""

from __future__ import annotations

import datetime as dt

from peewee import (
    AutoField,
    BigAutoField,
    BigIntegerField,
    BooleanField,
    CharField,
    DatabaseProxy,
    DateField,
    DateTimeField,
    DecimalField,
    ForeignKeyField,
    IntegerField,
    Model,
    SmallIntegerField,
    TextField,
)
from playhouse.postgres_ext import BinaryJSONField

database = DatabaseProxy()


def person_name(first: str, last: str) -> str:
    """"Wei Li" in Latin script, "李伟" (family name first, no space) in Chinese."""
    first, last = (first or "").strip(), (last or "").strip()
    if any("\u4e00" <= ch <= "\u9fff" for ch in first + last):
        return last + first
    return f"{first} {last}".strip()


def utcnow() -> dt.datetime:
    """Naive UTC: every timestamp column stores UTC."""
    return dt.datetime.now(dt.timezone.utc).replace(tzinfo=None)


class BaseModel(Model):
    class Meta:
        database = database
        legacy_table_names = False


class Team(BaseModel):
    id = AutoField()
    name = CharField(max_length=100, unique=True)
    created_at = DateTimeField(default=utcnow)


class Role(BaseModel):
    """A permission set: {entity: {action: level}} plus the administration flag."""

    id = AutoField()
    name = CharField(max_length=50, unique=True)
    permissions = BinaryJSONField(default=dict, index=False)
    is_admin = BooleanField(default=False)
    builtin = BooleanField(default=False)


class User(BaseModel):
    """A seat: one person's account. The password is only ever stored as an argon2 hash."""

    id = AutoField()
    email = CharField(max_length=254, unique=True)  # stored lower-case
    name = CharField(max_length=100)
    role = ForeignKeyField(Role, backref="users", on_delete="RESTRICT")
    team = ForeignKeyField(Team, backref="members", null=True, on_delete="SET NULL")
    password_hash = CharField(max_length=255, null=True)
    locale = CharField(max_length=10, null=True)
    active = BooleanField(default=True)
    suspended_reason = CharField(max_length=200, null=True)
    failed_logins = SmallIntegerField(default=0)
    locked_until = DateTimeField(null=True)
    # Bumped to end every session of this seat at its next request.
    session_version = IntegerField(default=1)
    last_login_at = DateTimeField(null=True)
    created_at = DateTimeField(default=utcnow)

    @property
    def is_admin(self) -> bool:
        return self.role.is_admin


class SetPasswordToken(BaseModel):
    """A one-time, expiring set-password link; only the token's SHA-256 is stored."""

    id = AutoField()
    user = ForeignKeyField(User, backref="tokens", on_delete="CASCADE")
    token_hash = CharField(max_length=64, unique=True)
    expires_at = DateTimeField()
    used_at = DateTimeField(null=True)
    created_at = DateTimeField(default=utcnow)


class OwnedRecord(BaseModel):
    # Indexes for the permission gate and keyset pagination are in the migrations.
    owner = ForeignKeyField(User, on_delete="RESTRICT", index=False)
    team = ForeignKeyField(Team, null=True, on_delete="SET NULL", index=False)
    created_at = DateTimeField(default=utcnow)
    updated_at = DateTimeField(default=utcnow)
    deleted_at = DateTimeField(null=True)

    #: The name used by permissions, audit rows and URLs.
    entity = ""
    #: The columns ``title`` is made of: a record shown as a link on another's page is loaded
    #: with these, its id and the permission gate's columns only.
    title_fields: tuple[str, ...] = ()

    @property
    def title(self) -> str:
        raise NotImplementedError


class Account(OwnedRecord):
    id = AutoField()
    name = CharField(max_length=200)
    industry = CharField(max_length=100, default="")
    website = CharField(max_length=200, default="")
    email = CharField(max_length=254, default="")
    phone = CharField(max_length=50, default="")
    city = CharField(max_length=100, default="")
    country = CharField(max_length=100, default="")
    description = TextField(default="")

    entity = "account"
    title_fields = ("name",)

    @property
    def title(self) -> str:
        return self.name


class Contact(OwnedRecord):
    id = AutoField()
    first_name = CharField(max_length=100, default="")
    last_name = CharField(max_length=100)
    title_text = CharField(max_length=100, default="", column_name="job_title")
    email = CharField(max_length=254, default="")
    phone = CharField(max_length=50, default="")
    account = ForeignKeyField(Account, null=True, backref="contacts", on_delete="SET NULL")
    description = TextField(default="")

    entity = "contact"
    title_fields = ("first_name", "last_name")

    @property
    def title(self) -> str:
        return person_name(self.first_name, self.last_name)


LEAD_STATUSES = ("new", "contacted", "qualified", "converted", "lost")


class Lead(OwnedRecord):
    id = AutoField()
    first_name = CharField(max_length=100, default="")
    last_name = CharField(max_length=100)
    company = CharField(max_length=200, default="")
    email = CharField(max_length=254, default="")
    phone = CharField(max_length=50, default="")
    source = CharField(max_length=50, default="")
    status = CharField(max_length=20, default="new")
    description = TextField(default="")
    converted_account = ForeignKeyField(Account, null=True, on_delete="SET NULL")
    converted_contact = ForeignKeyField(Contact, null=True, on_delete="SET NULL")
    converted_at = DateTimeField(null=True)

    entity = "lead"
    title_fields = ("first_name", "last_name")

    @property
    def title(self) -> str:
        return person_name(self.first_name, self.last_name)


OPPORTUNITY_STAGES = ("prospecting", "qualification", "proposal", "negotiation", "won", "lost")
CURRENCIES = ("CNY", "USD", "EUR", "HKD", "JPY", "GBP")


class Opportunity(OwnedRecord):
    id = AutoField()
    name = CharField(max_length=200)
    account = ForeignKeyField(Account, null=True, backref="opportunities", on_delete="SET NULL")
    contact = ForeignKeyField(Contact, null=True, on_delete="SET NULL")
    stage = CharField(max_length=20, default="prospecting")
    amount = DecimalField(max_digits=14, decimal_places=2, default=0)
    currency = CharField(max_length=3, default="CNY")
    probability = SmallIntegerField(default=10)
    expected_close = DateField(null=True)
    description = TextField(default="")
    lead = ForeignKeyField(Lead, null=True, on_delete="SET NULL")

    entity = "opportunity"
    title_fields = ("name",)

    @property
    def title(self) -> str:
        return self.name


TICKET_STATUSES = ("new", "open", "pending", "solved", "closed")
# Allowed moves of the status flow; "closed" is final.
TICKET_TRANSITIONS = {
    "new": ("open", "pending", "solved", "closed"),
    "open": ("pending", "solved", "closed"),
    "pending": ("open", "solved", "closed"),
    "solved": ("open", "closed"),
    "closed": (),
}
TICKET_PRIORITIES = ("low", "normal", "high", "urgent")


class Ticket(OwnedRecord):
    id = AutoField()
    subject = CharField(max_length=200)
    description = TextField(default="")
    status = CharField(max_length=20, default="new")
    priority = CharField(max_length=20, default="normal")
    account = ForeignKeyField(Account, null=True, backref="tickets", on_delete="SET NULL")
    contact = ForeignKeyField(Contact, null=True, on_delete="SET NULL")

    entity = "ticket"
    title_fields = ("subject",)

    @property
    def title(self) -> str:
        return self.subject


ACTIVITY_KINDS = ("task", "call", "meeting")
ACTIVITY_STATUSES = ("planned", "done", "cancelled")


class Activity(OwnedRecord):
    id = AutoField()
    kind = CharField(max_length=20, default="task")
    subject = CharField(max_length=200)
    due_at = DateTimeField(null=True)
    status = CharField(max_length=20, default="planned")
    description = TextField(default="")
    parent_type = CharField(max_length=20, null=True)
    parent_id = IntegerField(null=True)

    entity = "activity"
    title_fields = ("subject",)

    @property
    def title(self) -> str:
        return self.subject


class Note(BaseModel):
    """A note on a record's timeline; readable by whoever may read the record."""

    id = AutoField()
    parent_type = CharField(max_length=20)
    parent_id = IntegerField()
    author = ForeignKeyField(User, on_delete="RESTRICT")
    body = TextField()
    created_at = DateTimeField(default=utcnow)
    deleted_at = DateTimeField(null=True)

    entity = "note"


class AuditLog(BaseModel):
    """One row per create/update/delete; no foreign key to the record, so it outlives it."""

    id = BigAutoField()
    at = DateTimeField(default=utcnow, index=True)
    user = ForeignKeyField(User, null=True, on_delete="SET NULL")
    actor = CharField(max_length=254)  # the e-mail (or "cli:<name>") at the time
    ip = CharField(max_length=45, null=True)
    entity = CharField(max_length=20)
    record_id = IntegerField()
    action = CharField(max_length=20)
    changes = BinaryJSONField(default=dict, index=False)  # {field: [old, new]}

    class Meta:
        indexes = ((("entity", "record_id", "at"), False),)


class LoginLog(BaseModel):
    id = BigAutoField()
    at = DateTimeField(default=utcnow, index=True)
    user = ForeignKeyField(User, null=True, on_delete="SET NULL")
    email = CharField(max_length=254)
    ip = CharField(max_length=45, null=True)
    user_agent = CharField(max_length=300, default="")
    success = BooleanField()
    reason = CharField(max_length=50)


RECORD_MODELS: dict[str, type[OwnedRecord]] = {
    m.entity: m for m in (Account, Contact, Lead, Opportunity, Ticket, Activity)
}




class JobRun(BaseModel):
    """One run of a scheduler job (appliance/scheduler.py): when, and how it ended."""

    id = BigAutoField()
    job = CharField(max_length=50)
    started_at = DateTimeField()
    finished_at = DateTimeField(null=True)
    outcome = CharField(max_length=10)  # running, ok, failed
    message = TextField(default="")

    class Meta:
        table_name = "job_run"


class Notice(BaseModel):
    """Something the boss should know (a failed job, a quota crossing), until acknowledged."""

    id = AutoField()
    created_at = DateTimeField(default=utcnow)
    level = CharField(max_length=10)  # info, warning, error
    source = CharField(max_length=50)
    message = TextField()  # the English text (rows from before migration 0010 have only this)
    message_id = TextField(null=True)  # the English template, translated when shown (appliance/notices.py)
    params = BinaryJSONField(null=True, index=False)  # its %(name)s values
    acknowledged_at = DateTimeField(null=True)
    acknowledged_by = ForeignKeyField(User, null=True, on_delete="SET NULL", index=False)


class Attachment(BaseModel):
    """A file on a record; the bytes are stored once per SHA-256 (appliance/attachments.py)."""

    id = AutoField()
    parent_type = CharField(max_length=20)
    parent_id = IntegerField()
    owner = ForeignKeyField(User, on_delete="RESTRICT", index=False)  # whose quota it uses
    filename = CharField(max_length=255)
    content_type = CharField(max_length=100)
    size = BigIntegerField()
    sha256 = CharField(max_length=64)
    created_at = DateTimeField(default=utcnow)
    deleted_at = DateTimeField(null=True)

    entity = "attachment"


class CompanyProfile(BaseModel):
    """The customer's company (one row, id 1); certified fields are locked once certified (R-11)."""

    id = SmallIntegerField(primary_key=True)
    name = CharField(max_length=200, default="")
    registration_number = CharField(max_length=50, default="")
    legal_representative = CharField(max_length=100, default="")
    address = CharField(max_length=300, default="")
    phone = CharField(max_length=50, default="")
    website = CharField(max_length=200, default="")
    certified_at = DateTimeField(null=True)
    certified_by = CharField(max_length=254, null=True)
    updated_at = DateTimeField(default=utcnow)

    entity = "company"

    class Meta:
        table_name = "company_profile"


class Announcement(BaseModel):
    """A banner every seat sees between starts_at and ends_at (UTC), e-mailed once (R-2, R-13)."""

    id = AutoField()
    message = TextField()
    starts_at = DateTimeField()
    ends_at = DateTimeField()
    created_by = CharField(max_length=254)
    created_at = DateTimeField(default=utcnow)
    emailed_at = DateTimeField(null=True)
    withdrawn_at = DateTimeField(null=True)


class AppState(BaseModel):
    """A small fact a job remembers between runs (appliance/attachments.py, appliance/lifecycle.py)."""

    key = CharField(max_length=100, primary_key=True)
    value = BinaryJSONField(index=False)
    updated_at = DateTimeField(default=utcnow)

    class Meta:
        table_name = "app_state"


def get_state(key: str, default=None):
    row = AppState.get_or_none(AppState.key == key)
    return default if row is None else row.value


def set_state(key: str, value) -> None:
    (AppState.insert(key=key, value=value, updated_at=utcnow())
     .on_conflict(conflict_target=[AppState.key], update={AppState.value: value, AppState.updated_at: utcnow()})
     .execute())


ALL_MODELS = (Team, Role, User, SetPasswordToken, Account, Contact, Lead, Opportunity,
              Ticket, Activity, Note, AuditLog, LoginLog, JobRun, Notice, Attachment, CompanyProfile,
              Announcement, AppState)
