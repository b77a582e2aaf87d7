"""The Simplified Chinese UI translation: complete, in step with the code, compiled, and served.

When a test here fails after you changed UI text, run ``bash scripts/i18n.sh``, translate the new
or fuzzy entries in webapp/translations/zh/LC_MESSAGES/messages.po (and delete their ``#, fuzzy``
line), then run ``bash scripts/i18n.sh compile``.
"""

from __future__ import annotations

import io
import re
import shutil
import subprocess
from collections import Counter
from pathlib import Path

import pytest
from babel.messages import frontend
from babel.messages.extract import DEFAULT_KEYWORDS, extract_from_dir
from babel.messages.mofile import read_mo, write_mo
from babel.messages.pofile import read_po

ROOT = Path(__file__).resolve().parents[1]
BABEL_CFG = ROOT / "babel.cfg"
LC_MESSAGES = ROOT / "webapp" / "translations" / "zh" / "LC_MESSAGES"
PO_FILE = LC_MESSAGES / "messages.po"
MO_FILE = LC_MESSAGES / "messages.mo"
# The same keywords scripts/i18n.sh passes to pybabel (-k _l -k lazy_gettext -k N_).
KEYWORDS = {**DEFAULT_KEYWORDS, "_l": None, "lazy_gettext": None, "N_": None}
HOW_TO_FIX = ("run `bash scripts/i18n.sh`, translate the new or fuzzy entries in "
              "webapp/translations/zh/LC_MESSAGES/messages.po, then `bash scripts/i18n.sh compile`")

# %(name)s, %(n)d, %s, %%: anything Python's % operator treats as a conversion.
_PLACEHOLDER = re.compile(r"%(?:\([^)]*\))?[-#0 +]*(?:\*|\d+)?(?:\.(?:\*|\d+))?[hlL]?[diouxXeEfFgGcrsa%]")


def _catalog():
    with PO_FILE.open("rb") as f:
        return read_po(f, locale="zh", abort_invalid=True)


def _entries():
    return [m for m in _catalog() if m.id]


def _msgid(message) -> str:
    return message.id[0] if isinstance(message.id, (tuple, list)) else message.id


def _strings(message) -> list[str]:
    return list(message.string) if isinstance(message.string, (tuple, list)) else [message.string]


def _placeholders(text: str) -> Counter:
    return Counter(_PLACEHOLDER.findall(text))


def _bare_percent_signs(text: str) -> int:
    return _PLACEHOLDER.sub("", text).count("%")


def _method_map():
    parse = getattr(frontend, "parse_mapping_cfg", None) or frontend.parse_mapping
    with BABEL_CFG.open(encoding="utf-8") as f:
        return parse(f, str(BABEL_CFG))


def _extracted_msgids() -> dict[str, str]:
    """msgid -> first place it occurs, re-extracted from the sources with babel.cfg."""
    method_map, options_map = _method_map()
    found = {}
    for filename, lineno, message, _comments, _context in extract_from_dir(
            str(ROOT), method_map, options_map, keywords=KEYWORDS, comment_tags=("TRANSLATORS:",)):
        msgid = message[0] if isinstance(message, (tuple, list)) else message
        if msgid:
            found.setdefault(msgid, f"{filename}:{lineno}")
    return found


def test_every_entry_is_translated_and_not_fuzzy():
    catalog = _catalog()
    assert not catalog.fuzzy, "the .po header is marked fuzzy; remove its '#, fuzzy' line"
    entries = [m for m in catalog if m.id]
    assert len(entries) > 100
    untranslated = [_msgid(m) for m in entries if not all(s.strip() for s in _strings(m))]
    fuzzy = [_msgid(m) for m in entries if m.fuzzy]
    assert not untranslated, f"untranslated entries: {untranslated}; {HOW_TO_FIX}"
    assert not fuzzy, f"fuzzy entries (check the translation, then delete '#, fuzzy'): {fuzzy}"


def test_placeholders_match():
    problems = []
    for message in _entries():
        msgid = _msgid(message)
        for string in _strings(message):
            if _placeholders(string) != _placeholders(msgid):
                problems.append(f"{msgid!r}: placeholders {sorted(_placeholders(msgid))} vs "
                                f"{sorted(_placeholders(string))} in {string!r}")
            # Templates format every message with % (Jinja newstyle gettext): a stray % would break them.
            if _bare_percent_signs(string) != _bare_percent_signs(msgid):
                problems.append(f"{msgid!r}: a literal % was added or lost in {string!r}")
    assert not problems, "\n".join(problems)


def test_babel_checkers_pass():
    errors = [(m.id, [str(e) for e in errs]) for m, errs in _catalog().check() if errs]
    assert not errors, errors


