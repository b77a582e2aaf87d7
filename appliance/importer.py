"""Import of accounts, contacts, leads, opportunities and tickets from CSV or XLSX (R-14).

- ``read_table()`` turns a file into rows of text, or raises ``ImportFileError`` saying
  what is wrong with the file (empty, binary, not UTF-8/GBK, not a workbook, a formula,
  a cell or row count over the limits).
- ``guess_mapping()`` matches each column to a field by its English or Chinese header.
- ``validate()`` is the dry run: it checks every row and finds duplicates (within the
  file and against the records the seat can see), and writes nothing.
- ``run_import()`` writes a plan without problems in one transaction, with one 'create'
  audit row per record; ``import_table()`` runs ``validate()`` again inside that
  transaction, so the real import creates exactly what the dry run showed, or nothing.

Decisions:
- A CSV cell is text and is stored as written, a leading "=" included: the exports
  neutralise such cells. The apostrophe our own CSV export puts before a cell starting
  with = + - @ is removed again, so an export imports back unchanged.
- An XLSX formula cell is refused with its cell reference: the file need not hold the
  formula's result (programs other than Excel do not store it), and importing the formula
  text would store what nobody sees in the spreadsheet. Paste the values instead.
- A full name ("姓名", "Name" of a person) fills the last and first name: a Chinese name
  is split after its family name (one character, or two for the common compound family
  names), "Smith, John" at the comma, "John Smith" at the last space, one word is the last name.
- The owner column holds a seat's e-mail. Whom a seat may name follows its level for
  "create": all - any active seat; team - the active seats of its team; own - itself.
"""

from __future__ import annotations

import csv
import datetime as dt
import decimal
import io
import json
import re
import unicodedata
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

from flask_babel import lazy_gettext as _l
from flask_babel import lazy_ngettext as ngettext  # lazy; named so that Babel extracts its messages

from appliance.errors import ApplianceError, SeatError
from appliance.seats import EMAIL_RE
from appliance.seats import _decode as decode_text
from webapp import audit, permissions
from webapp.models import (CURRENCIES, RECORD_MODELS, Account, AuditLog, Contact, User, database, person_name,
                           utcnow)

IMPORTABLE = ("account", "contact", "lead", "opportunity", "ticket")
MAX_ROWS = 200_000
MAX_CELL = 100_000  # characters in any one cell; each field's own limit is checked per row
MAX_TEXT = 20_000  # a description, as webapp.forms.TEXT_MAX
MAX_UNPACKED = 1024 ** 3  # an .xlsx that unpacks to more than this is refused (a zip bomb)
BATCH = 10_000  # rows per COPY
MAX_AMOUNT = decimal.Decimal("999999999999")


class ImportFileError(ApplianceError):
    """A file cannot be imported: unreadable as a table, over a limit, or (raised by
    ``run_import``/``import_table``, with ``plan`` set) rows with problems."""

    def __init__(self, message, plan: "Plan | None" = None):
        super().__init__(message)
        self.plan = plan


class ImportChanged(ImportFileError):
    """``import_table``'s re-check found other duplicates than the dry run the seat reviewed
    (records were added or removed meanwhile); ``plan`` is the new dry run. Nothing is written."""


# ============================================================================= reading the file

@dataclass
class Table:
    headers: list[str]
    #: (row number in the file, the header being row 1 as a spreadsheet counts; cells)
    rows: list[tuple[int, list[str]]]


_MAGIC = (
    (b"\x89PNG", _l("a PNG image")), (b"\xff\xd8\xff", _l("a JPEG image")), (b"GIF8", _l("a GIF image")),
    (b"%PDF", _l("a PDF document")), (b"PK\x03\x04", _l("a ZIP archive (an Excel .xlsx file?)")),
    (b"\xd0\xcf\x11\xe0", _l("an old Office file (.xls or .doc)")), (b"\x1f\x8b", _l("a gzip archive")),
)


def _binary_kind(data: bytes):
    """What binary file this is (a translated description), or None for text."""
    for magic, kind in _MAGIC:
        if data.startswith(magic):
            return kind
    if not data.startswith((b"\xff\xfe", b"\xfe\xff")) and b"\x00" in data[:8192]:
        return _l("binary data")
    return None


def read_table(source: bytes | str | Path, filename: str) -> Table:
    """The header and data rows of a CSV or XLSX file (chosen by the file name's ending).

    Blank rows are skipped; every cell is text with the spaces around it removed.
    :raise ImportFileError: the file is not a readable table or is over a limit.
    """
    data = source if isinstance(source, bytes) else Path(source).read_bytes()
    name = Path(filename).name
    if not data.strip():
        raise ImportFileError(_l("%(file)s is empty; expected a header row, then one record per row", file=name))
    kind = _binary_kind(data)
    suffix = Path(name).suffix.lower()
    if suffix == ".xls" or (suffix == ".xlsx" and data.startswith(b"\xd0\xcf\x11\xe0")):
        raise ImportFileError(_l("%(file)s is an old Excel 97-2003 workbook; open it in Excel and save it as "
                                 "Excel Workbook (.xlsx) or CSV", file=name))
    if suffix == ".xlsx":
        if not data.startswith(b"PK\x03\x04"):
            raise ImportFileError(_l("%(file)s is not an Excel workbook (.xlsx) but %(kind)s; choose the "
                                     "workbook itself, or save it as CSV", file=name, kind=kind or _l("text")))
        grid = _xlsx_grid(data, name)
    else:
        if kind is not None:
            raise ImportFileError(_l("%(file)s is not a CSV text file but %(kind)s; choose a CSV (UTF-8 or GBK) "
                                     "or Excel .xlsx file", file=name, kind=kind))
        grid = _csv_grid(data, name)
    return _table(grid, name)


