"""The permission gate (R-6) for every entity and every route.

Two teams: East (manager M, agents A and B) and West (agent C), plus the boss.
Each agent owns one record of every kind, with a unique marker in its name.
An agent sees only its own; the manager sees the team's; the boss sees all.
A record outside the seat's level answers 404, exactly like a missing one.
"""

from __future__ import annotations

import io
import re
import shutil

import pytest

from webapp import audit
from webapp.forms import seat_label
from webapp.models import RECORD_MODELS, Account, Activity, Contact, Lead, Note, Opportunity, Ticket

ROUTES = {  # entity -> (url prefix, field holding the marker)
    "account": ("/accounts", "name"),
    "contact": ("/contacts", "last_name"),
    "lead": ("/leads", "last_name"),
    "opportunity": ("/opportunities", "name"),
    "ticket": ("/tickets", "subject"),
    "activity": ("/activities", "subject"),
}


def _make_records(owner_seat, tag: str) -> dict:
    """One record of each kind owned by the seat, each named with ``tag``."""
    user = owner_seat.user
    acc = audit.create(user, Account, {"name": f"acc-{tag}"})
    con = audit.create(user, Contact, {"last_name": f"con-{tag}", "account": acc.id})
    lead = audit.create(user, Lead, {"last_name": f"lead-{tag}", "company": f"co-{tag}"})
    opp = audit.create(user, Opportunity, {"name": f"opp-{tag}", "account": acc.id, "amount": 1000})
    tic = audit.create(user, Ticket, {"subject": f"tic-{tag}", "account": acc.id})
    act = audit.create(user, Activity, {"subject": f"act-{tag}", "parent_type": "account", "parent_id": acc.id})
    note = audit.add_note(user, acc, f"note-{tag}")
    return {"account": acc, "contact": con, "lead": lead, "opportunity": opp, "ticket": tic, "activity": act,
            "note": note}


@pytest.fixture
def world(make_seat, browser_for):
    seats = {
        "boss": make_seat("boss@corp.cn", role="boss"),
        "M": make_seat("m@corp.cn", role="manager", team="East"),
        "A": make_seat("a@corp.cn", role="agent", team="East"),
        "B": make_seat("b@corp.cn", role="agent", team="East"),
        "C": make_seat("c@corp.cn", role="agent", team="West"),
    }
    records = {name: _make_records(seats[name], name) for name in ("A", "B", "C")}
    # B's contact on A's account: A must not see it in the account's related list.
    audit.create(seats["B"].user, Contact, {"last_name": "con-B-on-A", "account": records["A"]["account"].id})
    return {"seats": seats, "records": records, "browser": lambda who: browser_for(seats[who])}


# The marker prefix of each entity's records.
TAGS = {"account": "acc", "contact": "con", "lead": "lead", "opportunity": "opp", "ticket": "tic", "activity": "act"}
# Which owners' records each viewer may see.
VISIBLE = {"A": {"A"}, "B": {"B"}, "C": {"C"}, "M": {"A", "B"}, "boss": {"A", "B", "C"}}


def _markers(html: str, entity: str) -> set[str]:
    """Whose records of ``entity`` a page or file shows ("con-B-on-A" is not B's marker)."""
    return set(re.findall(rf"\b{TAGS[entity]}-([ABC])(?![\w-])", html))


@pytest.mark.parametrize("viewer", ["A", "C", "M", "boss"])
@pytest.mark.parametrize("entity", list(ROUTES))
def test_list_detail_edit_delete_follow_the_level(world, viewer, entity):
    prefix, _ = ROUTES[entity]
    b = world["browser"](viewer)
    html = b.get(f"{prefix}/").get_data(as_text=True)
    assert _markers(html, entity) == VISIBLE[viewer], f"{viewer} list of {entity}"
    for owner in "ABC":
        record = world["records"][owner][entity]
        allowed = owner in VISIBLE[viewer]
        expected = 200 if allowed else 404
        assert b.get(f"{prefix}/{record.id}").status_code == expected, (viewer, owner, "detail")
        assert b.get(f"{prefix}/{record.id}/edit").status_code == expected, (viewer, owner, "edit form")
        assert b.get(f"{prefix}/{record.id}/delete").status_code == expected, (viewer, owner, "delete form")
        if not allowed:
            # The writes are refused too, and nothing changes.
            resp = b.post(f"{prefix}/{record.id}/edit", {"owner": seat_label(world["seats"][viewer].user)})
            assert resp.status_code == 404
            assert b.post(f"{prefix}/{record.id}/delete").status_code == 404
            fresh = RECORD_MODELS[entity].get_by_id(record.id)
            assert fresh.deleted_at is None and fresh.owner_id == record.owner_id


