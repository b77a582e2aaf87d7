"""Records through the web: audit rows, validation, bad input, paging, conversion, tickets, export."""

from __future__ import annotations

import csv
import io
import re
from html import escape as html_escape
from types import SimpleNamespace
from urllib.parse import quote

import pytest

from webapp import audit, company, prepared
from webapp.forms import seat_label
from webapp.models import Account, Activity, AuditLog, Contact, Lead, Note, Opportunity, Ticket, User


@pytest.fixture
def boss(make_seat):
    return make_seat("boss@corp.cn", role="boss")


@pytest.fixture
def agent(make_seat):
    return make_seat("agent@corp.cn", role="agent", team="East")


def _form(b, path: str, data: dict):
    return b.post(path, data, token_from=path)


# ----------------------------------------------------------------------------- audit

def test_every_write_leaves_an_audit_row_that_outlives_the_record(agent, browser_for):
    b = browser_for(agent)
    resp = _form(b, "/accounts/new", {"name": "Acme", "city": "Shanghai", "owner": seat_label(agent.user)})
    assert resp.status_code == 302
    acc = Account.get(Account.name == "Acme")
    resp = _form(b, f"/accounts/{acc.id}/edit", {"name": "Acme Ltd", "city": "Shanghai", "owner": seat_label(agent.user)})
    assert resp.status_code == 302
    assert b.post(f"/accounts/{acc.id}/delete").status_code == 302
    rows = list(AuditLog.select().where(AuditLog.entity == "account", AuditLog.record_id == acc.id)
                .order_by(AuditLog.id))
    assert [r.action for r in rows] == ["create", "update", "delete"]
    assert rows[0].changes["name"] == [None, "Acme"]
    assert rows[1].changes == {"name": ["Acme", "Acme Ltd"]}, "only the changed field, old -> new"
    assert rows[2].changes["name"] == ["Acme Ltd", None]
    assert all(r.user_id == agent.user.id and r.actor == agent.email and r.ip == "127.0.0.1" for r in rows)
    # Destroying the row itself leaves the audit trail in place.
    Account.delete().where(Account.id == acc.id).execute()
    assert AuditLog.select().where(AuditLog.entity == "account", AuditLog.record_id == acc.id).count() == 3


def test_saving_without_changes_writes_no_audit_row(agent, browser_for):
    b = browser_for(agent)
    acc = audit.create(agent.user, Account, {"name": "Same"})
    before = AuditLog.select().count()
    resp = _form(b, f"/accounts/{acc.id}/edit", {"name": "Same", "owner": seat_label(agent.user)})
    assert resp.status_code == 302
    assert AuditLog.select().count() == before


def test_audit_row_and_change_are_one_transaction(agent, monkeypatch):
    acc = audit.create(agent.user, Account, {"name": "Atomic"})

    def boom(*args, **kwargs):
        raise RuntimeError("audit store down")

    monkeypatch.setattr(audit, "write_row", boom)
    with pytest.raises(RuntimeError):
        audit.update(agent.user, acc, {"name": "Changed"})
    assert Account.get_by_id(acc.id).name == "Atomic", "no change may land without its audit row"


def test_notes_and_exports_are_audited(agent, browser_for):
    b = browser_for(agent)
    acc = audit.create(agent.user, Account, {"name": "Noted"})
    assert b.post(f"/notes/account/{acc.id}", {"body": "called them"}).status_code == 302
    note = Note.get(Note.body == "called them")
    assert AuditLog.get(AuditLog.entity == "note", AuditLog.record_id == note.id).action == "create"
    b.get("/accounts/export.csv?q=Noted").get_data()
    row = AuditLog.get(AuditLog.action == "export")
    assert row.entity == "account" and row.changes["rows"] == [None, 1]


def test_boss_filters_the_audit_log(boss, agent, browser_for):
    audit.create(agent.user, Account, {"name": "Filter me"})
    audit.create(boss.user, Lead, {"last_name": "Other"})
    b = browser_for(boss)
    html = b.get("/admin/audit?actor=agent@&entity=account").get_data(as_text=True)
    assert "Filter me" in html and "Other" not in html
    assert b.get("/admin/audit?from=not-a-date").status_code == 400
    assert b.get("/admin/audit?record_id=abc").status_code == 400
    html = b.get("/admin/logins?outcome=ok").get_data(as_text=True)
    assert "boss@corp.cn" in html


# ----------------------------------------------------------------------------- validation and bad input

def test_invalid_form_shows_field_errors_and_saves_nothing(agent, browser_for):
    b = browser_for(agent)
    resp = _form(b, "/opportunities/new", {"name": "", "amount": "lots", "probability": "150", "stage": "won",
                                           "currency": "CNY", "owner": seat_label(agent.user), "expected_close": "31/12"})
    assert resp.status_code == 400
    html = resp.get_data(as_text=True)
    assert html.count('class="error"') >= 4, "name, amount, probability and date each get an error"
    assert "Nothing was saved" in html
    assert Opportunity.select().count() == 0


@pytest.mark.parametrize("field,value", [
    ("name", "x" * 201), ("email", "not-an-email"), ("phone", "1" * 51), ("description", "d" * 20_001),
])
def test_over_long_or_malformed_input_is_a_field_error_never_a_500(agent, browser_for, field, value):
    data = {"name": "ok", "owner": seat_label(agent.user)}
    data[field] = value
    resp = _form(browser_for(agent), "/accounts/new", data)
    assert resp.status_code == 400
    assert Account.select().count() == 0


def test_unknown_owner_or_choice_is_refused(agent, browser_for):
    b = browser_for(agent)
    assert _form(b, "/accounts/new", {"name": "x", "owner": "(#999999)"}).status_code == 400
    assert _form(b, "/accounts/new", {"name": "x", "owner": "abc"}).status_code == 400
    assert _form(b, "/tickets/new", {"subject": "x", "status": "teleported", "priority": "normal",
                                     "owner": seat_label(agent.user)}).status_code == 400
    assert Account.select().count() == 0 and Ticket.select().count() == 0


