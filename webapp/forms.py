"""Create and edit forms for every record, with field-level validation.

Field names match the model's, so a valid form's ``record_values()`` is exactly
what the write path stores. Every text field carries the column's length limit:
over-long input is a field error, never a database error.
"""

from __future__ import annotations

import datetime as dt
import re

from flask import g, request, url_for
from flask_babel import to_user_timezone, to_utc
from flask_wtf import FlaskForm
from peewee import fn
from wtforms import (DateField, DateTimeLocalField, DecimalField, HiddenField, IntegerField, SelectField,
                     StringField, TextAreaField)
from wtforms.fields.choices import SelectChoice
from wtforms.validators import DataRequired, Email, InputRequired, Length, NumberRange, Optional, ValidationError

from webapp import permissions
from webapp.i18n import choice_label
from webapp.i18n import lazy_gettext as _l
from webapp.models import (ACTIVITY_KINDS, ACTIVITY_STATUSES, CURRENCIES, LEAD_STATUSES, OPPORTUNITY_STAGES,
                           RECORD_MODELS, TICKET_PRIORITIES, TICKET_STATUSES, TICKET_TRANSITIONS, Account, Contact,
                           User)

TEXT_MAX = 20_000
_ID_SUFFIX = re.compile(r"\(#(\d{1,10})\)\s*$")


def choices(values, label=choice_label) -> list[SelectChoice]:
    """Options for a select: each value with its translated label."""
    return [SelectChoice(v, label(v)) for v in values]


class LookupField(StringField):
    """A record chosen by name (or by the "Name (#id)" the autocomplete offers), within the seat's read scope.

    Works without JavaScript: a typed name that matches exactly one visible record is taken.
    A link the record already has to something the seat cannot see is shown as "(#id)" only,
    and kept as it is when the form is saved unchanged.
    """

    not_found = _l("No record by that name that you can see.")
    ambiguous = _l("Several records have that name; pick one from the suggestions.")

    def __init__(self, label, model, name_matches, **kwargs):
        super().__init__(label, **kwargs)
        self.model = model
        self.name_matches = name_matches  # (model, text) -> condition
        self.selected_id = None
        self.kept_id = None  # the current link, which saving unchanged keeps

    @property
    def lookup_url(self) -> str:
        """Where the autocomplete asks for suggestions (``static/app.js``)."""
        return url_for("search.lookup", entity=self.model.entity)

    def candidates(self):
        """What the field may point to."""
        return permissions.visible(g.user, self.model)

    def show_current(self, record_id: int | None, prefill: bool) -> None:
        """Remember the record's current link; on a first GET, show it (by name only if visible)."""
        self.kept_id = record_id
        if record_id is None or not prefill:
            return
        visible = self.candidates().where(self.model.id == record_id).first()
        self.data = picker_label(visible.title, record_id) if visible else f"(#{record_id})"

    def set_record(self, record) -> None:
        self.selected_id = record.id
        self.data = picker_label(record.title, record.id)

    def pre_validate(self, form):
        self.selected_id = None
        if not self.raw_data:
            # Not in the POST at all: keep the record's current link (a new record's owner: its maker).
            self.selected_id = self.kept_id
            return
        text = (self.data or "").strip()
        if not text:
            return
        if len(text) > 250:
            raise ValidationError(_l("Too long."))
        match = _ID_SUFFIX.search(text)
        if match and self.kept_id is not None and int(match.group(1)) == self.kept_id:
            self.selected_id = self.kept_id
            return
        query = self.candidates()
        if match:
            found = list(query.where(self.model.id == int(match.group(1))).limit(2))
        else:
            found = list(query.where(self.name_matches(self.model, text)).limit(2))
        if not found:
            raise ValidationError(self.not_found)
        if len(found) > 1:
            raise ValidationError(self.ambiguous)
        self.selected_id = found[0].id