@pytest.mark.parametrize("viewer", ["A", "M", "boss"])
@pytest.mark.parametrize("entity", list(ROUTES))
def test_export_search_and_lookup_follow_the_level(world, viewer, entity):
    prefix, _ = ROUTES[entity]
    b = world["browser"](viewer)
    csv_text = b.get(f"{prefix}/export.csv").get_data(as_text=True)
    assert _markers(csv_text, entity) == VISIBLE[viewer], f"{viewer} export of {entity}"
    from openpyxl import load_workbook
    sheet = load_workbook(io.BytesIO(b.get(f"{prefix}/export.xlsx").get_data())).active
    cells = " ".join(str(c.value) for row in sheet.iter_rows() for c in row if c.value is not None)
    assert _markers(cells, entity) == VISIBLE[viewer], f"{viewer} Excel export of {entity}"
    tag = TAGS[entity]
    found = b.get(f"/search/?q={tag}-").get_data(as_text=True)
    assert _markers(found, entity) == VISIBLE[viewer], f"{viewer} search of {entity}"
    lookup = b.get(f"/search/lookup/{entity}?q={tag}-").get_json()
    assert {row["label"].split(" ")[0].split("-")[1] for row in lookup if "-on-" not in row["label"]} \
        == VISIBLE[viewer]


def test_board_shows_only_visible_cards(world):
    for viewer in ("A", "M", "boss"):
        html = world["browser"](viewer).get("/opportunities/board").get_data(as_text=True)
        assert _markers(html, "opportunity") == VISIBLE[viewer], viewer


def test_only_mine_on_the_board_and_the_dashboard_is_the_seats_own(world):
    """A manager sees the team's cards, but "only mine" and the dashboard's "my" lists hold
    the manager's own records alone (M owns none; A's ticket and activity are A's)."""
    m = world["browser"]("M")
    assert _markers(m.get("/opportunities/board").get_data(as_text=True), "opportunity") == {"A", "B"}
    assert _markers(m.get("/opportunities/board?mine=1").get_data(as_text=True), "opportunity") == set()
    assert _markers(world["browser"]("A").get("/opportunities/board?mine=1").get_data(as_text=True),
                    "opportunity") == {"A"}
    mine_part = m.get("/").get_data(as_text=True).split("Recent changes")[0]  # the "My ..." cards
    assert _markers(mine_part, "ticket") == _markers(mine_part, "activity") == set()
    a_mine_part = world["browser"]("A").get("/").get_data(as_text=True).split("Recent changes")[0]
    assert _markers(a_mine_part, "ticket") == {"A"}


def test_related_lists_go_through_the_gate(world):
    account = world["records"]["A"]["account"]
    html_a = world["browser"]("A").get(f"/accounts/{account.id}").get_data(as_text=True)
    assert "con-A<" in html_a and "con-B-on-A" not in html_a
    html_m = world["browser"]("M").get(f"/accounts/{account.id}").get_data(as_text=True)
    assert "con-A<" in html_m and "con-B-on-A" in html_m


def test_special_actions_on_foreign_records_are_404(world):
    b = world["browser"]("A")
    rec_b = world["records"]["B"]
    assert b.get(f"/leads/{rec_b['lead'].id}/convert").status_code == 404
    assert b.post(f"/leads/{rec_b['lead'].id}/convert", {"account_name": "x"}).status_code == 404
    assert b.post(f"/opportunities/{rec_b['opportunity'].id}/stage", {"stage": "won"}).status_code == 404
    assert b.get(f"/tickets/{rec_b['ticket'].id}/transfer").status_code == 404
    assert b.post(f"/tickets/{rec_b['ticket'].id}/transfer",
                  {"to_user": seat_label(world["seats"]["A"].user)}).status_code == 404
    assert b.post(f"/notes/account/{rec_b['account'].id}", {"body": "sneaky"}).status_code == 404
    assert b.post(f"/notes/{rec_b['note'].id}/delete").status_code == 404
    assert Opportunity.get_by_id(rec_b["opportunity"].id).stage == "prospecting"
    assert Ticket.get_by_id(rec_b["ticket"].id).owner_id == world["seats"]["B"].user.id
    assert Note.select().where(Note.body == "sneaky").count() == 0
    assert Note.get_by_id(rec_b["note"].id).deleted_at is None