@pytest.mark.parametrize("query", [
    "?after=garbage", "?before=%%%", "?after=WzEsMl0", "?sort=password_hash", "?status=teleported",
    "?account=abc", "?account=99999999999999", "?q=" + "x" * 5000, "?q=%25_%5C", "?dir=sideways",
])
def test_bad_list_parameters_answer_400_or_are_ignored_never_500(agent, browser_for, query):
    resp = browser_for(agent).get("/tickets/" + query)
    assert resp.status_code in (200, 400), resp.status_code


def test_search_text_is_literal_not_a_pattern(agent, browser_for):
    audit.create(agent.user, Account, {"name": "100% Cotton"})
    audit.create(agent.user, Account, {"name": "1000 Cotton"})
    html = browser_for(agent).get("/accounts/?q=100%25").get_data(as_text=True)
    assert "100% Cotton" in html and "1000 Cotton" not in html


NAMES = ["华信科技有限公司", "上海华信", "王伟", "Wang Wei", "Nordic Ltd", "100% Cotton", "a_b", "李",
         "Ünïcode GmbH", "abcabc", "+86 138 0013 8000", "A1B22", "Room 1111b"]


@pytest.mark.parametrize("word", ["华信", "华", "王伟", "伟", "wang", "WEI", "ltd", "N", "100%", "_", "a_b", "ün",
                                  "ab", "bca", "cab", "信科技", "王李", "x", "华华",
                                  "138", "00", "0", "1", "0013 8", "+86", "a1", "1b2", "B22", "111b", "11b", "1111"])
def test_search_finds_what_a_substring_test_finds_for_words_of_every_length(boss, browser_for, word):
    """Matching runs on a copy with every character but a digit tripled (migrations 0004,
    0006), and the index is asked for parts of the word: same results as a plain
    case-insensitive substring test, for one- and two-character words too."""
    for name in NAMES:
        audit.create(boss.user, Account, {"name": name})
    html = browser_for(boss).get("/accounts/?q=" + quote(word)).get_data(as_text=True)
    shown = {name for name in NAMES if f">{html_escape(name)}</a>" in html}
    assert shown == {name for name in NAMES if word.lower() in name.lower()}


def test_search_matches_within_one_column_never_across_two(agent, browser_for):
    contact = audit.create(agent.user, Contact, {"first_name": "Wei", "last_name": "Li", "email": "li@x.cn"})
    link = f'href="/contacts/{contact.id}"'
    b = browser_for(agent)
    assert link in b.get("/contacts/?q=Li").get_data(as_text=True)
    assert link not in b.get("/contacts/?q=WeiLi").get_data(as_text=True)
    assert link not in b.get("/contacts/?q=Li%1Fli").get_data(as_text=True)  # the column separator


def test_a_two_character_word_is_looked_up_in_the_index_not_read_from_every_row(boss, db):
    """pg_trgm has no trigram for a word under three characters, and most Chinese words are
    two: before migration 0004 such a search read every row (9 s on ten times the 50-seat
    data set). Now the index hands back only the rows that hold the word."""
    model = audit.create(boss.user, Account, {"name": "上海0号公司", "city": "上海"})
    columns = ", ".join(f'"{f.column_name}"' for f in Account._meta.sorted_fields if f.name not in ("id", "name"))
    db.execute_sql(f"INSERT INTO account (name, {columns}) SELECT '上海' || i || '号公司', {columns} "
                   f"FROM account, generate_series(1, 5000) AS i WHERE id = %s", (model.id,))
    audit.create(boss.user, Account, {"name": "华信科技", "city": "北京"})
    from webapp.crud import matches
    query = Account.select(Account.id).where(Account.deleted_at.is_null(), matches(Account, "华信"))
    sql, params = query.sql()
    with db.atomic():
        db.execute_sql("ANALYZE account")  # as autovacuum would: how common the word is, and
        db.execute_sql("SELECT gin_clean_pending_list('account_search')")  # the new rows in the index proper
        db.execute_sql("SET LOCAL enable_seqscan = off")  # too few rows for the planner to want an index
        db.execute_sql("SET LOCAL enable_indexscan = off")
        plan = db.execute_sql("EXPLAIN (ANALYZE, FORMAT JSON) " + sql, params).fetchone()[0][0]["Plan"]
    nodes, index_scans = [plan], []
    while nodes:
        node = nodes.pop()
        nodes += node.get("Plans", [])
        if node["Node Type"] == "Bitmap Index Scan":
            index_scans.append((node["Index Name"], node["Actual Rows"]))
    assert index_scans == [("account_search", 1)], index_scans


@pytest.mark.parametrize("role,path", [("agent", "/contacts/?q=王"), ("manager", "/contacts/?q=王"),
                                       ("boss", "/contacts/?q=王"), ("agent", "/search/?q=王"),
                                       ("agent", "/leads/?q=王&status=new"), ("manager", "/leads/?q=王&status=new")])
def test_a_search_walk_tests_the_word_in_the_index_not_in_the_table(make_seat, browser_for, db, role, path):
    """A common word is found by walking the seat's newest rows. The walk's index holds what
    the list narrows by (the search text, the choice filters, the gate's owner and team:
    migration 0008) and the page asks for its ids alone, so the walk is an index-only scan
    that fetches none of the rows it passes from the table (an agent's rows lie scattered
    over it); only the page's own rows are read, by id."""
    model = Lead if path.startswith("/leads/") else Contact
    table = model._meta.table_name
    seat = make_seat(f"{role}@corp.cn", role=role, team="East")
    colleague = make_seat("colleague@corp.cn", role="agent", team="East")
    outsider = make_seat("outsider@corp.cn", role="agent", team="West")
    rows = [{"last_name": ("王" if i % 3 == 0 else "李") + str(i), "owner": owner.user.id, "team": owner.user.team_id}
            for i in range(300) for owner in (seat, colleague, outsider)]
    if model is Lead:
        for n, row in enumerate(rows):
            row["status"] = "new" if n // 3 % 2 == 0 else "contacted"  # i even: new
    with db.atomic():
        # The test cluster commits asynchronously; VACUUM marks a page all-visible only once
        # its rows' commit is flushed (hint bits), as it would be on the appliance.
        db.execute_sql("SET LOCAL synchronous_commit = on")
        model.insert_many(rows).execute()
    db.execute_sql(f'VACUUM ANALYZE "{table}"')  # as autovacuum would: statistics and the visibility map
    b = browser_for(seat)
    b.get(path)  # a manager's or the boss's search looks up where its walk may end, then keeps it
    statements = [(sql, params) for sql, params in _queries(b, path) if f'FROM "{table}"' in sql]
    assert len(statements) == 1, statements
    scans = _scans(db, *statements[0], table)
    walks = [scan for scan in scans if scan[1] != f"{table}_pkey"]
    assert len(walks) == 1 and walks[0][0] == "Index Only Scan" and walks[0][2] == 0, scans
    # Rows were written i by i, each for the seat, the colleague, then the outsider.
    sees = {"agent": 1, "manager": 2, "boss": 3}[role]  # the seat; and its team; and everyone
    step = 6 if model is Lead else 3  # 王 at every third i, and of those the new leads at every sixth
    newest = [f"王{i}" for i in range(299 - 299 % step, -1, -step) for owner in (2, 1, 0) if owner < sees]
    shown = re.findall(r">(王\d+)</a>", b.get(path).get_data(as_text=True))
    assert shown == newest[:len(shown)] and len(shown) == 10, shown