def _csv_grid(data: bytes, name: str):
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):  # Excel's "Unicode Text" is UTF-16
        try:
            text = data.decode("utf-16")
        except UnicodeDecodeError as exc:
            raise ImportFileError(_l("%(file)s starts like UTF-16 text but is not; save it as CSV (UTF-8)",
                                     file=name)) from exc
    else:
        try:
            text = decode_text(data, name)
        except SeatError as exc:
            raise ImportFileError(exc.args[0]) from exc
    if "\x00" in text:
        raise ImportFileError(_l("%(file)s holds NUL characters, which no text has; choose a CSV (UTF-8 or GBK) "
                                 "or Excel .xlsx file", file=name))
    first_line = text.split("\n", 1)[0]
    # Whichever separator the header uses most; a comma when it has none (one column).
    delimiter = max(",;\t", key=first_line.count)
    # Strict: a quote left open raises at the end of the data instead of swallowing every later row.
    reader = csv.reader(io.StringIO(text), delimiter=delimiter, strict=True)
    number, start_line, headers = 0, 1, None
    try:
        for number, cells in enumerate(reader, start=1):
            headers = headers or ([c.strip() for c in cells] if any(c.strip() for c in cells) else None)
            yield number, [_unescape(cell) for cell in cells]
            start_line = reader.line_num + 1
    except csv.Error as exc:
        column = _unclosed_cell(text, start_line, delimiter)
        if column is not None:
            label = f"{column + 1} ({headers[column]})" if headers and column < len(headers) and headers[column] \
                else str(column + 1)
            raise ImportFileError(_l("%(file)s: unclosed quote: the cell that starts at row %(row)d (line %(line)d "
                                     "of the file), column %(column)s never ends; add its closing double quote, "
                                     "and write a double quote within a cell as two", file=name, row=number + 1,
                                     line=start_line, column=label)) from exc
        if "field larger than field limit" in str(exc):
            raise _cell_too_long(name, number + 1, None) from exc
        raise ImportFileError(_l("%(file)s, row %(row)d is not valid CSV (%(error)s); check the quotes in that row",
                                 file=name, row=number + 1, error=str(exc))) from exc


def _unclosed_cell(text: str, line: int, delimiter: str):
    """The index of the quoted cell that never closes in the record starting at ``line``
    (1 for the first), or None when that record's quotes all close."""
    pos = 0
    for _ in range(line - 1):
        pos = text.find("\n", pos) + 1
        if pos == 0:
            return None
    cell_end = re.compile(f"[{re.escape(delimiter)}\n]")
    column = 0
    while True:
        if text.startswith('"', pos):  # a quoted cell: find its closing quote, past doubled ones
            pos += 1
            while True:
                pos = text.find('"', pos)
                if pos == -1:
                    return column
                if not text.startswith('"', pos + 1):
                    break
                pos += 2
            pos += 1
        end = cell_end.search(text, pos)
        if end is None or end.group() == "\n":
            return None
        column, pos = column + 1, end.end()


def _unescape(cell: str) -> str:
    """Undo our CSV export's protection: "'=1+2" was exported from "=1+2"."""
    if cell.startswith("'") and cell[1:2] in ("=", "+", "-", "@"):
        return cell[1:]
    return cell


def _xlsx_grid(data: bytes, name: str):
    from openpyxl import load_workbook
    from openpyxl.utils import get_column_letter

    unreadable = _l("%(file)s cannot be read as an Excel workbook (.xlsx); open it in Excel and save it again "
                    "as Excel Workbook or as CSV", file=name)
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            unpacked = sum(entry.file_size for entry in archive.infolist())
    except zipfile.BadZipFile as exc:
        raise ImportFileError(unreadable) from exc
    if unpacked > MAX_UNPACKED:
        raise ImportFileError(_l("%(file)s unpacks to more than 1 GB; split it into smaller files", file=name))
    try:
        # Not data_only: a formula must be seen as one (see the module's docstring).
        book = load_workbook(io.BytesIO(data), read_only=True, data_only=False)
        sheet = book.worksheets[0]
        for number, row in enumerate(sheet.iter_rows(), start=1):
            cells = []
            for index, cell in enumerate(row):
                if getattr(cell, "data_type", None) == "f":
                    raise ImportFileError(_l(
                        "%(file)s: cell %(cell)s holds a formula (%(formula)s); formulas are not imported. In "
                        "Excel copy the cells and use Paste Special > Values, then upload the file again",
                        file=name, cell=f"{get_column_letter(index + 1)}{number}", formula=str(cell.value)[:50]))
                cells.append(_xlsx_text(cell.value))
            yield number, cells
        book.close()
    except ImportFileError:
        raise
    except Exception as exc:  # noqa: BLE001 - openpyxl raises many kinds for a zip that is no workbook
        raise ImportFileError(unreadable) from exc