def test_activity_cannot_link_to_a_foreign_record(world):
    b = world["browser"]("A")
    foreign = world["records"]["B"]["account"]
    resp = b.post("/activities/new", {"kind": "task", "subject": "linked", "status": "planned",
                                      "owner": seat_label(world["seats"]["A"].user), "parent": f"account:{foreign.id}"},
                  token_from="/activities/new")
    assert resp.status_code == 400
    assert Activity.select().where(Activity.subject == "linked").count() == 0
    # The link is a hidden field: its error must still reach the page, or the seat reads
    # "correct the fields marked below" with no field marked (as after a ticket was handed over).
    assert "The linked record does not exist or is not yours to see." in resp.get_data(as_text=True)


def test_the_seat_lookup_needs_a_login_and_gives_names_only(world, app):
    """Any seat may assign a record to any active seat, so each may look the seats up: names
    and ids (as lists show them), never e-mail addresses, and nothing without a login."""
    anonymous = app.test_client().get("/search/seats?q=A")
    assert anonymous.status_code == 302 and "/auth/login" in anonymous.headers["Location"]
    for viewer in ("A", "C", "M", "boss"):
        rows = world["browser"](viewer).get("/search/seats?q=b").get_json()
        assert {r["id"] for r in rows} == {world["seats"][w].user.id for w in ("B", "boss")}, viewer
        assert not [r for r in rows if "@" in r["label"]]


def test_lookup_field_cannot_reach_a_foreign_account(world):
    b = world["browser"]("A")
    foreign = world["records"]["B"]["account"]
    resp = b.post("/contacts/new", {"last_name": "probe", "account": f"acc-B (#{foreign.id})",
                                    "owner": seat_label(world["seats"]["A"].user)}, token_from="/contacts/new")
    assert resp.status_code == 400
    assert Contact.select().where(Contact.last_name == "probe").count() == 0


def test_admin_pages_are_404_for_everyone_but_the_boss(world):
    for viewer in ("A", "M"):
        b = world["browser"](viewer)
        for path in ("/admin/seats", "/admin/seats/bulk", "/admin/audit", "/admin/logins", "/admin/roles",
                     "/admin/notices", "/admin/sla", "/admin/quota"):
            assert b.get(path).status_code == 404, (viewer, path)
        assert b.post("/admin/notices/1/acknowledge").status_code == 404
        target = world["seats"]["B"].user
        assert b.post(f"/admin/seats/{target.id}/suspend").status_code == 404
        assert b.post(f"/admin/seats/{target.id}/link").status_code == 404
        assert b.post("/admin/seats/change", {"seat": [target.id], "action": "disable"}).status_code == 404
        assert b.post("/admin/seats/bulk", {"text": "email,name,role\nx@corp.cn,X,boss\n"}).status_code == 404
        assert b.get("/admin/export").status_code == 404 and b.post("/admin/export").status_code == 404
        assert b.get("/admin/export/crm-export-20261130T000000Z.zip").status_code == 404
        assert target.__class__.get_by_id(target.id).active
    boss = world["browser"]("boss")
    for path in ("/admin/seats", "/admin/seats/bulk", "/admin/audit", "/admin/logins", "/admin/roles",
                 "/admin/notices", "/admin/sla", "/admin/quota"):
        assert boss.get(path).status_code == 200, path