def test_python_format_entries_are_flagged():
    unflagged = [_msgid(m) for m in _entries() if re.search(r"%\(\w+\)[sd]", _msgid(m)) and not m.python_format]
    assert not unflagged, unflagged


# ----------------------------------------------------------------------------- in step with the code

def test_every_ui_string_in_the_code_is_in_the_catalog():
    in_po = {_msgid(m) for m in _entries()}
    extracted = _extracted_msgids()
    assert len(extracted) > 100, "extraction found almost nothing: is babel.cfg right?"
    missing = {msgid: where for msgid, where in extracted.items() if msgid not in in_po}
    assert not missing, (
        "UI strings without a Chinese translation:\n"
        + "\n".join(f"  {where}: {msgid!r}" for msgid, where in sorted(missing.items(), key=lambda i: i[1]))
        + f"\nTo fix: {HOW_TO_FIX}.")


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_script_extracts_the_same_messages(tmp_path):
    """scripts/i18n.sh and this test agree on what is a UI string (keywords, babel.cfg)."""
    pot = tmp_path / "messages.pot"
    subprocess.run(["bash", str(ROOT / "scripts" / "i18n.sh"), "extract", str(pot)], cwd=ROOT, check=True,
                   capture_output=True, timeout=120)
    with pot.open("rb") as f:
        from_script = {_msgid(m) for m in read_po(f) if m.id}
    assert from_script == set(_extracted_msgids())
    assert from_script == {_msgid(m) for m in _entries()}, f"the .po is not up to date; {HOW_TO_FIX}"


def test_compiled_catalog_is_up_to_date():
    """The .mo holds the .po's translations. Compared message by message, not byte by byte:
    the bytes also carry the compiling Babel's version ("Generated-By"), which a fresh
    virtual environment may not share."""
    assert MO_FILE.is_file(), "messages.mo is missing: run `bash scripts/i18n.sh compile`"
    buf = io.BytesIO()
    write_mo(buf, _catalog(), use_fuzzy=False)
    buf.seek(0)
    def entries(messages):  # a plural entry's id and strings are lists: made hashable
        frozen = lambda value: tuple(value) if isinstance(value, (list, tuple)) else value  # noqa: E731
        return {(m.context, frozen(m.id), frozen(m.string)) for m in messages if m.id}

    with MO_FILE.open("rb") as f:
        compiled = entries(read_mo(f))
    expected = entries(read_mo(buf))
    assert len(expected) > 100 and compiled == expected, "messages.mo is stale: run `bash scripts/i18n.sh compile`"


# ----------------------------------------------------------------------------- served to the browser

ZH = {"Accept-Language": "zh-CN,zh;q=0.9,en;q=0.5"}
EN = {"Accept-Language": "en-US,en;q=0.9"}


def test_pages_follow_the_browser_language(make_seat, browser_for):
    b = browser_for(make_seat("boss@corp.cn", role="boss"))

    html = b.get("/", headers=ZH).get_data(as_text=True)
    assert '<html lang="zh-CN"' in html
    for text in ("工作台", "客户", "联系人", "线索", "商机", "销售漏斗", "工单", "活动", "系统管理", "退出登录"):
        assert text in html, text
    assert ">Accounts<" not in html

    html = b.get("/", headers=EN).get_data(as_text=True)
    assert '<html lang="en"' in html
    assert ">Accounts<" in html and ">Dashboard<" in html
    assert "客户" not in html


def test_every_main_page_renders_in_chinese(make_seat, browser_for):
    """Runs each page's messages through the real formatting (a broken placeholder raises here)."""
    b = browser_for(make_seat("boss@corp.cn", role="boss"))
    expected = {"/accounts/": "客户", "/opportunities/board": "销售漏斗", "/admin/seats": "席位",
                "/admin/audit": "审计日志", "/admin/logins": "登录日志", "/admin/roles": "角色与团队",
                "/tickets/new": "新建工单", "/search/?q=x": "未找到与“x”相关的结果。",
                "/admin/quota": "附件空间", "/admin/company": "公司资料", "/admin/announcements": "公告",
                "/admin/deleted/": "已删除项目", "/import/contact": "导入联系人"}
    for path in ["/", "/contacts/", "/leads/", "/opportunities/", "/tickets/", "/activities/",
                 "/accounts/new", "/contacts/new", "/leads/new", "/opportunities/new", "/activities/new",
                 *expected]:
        resp = b.get(path, headers=ZH)
        html = resp.get_data(as_text=True)
        assert resp.status_code == 200, (path, html[:2000])
        assert '<html lang="zh-CN"' in html, path
        assert expected.get(path, "工作台") in html, path