def _plan_nodes(db, sql: str, params) -> list[dict]:
    """Every node of the statement's executed plan, with the planner kept off sequential and
    bitmap scans (a test's few rows would invite them): the walk it takes if it walks."""
    with db.atomic():
        for setting in ("enable_seqscan", "enable_bitmapscan"):
            db.execute_sql(f"SET LOCAL {setting} = off")
        plan = db.execute_sql("EXPLAIN (ANALYZE, FORMAT JSON) " + sql, params).fetchone()[0]
    nodes, seen = [plan[0]["Plan"]], []
    while nodes:
        node = nodes.pop()
        nodes += node.get("Plans", [])
        seen.append(node)
    return seen


def _scans(db, sql: str, params, table: str) -> list[tuple]:
    """(node type, index, heap fetches) of each scan of ``table`` in the statement's plan."""
    return [(node["Node Type"], node["Index Name"], node.get("Heap Fetches"))
            for node in _plan_nodes(db, sql, params) if node.get("Relation Name") == table]


WALK_WORDS = {  # word -> the rows i (0 oldest .. 119 newest) whose names hold it
    "Oldword": range(0, 20), "Newword": range(100, 120), "Sparse": range(0, 120, 25), "Common": range(120),
    "Middle": [*range(2, 90, 4), 116], "Fresh": [5, 20, 40, 117, 118, 119]}


@pytest.fixture
def walk_world(make_seat, db, monkeypatch):
    """120 rounds of accounts, one per round for the seat, a colleague and an outsider, each
    round changed later than the one before; the search walk bounded to the newest 30 for a
    table of 150 rows or more (``ANALYZE`` tells the planner how many there are), a walk on
    to the newest 90."""
    import datetime as dt

    from webapp import crud

    monkeypatch.setattr(crud, "SEARCH_WALK_ROWS", 30)
    monkeypatch.setattr(crud, "SEARCH_WALK_ON_ROWS", 90)
    monkeypatch.setattr(crud, "BOUNDED_FROM_ROWS", 150)
    monkeypatch.setattr(crud, "_walk_boundaries", {})
    seats = {role: make_seat(f"{role}@corp.cn", role=role, team="East") for role in ("agent", "manager", "boss")}
    colleague = make_seat("colleague@corp.cn", role="agent", team="East")
    outsider = make_seat("outsider@corp.cn", role="agent", team="West")
    start = dt.datetime(2024, 1, 1)
    rows = []
    for i in range(120):
        for n, owner in enumerate((seats["agent"], colleague, outsider)):
            words = " ".join(w for w, where in WALK_WORDS.items() if i in where)
            rows.append({"name": f"{words} {i}-{n}", "owner": owner.user.id, "team": owner.user.team_id,
                         "updated_at": start + dt.timedelta(minutes=i)})
    Account.insert_many(rows).execute()
    db.execute_sql("ANALYZE account")
    everyone = list(Account.select().where(Account.deleted_at.is_null())
                    .order_by(Account.updated_at.desc(), Account.id.desc()))
    return seats, everyone


def _newest_named(rows, word: str, seat) -> list[str]:
    team = seat.user.team_id
    level = {"agent": "own", "manager": "team", "boss": "all"}[seat.user.role.name]
    return [r.name for r in rows if word.lower() in r.name.lower() and (
        level == "all" or r.owner_id == seat.user.id or (level == "team" and r.team_id == team))]


@pytest.mark.parametrize("role", ["agent", "manager", "boss"])
@pytest.mark.parametrize("word", list(WALK_WORDS))
def test_a_bounded_search_walk_shows_the_rows_of_an_unbounded_one(walk_world, browser_for, role, word):
    """A manager's or the boss's newest-first search walks at most the table's newest
    ``SEARCH_WALK_ROWS`` rows, then reads the older matches from the index: the list's two
    pages and the global search show exactly the newest matches, wherever in time they lie."""
    seats, everyone = walk_world
    expected = _newest_named(everyone, word, seats[role])
    b = browser_for(seats[role])
    first = b.get(f"/accounts/?q={word}").get_data(as_text=True)
    shown = re.findall(r'href="/accounts/\d+">([^<]+)</a>', first)
    assert shown == expected[:10]
    after = re.search(r'href="(/accounts/\?[^"]*after=[^"]+)"', first)
    assert bool(after) == (len(expected) > 10)
    if after:
        second = b.get(after.group(1).replace("&amp;", "&")).get_data(as_text=True)
        assert re.findall(r'href="/accounts/\d+">([^<]+)</a>', second) == expected[10:20]
    found = b.get(f"/search/?q={word}").get_data(as_text=True)
    assert re.findall(r'href="/accounts/\d+">([^<]+)</a>', found) == expected[:10]


def _walked(db, sql: str, params, index: str) -> list[int]:
    """The entries each scan of ``index`` passed in the statement's plan."""
    return [node["Actual Rows"] + node.get("Rows Removed by Filter", 0)
            for node in _plan_nodes(db, sql, params) if node.get("Index Name") == index]