def test_attachments_follow_their_record(world, settings):
    """A file on A's account: A and the East manager and the boss reach it; B (same team, agent)
    and C (West) get 404 for the file, its deletion and an upload onto the account."""
    import io

    from appliance import attachments
    from webapp.models import Attachment

    shutil.rmtree(attachments.store_dir(settings), ignore_errors=True)
    acc = world["records"]["A"]["account"]
    owner = world["seats"]["A"].user
    data = b"%PDF-1.4 attachment of A"
    row = attachments.attach(settings, owner, owner, "account", acc.id, "a.pdf",
                             attachments.receive(settings, io.BytesIO(data)))
    for viewer in ("B", "C"):
        b = world["browser"](viewer)
        assert b.get(f"/attachments/{row.id}").status_code == 404, viewer
        assert b.post(f"/attachments/{row.id}/delete").status_code == 404, viewer
        resp = b.client.post(f"/attachments/account/{acc.id}", content_type="multipart/form-data",
                             data={"csrf_token": b.csrf("/"), "file": (io.BytesIO(data), "x.pdf")})
        assert resp.status_code == 404, viewer
    for viewer in ("A", "M", "boss"):
        assert world["browser"](viewer).get(f"/attachments/{row.id}").data == data, viewer
    assert Attachment.select().count() == 1 and Attachment.get().deleted_at is None
    shutil.rmtree(attachments.store_dir(settings), ignore_errors=True)


def test_manager_can_edit_team_record_but_not_other_team(world):
    b = world["browser"]("M")
    rec_b = world["records"]["B"]["account"]
    rec_c = world["records"]["C"]["account"]
    owner_b = seat_label(world["seats"]["B"].user)
    resp = b.post(f"/accounts/{rec_b.id}/edit", {"name": "acc-B renamed", "owner": owner_b},
                  token_from=f"/accounts/{rec_b.id}/edit")
    assert resp.status_code == 302
    assert Account.get_by_id(rec_b.id).name == "acc-B renamed"
    assert b.post(f"/accounts/{rec_c.id}/edit", {"name": "hijack", "owner": owner_b}).status_code == 404
    assert Account.get_by_id(rec_c.id).name == "acc-C"


def test_unknown_and_absurd_ids_are_404(world):
    b = world["browser"]("boss")
    for path in ("/accounts/999999", "/accounts/0", "/accounts/99999999999999999999999", "/accounts/-1",
                 "/accounts/abc", "/notes/99999999999999999999/delete"):
        method = b.post if path.endswith("delete") else b.get
        assert method(path).status_code == 404, path
    assert b.post("/notes/nonsense/1", {"body": "x"}).status_code == 404


def test_deleted_record_is_gone_for_everyone(world):
    a = world["browser"]("A")
    rec = world["records"]["A"]["lead"]
    assert a.post(f"/leads/{rec.id}/delete").status_code == 302
    assert a.get(f"/leads/{rec.id}").status_code == 404
    assert world["browser"]("boss").get(f"/leads/{rec.id}").status_code == 404


def test_import_needs_create_and_makes_only_records_the_agent_owns(world, make_seat, browser_for):
    """An agent imports records it owns; naming another seat as owner is refused and nothing is
    written. Another seat cannot reach its upload; a seat without "create" gets 404 everywhere."""
    from webapp.models import Role
    from webapp.permissions import ACTIONS, ENTITIES

    a, b = world["browser"]("A"), world["browser"]("B")
    upload = a.client.post("/import/account", content_type="multipart/form-data", data={
        "csrf_token": a.csrf("/import/account"),
        "file": (io.BytesIO(b"Name,Owner\nimp-1,\nimp-2,b@corp.cn\n"), "accounts.csv")})
    review = upload.headers["Location"]
    for path in (review, review + "/report.csv"):
        assert b.get(path).status_code == 404, path
    assert b.post(review, {"column-0": "name", "action": "import"}).status_code == 404
    mapping = {"column-0": "name", "column-1": "owner", "skip_duplicates": "1", "action": "import"}
    assert a.post(review, mapping).status_code == 400
    assert Account.select().where(Account.name.startswith("imp-")).count() == 0
    assert a.post(review, dict(mapping, **{"column-1": ""})).status_code == 200  # mapping changed: checked first
    assert a.post(review, dict(mapping, **{"column-1": ""})).status_code == 302
    assert {x.owner_id for x in Account.select().where(Account.name.startswith("imp-"))} == {
        world["seats"]["A"].user.id}

    Role.create(name="reader", permissions={e: {x: ("all" if x == "read" else "none") for x in ACTIONS}
                                           for e in ENTITIES})
    reader = browser_for(make_seat("reader@corp.cn", role="reader"))
    for entity in ("account", "contact", "lead", "opportunity", "ticket"):
        assert reader.get(f"/import/{entity}").status_code == 404, entity
        assert reader.post(f"/import/{entity}").status_code == 404, entity
    assert reader.get(review).status_code == 404 and reader.get(review + "/report.csv").status_code == 404
    assert world["browser"]("boss").get("/import/activity").status_code == 404, "activities are not importable"