def _xlsx_text(value) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))  # a phone number typed into a number cell
    if isinstance(value, dt.datetime):
        return value.date().isoformat() if value.time() == dt.time() else value.isoformat(sep=" ")
    if isinstance(value, (dt.date, dt.time)):
        return value.isoformat()
    return str(value)


def _cell_too_long(name: str, row: int, column) -> ImportFileError:
    return ImportFileError(_l("%(file)s, row %(row)d%(column)s: a cell holds more than %(max)s characters, more "
                              "than any field takes; shorten it", file=name, row=row,
                              column=f", {column}" if column else "", max=f"{MAX_CELL:,}"))


def _table(grid, name: str) -> Table:
    headers, rows = None, []
    for number, cells in grid:
        cells = [cell.strip() for cell in cells]
        for index, cell in enumerate(cells):
            if len(cell) > MAX_CELL:
                raise _cell_too_long(name, number, headers[index] if headers and index < len(headers) else None)
        if not any(cells):
            continue
        if headers is None:
            headers = cells
            continue
        if len(rows) == MAX_ROWS:
            raise ImportFileError(_l("%(file)s holds more than %(max)s records; one import takes at most %(max)s: "
                                     "split the file", file=name, max=f"{MAX_ROWS:,}"))
        rows.append((number, cells))
    if headers is None:
        raise ImportFileError(_l("%(file)s is empty; expected a header row, then one record per row", file=name))
    if not rows:
        raise ImportFileError(_l("%(file)s has a header row but no records", file=name))
    return Table(headers=headers, rows=rows)


# ============================================================================= matching columns to fields

@dataclass(frozen=True)
class Field:
    name: str  # a model field, or full_name (split into last and first name)
    label: object
    headers: tuple[str, ...]  # normalised (see _norm)
    required: bool = False


def _norm(header: str) -> str:
    """"E-mail", "e_mail " and "ＥＭＡＩＬ" all become "email"; Chinese stays as it is."""
    return "".join(ch for ch in unicodedata.normalize("NFKC", header or "").lower() if ch.isalnum())


def _field(name, label, *headers, required=False) -> Field:
    return Field(name, label, tuple(dict.fromkeys(_norm(h) for h in (name, *headers))), required)


_EMAIL = _field("email", _l("E-mail"), "e-mail", "mail", "email address", "邮箱", "电子邮件", "电子邮箱", "邮件",
                "邮箱地址")
_PHONE = _field("phone", _l("Phone"), "telephone", "tel", "mobile", "phone number", "电话", "手机", "手机号",
                "手机号码", "联系电话", "电话号码", "座机")
_OWNER = _field("owner", _l("Assigned to"), "owner email", "assigned to", "负责人", "所有者", "归属人", "跟进人")
_DESCRIPTION = _field("description", _l("Description"), "notes", "note", "remarks", "comment", "描述", "备注",
                      "说明")
_FULL_NAME = _field("full_name", _l("Full name"), "name", "contact name", "姓名", "名字", "联系人姓名")
_LAST_NAME = _field("last_name", _l("Last name"), "surname", "family name", "姓")
_FIRST_NAME = _field("first_name", _l("First name"), "given name", "名")
_ACCOUNT = _field("account", _l("Account"), "account name", "company", "company name", "customer", "客户",
                  "客户名称", "公司", "公司名称", "单位")
_CONTACT = _field("contact", _l("Contact"), "contact name", "联系人", "联系人姓名")

FIELDS: dict[str, tuple[Field, ...]] = {
    "account": (
        _field("name", _l("Name"), "account", "account name", "company", "company name", "customer", "名称",
               "公司名称", "客户名称", "公司", "客户", "单位", "企业名称", required=True),
        _field("industry", _l("Industry"), "行业"),
        _field("website", _l("Website"), "web", "url", "homepage", "网站", "网址", "官网"),
        _EMAIL, _PHONE,
        _field("city", _l("City"), "城市"),
        _field("country", _l("Country"), "国家", "国家地区"),
        _DESCRIPTION, _OWNER),
    "contact": (
        _FULL_NAME, _LAST_NAME, _FIRST_NAME,
        _field("title_text", _l("Job title"), "title", "job title", "position", "职位", "职务"),
        _EMAIL, _PHONE, _ACCOUNT, _DESCRIPTION, _OWNER),
    "lead": (
        _FULL_NAME, _LAST_NAME, _FIRST_NAME,
        _field("company", _l("Company"), "company name", "公司", "公司名称", "单位", "企业"),
        _EMAIL, _PHONE,
        _field("source", _l("Source"), "lead source", "来源", "线索来源"),
        _field("status", _l("Status"), "状态"),
        _DESCRIPTION, _OWNER),
    "opportunity": (
        _field("name", _l("Name"), "opportunity", "opportunity name", "名称", "商机", "商机名称", "项目",
               required=True),
        _ACCOUNT, _CONTACT,
        _field("stage", _l("Stage"), "阶段", "销售阶段"),
        _field("amount", _l("Amount"), "value", "金额"),
        _field("currency", _l("Currency"), "币种", "货币"),
        _field("probability", _l("Probability (%)"), "概率", "赢率", "成交概率"),
        _field("expected_close", _l("Expected close"), "close date", "expected close date", "预计成交日期",
               "预计成交", "成交日期"),
        _DESCRIPTION, _OWNER),
    "ticket": (
        _field("subject", _l("Subject"), "title", "主题", "标题", "问题", required=True),
        _DESCRIPTION,
        _field("status", _l("Status"), "状态"),
        _field("priority", _l("Priority"), "优先级"),
        _ACCOUNT, _CONTACT, _OWNER),
}
# Contacts and leads need a last name, given as such or within a full name.
_PERSON = ("contact", "lead")