@pytest.mark.parametrize("role,statements", [("agent", 1), ("manager", 2), ("boss", 2)])
def test_a_search_for_old_rows_walks_no_further_than_the_bound(walk_world, browser_for, db, role, statements):
    """"Oldword" lies in the oldest rows only: an unbounded walk of a manager's or the boss's
    newest rows passes the whole table before it finds them. Bounded, the first statement
    passes at most the newest 30 rows, whatever plan the planner takes (here the walk is
    forced), and a second asks for the older matches; an agent's walk passes its own rows
    only and stays one statement."""
    seats, _ = walk_world
    b = browser_for(seats[role])
    b.get("/accounts/?q=Oldword")  # the walk boundary is looked up once and kept
    on_table = [(sql, params) for sql, params in _queries(b, "/accounts/?q=Oldword") if 'FROM "account"' in sql]
    assert len(on_table) == statements, on_table
    if role == "agent":
        return
    passed = _walked(db, *on_table[0], "account_recent")
    assert passed and max(passed) <= 30, passed
    assert "MATERIALIZED" in on_table[1][0]


@pytest.mark.parametrize("role", ["manager", "boss"])
def test_a_word_found_new_but_short_of_a_page_walks_on_only_if_dense_and_only_so_far(walk_world, browser_for,
                                                                                      db, role):
    """"Fresh" fills half a page among the newest 30 rows (three rounds) and has three old
    rounds: the walk goes on below the first edge, ends at the table's newest 90 rows, and a
    third statement reads the rest from the index. "Middle" is in one of the newest rounds and
    22 older ones: too sparse to walk on, its older matches come from the index at once. (The
    rows shown are checked against a reference by the test above.)"""
    seats, _ = walk_world
    b = browser_for(seats[role])
    for word in ("Fresh", "Middle"):
        b.get(f"/accounts/?q={word}")  # both walk boundaries are looked up once and kept
    on_table = [(sql, params) for sql, params in _queries(b, "/accounts/?q=Fresh") if 'FROM "account"' in sql]
    assert len(on_table) == 3, on_table
    first, walk_on, rest = on_table
    assert max(_walked(db, *first, "account_recent")) <= 30
    passed = _walked(db, *walk_on, "account_recent")
    assert passed and max(passed) <= 90 - 30, passed
    assert "MATERIALIZED" in rest[0] and "MATERIALIZED" not in walk_on[0]
    on_table = [(sql, params) for sql, params in _queries(b, "/accounts/?q=Middle") if 'FROM "account"' in sql]
    assert len(on_table) == 2 and "MATERIALIZED" in on_table[1][0], on_table


def test_the_walk_boundary_is_the_newest_rows_edge_kept_for_a_while(walk_world, monkeypatch):
    """The edge of the newest SEARCH_WALK_ROWS rows, looked up again once WALK_BOUNDARY_SECONDS
    have passed; none for a table too small to bound."""
    from webapp import crud

    _, everyone = walk_world
    edge = crud.walk_boundary(Account)
    assert edge == (everyone[29].updated_at, everyone[29].id)
    Account.create(name="Later", owner=everyone[0].owner_id, team=everyone[0].team_id)
    assert crud.walk_boundary(Account) == edge, "kept"
    later = crud.time.monotonic() + crud.WALK_BOUNDARY_SECONDS + 1
    monkeypatch.setattr(crud, "time", SimpleNamespace(monotonic=lambda: later))
    assert crud.walk_boundary(Account) == (everyone[28].updated_at, everyone[28].id), "looked up again"
    monkeypatch.setattr(crud, "_walk_boundaries", {})
    monkeypatch.setattr(crud, "BOUNDED_FROM_ROWS", 1000)
    assert crud.walk_boundary(Account) is None, "a table under BOUNDED_FROM_ROWS is walked whole"
    monkeypatch.setattr(crud, "_walk_boundaries", {})
    monkeypatch.setattr(crud, "BOUNDED_FROM_ROWS", 150)
    monkeypatch.setattr(crud, "SEARCH_WALK_ROWS", 10_000)
    assert crud.walk_boundary(Account) is None, "and one with fewer rows than the bound"


def test_the_dashboard_pipeline_is_summed_from_the_owner_index(agent, browser_for, db):
    """A seat's opportunities counted and summed by stage: the owner index holds the stage
    and the amount (migration 0008), so all of the seat's opportunities are read from it,
    none from the table (an agent's are scattered over it)."""
    with db.atomic():
        db.execute_sql("SET LOCAL synchronous_commit = on")  # see the search-walk test
        Opportunity.insert_many([{"name": f"Deal {i}", "owner": agent.user.id, "amount": i,
                                  "stage": ("proposal", "won")[i % 2]} for i in range(200)]).execute()
    db.execute_sql("VACUUM ANALYZE opportunity")
    b = browser_for(agent)
    statements = [(sql, params) for sql, params in _queries(b, "/") if "GROUP BY" in sql and '"opportunity"' in sql]
    assert len(statements) == 1, statements
    assert _scans(db, *statements[0], "opportunity") == [("Index Only Scan", "opportunity_owner", 0)]


@pytest.mark.parametrize("role", ["agent", "manager", "boss"])
def test_only_mine_lists_the_seats_own_records_and_names_the_owner_once(make_seat, browser_for, role):
    """"Only mine" narrows the gate to the seat's own records rather than adding ``owner_id
    = me`` to it: the same rows, but a condition the planner does not count twice."""
    seat = make_seat(f"{role}@corp.cn", role=role, team="East")
    colleague = make_seat("colleague@corp.cn", role="agent", team="East")
    audit.create(seat.user, Account, {"name": "Mine Ltd"})
    audit.create(colleague.user, Account, {"name": "Colleague Ltd"})
    b = browser_for(seat)
    for path in ("/accounts/?mine=1", "/accounts/?mine=1&q=Ltd"):
        html = b.get(path).get_data(as_text=True)
        assert "Mine Ltd" in html and "Colleague Ltd" not in html, path
        statements = [sql for sql, _ in _queries(b, path) if 'FROM "account"' in sql]
        assert len(statements) == 1 and statements[0].count('"owner_id" = %s') == 1, statements
    if role != "agent":
        assert "Colleague Ltd" in b.get("/accounts/").get_data(as_text=True)


# ----------------------------------------------------------------------------- paging