# Every route and where this file proves it answers only within the seat's level.
COVERED = {
    "/<prefix>/": "list", "/<prefix>/<int:record_id>": "detail", "/<prefix>/<int:record_id>/edit": "edit",
    "/<prefix>/<int:record_id>/delete": "delete", "/<prefix>/export.csv": "export", "/<prefix>/export.xlsx": "export", "/<prefix>/new": "creation",
    "/leads/<int:record_id>/convert": "special actions", "/opportunities/<int:record_id>/stage": "special actions",
    "/opportunities/board": "board", "/tickets/<int:record_id>/transfer": "special actions",
    "/notes/<entity>/<int:record_id>": "special actions", "/notes/<int:note_id>/delete": "special actions",
    "/search/": "search", "/search/lookup/<entity>": "lookup", "/search/seats": "seat lookup",
    "/": "dashboard",
    "/admin/audit": "admin", "/admin/logins": "admin", "/admin/roles": "admin", "/admin/seats": "admin",
    "/admin/seats/<int:user_id>/link": "admin", "/admin/seats/<int:user_id>/suspend": "admin",
    "/admin/seats/<int:user_id>/reactivate": "admin", "/admin/seats/bulk": "admin", "/admin/seats/change": "admin",
    "/admin/export": "admin", "/admin/export/<name>": "admin",
    "/admin/notices": "admin", "/admin/notices/<int:notice_id>/acknowledge": "admin", "/admin/sla": "admin",
    # Deleted items: boss only, tested in test_lifecycle.py (every route 404 for a manager and an agent).
    "/admin/deleted/": "admin", "/admin/deleted/<entity>/<int:record_id>/undo": "admin",
    "/admin/deleted/<entity>/<int:record_id>/destroy": "admin",
    "/admin/quota": "admin",
    # Company profile and announcements: boss only, tested in test_company.py (404 for a manager).
    "/admin/company": "admin", "/admin/company/licence": "admin", "/admin/company/licence/<int:attachment_id>": "admin",
    "/admin/company/licence/<int:attachment_id>/delete": "admin", "/admin/company/certify": "admin",
    "/admin/announcements": "admin",
    "/admin/announcements/<int:announcement_id>/withdraw": "admin",
    "/attachments/<entity>/<int:record_id>": "attachments", "/attachments/<int:attachment_id>": "attachments",
    "/attachments/<int:attachment_id>/delete": "attachments",
}
COVERED.update({"/import/<entity>": "import", "/import/<entity>/<token>": "import",
                "/import/<entity>/<token>/report.csv": "import"})
PUBLIC = {"/auth/login", "/auth/logout", "/auth/locale", "/auth/set-password/<token>", "/static/<path:filename>",
          "/healthz", "/readyz"}


def test_every_route_is_covered_by_these_tests(app):
    """A new route fails here until its permission behaviour is tested in this file."""
    prefixes = tuple(prefix for prefix, _ in ROUTES.values())
    uncovered = []
    for rule in app.url_map.iter_rules():
        path = rule.rule
        for prefix in prefixes:
            if path.startswith(prefix + "/"):
                generic = "/<prefix>" + path[len(prefix):]
                if generic in COVERED:
                    path = generic
                break
        if path not in COVERED and path not in PUBLIC:
            uncovered.append(rule.rule)
    assert not uncovered, f"routes without permission tests: {uncovered}"