def fields_of(entity: str) -> dict[str, Field]:
    return {f.name: f for f in FIELDS[entity]}


def column_names(table: Table) -> list[str]:
    """Each column's header, or "#3" for a column without one."""
    return [h or f"#{i + 1}" for i, h in enumerate(table.headers)]


def guess_mapping(headers: list[str], entity: str) -> list[str]:
    """The field name for each column ("" for ignore); a field goes to the first column naming it."""
    by_header = {header: f.name for f in FIELDS[entity] for header in f.headers}
    mapping, used = [], set()
    for header in headers:
        name = by_header.get(_norm(header), "")
        if name in used:
            name = ""
        used.add(name)
        mapping.append(name)
    return mapping


# ============================================================================= checking the rows (the dry run)

@dataclass
class Problem:
    row: int
    column: str  # the file's header of the column, or the field's label
    message: str
    hint: str
    value: str = ""
    duplicate: bool = False


@dataclass
class Plan:
    entity: str
    mapping: list[str]
    skip_duplicates: bool
    #: the values of each record to create, as the model's fields (owner and team as ids)
    records: list[dict] = field(default_factory=list)
    record_rows: list[int] = field(default_factory=list)  # the file row of each record
    problems: list[Problem] = field(default_factory=list)  # errors and duplicates, by row
    total_rows: int = 0

    @property
    def errors(self) -> list[Problem]:
        return [p for p in self.problems if not p.duplicate]

    @property
    def duplicates(self) -> list[Problem]:
        return [p for p in self.problems if p.duplicate]

    @property
    def ok(self) -> bool:
        return not self.errors


class _Bad(Exception):
    """One cell's problem: (message, hint)."""


CHOICES = {
    # field -> {accepted text (lower case): stored value}; the value itself is accepted too
    ("lead", "status"): {"新建": "new", "新": "new", "新线索": "new", "已联系": "contacted", "合格": "qualified",
                         "已确认": "qualified", "输单": "lost", "丢失": "lost", "已丢失": "lost", "无效": "lost",
                         "contacted": "contacted", "qualified": "qualified", "new": "new", "lost": "lost"},
    ("opportunity", "stage"): {"初步接洽": "prospecting", "需求确认": "qualification", "方案报价": "proposal",
                               "报价": "proposal", "商务谈判": "negotiation", "谈判": "negotiation", "赢单": "won",
                               "成交": "won", "已成交": "won", "输单": "lost", "丢单": "lost"},
    ("ticket", "status"): {"新建": "new", "处理中": "open", "打开": "open", "挂起": "pending", "等待": "pending",
                           "已解决": "solved", "已关闭": "closed", "关闭": "closed"},
    ("ticket", "priority"): {"低": "low", "普通": "normal", "一般": "normal", "中": "normal", "高": "high",
                             "紧急": "urgent"},
}
_STORED_CHOICES = {
    ("lead", "status"): ("new", "contacted", "qualified", "lost"),  # "converted" only by converting
    ("opportunity", "stage"): ("prospecting", "qualification", "proposal", "negotiation", "won", "lost"),
    ("ticket", "status"): ("new", "open", "pending", "solved", "closed"),  # history comes in as it was
    ("ticket", "priority"): ("low", "normal", "high", "urgent"),
}
_CURRENCY_NAMES = {"rmb": "CNY", "人民币": "CNY", "元": "CNY", "¥": "CNY", "￥": "CNY", "美元": "USD", "$": "USD",
                   "us$": "USD", "欧元": "EUR", "€": "EUR", "港币": "HKD", "港元": "HKD", "hk$": "HKD",
                   "日元": "JPY", "円": "JPY", "英镑": "GBP", "£": "GBP"}
_SETTLED_PROBABILITY = {"won": 100, "lost": 0}  # as moving a card on the board does
_DATE_FORMATS = ("%Y-%m-%d", "%Y/%m/%d", "%Y.%m.%d", "%Y年%m月%d日")
# The common two-character family names (复姓); any other Chinese name has a one-character one.
_COMPOUND_SURNAMES = {"欧阳", "司马", "上官", "诸葛", "东方", "皇甫", "令狐", "司徒", "慕容", "夏侯", "尉迟",
                      "公孙", "长孙", "宇文", "轩辕", "端木", "独孤", "南宫", "西门", "呼延", "澹台", "申屠"}


