"""Import of records from CSV and XLSX (issue 6, R-14): reading files in their encodings,
mapping columns by English or Chinese header, the dry run, duplicates, all-or-nothing,
permissions, audit rows and the web pages. Real PostgreSQL and real files, no mocks."""

from __future__ import annotations

import csv
import datetime as dt
import decimal
import io
import os
import re
import stat

import pytest
from openpyxl import Workbook

from appliance import importer
from appliance.importer import ImportFileError, guess_mapping, import_table, read_table, validate
from webapp import audit
from webapp.models import Account, AuditLog, Contact, Lead, Opportunity, Ticket
from webapp.permissions import PermissionDenied


def _xlsx(rows) -> bytes:
    book = Workbook()
    for row in rows:
        book.active.append(row)
    out = io.BytesIO()
    book.save(out)
    return out.getvalue()


def _xlsx_with_cell(text: str) -> bytes:
    """A workbook whose B2 holds ``text`` whatever its length (openpyxl itself writes at most
    Excel's 32,767 characters a cell, so the sheet's XML is edited)."""
    import zipfile

    source = zipfile.ZipFile(io.BytesIO(_xlsx([["name", "description"], ["Acme", "MARKER"]])))
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as archive:
        for entry in source.infolist():
            archive.writestr(entry, source.read(entry.filename).replace(b"MARKER", text.encode()))
    return out.getvalue()


def _counts() -> dict:
    return {m.__name__: m.select().count() for m in (Account, Contact, Lead, Opportunity, Ticket, AuditLog)}


def _read(text: str, name: str = "file.csv"):
    return read_table(text.encode("utf-8"), name)


# ----------------------------------------------------------------------------- reading files

CHINESE = "姓名,邮箱,手机,公司,负责人\n王伟,wang.wei@corp.cn,138 0013 8000,华信科技,\n欧阳修文,ouyang@corp.cn,,华信科技,\n"


@pytest.mark.parametrize("encoding", ["utf-8", "utf-8-sig", "gbk"])
def test_utf8_with_and_without_bom_and_gbk_read_the_same(encoding):
    table = read_table(CHINESE.encode(encoding), "联系人.csv")
    assert table.headers == ["姓名", "邮箱", "手机", "公司", "负责人"]
    assert table.rows == [(2, ["王伟", "wang.wei@corp.cn", "138 0013 8000", "华信科技", ""]),
                          (3, ["欧阳修文", "ouyang@corp.cn", "", "华信科技", ""])]


def test_windows_1252_text_is_refused_not_read_as_gbk():
    # GBK decodes it without an error: "Müller" would be stored as "M黮ler".
    data = "name,city\nAcme,Berlin\nAnna Müller,Köln\nJörg Schäfer,Düsseldorf\n".encode("cp1252")
    with pytest.raises(ImportFileError, match="^" + re.escape(
            "people.csv is neither UTF-8 nor GBK Chinese text (line 3 reads as “Anna M黮ler,K鰈n”); save it as "
            "CSV (UTF-8)")):
        read_table(data, "people.csv")


@pytest.mark.parametrize("bom", [b"", b"\xef\xbb\xbf"])
def test_utf8_with_one_damaged_byte_is_refused_naming_line_and_byte(bom):
    # Decoded as GBK, every Chinese name in it would be nonsense.
    text = "姓名,城市\n王伟,上海\n李娜,北京\n" * 20
    data = bom + text.encode() + "张三,广".encode() + b"\xff" + "州\n赵六,深圳\n".encode()
    with pytest.raises(ImportFileError, match="^" + re.escape(
            "c.csv is UTF-8 text with a damaged byte (0xFF, shown as �) on line 61: “张三,广�州”; correct that "
            "character")):
        read_table(data, "c.csv")