class SeatField(LookupField):
    """The seat a record is assigned to, picked as a record is: by name, or the "Name (#id)"
    that the autocomplete offers. Any active seat; a new record's default is the current one.

    Not a select of every seat: with 1000 seats that made each form page 40 KB and its
    query PostgreSQL's top statement (docs/performance.md). A disabled seat that still holds
    the record stays assigned when the form is saved unchanged.
    """

    not_found = _l("No active seat by that name.")
    ambiguous = _l("Several seats have that name; pick one from the suggestions.")

    def __init__(self, label=_l("Assigned to"), **kwargs):
        super().__init__(label, User, seat_named, **kwargs)

    @property
    def lookup_url(self) -> str:
        return url_for("search.seats")

    def candidates(self):
        return User.select(User.id, User.name).where(User.active)

    def show_current(self, user_id: int | None, prefill: bool) -> None:
        """Any seat's name may be shown (lists show them), also a disabled one's."""
        self.kept_id = user_id
        if user_id is not None and prefill:
            seat = g.user if user_id == g.user.id else User.get_or_none(User.id == user_id)
            self.data = seat_label(seat) if seat is not None else f"(#{user_id})"

    def pre_validate(self, form):
        super().pre_validate(form)
        if self.selected_id is None:
            raise ValidationError(_l("Choose a seat."))


def picker_label(name: str, record_id: int) -> str:
    """How a picker names a record or a seat: "王伟 (#12)" (names are not unique); the
    number is what a picked label is read back by (``_ID_SUFFIX``)."""
    return f"{name} (#{record_id})"


def seat_label(user) -> str:
    return picker_label(user.name, user.id)


def seat_named(model, text):
    return fn.LOWER(model.name) == text.lower()


def account_named(model, text):
    return model.name == text


def contact_named(model, text):
    """"Wei Li", or "李伟" with the family name first and no space."""
    return ((fn.TRIM(fn.CONCAT_WS(" ", model.first_name, model.last_name)) == text)
            | (fn.CONCAT(model.last_name, model.first_name) == text))


class RecordForm(FlaskForm):
    """Common base: owner choice and the mapping to model values."""

    owner = SeatField()
    #: the LookupFields of this form (each named like the model's foreign key)
    lookups: tuple[str, ...] = ()

    def prepare(self, record=None) -> None:
        """Show whom the record is assigned to (a new one: the current seat) and what its lookups point at."""
        prefill = not self.is_submitted()
        # A new record is the current seat's unless another is chosen (also when the POST leaves it out).
        self.owner.show_current(record.owner_id if record is not None else g.user.id, prefill)
        if record is not None:
            for name in self.lookups:
                self[name].show_current(record.__data__.get(name), prefill)

    def record_values(self) -> dict:
        values = {}
        for name, field in self._fields.items():
            if name == "csrf_token":
                continue
            if isinstance(field, LookupField):
                values[name] = field.selected_id
            elif isinstance(field, StringField):  # text, text areas, hidden fields
                values[name] = (field.data or "").strip()
            else:
                values[name] = field.data
        return values


def _text(label, max_length, required=False, email=False):
    validators = [DataRequired()] if required else [Optional()]
    validators.append(Length(max=max_length))
    if email:
        validators.append(Email(message=_l("Not an e-mail address."), check_deliverability=False))
    return StringField(label, validators=validators)


def _description():
    return TextAreaField(_l("Description"), validators=[Optional(), Length(max=TEXT_MAX)])


class AccountForm(RecordForm):
    name = _text(_l("Name"), 200, required=True)
    industry = _text(_l("Industry"), 100)
    website = _text(_l("Website"), 200)
    email = _text(_l("E-mail"), 254, email=True)
    phone = _text(_l("Phone"), 50)
    city = _text(_l("City"), 100)
    country = _text(_l("Country"), 100)
    description = _description()


class ContactForm(RecordForm):
    first_name = _text(_l("First name"), 100)
    last_name = _text(_l("Last name"), 100, required=True)
    title_text = _text(_l("Job title"), 100)
    email = _text(_l("E-mail"), 254, email=True)
    phone = _text(_l("Phone"), 50)
    account = LookupField(_l("Account"), Account, account_named)
    description = _description()
    lookups = ("account",)