def split_full_name(text: str) -> tuple[str, str]:
    """(last name, first name) of a full name; see the module's docstring."""
    text = " ".join(text.split())
    if "," in text:
        last, _, first = text.partition(",")
        return last.strip(), first.strip()
    if any("\u4e00" <= ch <= "\u9fff" for ch in text) and " " not in text:
        cut = 2 if len(text) >= 3 and text[:2] in _COMPOUND_SURNAMES else 1
        return text[:cut], text[cut:]
    first, _, last = text.rpartition(" ")
    return last, first


def _phone_key(phone: str) -> str:
    digits = re.sub(r"\D", "", phone or "")
    if len(digits) == 13 and digits.startswith("86"):  # +86 before a mainland mobile number
        digits = digits[2:]
    return digits if len(digits) >= 6 else ""


def _duplicate_keys(entity: str, v: dict) -> list[tuple[str, tuple]]:
    """(field that matched, key) pairs that make two records of ``entity`` the same one."""
    keys = []
    if v.get("email"):
        keys.append(("email", ("email", v["email"].strip().lower())))
    if _phone_key(v.get("phone", "")):
        keys.append(("phone", ("phone", _phone_key(v["phone"]))))
    if entity == "account" and v.get("name"):
        keys.append(("name", ("name", v["name"].lower())))
    elif entity in _PERSON and v.get("last_name"):
        # Two people of the same name are the same one only at the same company.
        where = v.get("account") if entity == "contact" else (v.get("company") or "").lower()
        keys.append(("last_name", ("name", person_name(v.get("first_name", ""), v["last_name"]).lower(), where)))
    elif entity == "opportunity" and v.get("name"):
        keys.append(("name", ("name", v["name"].lower(), v.get("account"))))
    elif entity == "ticket" and v.get("subject"):
        keys.append(("subject", ("name", v["subject"].lower(), v.get("account"), v.get("description", ""))))
    return keys


_KEY_COLUMNS = {
    "account": ("name", "email", "phone"),
    "contact": ("first_name", "last_name", "email", "phone", "account"),
    "lead": ("first_name", "last_name", "company", "email", "phone"),
    "opportunity": ("name", "account"),
    "ticket": ("subject", "account", "description"),
}


class _Context:
    """What checking the rows needs from the database, loaded once per file."""

    def __init__(self, table: Table, mapping: list[str], entity: str, user: User):
        self.entity, self.user = entity, user
        self.seats = {u.email: u for u in User.select(User.id, User.email, User.team).where(User.active)}
        self.teams = {u.id: u.team_id for u in self.seats.values()}
        self.level = level = permissions.level(user, entity, "create")
        if level == "all":
            self.assignable = None  # any active seat
        elif level == "team" and user.team_id is not None:
            self.assignable = {u.id for u in self.seats.values() if u.team_id == user.team_id} | {user.id}
        else:
            self.assignable = {user.id}
        self.accounts = self._by_name(Account, self._cells(table, mapping, "account"))
        self.contacts = self._by_name(Contact, self._cells(table, mapping, "contact"))
        self.existing = self._existing_keys()

    @staticmethod
    def _cells(table, mapping, name) -> list[str]:
        if name not in mapping:
            return []
        index = mapping.index(name)
        return list({cells[index] for _, cells in table.rows if index < len(cells) and cells[index]})

    def _by_name(self, model, names: list[str]) -> dict[str, list[int]]:
        """{name: ids} of the records of ``model`` the seat can see with one of these names."""
        found: dict[str, list[int]] = {}
        if not names:
            return found
        wanted = set(names)
        query = permissions.visible(self.user, model, "read")
        if model is Account:
            rows = query.select(Account.id, Account.name).where(Account.name == _any(names))
            for row in rows:
                found.setdefault(row.name, []).append(row.id)
        else:
            from webapp.forms import contact_named

            rows = query.select(Contact.id, Contact.first_name, Contact.last_name).where(
                contact_named(Contact, _any(names)))
            for row in rows:
                for name in {f"{row.first_name} {row.last_name}".strip(), row.last_name + row.first_name}:
                    if name in wanted:
                        found.setdefault(name, []).append(row.id)
        return found

    def _existing_keys(self) -> dict[tuple, str]:
        """{duplicate key: "#12 Acme"} of the records the seat can see."""
        model = RECORD_MODELS[self.entity]
        columns = [getattr(model, name) for name in _KEY_COLUMNS[self.entity]]
        keys = {}
        query = permissions.visible(self.user, model, "read").select(model.id, *columns).tuples()
        for row_id, *values in query.iterator():
            values = dict(zip(_KEY_COLUMNS[self.entity], values))
            title = values.get("name") or values.get("subject") or person_name(values.get("first_name", ""),
                                                                              values.get("last_name", ""))
            for _, key in _duplicate_keys(self.entity, values):
                keys.setdefault(key, f"#{row_id} {title}")
        return keys


def _any(values: list[str]):
    """= ANY(array): one parameter however many names the file holds."""
    from peewee import Value, fn

    # Our own converter: the column's would turn the list into one text.
    return fn.ANY(Value(list(values), unpack=False, converter=list))