def test_gbk_with_rare_name_characters_still_reads():
    # 喆 and 堃 are outside GB2312, GBK's common area; a name may hold one all the same.
    text = "姓名,公司,城市\n王喆,华信科技,上海\n李堃,华信科技,北京\n阿凡提·买买提,天山贸易,乌鲁木齐\n张伟,长江实业,武汉\n"
    table = read_table(text.encode("gbk"), "c.csv")
    assert [cells[0] for _, cells in table.rows] == ["王喆", "李堃", "阿凡提·买买提", "张伟"]
    # GBK text that is partly valid UTF-8 by chance (职 is D6 B0) is read as GBK.
    assert read_table("职位,城市\n职员,上海\n".encode("gbk"), "c.csv").rows == [(2, ["职员", "上海"])]
    # Short files whose names are mostly rare characters, or valid UTF-8 up to a rare one
    # (石远 is valid UTF-8 in GBK; 珺 and 玥 are outside GB2312), are GBK all the same.
    for name in ("石远", "田喆", "李珺玥"):
        text = f"姓名,邮箱\n石远,shi@corp.cn\n{name},x@corp.cn\n"
        assert read_table(text.encode("gbk"), "c.csv").rows == [(2, ["石远", "shi@corp.cn"]), (3, [name, "x@corp.cn"])]
    assert read_table("姓名\n李珺玥\n".encode("gbk"), "c.csv").rows == [(2, ["李珺玥"])]


def test_a_single_latin_1_letter_is_enough_to_refuse_the_file():
    with pytest.raises(ImportFileError, match=re.escape("line 2 reads as “Fran鏾is Dupont,ACME”")):
        read_table("name,company\nFrançois Dupont,ACME\n".encode("latin-1"), "p.csv")


@pytest.mark.parametrize("separator", [",", ";", "\t"])
def test_comma_semicolon_and_tab_separated(separator):
    text = separator.join(["Name", "E-mail", "City"]) + "\n" + separator.join(['"Acme, Inc"', "a@acme.cn", "上海"])
    table = _read(text)
    assert table.headers == ["Name", "E-mail", "City"] and table.rows == [(2, ["Acme, Inc", "a@acme.cn", "上海"])]


def test_xlsx_values_numbers_and_dates_become_text():
    data = _xlsx([["Name", "Phone", "Amount", "Expected close"],
                  ["Renewal", 13800138000, 1234.5, dt.datetime(2025, 3, 31)],
                  [None, None, None, None],
                  ["Upgrade", "+86 21 5555", 10, dt.date(2025, 1, 2)]])
    table = read_table(data, "opps.xlsx")
    assert table.headers == ["Name", "Phone", "Amount", "Expected close"]
    assert table.rows == [(2, ["Renewal", "13800138000", "1234.5", "2025-03-31"]),
                          (4, ["Upgrade", "+86 21 5555", "10", "2025-01-02"])]


def test_our_own_csv_export_imports_back_unchanged():
    table = _read("name,phone,description\nAcme,'+86 21 5555,'=1+2\n")
    assert table.rows == [(2, ["Acme", "+86 21 5555", "=1+2"])]


def _too_many_rows() -> bytes:
    return ("name\n" + "x\n" * (importer.MAX_ROWS + 1)).encode()