class LeadForm(RecordForm):
    first_name = _text(_l("First name"), 100)
    last_name = _text(_l("Last name"), 100, required=True)
    company = _text(_l("Company"), 200)
    email = _text(_l("E-mail"), 254, email=True)
    phone = _text(_l("Phone"), 50)
    source = _text(_l("Source"), 50)
    status = SelectField(_l("Status"), choices=choices(s for s in LEAD_STATUSES if s != "converted"),
                         default="new")
    description = _description()


class OpportunityForm(RecordForm):
    name = _text(_l("Name"), 200, required=True)
    account = LookupField(_l("Account"), Account, account_named)
    contact = LookupField(_l("Contact"), Contact, contact_named)
    stage = SelectField(_l("Stage"), choices=choices(OPPORTUNITY_STAGES), default="prospecting")
    amount = DecimalField(_l("Amount"), places=2, default=0,
                          validators=[InputRequired(), NumberRange(min=0, max=999_999_999_999)])
    currency = SelectField(_l("Currency"), choices=choices(CURRENCIES, label=str), default="CNY")
    probability = IntegerField(_l("Probability (%)"), default=10,
                               validators=[InputRequired(), NumberRange(min=0, max=100)])
    expected_close = DateField(_l("Expected close"), validators=[Optional()])
    description = _description()
    lookups = ("account", "contact")


class TicketForm(RecordForm):
    subject = _text(_l("Subject"), 200, required=True)
    status = SelectField(_l("Status"), choices=choices(TICKET_STATUSES), default="new")
    priority = SelectField(_l("Priority"), choices=choices(TICKET_PRIORITIES), default="normal")
    account = LookupField(_l("Account"), Account, account_named)
    contact = LookupField(_l("Contact"), Contact, contact_named)
    description = _description()
    lookups = ("account", "contact")

    def prepare(self, record=None) -> None:
        super().prepare(record)
        self._current_status = record.status if record is not None else None

    def validate_status(self, field):
        """The status flow of R-5: only the moves in ``TICKET_TRANSITIONS``."""
        current = self._current_status
        if current is None:
            if field.data not in ("new", "open"):
                raise ValidationError(_l("A new ticket starts as New or Open."))
        elif field.data != current and field.data not in TICKET_TRANSITIONS[current]:
            raise ValidationError(_l("A ticket cannot move from %(a)s to %(b)s.",
                                     a=choice_label(current), b=choice_label(field.data)))


class ActivityForm(RecordForm):
    # "account:12": the record this activity is linked to, set from the record's page.
    parent = HiddenField(validators=[Optional(), Length(max=40)])
    kind = SelectField(_l("Type"), choices=choices(ACTIVITY_KINDS), default="task")
    subject = _text(_l("Subject"), 200, required=True)
    due_at = DateTimeLocalField(_l("Due"), format="%Y-%m-%dT%H:%M", validators=[Optional()])
    status = SelectField(_l("Status"), choices=choices(ACTIVITY_STATUSES), default="planned")
    description = _description()

    def prepare(self, record=None) -> None:
        """Times are stored in UTC and shown in the appliance's time zone."""
        super().prepare(record)
        self.parent_record = None
        if not self.is_submitted():
            if record is not None:
                if record.due_at:
                    local = to_user_timezone(record.due_at.replace(tzinfo=dt.timezone.utc))
                    self.due_at.data = local.replace(tzinfo=None)
                if record.parent_type:
                    self.parent.data = f"{record.parent_type}:{record.parent_id}"
            else:
                self.parent.data = request.args.get("parent", "")[:40]

    def validate_parent(self, field):
        """The linked record must be one the seat can read (a guessed id is refused)."""
        entity, _, raw = (field.data or "").partition(":")
        if not entity:
            return
        model = RECORD_MODELS.get(entity)
        record = None
        if model is not None and raw.isdigit() and permissions.valid_id(int(raw)):
            record = permissions.visible(g.user, model).where(model.id == int(raw)).first()
        if record is None:
            raise ValidationError(_l("The linked record does not exist or is not yours to see."))
        self.parent_record = record

    def record_values(self) -> dict:
        values = super().record_values()
        values.pop("parent")
        if self.parent_record is not None:
            values["parent_type"], values["parent_id"] = self.parent_record.entity, self.parent_record.id
        if values["due_at"] is not None:
            values["due_at"] = to_utc(values["due_at"])
        return values