def validate(table: Table, mapping: list[str], entity: str, user: User, skip_duplicates: bool = True) -> Plan:
    """The dry run: every row checked, duplicates found, nothing written.

    ``mapping`` has one field name per column ("" to ignore it). Rows that duplicate an
    earlier row or a record the seat can see are left out when ``skip_duplicates``, and
    reported either way.
    :raise PermissionDenied: the seat may not create records of ``entity``.
    """
    if entity not in IMPORTABLE:
        raise ImportFileError(_l("%(entity)s records cannot be imported", entity=entity))
    if not permissions.can(user, entity, "create"):
        raise permissions.PermissionDenied(f"{user.email} may not create {entity}")
    known = fields_of(entity)
    mapping = ([(m or "") for m in mapping] + [""] * len(table.headers))[:len(table.headers)]
    plan = Plan(entity=entity, mapping=mapping, skip_duplicates=skip_duplicates, total_rows=len(table.rows))
    headers = column_names(table)
    if _mapping_problems(plan, headers, known):
        return plan
    ctx = _Context(table, mapping, entity, user)
    model = RECORD_MODELS[entity]
    required = "last_name" if entity in _PERSON else next(f.name for f in FIELDS[entity] if f.required)

    def column_of(name: str) -> str:
        """The file's header for a field (a last name may come from the full name column)."""
        for candidate in ((name, "full_name") if name in ("last_name", "first_name") else (name,)):
            if candidate in mapping:
                return headers[mapping.index(candidate)]
        return str(known[name].label)

    seen: dict[tuple, int] = {}  # duplicate key -> first row holding it
    for number, cells in table.rows:
        values, row_problems = {}, []
        extra = [c for c in cells[len(mapping):] if c]
        if extra:
            # Its values are shifted: checking them would only report the shift many times.
            plan.problems.append(Problem(number, "", _l("this row has %(n)d cells, the header %(m)d",
                                                        n=len(cells), m=len(mapping)),
                                         _l("a value holding the separator (a comma) must be in double quotes"),
                                         extra[0][:200]))
            continue
        for index, name in enumerate(mapping):
            text = cells[index] if index < len(cells) else ""
            if not name or not text:
                continue
            try:
                _set_value(values, name, text, model, ctx)
            except _Bad as bad:
                message, hint = bad.args
                row_problems.append(Problem(number, headers[index], message, hint, text[:200]))
        if not row_problems and not values.get(required):
            row_problems.append(Problem(number, column_of(required), _l("%(field)s is empty",
                                                                        field=known[required].label),
                                        _l("every record needs it: fill it in, or remove the row")))
        plan.problems += row_problems
        if row_problems:
            continue
        values.setdefault("owner", user.id)
        values["team"] = ctx.teams[values["owner"]]
        if entity == "opportunity" and "probability" not in values and values.get("stage") in _SETTLED_PROBABILITY:
            values["probability"] = _SETTLED_PROBABILITY[values["stage"]]
        keys = _duplicate_keys(entity, values)
        duplicate = _first_duplicate(keys, seen, ctx.existing)
        for _, key in keys:
            seen.setdefault(key, number)
        if duplicate is not None:
            name, where = duplicate
            plan.problems.append(Problem(
                number, column_of(name), _l("same %(field)s as %(where)s", field=known[name].label, where=where),
                _l("this row is skipped") if skip_duplicates else _l("this row is imported all the same"),
                str(values.get(name, ""))[:200], duplicate=True))
            if skip_duplicates:
                continue
        plan.records.append(values)
        plan.record_rows.append(number)
    return plan


def _first_duplicate(keys, seen: dict, existing: dict):
    """(field, where) of the first key an earlier row or a visible record already has, or None."""
    for name, key in keys:
        if key in seen:
            return name, _l("row %(row)d of this file", row=seen[key])
        if key in existing:
            return name, _l("the existing record %(record)s", record=existing[key])
    return None


def _mapping_problems(plan: Plan, headers: list[str], known: dict[str, Field]) -> bool:
    """Report unknown, doubled and missing required fields on the header row (row 1)."""
    first = {}
    for index, name in enumerate(plan.mapping):
        if not name:
            continue
        if name not in known:
            plan.problems.append(Problem(1, headers[index], _l("%(field)s is not a field of this record",
                                                              field=name), _l("choose another field or ignore")))
        elif name in first:
            plan.problems.append(Problem(1, headers[index], _l("%(field)s is chosen for two columns, %(a)s and %(b)s",
                                                              field=known[name].label, a=headers[first[name]],
                                                              b=headers[index]), _l("ignore one of them")))
        else:
            first[name] = index
    if plan.entity in _PERSON:
        needed = [] if ("last_name" in first or "full_name" in first) else [known["last_name"]]
    else:
        needed = [f for f in FIELDS[plan.entity] if f.required and f.name not in first]
    for f in needed:
        plan.problems.append(Problem(
            1, str(f.label), _l("no column is chosen for %(field)s, which every record needs", field=f.label),
            _l("choose the column that holds it, or add such a column to the file") if plan.entity not in _PERSON
            else _l("choose the column with the last name or the full name, or add one to the file")))
    return bool(plan.problems)