def test_dashboard_shows_only_visible_records(world):
    """Recent changes are the newest ten records the seat may read, across modules; the
    "my" cards hold the seat's own. Every level in one process: the dashboard's statements
    are kept per gate shape (webapp/prepared.py)."""
    seats = world["seats"]
    for viewer in ("A", "C", "M", "boss", "A"):
        mine, recent = world["browser"](viewer).get("/").get_data(as_text=True).split("Recent changes")
        owners = {seats[owner].user.id for owner in VISIBLE[viewer]}
        newest = sorted(((r.updated_at, ROUTES[entity][0], str(r.id)) for entity, model in RECORD_MODELS.items()
                         for r in model.select() if r.owner_id in owners), reverse=True)[:10]
        assert re.findall(r'href="(/[a-z]+)/(\d+)"', recent) == [(prefix, rid) for _, prefix, rid in newest], viewer
        assert _markers(mine, "ticket") == _markers(mine, "activity") == ({viewer} if viewer in "ABC" else set())


def test_reactivate_is_boss_only(world):
    target = world["seats"]["B"].user
    from appliance import seats as seat_lib

    seat_lib.suspend(target)
    assert world["browser"]("M").post(f"/admin/seats/{target.id}/reactivate").status_code == 404
    from webapp.models import User
    assert User.get_by_id(target.id).active is False


def test_a_read_only_role_cannot_create_edit_delete_or_export(world, make_seat, browser_for):
    """A custom role: read all, nothing else. Creation and export answer 404, edits 403."""
    from webapp.models import Role
    from webapp.permissions import ACTIONS, ENTITIES

    Role.create(name="auditor", permissions={e: {a: ("all" if a == "read" else "none") for a in ACTIONS}
                                             for e in ENTITIES})
    viewer = browser_for(make_seat("auditor@corp.cn", role="auditor"))
    for entity, (prefix, field) in ROUTES.items():
        record = world["records"]["A"][entity]
        assert viewer.get(f"{prefix}/{record.id}").status_code == 200
        assert viewer.get(f"{prefix}/new").status_code == 404
        assert viewer.get(f"{prefix}/export.csv").status_code == 404
        assert viewer.get(f"{prefix}/export.xlsx").status_code == 404
        assert viewer.get(f"{prefix}/{record.id}/edit").status_code == 403
        assert viewer.post(f"{prefix}/{record.id}/delete").status_code == 403
        assert viewer.post(f"{prefix}/new", {field: "planted"}).status_code == 404
        assert 'href="' + prefix + '/new"' not in viewer.get(f"{prefix}/").get_data(as_text=True)
        assert RECORD_MODELS[entity].get_by_id(record.id).deleted_at is None
    assert Account.select().where(Account.name == "planted").count() == 0


@pytest.mark.parametrize("read,export,expected", [
    ("own", "all", {"A2"}),  # export all, but it reads only its own: it exports only its own
    ("all", "own", {"A2"}),
    ("team", "all", {"A", "B", "A2"}),
    ("none", "all", None),  # nothing to read, nothing to export: the export is not there
])
def test_the_export_level_is_capped_by_the_read_level(world, make_seat, browser_for, read, export, expected):
    from webapp.models import Role
    from webapp.permissions import ACTIONS, ENTITIES, level

    grants = {"read": read, "export": export}
    Role.create(name="exporter", permissions={e: {a: grants.get(a, "none") for a in ACTIONS} for e in ENTITIES})
    seat = make_seat("a2@corp.cn", role="exporter", team="East")
    audit.create(world["seats"]["boss"].user, Account, {"name": "acc-A2", "owner": seat.user.id})
    assert level(seat.user, "account", "export") == min(read, export, key=["none", "own", "team", "all"].index)
    b = browser_for(seat)
    csv_resp, xlsx_resp = b.get("/accounts/export.csv"), b.get("/accounts/export.xlsx")
    if expected is None:
        assert csv_resp.status_code == xlsx_resp.status_code == 404
        return
    exported = set(re.findall(r"\bacc-(A2|[ABC])(?![\w-])", csv_resp.get_data(as_text=True)))
    assert exported == expected
    from openpyxl import load_workbook
    sheet = load_workbook(io.BytesIO(xlsx_resp.get_data())).active
    cells = " ".join(str(c.value) for row in sheet.iter_rows() for c in row if c.value is not None)
    assert set(re.findall(r"\bacc-(A2|[ABC])(?![\w-])", cells)) == expected