def test_keyset_pages_walk_every_row_once_in_both_directions(agent, browser_for):
    names = [f"Company {i:03d}" for i in range(37)]
    for name in names:
        audit.create(agent.user, Account, {"name": name})
    b = browser_for(agent)
    seen, url, pages = [], "/accounts/?sort=name&dir=asc", []
    while url:
        html = b.get(url).get_data(as_text=True)
        page = re.findall(r">(Company \d{3})</a>", html)
        pages.append(page)
        seen += page
        nxt = re.search(r'href="([^"]+after=[^"]+)"', html)
        url = nxt.group(1).replace("&amp;", "&") if nxt else None
    assert seen == names, "every row once, in order"
    assert [len(p) for p in pages] == [10, 10, 10, 7]
    # And back from the last page.
    back = [pages[-1]]
    prev = re.search(r'href="([^"]+before=[^"]+)"', html)
    while prev:
        html = b.get(prev.group(1).replace("&amp;", "&")).get_data(as_text=True)
        back.insert(0, re.findall(r">(Company \d{3})</a>", html))
        prev = re.search(r'href="([^"]+before=[^"]+)"', html)
    assert back == pages


# ----------------------------------------------------------------------------- lead conversion

def test_convert_lead_creates_account_contact_opportunity(agent, browser_for):
    lead = audit.create(agent.user, Lead, {"first_name": "Li", "last_name": "Wei", "company": "Wei Trading",
                                           "email": "li@wei.cn"})
    b = browser_for(agent)
    resp = _form(b, f"/leads/{lead.id}/convert", {"account_name": "Wei Trading", "create_opportunity": "y",
                                                  "opportunity_name": "Wei deal", "amount": "5000",
                                                  "currency": "CNY", "stage": "qualification"})
    assert resp.status_code == 302
    acc = Account.get(Account.name == "Wei Trading")
    con = Contact.get(Contact.last_name == "Wei")
    opp = Opportunity.get(Opportunity.name == "Wei deal")
    assert con.account_id == acc.id and opp.account_id == acc.id and opp.contact_id == con.id
    lead = Lead.get_by_id(lead.id)
    assert lead.status == "converted" and lead.converted_account_id == acc.id
    assert f"/opportunities/{opp.id}" in resp.headers["Location"]
    # A converted lead cannot be converted twice.
    resp = b.post(f"/leads/{lead.id}/convert", {"account_name": "Again"})
    assert resp.status_code == 302
    assert Account.select().where(Account.name == "Again").count() == 0


def test_convert_lead_is_all_or_nothing(agent, browser_for, monkeypatch):
    import webapp.leads

    lead = audit.create(agent.user, Lead, {"last_name": "Zhang", "company": "Zhang Co"})
    real_create = audit.create

    def failing_create(actor, model, values):
        if model is Opportunity:
            raise RuntimeError("disk full")
        return real_create(actor, model, values)

    monkeypatch.setattr(webapp.leads.audit, "create", failing_create)

    class FakeForm:  # the parsed form, as the view hands it over
        class existing_account:
            selected_id = None

        class account_name:
            data = "Zhang Co"

        class create_opportunity:
            data = True

        class opportunity_name:
            data = "Zhang deal"

        class amount:
            data = 1

        class currency:
            data = "CNY"

        class stage:
            data = "qualification"

    with pytest.raises(RuntimeError):
        webapp.leads.convert_lead(agent.user, lead, FakeForm)
    assert Account.select().count() == 0 and Contact.select().count() == 0
    assert Lead.get_by_id(lead.id).status == "new"
    assert AuditLog.select().where(AuditLog.entity.in_(["account", "contact"])).count() == 0


# ----------------------------------------------------------------------------- tickets

def test_ticket_status_flow(agent, browser_for):
    b = browser_for(agent)
    assert _form(b, "/tickets/new", {"subject": "Broken", "status": "solved", "priority": "normal",
                                     "owner": seat_label(agent.user)}).status_code == 400, "a ticket starts new or open"
    assert _form(b, "/tickets/new", {"subject": "Broken", "status": "new", "priority": "high",
                                     "owner": seat_label(agent.user)}).status_code == 302
    ticket = Ticket.get(Ticket.subject == "Broken")
    for status in ("open", "pending", "solved", "closed"):
        resp = _form(b, f"/tickets/{ticket.id}/edit", {"subject": "Broken", "status": status, "priority": "high",
                                                        "owner": seat_label(agent.user)})
        assert resp.status_code == 302, status
    resp = _form(b, f"/tickets/{ticket.id}/edit", {"subject": "Broken", "status": "open", "priority": "high",
                                                    "owner": seat_label(agent.user)})
    assert resp.status_code == 400, "closed is final"
    assert Ticket.get_by_id(ticket.id).status == "closed"


def test_ticket_hand_over_moves_owner_team_and_leaves_a_note(make_seat, browser_for):
    a = make_seat("a@corp.cn", role="agent", team="East")
    c = make_seat("c@corp.cn", role="agent", team="West")
    ticket = audit.create(a.user, Ticket, {"subject": "Printer"})
    b = browser_for(a)
    resp = _form(b, f"/tickets/{ticket.id}/transfer", {"to_user": seat_label(c.user), "comment": "West handles printers"})
    assert resp.status_code == 302
    ticket = Ticket.get_by_id(ticket.id)
    assert ticket.owner_id == c.user.id and ticket.team_id == c.user.team_id
    assert b.get(f"/tickets/{ticket.id}").status_code == 404
    html = browser_for(c).get(f"/tickets/{ticket.id}").get_data(as_text=True)
    assert "West handles printers" in html
    assert f"{a.user.name} → {c.user.name}" in html, "the timeline names the seats, not their ids"
    change = AuditLog.get(AuditLog.entity == "ticket", AuditLog.action == "update")
    assert change.changes["owner"] == [a.user.id, c.user.id]


# ----------------------------------------------------------------------------- board, activities, export

def test_board_move_by_json_and_by_plain_form(agent, browser_for):
    opp = audit.create(agent.user, Opportunity, {"name": "Deal"})
    b = browser_for(agent)
    token = b.csrf("/opportunities/board")
    resp = b.client.post(f"/opportunities/{opp.id}/stage", data={"stage": "proposal"},
                         headers={"X-CSRFToken": token, "Accept": "application/json"})
    assert resp.status_code == 200 and resp.get_json() == {"id": opp.id, "stage": "proposal"}
    resp = b.post(f"/opportunities/{opp.id}/stage", {"stage": "won"})
    assert resp.status_code == 302
    opp = Opportunity.get_by_id(opp.id)
    assert opp.stage == "won" and opp.probability == 100
    resp = b.client.post(f"/opportunities/{opp.id}/stage", data={"stage": "heaven"},
                         headers={"X-CSRFToken": token, "Accept": "application/json"})
    assert resp.status_code == 400