def _set_value(values: dict, name: str, text: str, model, ctx: _Context) -> None:
    """Put one cell's value into ``values`` as the field stores it. :raise _Bad: it does not fit."""
    entity = ctx.entity
    if name == "full_name":
        last, first = split_full_name(text)
        # A separate last or first name column wins over the full name.
        values.setdefault("last_name", _fit(model, "last_name", last))
        values.setdefault("first_name", _fit(model, "first_name", first))
    elif name in ("last_name", "first_name"):
        values[name] = _fit(model, name, text)
    elif name == "owner":
        seat = ctx.seats.get(text.lower())
        if seat is None:
            raise _Bad(_l("no active seat has this e-mail"),
                       _l("write the e-mail of an active seat, or leave the cell empty to own the record yourself"))
        if ctx.assignable is not None and seat.id not in ctx.assignable:
            raise _Bad(_l("you may not assign records to this seat"),
                       _l("your role lets you assign records only to yourself; leave the cell empty")
                       if ctx.level == "own" else _l("your role lets you assign records only to your team"))
        values["owner"] = seat.id
    elif name in ("account", "contact"):
        found = (ctx.accounts if name == "account" else ctx.contacts).get(text, [])
        if not found:
            raise _Bad(_l("no %(what)s of this name that you can see", what=fields_of(entity)[name].label),
                       _l("import or create it first, correct the name, or leave the cell empty"))
        if len(found) > 1:
            raise _Bad(_l("%(n)d records you can see have this name", n=len(found)),
                       _l("rename one of them so that names are unique, or leave the cell empty"))
        values[name] = found[0]
    elif name == "email":
        if not EMAIL_RE.match(text):
            raise _Bad(_l("not an e-mail address"), _l("write it as name@example.com, or leave the cell empty"))
        values[name] = _fit(model, name, text)
    elif (entity, name) in _STORED_CHOICES:
        allowed = _STORED_CHOICES[(entity, name)]
        value = CHOICES[(entity, name)].get(text.lower(), text.lower())
        if value not in allowed:
            raise _Bad(_l("not a known value"), _l("use one of: %(values)s", values=", ".join(allowed)))
        values[name] = value
    elif name == "currency":
        value = _CURRENCY_NAMES.get(text.lower(), text.upper())
        if value not in CURRENCIES:
            raise _Bad(_l("not a known currency"), _l("use one of: %(values)s", values=", ".join(CURRENCIES)))
        values[name] = value
    elif name == "amount":
        values[name] = _amount(text)
    elif name == "probability":
        values[name] = _probability(text)
    elif name == "expected_close":
        values[name] = _date(text)
    else:
        values[name] = _fit(model, name, text)


def _fit(model, name: str, text: str) -> str:
    limit = getattr(model._meta.fields[name], "max_length", None) or MAX_TEXT
    if len(text) > limit:
        raise _Bad(_l("%(n)s characters long; at most %(max)d fit", n=f"{len(text):,}", max=limit),
                   _l("shorten it"))
    return text


def _amount(text: str) -> decimal.Decimal:
    cleaned = re.sub(r"[\s,，¥￥$€£元]", "", text)
    try:
        value = decimal.Decimal(cleaned)
    except decimal.InvalidOperation:
        value = None
    if value is None or not value.is_finite():
        raise _Bad(_l("not an amount"), _l("write a number such as 12500.00, without other text"))
    if value < 0 or value > MAX_AMOUNT:
        raise _Bad(_l("out of range"), _l("an amount is between 0 and 999,999,999,999"))
    return value.quantize(decimal.Decimal("0.01"), rounding=decimal.ROUND_HALF_UP)


def _probability(text: str) -> int:
    try:
        value = decimal.Decimal(text.rstrip("%").strip())
        # A spreadsheet's "30%" cell holds 0.3.
        if "%" not in text and "." in text and value < 1:
            value *= 100
        whole = int(value.to_integral_value(rounding=decimal.ROUND_HALF_UP))
    except (decimal.InvalidOperation, ValueError):
        whole = None
    if whole is None or not 0 <= whole <= 100:
        raise _Bad(_l("not a probability"), _l("write a whole number from 0 to 100"))
    return whole


def _date(text: str) -> dt.date:
    if len(text) > 10 and text[10] in " T":  # a date and time: the date is what counts
        text = text[:10]
    for form in _DATE_FORMATS:
        try:
            return dt.datetime.strptime(text, form).date()
        except ValueError:
            continue
    raise _Bad(_l("not a date"), _l("write dates as YYYY-MM-DD, for example 2025-03-31"))


# ============================================================================= writing