@pytest.mark.parametrize("data,name,message", [
    (b"", "a.csv", "a.csv is empty; expected a header row"),
    (b" \r\n\r\n", "a.csv", "a.csv is empty"),
    (b"name,email\n", "a.csv", "a.csv has a header row but no records"),
    ("name\nCafé ÿ\n".encode("latin-1"), "a.csv", "a.csv is neither UTF-8 nor GBK text; save it as CSV (UTF-8)"),
    (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\x00", "logo.csv", "logo.csv is not a CSV text file but a PNG image"),
    (b"name\nAcme\n", "a.xlsx", "a.xlsx is not an Excel workbook (.xlsx) but text"),
    (b"name\n" + b"Acme\n" * 3000 + b"A\x00cme\n", "a.csv", "a.csv holds NUL characters"),
    (b"\x89PNG\r\n\x1a\n\x00\x00", "a.xlsx", "a.xlsx is not an Excel workbook (.xlsx) but a PNG image"),
    (b"PK\x03\x04 not really a zip", "a.xlsx", "a.xlsx cannot be read as an Excel workbook (.xlsx)"),
    (b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1", "old.xls", "old.xls is an old Excel 97-2003 workbook"),
    (b"name,description\nAcme," + b"x" * 1_000_000 + b"\n", "a.csv",
     "a.csv, row 2: a cell holds more than 100,000 characters"),
    (b"name,description\nAcme," + b"x" * 100_001 + b"\n", "a.csv",
     "a.csv, row 2, description: a cell holds more than 100,000 characters"),
    (_xlsx_with_cell("x" * 1_000_000), "a.xlsx",
     "a.xlsx, row 2, description: a cell holds more than 100,000 characters"),
    (_xlsx([["name", "amount"], ["Acme", "=1+2"]]), "a.xlsx",
     "a.xlsx: cell B2 holds a formula (=1+2); formulas are not imported"),
    (_too_many_rows(), "big.csv", "big.csv holds more than 200,000 records; one import takes at most 200,000"),
])
def test_a_malformed_file_is_refused_with_a_clear_message(data, name, message):
    with pytest.raises(ImportFileError, match="^" + re.escape(message)):
        read_table(data, name)


UNCLOSED = ("unclosed quote: the cell that starts at row 3 (line 3 of the file), column 2 (description) never "
            "ends; add its closing double quote")


def test_an_unclosed_quote_is_refused_naming_where_the_cell_starts():
    # Before: one account "Acme" whose description swallowed the rows after it.
    data = 'name,description\nZeta,"fine, ""quoted"" text"\nAcme,"Big customer\nBeta,x\nGamma,y\n'
    with pytest.raises(ImportFileError, match="^" + re.escape("a.csv: " + UNCLOSED)):
        _read(data, "a.csv")


def test_an_unclosed_quote_in_a_big_file_is_not_called_a_long_cell():
    # The open cell grows past csv's field limit before the data ends.
    data = "name,description\nZeta,z\nAcme,\"Big customer\n" + "Beta,x\n" * 50_000
    with pytest.raises(ImportFileError, match="^" + re.escape("a.csv: " + UNCLOSED)):
        _read(data, "a.csv")
    # A quoted cell that does close, over multiple lines, reads as one cell; a long one is a long cell.
    assert _read('name,description\nAcme,"two\nlines"\nBeta,x\n').rows == [(2, ["Acme", "two\nlines"]),
                                                                            (3, ["Beta", "x"])]
    with pytest.raises(ImportFileError, match=re.escape("a.csv, row 2: a cell holds more than 100,000")):
        _read('name,description\nAcme,"' + "x\n" * 100_000 + '"\nBeta,x\n', "a.csv")


def test_a_zip_that_is_no_workbook_is_refused():
    out = io.BytesIO()
    import zipfile
    with zipfile.ZipFile(out, "w") as archive:
        archive.writestr("readme.txt", "hello")
    with pytest.raises(ImportFileError, match="cannot be read as an Excel workbook"):
        read_table(out.getvalue(), "renamed.xlsx")


# ----------------------------------------------------------------------------- mapping

@pytest.mark.parametrize("entity,headers,expected", [
    ("account", ["Name", "E-mail", "Phone", "City", "Owner", "Whatever"],
     ["name", "email", "phone", "city", "owner", ""]),
    ("account", ["公司名称", "电子邮件", "电话", "行业", "负责人"], ["name", "email", "phone", "industry", "owner"]),
    ("contact", ["First name", "Last name", "Email", "Company", "Job title"],
     ["first_name", "last_name", "email", "account", "title_text"]),
    ("contact", ["姓名", "邮箱", "手机", "客户", "职位", "备注"],
     ["full_name", "email", "phone", "account", "title_text", "description"]),
    ("contact", ["姓", "名"], ["last_name", "first_name"]),
    ("lead", ["姓名", "公司", "来源", "状态"], ["full_name", "company", "source", "status"]),
    ("opportunity", ["名称", "客户", "阶段", "金额", "币种", "预计成交日期"],
     ["name", "account", "stage", "amount", "currency", "expected_close"]),
    ("opportunity", ["Opportunity name", "Account", "Stage", "Amount", "Expected close", "Assigned to"],
     ["name", "account", "stage", "amount", "expected_close", "owner"]),
    ("ticket", ["主题", "优先级", "状态", "描述", "联系人"], ["subject", "priority", "status", "description", "contact"]),
    # The second column naming a field is ignored, not mapped twice.
    ("account", ["Email", "E-mail"], ["email", ""]),
])
def test_columns_are_matched_by_english_or_chinese_header(entity, headers, expected):
    assert guess_mapping(headers, entity) == expected


def test_a_full_name_is_split_sensibly():
    assert [importer.split_full_name(n) for n in ("王伟", "欧阳修文", "John Smith", "Smith, John", "Madonna")] == [
        ("王", "伟"), ("欧阳", "修文"), ("Smith", "John"), ("Smith", "John"), ("Madonna", "")]


# ----------------------------------------------------------------------------- the dry run and the import

def test_dry_run_writes_nothing_and_the_import_creates_exactly_its_plan(make_seat):
    boss = make_seat("boss@corp.cn", role="boss")
    agent = make_seat("li@corp.cn", role="agent")
    acc = audit.create(boss.user, Account, {"name": "华信科技"})
    table = read_table(("姓名,邮箱,手机,公司,负责人\n"
                        "王伟,wang.wei@corp.cn,138 0013 8000,华信科技,LI@corp.cn\n"
                        "欧阳修文,ouyang@corp.cn,,华信科技,\n").encode("gbk"), "c.csv")
    mapping = guess_mapping(table.headers, "contact")
    before = _counts()
    plan = validate(table, mapping, "contact", boss.user)
    assert _counts() == before, "the dry run wrote something"
    assert plan.ok and plan.problems == [] and plan.record_rows == [2, 3]
    assert plan.errors == [] and len(plan.records) == 2
    real = import_table(table, mapping, "contact", boss.user)
    assert real.records == plan.records and real.record_rows == plan.record_rows
    after = _counts()
    assert after["Contact"] == before["Contact"] + 2 and after["AuditLog"] == before["AuditLog"] + 2
    rows = {c.last_name + c.first_name: c for c in Contact.select()}
    assert set(rows) == {"王伟", "欧阳修文"}
    wang = rows["王伟"]
    assert (wang.last_name, wang.first_name, wang.email, wang.phone, wang.account_id) == (
        "王", "伟", "wang.wei@corp.cn", "138 0013 8000", acc.id)
    assert wang.owner_id == agent.user.id and rows["欧阳修文"].owner_id == boss.user.id


def test_a_row_with_more_cells_than_the_header_is_reported(make_seat):
    """An unquoted comma shifts the row: reported, with what to do."""
    boss = make_seat("boss@corp.cn", role="boss")
    table = _read("Name,Email\nSmith, John,js@corp.cn\n")
    plan = validate(table, guess_mapping(table.headers, "contact"), "contact", boss.user)
    assert [(p.row, p.message) for p in plan.errors] == [(2, "this row has 3 cells, the header 2")]
    assert "double quotes" in plan.errors[0].hint


def test_each_created_record_gets_its_own_create_audit_row_with_its_values(make_seat):
    boss = make_seat("boss@corp.cn", role="boss", team="East")
    acc = audit.create(boss.user, Account, {"name": "Acme"})
    table = _read("名称,客户,阶段,金额,币种,预计成交日期,概率\n"
                  "续约2025,Acme,赢单,\"¥1,234.5\",人民币,2025/03/31,\n"
                  "Upgrade,,negotiation,100,USD,2025-06-30 00:00:00,30%\n")
    plan = import_table(table, guess_mapping(table.headers, "opportunity"), "opportunity", boss.user)
    assert plan.ok and len(plan.records) == 2
    renewal = Opportunity.get(Opportunity.name == "续约2025")
    assert (renewal.stage, renewal.amount, renewal.currency, renewal.expected_close, renewal.probability,
            renewal.account_id, renewal.team_id) == ("won", decimal.Decimal("1234.50"), "CNY", dt.date(2025, 3, 31),
                                                     100, acc.id, boss.user.team_id)
    upgrade = Opportunity.get(Opportunity.name == "Upgrade")
    assert (upgrade.stage, upgrade.probability, upgrade.expected_close) == ("negotiation", 30, dt.date(2025, 6, 30))
    for record in (renewal, upgrade):
        rows = list(AuditLog.select().where(AuditLog.entity == "opportunity", AuditLog.record_id == record.id))
        assert len(rows) == 1 and rows[0].action == "create" and rows[0].actor == "boss@corp.cn"
        assert rows[0].changes == {k: [None, v] for k, v in audit.snapshot(record).items()}
    # The same shape as a record created through the form's write path.
    by_hand = audit.create(boss.user, Opportunity, {"name": "by hand"})
    hand_row = AuditLog.get(AuditLog.entity == "opportunity", AuditLog.record_id == by_hand.id)
    assert set(hand_row.changes) == set(AuditLog.get(AuditLog.record_id == upgrade.id).changes)


def test_text_with_separators_and_escapes_is_stored_exactly(make_seat):
    boss = make_seat("boss@corp.cn", role="boss")
    description = 'line one\nline\ttwo \\N C:\\path "quoted" 备注\r\nend'
    table = _read("Name,Description\n" + '"Tab\tName",' + '"' + description.replace('"', '""') + '"\n')
    import_table(table, ["name", "description"], "account", boss.user)
    account = Account.get()
    assert (account.name, account.description) == ("Tab\tName", description)
    assert AuditLog.get(AuditLog.record_id == account.id).changes["description"] == [None, account.description]


def test_one_bad_row_means_nothing_is_written(make_seat):
    boss = make_seat("boss@corp.cn", role="boss")
    rows = "\n".join(f"Company {i},c{i}@corp.cn" for i in range(50))
    table = _read("Name,Email\n" + rows + "\nBroken,not-an-email\n")
    before = _counts()
    with pytest.raises(ImportFileError, match="nothing was imported: 1 problem in the file; correct it and try again") as err:
        import_table(table, ["name", "email"], "account", boss.user)
    assert _counts() == before
    [problem] = err.value.plan.errors
    assert (problem.row, problem.column, problem.message, problem.value) == (
        52, "Email", "not an e-mail address", "not-an-email")
    assert problem.hint == "write it as name@example.com, or leave the cell empty"


@pytest.mark.parametrize("entity,text,row,column,message", [
    ("account", "Name,Website\n" + "x" * 201 + ",\n", 2, "Name", "201 characters long; at most 200 fit"),
    ("account", "Name,City\n,Shanghai\n", 2, "Name", "Name is empty"),
    ("contact", "姓名,邮箱\n,a@b.cn\n", 2, "姓名", "Last name is empty"),
    ("opportunity", "Name,Amount\nBig,a lot\n", 2, "Amount", "not an amount"),
    ("opportunity", "Name,Amount\nBig,-5\n", 2, "Amount", "out of range"),
    ("opportunity", "Name,Stage\nBig,maybe\n", 2, "Stage", "not a known value"),
    ("opportunity", "Name,Expected close\nBig,31/12/2025\n", 2, "Expected close", "not a date"),
    ("opportunity", "Name,Probability\nBig,150\n", 2, "Probability", "not a probability"),
    ("opportunity", "Name,Currency\nBig,BTC\n", 2, "Currency", "not a known currency"),
    ("opportunity", "Name,Account\nBig,Nobody Ltd\n", 2, "Account", "no Account of this name that you can see"),
    ("lead", "Last name,Status\nWang,converted\n", 2, "Status", "not a known value"),
    ("ticket", "Subject,Priority\nPrinter,whenever\n", 2, "Priority", "not a known value"),
    ("account", "Name,Owner\nAcme,ghost@corp.cn\n", 2, "Owner", "no active seat has this e-mail"),
])
def test_each_bad_cell_is_reported_with_row_column_and_what_is_wrong(make_seat, entity, text, row, column, message):
    boss = make_seat("boss@corp.cn", role="boss")
    table = _read(text)
    plan = validate(table, guess_mapping(table.headers, entity), entity, boss.user)
    assert [(p.row, p.column, str(p.message)) for p in plan.errors] == [(row, column, message)]
    assert plan.errors[0].hint


@pytest.mark.parametrize("entity,headers,message", [
    ("account", "City,Email", "no column is chosen for Name, which every record needs"),
    ("contact", "Email,Phone", "no column is chosen for Last name, which every record needs"),
    ("ticket", "Description", "no column is chosen for Subject, which every record needs"),
])
def test_missing_required_columns_are_named(make_seat, entity, headers, message):
    boss = make_seat("boss@corp.cn", role="boss")
    table = _read(headers + "\n" + ",".join("x" for _ in headers.split(",")) + "\n")
    plan = validate(table, guess_mapping(table.headers, entity), entity, boss.user)
    assert [(p.row, str(p.message)) for p in plan.errors] == [(1, message)] and plan.records == []
    with pytest.raises(ImportFileError):
        import_table(table, guess_mapping(table.headers, entity), entity, boss.user)


def test_a_field_chosen_for_two_columns_is_a_problem(make_seat):
    boss = make_seat("boss@corp.cn", role="boss")
    table = _read("A,B\nx,y\n")
    plan = validate(table, ["name", "name"], "account", boss.user)
    assert [str(p.message) for p in plan.errors] == ["Name is chosen for two columns, A and B"]


def test_duplicates_within_the_file_and_against_visible_records(make_seat):
    agent = make_seat("li@corp.cn", role="agent")
    other = make_seat("wu@corp.cn", role="agent")
    mine = audit.create(agent.user, Contact, {"last_name": "Old", "email": "old@corp.cn"})
    audit.create(other.user, Contact, {"last_name": "Hidden", "email": "hidden@corp.cn"})
    table = _read("Last name,Email,Phone\n"
                  "A,a@corp.cn,+86 138 0013 8000\n"
                  "B,OLD@corp.cn,\n"            # an existing record of the agent's
                  "C,hidden@corp.cn,\n"         # exists, but not visible to the agent: not a duplicate
                  "D,d@corp.cn,13800138000\n"   # the same phone as row 2
                  "E,a@corp.cn,\n")             # the same e-mail as row 2
    mapping = guess_mapping(table.headers, "contact")
    plan = validate(table, mapping, "contact", agent.user)
    assert plan.ok and plan.errors == []
    assert [(p.row, p.column, str(p.message)) for p in plan.duplicates] == [
        (3, "Email", f"same E-mail as the existing record #{mine.id} Old"),
        (5, "Phone", "same Phone as row 2 of this file"),
        (6, "Email", "same E-mail as row 2 of this file")]
    assert plan.record_rows == [2, 4]
    kept = validate(table, mapping, "contact", agent.user, skip_duplicates=False)
    assert kept.record_rows == [2, 3, 4, 5, 6] and len(kept.duplicates) == 3
    assert all(str(p.hint) == "this row is imported all the same" for p in kept.duplicates)
    import_table(table, mapping, "contact", agent.user)
    assert sorted(c.last_name for c in Contact.select().where(Contact.owner == agent.user.id)) == ["A", "C", "Old"]


def test_people_of_the_same_name_are_duplicates_only_at_the_same_account(make_seat):
    boss = make_seat("boss@corp.cn", role="boss")
    audit.create(boss.user, Account, {"name": "Acme"})
    audit.create(boss.user, Account, {"name": "Beta"})
    table = _read("姓名,客户\n王伟,Acme\n王伟,Beta\n王伟,Acme\n")
    plan = validate(table, guess_mapping(table.headers, "contact"), "contact", boss.user)
    assert [(p.row, str(p.message)) for p in plan.duplicates] == [(4, "same Last name as row 2 of this file")]


# ----------------------------------------------------------------------------- permissions

def test_an_agent_owns_what_it_imports_and_cannot_name_another_seat(make_seat):
    agent = make_seat("li@corp.cn", role="agent", team="East")
    make_seat("wu@corp.cn", role="agent", team="East")
    table = _read("Name,Owner\nMine,\nAlso mine,LI@CORP.CN\nTheirs,wu@corp.cn\n")
    plan = validate(table, guess_mapping(table.headers, "account"), "account", agent.user)
    assert [(p.row, p.column, str(p.message), str(p.hint)) for p in plan.errors] == [
        (4, "Owner", "you may not assign records to this seat",
         "your role lets you assign records only to yourself; leave the cell empty")]
    with pytest.raises(ImportFileError):
        import_table(table, guess_mapping(table.headers, "account"), "account", agent.user)
    assert Account.select().count() == 0
    table = _read("Name,Owner\nMine,\nAlso mine,LI@CORP.CN\n")
    import_table(table, guess_mapping(table.headers, "account"), "account", agent.user)
    assert {(a.name, a.owner_id, a.team_id) for a in Account.select()} == {
        ("Mine", agent.user.id, agent.user.team_id), ("Also mine", agent.user.id, agent.user.team_id)}


def test_a_manager_assigns_within_its_team_and_the_boss_to_anyone(make_seat):
    boss = make_seat("boss@corp.cn", role="boss")
    manager = make_seat("m@corp.cn", role="manager", team="East")
    east = make_seat("e@corp.cn", role="agent", team="East")
    west = make_seat("w@corp.cn", role="agent", team="West")
    table = _read("Name,Owner\nOne,e@corp.cn\nTwo,w@corp.cn\n")
    mapping = guess_mapping(table.headers, "account")
    plan = validate(table, mapping, "account", manager.user)
    assert [(p.row, str(p.message)) for p in plan.errors] == [(3, "you may not assign records to this seat")]
    import_table(table, mapping, "account", boss.user)
    assert {(a.name, a.owner_id, a.team_id) for a in Account.select()} == {
        ("One", east.user.id, east.user.team_id), ("Two", west.user.id, west.user.team_id)}


def test_account_lookup_sees_only_what_the_seat_can_see(make_seat):
    agent = make_seat("li@corp.cn", role="agent")
    other = make_seat("wu@corp.cn", role="agent")
    audit.create(other.user, Account, {"name": "Their Ltd"})
    audit.create(agent.user, Account, {"name": "Twice"})
    audit.create(agent.user, Account, {"name": "Twice"})
    table = _read("Last name,Account\nA,Their Ltd\nB,Twice\n")
    plan = validate(table, guess_mapping(table.headers, "contact"), "contact", agent.user)
    assert [(p.row, str(p.message)) for p in plan.errors] == [
        (2, "no Account of this name that you can see"), (3, "2 records you can see have this name")]


def test_a_seat_without_create_may_not_import(make_seat, browser_for):
    from webapp.models import Role
    from webapp.permissions import ACTIONS, ENTITIES

    Role.create(name="reader", permissions={e: {a: ("all" if a == "read" else "none") for a in ACTIONS}
                                           for e in ENTITIES})
    reader = make_seat("r@corp.cn", role="reader")
    table = _read("Name\nAcme\n")
    with pytest.raises(PermissionDenied):
        validate(table, ["name"], "account", reader.user)
    b = browser_for(reader)
    assert b.get("/import/account").status_code == 404
    resp = b.client.post("/import/account", content_type="multipart/form-data",
                         data={"csrf_token": b.csrf("/"), "file": (io.BytesIO(b"Name\nAcme\n"), "a.csv")})
    assert resp.status_code == 404 and Account.select().count() == 0
    assert "/import/account" not in b.get("/accounts/").get_data(as_text=True)


# ----------------------------------------------------------------------------- the web pages

def _upload(b, entity: str, data: bytes, name: str):
    return b.client.post(f"/import/{entity}", content_type="multipart/form-data",
                         data={"csrf_token": b.csrf(f"/import/{entity}"), "file": (io.BytesIO(data), name)})


def test_upload_review_and_import_through_the_pages(make_seat, browser_for, settings):
    boss = make_seat("boss@corp.cn", role="boss")
    b = browser_for(boss)
    assert 'href="/import/account"' in b.get("/accounts/").get_data(as_text=True)
    page = b.get("/import/account")
    assert page.status_code == 200 and 'accept=".csv,.xlsx"' in page.get_data(as_text=True)

    data = _xlsx([["公司名称", "邮箱", "城市", "备注"], ["华信科技", "info@huaxin.cn", "上海", "老客户"],
                  ["Acme", "not an e-mail", "Beijing", ""]])
    resp = _upload(b, "account", data, "客户.xlsx")
    assert resp.status_code == 302
    review_url = resp.headers["Location"]
    token = review_url.rstrip("/").rsplit("/", 1)[1]
    job = settings.appliance.data_dir / "imports" / token
    assert {p.name for p in job.iterdir()} == {"upload.xlsx", "import.json", "rows.json"}
    assert all(stat.S_IMODE(os.stat(p).st_mode) == 0o600 for p in job.iterdir())
    # The workbook was parsed once, at the upload: the pages use the rows kept beside it.
    (job / "upload.xlsx").write_bytes(b"PK\x03\x04 no longer a workbook")

    html = b.get(review_url).get_data(as_text=True)
    assert "客户.xlsx: 2 rows; 1 to import, 1 problem, 0 duplicates." in html
    assert re.search(r'<select name="column-0"[^>]*>.*?<option value="name" selected>', html, re.S)
    assert "not an e-mail address" in html and "Import 1 row<" in html
    report = b.get(review_url + "/report.csv")
    assert report.status_code == 200 and report.mimetype == "text/csv"
    rows = list(csv.reader(io.StringIO(report.get_data().decode("utf-8-sig"))))
    assert rows[0] == ["Row", "Column", "Kind", "Problem", "What to do", "Value"]
    assert rows[1][:4] == ["3", "邮箱", "error", "not an e-mail address"] and rows[1][5] == "not an e-mail"

    # Importing with problems writes nothing and says so.
    mapping = {"column-0": "name", "column-1": "email", "column-2": "city", "column-3": "description"}
    before = _counts()
    resp = b.post(review_url, dict(mapping, skip_duplicates="1", action="import"), token_from=review_url)
    assert resp.status_code == 400 and "Nothing was imported" in resp.get_data(as_text=True)
    assert _counts() == before

    # Ignoring the e-mail column: the changed mapping is checked first, then imported.
    mapping["column-1"] = ""
    resp = b.post(review_url, dict(mapping, skip_duplicates="1", action="import"), token_from=review_url)
    assert resp.status_code == 200 and "The mapping changed" in resp.get_data(as_text=True)
    assert _counts() == before and "2 rows; 2 to import, 0 problems" in resp.get_data(as_text=True)
    resp = b.post(review_url, dict(mapping, skip_duplicates="1", action="import"), token_from=review_url)
    assert resp.status_code == 302 and resp.headers["Location"].endswith("/accounts/")
    assert "Imported 2 records." in b.get("/accounts/").get_data(as_text=True)
    assert {(a.name, a.email, a.city, a.description) for a in Account.select()} == {
        ("华信科技", "", "上海", "老客户"), ("Acme", "", "Beijing", "")}
    assert AuditLog.select().where(AuditLog.entity == "account", AuditLog.action == "create").count() == 2
    assert not job.exists(), "the upload is removed once imported"
    assert b.get(review_url).status_code == 404


def test_an_import_that_would_differ_from_the_reviewed_dry_run_writes_nothing(make_seat, browser_for):
    boss = make_seat("boss@corp.cn", role="boss")
    b = browser_for(boss)
    review_url = _upload(b, "account", "Name,City\nAcme,上海\nBeta,北京\nGamma,广州\n".encode(), "a.csv").headers[
        "Location"]
    token = b.csrf(review_url)  # the review page, as the seat sees it
    assert "3 to import" in b.get(review_url).get_data(as_text=True)
    # Meanwhile someone creates "Beta": the import would now skip row 3, which the review did not show.
    audit.create(boss.user, Account, {"name": "Beta"})
    form = {"column-0": "name", "column-1": "city", "skip_duplicates": "1", "action": "import", "csrf_token": token}
    before = _counts()
    resp = b.client.post(review_url, data=form)
    html = resp.get_data(as_text=True)
    assert resp.status_code == 409 and _counts() == before
    assert ("Nothing was imported: since your check, 1 row became a duplicate of a record added meanwhile "
            "(row 3). Check the result below, then import.") in html
    assert "a.csv: 3 rows; 2 to import, 0 problems, 1 duplicate." in html, "counts in the singular too"
    assert "same Name as the existing record" in html
    # The new dry run is now the one shown: importing it creates exactly that.
    assert b.client.post(review_url, data=form).status_code == 302
    assert sorted(a.name for a in Account.select()) == ["Acme", "Beta", "Gamma"]


def test_a_bad_upload_is_answered_on_the_form_and_nothing_is_kept(make_seat, browser_for, settings):
    b = browser_for(make_seat("boss@corp.cn", role="boss"))
    resp = _upload(b, "contact", b"\x89PNG\r\n\x1a\n\x00\x00\x00", "photo.csv")
    assert resp.status_code == 400
    assert "photo.csv is not a CSV text file but a PNG image" in resp.get_data(as_text=True)
    folder = settings.appliance.data_dir / "imports"
    assert not folder.exists() or not any(folder.iterdir())


def test_another_seats_upload_is_not_found(make_seat, browser_for):
    a = browser_for(make_seat("a@corp.cn", role="agent"))
    b = browser_for(make_seat("b@corp.cn", role="agent"))
    review_url = _upload(a, "lead", "姓名,公司\n王伟,华信\n".encode("gbk"), "leads.csv").headers["Location"]
    assert "leads.csv: 1 row; 1 to import, 0 problems, 0 duplicates." in a.get(review_url).get_data(as_text=True)
    assert b.get(review_url).status_code == 404
    assert b.get(review_url + "/report.csv").status_code == 404
    mapping = {"column-0": "full_name", "column-1": "company", "skip_duplicates": "1", "action": "import"}
    assert b.post(review_url, mapping).status_code == 404
    assert a.get(review_url.replace("/lead/", "/contact/")).status_code == 404, "bound to its entity too"
    assert Lead.select().count() == 0
    assert a.post(review_url, mapping).status_code == 302
    assert [(x.last_name, x.first_name, x.company) for x in Lead.select()] == [("王", "伟", "华信")]


def test_old_uploads_are_removed_when_a_new_import_starts(make_seat, browser_for, settings):
    b = browser_for(make_seat("boss@corp.cn", role="boss"))
    first = _upload(b, "ticket", b"Subject\nPrinter\n", "t.csv").headers["Location"].rsplit("/", 1)[1]
    old = settings.appliance.data_dir / "imports" / first
    day_ago = old.stat().st_mtime - 2 * 86400
    os.utime(old, (day_ago, day_ago))
    _upload(b, "ticket", b"Subject\nScanner\n", "t.csv")
    assert not old.exists()