def test_activity_linked_to_a_record_shows_on_its_timeline(agent, browser_for, settings):
    acc = audit.create(agent.user, Account, {"name": "Linked"})
    b = browser_for(agent)
    path = f"/activities/new?parent=account:{acc.id}"
    assert f'value="account:{acc.id}"' in b.get(path).get_data(as_text=True)
    resp = b.post(path, {"kind": "call", "subject": "Call the buyer", "status": "planned",
                         "owner": seat_label(agent.user), "parent": f"account:{acc.id}", "due_at": "2026-12-01T09:30"},
                  token_from=path)
    assert resp.status_code == 302
    act = Activity.get(Activity.subject == "Call the buyer")
    assert (act.parent_type, act.parent_id) == ("account", acc.id)
    assert act.due_at.hour == 1, "09:30 in Asia/Shanghai is stored as 01:30 UTC"
    assert "Call the buyer" in b.get(f"/accounts/{acc.id}").get_data(as_text=True)
    assert "Call the buyer" in b.get("/").get_data(as_text=True), "on the dashboard as an open activity"


def test_export_neutralises_formulas(agent, browser_for):
    audit.create(agent.user, Account, {"name": "=HYPERLINK(\"http://evil\")", "phone": "+86 123"})
    text = browser_for(agent).get("/accounts/export.csv").get_data(as_text=True)
    rows = list(csv.DictReader(io.StringIO(text.lstrip("\ufeff"))))
    assert rows[0]["name"].startswith("'=") and rows[0]["phone"] == "'+86 123"


def test_an_export_is_audited_before_its_rows_go_out(agent, app):
    """A download aborted after its first rows has let them out: the audit row is already there."""
    from webapp.crud import MODULES, export_rows

    for n in range(3):
        audit.create(agent.user, Account, {"name": f"Exported {n}"})
    with app.test_request_context("/accounts/export.csv?q=Exported"):
        stream = export_rows(MODULES["account"], agent.user, {"q": "Exported"})
        first = next(stream)
        stream.close()  # the browser went away
    assert "name" in first, "the header went out"
    row = AuditLog.get(AuditLog.action == "export")
    assert (row.user_id, row.entity, row.changes["rows"], row.changes["search"]) == (
        agent.user.id, "account", [None, 3], [None, "Exported"])


FORMULA_LIKE = ["=1+2", "+86 123", "-2+3", "@SUM(A1)", "\t=cmd", "\r=cmd"]


@pytest.mark.parametrize("value", FORMULA_LIKE)
def test_csv_export_neutralises_every_formula_start(agent, browser_for, value):
    audit.create(agent.user, Account, {"name": "Formula Ltd", "description": value})
    text = browser_for(agent).get("/accounts/export.csv").get_data(as_text=True)
    rows = list(csv.DictReader(io.StringIO(text.lstrip("\ufeff"), newline="")))
    assert rows[0]["description"] == "'" + value, "an apostrophe first: no spreadsheet runs it"
    assert rows[0]["name"] == "Formula Ltd", "other text is left alone"


def test_excel_export_writes_formula_like_text_as_string_cells(agent, browser_for):
    import zipfile

    from openpyxl import load_workbook

    for value in FORMULA_LIKE:
        audit.create(agent.user, Account, {"name": f"Formula {value!r}", "description": value})
    data = browser_for(agent).get("/accounts/export.xlsx").get_data()
    sheet = load_workbook(io.BytesIO(data)).active
    header = [c.value for c in sheet[1]]
    cells = [row[header.index("description")] for row in sheet.iter_rows(min_row=2)]
    # The text as it is, no apostrophe (a carriage return comes back as a line feed: XML reads it so).
    assert sorted(c.value for c in cells) == sorted(v.replace("\r", "\n") for v in FORMULA_LIKE)
    assert {c.data_type for c in cells} == {"s"}, "string cells, never formulas"
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        xml = archive.read("xl/worksheets/sheet1.xml").decode()
    assert "<f>" not in xml and "<f " not in xml, "no formula element in the sheet"


def test_excel_export_holds_the_filtered_list_with_formulas_as_plain_text(agent, boss, browser_for):
    from openpyxl import load_workbook

    audit.create(agent.user, Account, {"name": "=HYPERLINK(\"http://evil\")", "phone": "+86 123",
                                       "city": "上海"})
    audit.create(agent.user, Account, {"name": "华信科技", "city": "北京"})
    audit.create(boss.user, Account, {"name": "Not the agent's", "city": "上海"})
    resp = browser_for(agent).get("/accounts/export.xlsx?q=上海")
    assert resp.status_code == 200 and resp.mimetype.endswith("spreadsheetml.sheet")
    sheet = load_workbook(io.BytesIO(resp.get_data()), read_only=False).active
    header = [c.value for c in sheet[1]]
    rows = [dict(zip(header, (c.value for c in row))) for row in sheet.iter_rows(min_row=2)]
    assert [r["name"] for r in rows] == ['=HYPERLINK("http://evil")'], "filtered, and only what the agent sees"
    name_cell = sheet.cell(row=2, column=header.index("name") + 1)
    assert name_cell.data_type == "s", "a string cell, which no spreadsheet evaluates"
    assert rows[0]["phone"] == "+86 123" and rows[0]["city"] == "上海"
    exports = AuditLog.select().where(AuditLog.entity == "account", AuditLog.action == "export")
    assert [e.changes["rows"] for e in exports] == [[None, 1]]


def test_dashboard_shows_my_pipeline_and_recent_changes(agent, browser_for):
    audit.create(agent.user, Opportunity, {"name": "Big one", "stage": "proposal", "amount": 12345})
    html = browser_for(agent).get("/").get_data(as_text=True)
    assert "12,345.00" in html and "Big one" in html