def run_import(plan: Plan, user: User) -> int:
    """Create the plan's records in one transaction, each with its own 'create' audit row;
    returns how many. :raise ImportFileError: the plan has errors (nothing is written).
    :raise PermissionDenied: the seat may not create these records."""
    if not plan.ok:
        raise ImportFileError(ngettext("nothing was imported: %(num)d problem in the file; correct it and try again",
                                       "nothing was imported: %(num)d problems in the file; correct them and try again",
                                       len(plan.errors)), plan=plan)
    if not permissions.can(user, plan.entity, "create"):
        raise permissions.PermissionDenied(f"{user.email} may not create {plan.entity}")
    model = RECORD_MODELS[plan.entity]
    fields = {name: f for name, f in model._meta.fields.items() if name != "id"}
    tracked = [name for name in fields if name not in audit._UNTRACKED]
    now, ip = utcnow(), audit.client_ip()
    with database.atomic():
        # Ids are taken first so that each audit row names its record without relying on RETURNING's order.
        ids = [row[0] for row in database.execute_sql(
            "SELECT nextval(pg_get_serial_sequence(%s, 'id')) FROM generate_series(1, %s)",
            (model._meta.table_name, len(plan.records)))]
        rows, audit_rows = [], []
        for record_id, values in zip(ids, plan.records):
            row = {"id": record_id, "created_at": now, "updated_at": now, "deleted_at": None}
            for name, f in fields.items():
                if name not in row:
                    row[name] = values[name] if name in values else (f.default() if callable(f.default)
                                                                     else f.default)
            rows.append(row)
            audit_rows.append({"at": now, "user": user.id, "actor": user.email, "ip": ip, "entity": plan.entity,
                               "record_id": record_id, "action": "create",
                               "changes": {name: [None, audit.jsonable(row[name])] for name in tracked}})
        _copy(model, rows)
        _copy(AuditLog, audit_rows)
    return len(rows)


def _copy(model, rows: list[dict]) -> None:
    """Write rows (keyed by field name) with COPY, in batches: many times faster than INSERTs."""
    if not rows:
        return
    names = list(rows[0])
    columns = ", ".join(f'"{model._meta.fields[name].column_name}"' for name in names)
    cursor = database.connection().cursor()
    for start in range(0, len(rows), BATCH):
        lines = ("\t".join(_copy_text(row[name]) for name in names) for row in rows[start:start + BATCH])
        cursor.copy_expert(f'COPY "{model._meta.table_name}" ({columns}) FROM STDIN',
                           io.StringIO("\n".join(lines) + "\n"))


def _copy_text(value) -> str:
    """A value in COPY's text format: \\N for NULL, backslash escapes for the separators."""
    if value is None:
        return "\\N"
    if isinstance(value, bool):
        return "t" if value else "f"
    if isinstance(value, (dict, list)):
        value = json.dumps(value, ensure_ascii=False)
    elif isinstance(value, (dt.date, dt.datetime)):
        value = value.isoformat()
    return str(value).replace("\\", "\\\\").replace("\t", "\\t").replace("\n", "\\n").replace("\r", "\\r")


def import_table(table: Table, mapping: list[str], entity: str, user: User, skip_duplicates: bool = True,
                 reviewed_duplicates: list[int] | None = None) -> Plan:
    """The real import: ``validate()`` then ``run_import()`` in one transaction, so the records
    created are those of the dry run. Returns the plan.

    ``reviewed_duplicates``: the rows the reviewed dry run found duplicates; when the re-check
    finds others (records added or removed since), nothing is written.
    :raise ImportChanged: see ``reviewed_duplicates``.
    :raise ImportFileError: rows with problems (``exc.plan`` holds them); nothing is written."""
    with database.atomic():
        # One import of an entity at a time: the second one sees the first one's records as duplicates.
        database.execute_sql("SELECT pg_advisory_xact_lock(hashtext(%s))", (f"crm-appliance import {entity}",))
        plan = validate(table, mapping, entity, user, skip_duplicates)
        if reviewed_duplicates is not None and plan.ok:
            changed = _changes(reviewed_duplicates, [p.row for p in plan.duplicates])
            if changed:
                raise ImportChanged(_l("Nothing was imported: since your check, %(changes)s. Check the result "
                                       "below, then import.", changes=changed), plan=plan)
        run_import(plan, user)
    return plan


def _changes(reviewed: list[int], now: list[int]) -> str:
    """What differs between the duplicate rows reviewed and those found now ("" for nothing)."""
    def rows(numbers: list[int]) -> str:
        return ", ".join(map(str, numbers[:10])) + (", …" if len(numbers) > 10 else "")

    added = sorted(set(now) - set(reviewed))
    gone = sorted(set(reviewed) - set(now))
    parts = []
    if added:
        parts.append(ngettext("%(num)d row became a duplicate of a record added meanwhile (row %(rows)s)",
                              "%(num)d rows became duplicates of records added meanwhile (rows %(rows)s)",
                              len(added), rows=rows(added)))
    if gone:
        parts.append(ngettext("%(num)d row is no longer a duplicate (row %(rows)s)",
                              "%(num)d rows are no longer duplicates (rows %(rows)s)", len(gone), rows=rows(gone)))
    return "; ".join(str(p) for p in parts)


def report_csv(plan: Plan) -> bytes:
    """Every problem and duplicate of a plan as CSV (UTF-8 with BOM, for Excel)."""
    from webapp.crud import neutralise

    out = io.StringIO()
    out.write("\ufeff")
    writer = csv.writer(out)
    writer.writerow([str(_l("Row")), str(_l("Column")), str(_l("Kind")), str(_l("Problem")),
                     str(_l("What to do")), str(_l("Value"))])
    for p in sorted(plan.problems, key=lambda p: (p.row, p.duplicate)):
        writer.writerow([p.row, neutralise(p.column), str(_l("duplicate") if p.duplicate else _l("error")),
                         str(p.message), str(p.hint), neutralise(p.value)])
    return out.getvalue().encode("utf-8")