def test_password_problem_is_shown_in_chinese(settings, app):
    from appliance import seats
    from tests.conftest import Browser

    created = seats.add_seat(settings, "new@corp.cn", "New Seat", "agent")
    path = "/auth/set-password/" + created.link.rsplit("/", 1)[1]
    b = Browser(app.test_client())
    token = b.csrf(path)
    resp = b.client.post(path, data={"password": "short", "confirm": "short", "csrf_token": token}, headers=ZH)
    html = resp.get_data(as_text=True)
    assert resp.status_code == 400, html[:2000]
    assert f"密码至少需要 {seats.MIN_PASSWORD} 个字符。" in html


@pytest.mark.parametrize("zone", ["Asia/Shanghai", "America/New_York", "Europe/London", "Australia/Lord_Howe"])
def test_local_minutes_writes_what_babel_writes(pg_cluster, secrets_dir, db, zone):
    """show_value's fast time formatter against flask_babel's, every 37 minutes of a year
    (so across each zone's daylight-saving changes), and a few other years. (Before time zones
    existed, local mean time, they differ by seconds: pytz and zoneinfo round it differently.)"""
    import datetime as dt

    from flask_babel import format_datetime

    from tests.conftest import make_settings
    from webapp import create_app
    from webapp.i18n import local_minutes

    app = create_app(make_settings(pg_cluster, secrets_dir, web={"timezone": zone}), database=db)
    with app.test_request_context("/"):
        moments = [dt.datetime(2026, 1, 1) + dt.timedelta(minutes=37 * i) for i in range(0, 14_300)]
        moments += [dt.datetime(1970, 1, 1), dt.datetime(1991, 9, 15, 17, 30), dt.datetime(2038, 1, 19, 3, 14),
                    dt.datetime(2099, 12, 31, 23, 59), dt.datetime(2026, 3, 8, 7, 0, tzinfo=dt.timezone.utc)]
        differ = [(m, local_minutes(m), format_datetime(m, "yyyy-MM-dd HH:mm")) for m in moments
                  if local_minutes(m) != format_datetime(m, "yyyy-MM-dd HH:mm")]
        assert not differ, differ[:5]
        assert local_minutes(dt.datetime(2026, 7, 1, 12, 0)) != "2026-07-01 12:00"  # converted, not copied


def test_a_pages_catalogue_is_looked_up_once_and_translates_as_flask_babel_does(app, monkeypatch):
    """Templates' ``_()``/``ngettext()`` and the lazy labels use the request's catalogue,
    looked up once (webapp/i18n.py): the same text as Flask-Babel's own, escaped and filled
    in the same way, and the next request in another language gets its own."""
    import flask_babel
    from flask import g, render_template_string

    from webapp import i18n

    lookups = []
    real_lookup = flask_babel.Domain.get_translations
    monkeypatch.setattr(flask_babel.Domain, "get_translations", lambda self: lookups.append(1) or real_lookup(self))
    page = "{{ _('Nothing found for “%(q)s”.', q=q) }}|{{ ngettext('Import %(num)d row', 'Import %(num)d rows', 3) }}"
    for headers, want, label_text in ((ZH, "未找到与“&lt;b&gt;”相关的结果。|导入 3 行", "客户"),
                                      (EN, "Nothing found for “&lt;b&gt;”.|Import 3 rows", "Accounts")):
        with app.test_request_context("/", headers=headers):
            lookups.clear()
            label = i18n.lazy_gettext("Accounts")
            assert render_template_string(page + "|{{ label }}|{{ label }}", q="<b>", label=label) == \
                f"{want}|{label_text}|{label_text}"
            assert len(lookups) == 1, "the page looked its catalogue up once"
            assert g.page_translations is flask_babel.get_translations() and label_text == flask_babel.gettext("Accounts")
            assert str(i18n.lazy_gettext("There is no announcement %(id)d; list them with: crm-appliance "
                                         "announce list", id=7)).count("7") == 1


_AUDIT_CALL = re.compile(r'write_row\(\s*[^,]+,\s*"([a-z_]+)",\s*[^,]+,\s*"([a-z_]+)"')


def test_every_audited_kind_and_action_has_a_name_and_a_place_in_the_filter():
    """The audit page names what each row is about and what was done (translated like every
    label); an audit action or kind written in the code without a label would show its raw key."""
    from webapp.i18n import AUDIT_ACTIONS, CHOICE_LABELS, ENTITY_NAMES

    written = [m.groups() for path in ROOT.glob("[awi]*/*.py") for m in _AUDIT_CALL.finditer(path.read_text())]
    assert len(written) > 20, "the pattern no longer finds the audit calls"
    for entity, action in written:
        assert entity in ENTITY_NAMES, f"audit kind {entity!r} has no name in webapp/i18n.py ENTITY_NAMES"
        assert action in AUDIT_ACTIONS and action in CHOICE_LABELS, \
            f"audit action {action!r} is not in webapp/i18n.py AUDIT_ACTIONS and CHOICE_LABELS"