def test_recent_changes_are_the_newest_the_seat_may_read_across_modules(make_seat, browser_for):
    """The dashboard's one UNION ALL statement gives what reading each module through the gate
    and merging would: the newest ten, newest first, nothing outside the seat's level."""
    import datetime as dt

    from webapp import dashboard, permissions
    from webapp.models import RECORD_MODELS

    manager = make_seat("m@corp.cn", role="manager", team="East")
    east = make_seat("e@corp.cn", role="agent", team="East")
    west = make_seat("w@corp.cn", role="agent", team="West")
    values = {"account": {"name": "Acme"}, "contact": {"first_name": "Li", "last_name": "Wei"},
              "lead": {"first_name": "Zhao", "last_name": "Min"}, "opportunity": {"name": "Deal"},
              "ticket": {"subject": "Broken"}, "activity": {"subject": "Call back", "kind": "call"}}
    start = dt.datetime(2026, 1, 1)
    n = 0
    for seat in (east, west, manager):
        for entity, model in RECORD_MODELS.items():
            for _ in range(2):
                record = audit.create(seat.user, model, values[entity])
                n += 1
                model.update(updated_at=start + dt.timedelta(minutes=7 * n % 61, seconds=n)).where(
                    model.id == record.id).execute()
    for seat in (east, west, manager):
        expected = sorted((r for m in RECORD_MODELS.values() for r in permissions.visible(seat.user, m)),
                          key=lambda r: r.updated_at, reverse=True)[:10]
        got = dashboard.recent_changes(seat.user)
        assert [(r.entity, r.id, r.updated_at, r.title) for r in got] == \
            [(r.entity, r.id, r.updated_at, r.title) for r in expected], seat.email
        assert all(permissions.allows(seat.user, r, "read") for r in got)
    html = browser_for(west).get("/").get_data(as_text=True)
    assert "Zhao Min" in html and "Li Wei" in html


def _statements(b, path) -> list[str]:
    """The SQL statements one page view runs, as text."""
    return [str((sql, params)) for sql, params in _queries(b, path)]


def _queries(b, path) -> list[tuple[str, list]]:
    """(SQL, parameters) of each statement one page view runs (peewee logs each one at DEBUG),
    a prepared statement's as the SELECT it runs."""
    import logging

    logger = logging.getLogger("peewee")
    seen = []

    class Collect(logging.Handler):
        def emit(self, record):
            if record.name == "peewee":  # queries only, not peewee.pool's connection lines
                sql, params = record.msg
                if not sql.startswith("PREPARE "):  # once per connection; its EXECUTEs as the SELECT they run
                    seen.append(prepared.as_select(sql, params))

    handler = Collect()
    # The announcement banner is cached for a few seconds per process; start every
    # request with it expired so that two requests differ only in what they show.
    company._forget_cached()
    logger.addHandler(handler)
    old = logger.level
    logger.setLevel(logging.DEBUG)
    try:
        assert b.get(path).status_code == 200
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old)
    return seen


def test_list_page_costs_the_same_queries_for_1_row_or_10(agent, browser_for):
    """No query per row: owners and accounts come in the page's own query."""
    b = browser_for(agent)
    acc = audit.create(agent.user, Account, {"name": "Parent"})
    audit.create(agent.user, Opportunity, {"name": "Deal 0", "account": acc.id})
    one = len(_statements(b, "/opportunities/"))
    for i in range(1, 10):
        audit.create(agent.user, Opportunity, {"name": f"Deal {i}", "account": acc.id})
    ten = len(_statements(b, "/opportunities/"))
    assert one == ten, f"{one} queries for 1 row, {ten} for 10"


def test_a_record_page_loads_its_links_in_its_own_query(agent, browser_for):
    """The owner, account and contact a record points at come with the record, not one query
    each; and no query of a page view reads a seat's password hash."""
    b = browser_for(agent)
    acc = audit.create(agent.user, Account, {"name": "Parent"})
    con = audit.create(agent.user, Contact, {"first_name": "Li", "last_name": "Wei", "account": acc.id})
    bare = audit.create(agent.user, Opportunity, {"name": "Bare deal"})
    linked = audit.create(agent.user, Opportunity, {"name": "Linked deal", "account": acc.id, "contact": con.id})
    assert b.post(f"/notes/opportunity/{linked.id}", {"body": "Called"}).status_code == 302
    bare_statements = _statements(b, f"/opportunities/{bare.id}")
    linked_statements = _statements(b, f"/opportunities/{linked.id}")
    assert len(linked_statements) == len(bare_statements), "\n".join(linked_statements)
    html = b.get(f"/opportunities/{linked.id}").get_data(as_text=True)
    assert "Parent" in html and "Li Wei" in html and agent.user.name in html
    assert '"user"' in linked_statements[0]  # the session's seat
    assert not [q for q in linked_statements if "password_hash" in q]


def test_editing_keeps_a_link_to_a_record_the_editor_cannot_see(make_seat, browser_for):
    """A's contact sits on B's account: A sees "(#id)" without the name, and saving keeps the link."""
    a = make_seat("a@corp.cn", role="agent", team="East")
    b = make_seat("b@corp.cn", role="agent", team="East")
    secret_account = audit.create(b.user, Account, {"name": "Secret Holdings"})
    contact = audit.create(a.user, Contact, {"last_name": "Mine", "account": secret_account.id})
    browser = browser_for(a)
    form = browser.get(f"/contacts/{contact.id}/edit").get_data(as_text=True)
    assert "Secret Holdings" not in form and f'value="(#{secret_account.id})"' in form
    resp = _form(browser, f"/contacts/{contact.id}/edit", {"last_name": "Mine, renamed",
                                                            "account": f"(#{secret_account.id})",
                                                            "owner": seat_label(a.user)})
    assert resp.status_code == 302
    contact = Contact.get_by_id(contact.id)
    assert contact.last_name == "Mine, renamed" and contact.account_id == secret_account.id
    # Nor do the contact's page and the contact list name that account.
    for path in (f"/contacts/{contact.id}", "/contacts/"):
        html = browser.get(path).get_data(as_text=True)
        assert "Secret Holdings" not in html and f"#{secret_account.id}" in html, path
    # Pointing another contact at that account by its id is still refused.
    resp = _form(browser, "/contacts/new", {"last_name": "Probe", "account": f"(#{secret_account.id})",
                                            "owner": seat_label(a.user)})
    assert resp.status_code == 400


def test_a_save_without_the_lookup_field_keeps_the_link_instead_of_failing(agent, browser_for):
    """Found by the load test (bench/load): a POST that leaves out a lookup field got a 500."""
    acc = audit.create(agent.user, Account, {"name": "Kept Ltd"})
    contact = audit.create(agent.user, Contact, {"last_name": "Wang", "account": acc.id})
    b = browser_for(agent)
    resp = _form(b, f"/contacts/{contact.id}/edit", {"last_name": "Wang Wei", "owner": seat_label(agent.user)})
    assert resp.status_code == 302
    contact = Contact.get_by_id(contact.id)
    assert contact.last_name == "Wang Wei" and contact.account_id == acc.id


def test_the_owner_is_picked_by_name_and_a_form_holds_no_list_of_seats(agent, make_seat, browser_for):
    """The "Assigned to" picker: any active seat by its exact name (in any case) or the "Name (#id)"
    the autocomplete offers; a form page lists no seats (it listed all 1000 in the load test)."""
    from appliance import seats

    wang = make_seat("wang@corp.cn", name="Wang Fang")
    twins = [make_seat(f"li{i}@corp.cn", name="Li Na") for i in (1, 2)]
    gone = make_seat("gone@corp.cn", name="Zhao Gone")
    seats.disable_seats([gone.user])
    b = browser_for(agent)
    form = b.get("/accounts/new").get_data(as_text=True)
    assert "<option" not in form and "Wang Fang" not in form
    assert f'value="{html_escape(seat_label(agent.user))}"' in form, "a new record is the seat's own by default"
    assert 'data-lookup="/search/seats"' in form

    assert _form(b, "/accounts/new", {"name": "By name", "owner": "wang fang"}).status_code == 302
    assert Account.get(Account.name == "By name").owner_id == wang.user.id
    assert _form(b, "/accounts/new", {"name": "By label", "owner": seat_label(twins[1].user)}).status_code == 302
    assert Account.get(Account.name == "By label").owner_id == twins[1].user.id
    assert _form(b, "/accounts/new", {"name": "Unsaid"}).status_code == 302, "a POST without the field"
    assert Account.get(Account.name == "Unsaid").owner_id == agent.user.id
    refused = {"Li Na": "Several seats have that name", "Zhao Gone": "No active seat by that name",
               seat_label(gone.user): "No active seat by that name", "": "Choose a seat",
               "(#999999)": "No active seat by that name"}
    for typed, message in refused.items():
        resp = _form(b, "/accounts/new", {"name": "Refused", "owner": typed})
        assert resp.status_code == 400 and message in resp.get_data(as_text=True), typed
    assert not Account.select().where(Account.name == "Refused").exists()


def test_a_record_of_a_disabled_seat_keeps_its_owner_when_saved_unchanged(agent, make_seat, browser_for):
    from appliance import seats

    leaver = make_seat("leaver@corp.cn", role="agent", name="Leaver")
    boss = make_seat("boss@corp.cn", role="boss")
    acc = audit.create(leaver.user, Account, {"name": "Left behind"})
    seats.disable_seats([leaver.user])
    b = browser_for(boss)
    form = b.get(f"/accounts/{acc.id}/edit").get_data(as_text=True)
    assert f'value="{seat_label(leaver.user)}"' in form
    assert _form(b, f"/accounts/{acc.id}/edit", {"name": "Left behind, renamed",
                                                  "owner": seat_label(leaver.user)}).status_code == 302
    acc = Account.get_by_id(acc.id)
    assert acc.name == "Left behind, renamed" and acc.owner_id == leaver.user.id
    # A POST without the field at all keeps it too; handing it on works as for any record.
    assert _form(b, f"/accounts/{acc.id}/edit", {"name": "Left behind, again"}).status_code == 302
    assert Account.get_by_id(acc.id).owner_id == leaver.user.id
    assert _form(b, f"/accounts/{acc.id}/edit", {"name": "Taken over", "owner": seat_label(agent.user)}).status_code == 302
    assert Account.get_by_id(acc.id).owner_id == agent.user.id


def test_the_seat_lookup_suggests_active_seats_by_part_of_the_name_and_nothing_else(agent, make_seat, browser_for):
    from appliance import seats

    for i in range(12):
        make_seat(f"chen{i}@corp.cn", name=f"陈{i:02d} Chen")
    gone = make_seat("gone@corp.cn", name="陈 Gone")
    seats.disable_seats([gone.user])
    b = browser_for(agent)
    rows = b.get("/search/seats?q=CHEN").get_json()
    assert len(rows) == 10, "at most ten suggestions"
    assert [r["label"] for r in rows] == sorted(r["label"] for r in rows)
    assert all(r["label"].startswith("陈") and r["label"].endswith(f"(#{r['id']})") for r in rows)
    assert [r["label"] for r in b.get("/search/seats?q=陈05").get_json()] == [
        seat_label(User.get(User.email == "chen5@corp.cn"))]
    assert b.get("/search/seats?q=Gone").get_json() == [], "a disabled seat is not offered"
    assert b.get("/search/seats?q=").get_json() == []
    assert "@" not in b.get("/search/seats?q=c").get_data(as_text=True), "names only, no e-mail addresses"


def test_a_record_loaded_as_a_link_has_its_title_and_the_gates_columns(agent, make_seat, db):
    """with_related loads a linked record with permissions.link_columns only: its title (made of
    the model's title_fields) and what permissions.allows decides on must be all there."""
    from webapp import permissions
    from webapp.models import RECORD_MODELS

    other = make_seat("other@corp.cn", role="agent")
    values = {"account": {"name": "Acme"}, "contact": {"first_name": "Li", "last_name": "Wei"},
              "lead": {"first_name": "Zhao", "last_name": "Min"}, "opportunity": {"name": "Deal"},
              "ticket": {"subject": "Broken"}, "activity": {"subject": "Call back", "kind": "call"}}
    assert set(values) == set(RECORD_MODELS)
    for entity, model in RECORD_MODELS.items():
        full = audit.create(agent.user, model, values[entity])
        link = model.select(*permissions.link_columns(model, model)).where(model.id == full.id).get()
        assert link.title == full.title and link.title.strip(), entity
        for seat in (agent.user, other.user):
            assert permissions.allows(seat, link, "read") == permissions.allows(seat, full, "read"), entity
