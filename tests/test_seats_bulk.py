"""Many seats at once (issue 6, R-8 and R-10): a seats file, the licence cap, disable, remove
with the records handed over. Real PostgreSQL; the CLI through Click's runner."""

from __future__ import annotations

import re
import threading
import time

import pytest
from click.testing import CliRunner

from appliance import seats
from appliance.errors import SeatError
from installer.cli import main
from tests.test_cli import _config_file
from webapp import audit
from webapp.models import Account, Activity, AuditLog, Contact, Lead, Opportunity, Ticket, User


def _csv(n: int, start: int = 0, header: str = "email,name,role,team") -> bytes:
    lines = [header] + [f"seat{i}@corp.cn,Seat {i},agent,East" for i in range(start, start + n)]
    return ("\n".join(lines) + "\n").encode()


# ----------------------------------------------------------------------------- the file


def test_a_seats_file_in_utf8_with_bom_gbk_and_chinese_headers_reads_the_same():
    text = "邮箱,姓名,角色,团队\nwang.wei@corp.cn,王伟,agent,华东\n"
    for data in (text.encode("utf-8"), b"\xef\xbb\xbf" + text.encode("utf-8"), text.encode("gbk")):
        rows = seats.read_seat_rows(data, "seats.csv")
        assert [(r.line, r.email, r.name, r.role, r.team) for r in rows] == [
            (2, "wang.wei@corp.cn", "王伟", "agent", "华东")]


@pytest.mark.parametrize("data,message", [
    (b"", "seats.csv is empty; expected a header row: email,name,role,team"),
    (b"email,name\nx@corp.cn,X\n", "seats.csv: the header row lacks role"),
    (b"email,name,role\n", "seats.csv has a header row but no seats"),
    (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\xff\xfe\x80", "seats.csv is neither UTF-8 nor GBK text"),
    (_csv(101), "seats.csv holds 101 seats; one operation adds at most 100: split the file"),
])
def test_a_bad_seats_file_is_refused_with_what_is_wrong(data, message):
    with pytest.raises(SeatError, match="^" + message.replace("(", r"\(")):
        seats.read_seat_rows(data, "seats.csv")


def test_a_file_of_seats_to_disable_reads_every_line_as_an_e_mail():
    plain = "a@corp.cn\n\nB@Corp.cn\n"
    assert seats.read_seat_emails(plain.encode("gbk"), "f.txt") == {"a@corp.cn": 1, "b@corp.cn": 3}
    # The seats file that added them works too: the header names the e-mail column.
    added = "姓名,邮箱,角色\n王伟,wang.wei@corp.cn,agent\n"
    for data in (added.encode("utf-8"), b"\xef\xbb\xbf" + added.encode("utf-8"), added.encode("gbk")):
        assert seats.read_seat_emails(data, "f.csv") == {"wang.wei@corp.cn": 2}
    assert seats.read_seat_emails(b"email\tname\nx@corp.cn\tX\n", "f.csv") == {"x@corp.cn": 2}


@pytest.mark.parametrize("data,message", [
    (b"a@corp.cn\nbob.corp.cn\nc@corp.cn\nbob at corp\n",
     "nothing was changed: 2 lines of f.txt are wrong: line 2: 'bob.corp.cn' is not an e-mail address; "
     "line 4: 'bob at corp' is not an e-mail address"),
    (b"email,name\n,Nobody\n", "nothing was changed: 1 lines of f.txt are wrong: line 2: '' is not an e-mail"),
    (b"\n \n", "f.txt names no seat; expected one e-mail per line"),
    (b"email\n", "f.txt names no seat"),
])
def test_a_line_that_is_not_an_e_mail_stops_a_disable_or_remove(data, message):
    with pytest.raises(SeatError, match="^" + re.escape(message)):
        seats.read_seat_emails(data, "f.txt")


def test_the_commands_refuse_a_file_with_a_typo_or_an_unknown_seat_and_change_nothing(tmp_path, settings, db):
    config = _config_file(tmp_path, settings)
    for n in range(3):
        seats.add_seat(settings, f"seat{n}@corp.cn", f"Seat {n}", "agent")
    file = tmp_path / "stolen.txt"
    for text, message in (("seat0@corp.cn\nseat1.corp.cn\n", "line 2: 'seat1.corp.cn' is not an e-mail address"),
                          ("email\nseat0@corp.cn\nnobody@corp.cn\n",
                           "no seat has the e-mail nobody@corp.cn (line 3); nothing was changed")):
        file.write_text(text)
        for args in (["disable"], ["remove", "--reassign-to", "seat2@corp.cn", "--yes"]):
            result = CliRunner().invoke(main, ["--config", config, "seats", *args, "--file", str(file)])
            assert result.exit_code == 1 and message in result.output, result.output
            assert "Traceback" not in result.output
            assert User.select().where(User.active).count() == 3, "nothing was changed"
    file.write_text("email\nseat0@corp.cn\n\nSEAT1@corp.cn\n")
    result = CliRunner().invoke(main, ["--config", config, "seats", "disable", "--file", str(file)])
    assert result.exit_code == 0 and "Seats disabled: 2" in result.output, result.output
    assert [u.email for u in User.select().where(User.active)] == ["seat2@corp.cn"]


# ----------------------------------------------------------------------------- adding


def test_a_hundred_seats_are_added_at_once_each_with_its_own_link(pg_cluster, secrets_dir, db):
    from tests.conftest import make_settings

    licensed = make_settings(pg_cluster, secrets_dir, seats={"licensed": 100})
    created = seats.add_seats(licensed, seats.read_seat_rows(_csv(100), "seats.csv"))
    assert len(created) == 100 and len({c.link for c in created}) == 100
    assert User.select().where(User.active).count() == 100
    with pytest.raises(SeatError, match="the licence allows 100 seats and all are in use"):
        seats.add_seat(licensed, "one.more@corp.cn", "One More", "agent")


def test_the_licence_cap_says_how_many_seats_are_free_and_adds_none(pg_cluster, secrets_dir, db):
    from tests.conftest import make_settings

    small = make_settings(pg_cluster, secrets_dir, seats={"licensed": 5})
    seats.add_seats(small, seats.read_seat_rows(_csv(3), "a.csv"))
    with pytest.raises(SeatError) as err:
        seats.add_seats(small, seats.read_seat_rows(_csv(3, start=10), "b.csv"))
    assert str(err.value) == ("no seat was added: the licence allows 5 seats, 3 are in use, so 2 are free, and this "
                              "adds 3; add fewer, disable seats or extend the licence")
    assert User.select().count() == 3


def test_every_bad_line_is_named_and_nothing_is_added(settings, db):
    seats.add_seat(settings, "taken@corp.cn", "Taken", "agent")
    data = ("email,name,role\n"
            "good@corp.cn,Good,agent\n"
            "not-an-email,Bad,agent\n"
            "x@corp.cn,X,emperor\n"
            "TAKEN@corp.cn,Again,agent\n"
            "good@corp.cn,Twice,agent\n").encode()
    with pytest.raises(SeatError) as err:
        seats.add_seats(settings, seats.read_seat_rows(data, "seats.csv"))
    message = str(err.value)
    assert message.startswith("no seat was added: 4 lines are wrong: line 3: 'not-an-email' is not an e-mail")
    for part in ("line 4: unknown role 'emperor'", "line 5: a seat with e-mail taken@corp.cn already exists",
                 "line 6: good@corp.cn is also on line 2"):
        assert part in message
    assert [u.email for u in User.select()] == ["taken@corp.cn"]


def test_two_adds_racing_for_the_last_seats_never_exceed_the_licence(pg_cluster, secrets_dir, app_database, db,
                                                                      monkeypatch):
    """The first add pauses inside its transaction, after counting the seats in use, while the
    second one counts: without the lock both would find two seats free."""
    from appliance.db import open_database
    from tests.conftest import make_settings

    small = make_settings(pg_cluster, secrets_dir, seats={"licensed": 3})
    seats.add_seat(small, "first@corp.cn", "First", "agent")
    outcomes, second_started, paused = {}, threading.Event(), []
    real_issue_link = seats.issue_link

    def slow_first_link(settings, user):
        if threading.current_thread().name == "first" and not paused:
            paused.append(True)
            second_started.wait(10)
            time.sleep(0.5)  # the second add reaches its count (or waits for the lock) meanwhile
        return real_issue_link(settings, user)

    monkeypatch.setattr(seats, "issue_link", slow_first_link)

    def add(start: int) -> None:
        conn = open_database(small)
        with conn.connection_context():
            if threading.current_thread().name == "second":
                while not paused:
                    time.sleep(0.01)
                second_started.set()
            try:
                seats.add_seats(small, seats.read_seat_rows(_csv(2, start=start), "race.csv"))
                outcomes[threading.current_thread().name] = "added"
            except SeatError as exc:
                outcomes[threading.current_thread().name] = str(exc)

    threads = [threading.Thread(target=add, args=(n,), name=name) for n, name in ((100, "first"), (200, "second"))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert outcomes["first"] == "added" and "3 are in use, so 0 are free" in outcomes["second"], outcomes
    assert User.select().where(User.active).count() == 3


# ----------------------------------------------------------------------------- disabling and removing


def test_disabled_seats_free_the_licence_and_their_sessions_end(make_seat, browser_for):
    agent = make_seat("agent@corp.cn")
    browser = browser_for(agent)
    assert browser.get("/contacts/").status_code == 200
    changed = seats.disable_seats(seats.find_seats(["AGENT@corp.cn"]), "stolen laptop")
    assert [u.email for u in changed] == ["agent@corp.cn"] and not User.get_by_id(agent.user.id).active
    assert seats.disable_seats(seats.find_seats(["agent@corp.cn"])) == [], "already disabled: unchanged"
    assert browser.get("/contacts/").status_code == 302, "the next request finds the session ended"
    with pytest.raises(SeatError, match="no seat has the e-mail nobody@corp.cn; nothing was changed"):
        seats.find_seats(["agent@corp.cn", "nobody@corp.cn"])


def test_removing_seats_hands_every_record_to_the_chosen_seat_audited(make_seat):
    boss = make_seat("boss@corp.cn", role="boss", team="HQ")
    leaving = make_seat("leaving@corp.cn", team="East")
    staying = make_seat("staying@corp.cn", team="West")
    acc = audit.create(leaving.user, Account, {"name": "Kept Ltd"})
    contact = audit.create(leaving.user, Contact, {"last_name": "Wang", "account": acc.id})
    ticket = audit.create(leaving.user, Ticket, {"subject": "Invoice"})
    lead = audit.create(leaving.user, Lead, {"last_name": "Zhao", "company": "Zhao Co"})
    opportunity = audit.create(leaving.user, Opportunity, {"name": "Big deal", "account": acc.id})
    activity = audit.create(leaving.user, Activity, {"subject": "Call back", "parent_type": "account",
                                                     "parent_id": acc.id})
    other = audit.create(staying.user, Account, {"name": "Other Ltd"})

    moved = seats.remove_seats(seats.find_seats(["leaving@corp.cn"]), staying.user, boss.user)
    assert moved == {"account": 1, "contact": 1, "ticket": 1, "lead": 1, "opportunity": 1, "activity": 1}
    for model, record in ((Account, acc), (Contact, contact), (Ticket, ticket), (Lead, lead),
                          (Opportunity, opportunity), (Activity, activity)):
        row = model.get_by_id(record.id)
        assert row.owner_id == staying.user.id and row.team_id == staying.user.team_id
        trail = AuditLog.get(AuditLog.entity == model.entity, AuditLog.record_id == record.id,
                             AuditLog.action == "update")
        assert trail.changes["owner"] == [leaving.user.id, staying.user.id] and trail.actor == "boss@corp.cn"
    assert Account.get_by_id(other.id).owner_id == staying.user.id
    assert not User.get_by_id(leaving.user.id).active
    for model in (Account, Contact, Ticket, Lead, Opportunity, Activity):
        assert not model.select().where(model.owner == leaving.user.id).exists(), model.entity
    with pytest.raises(SeatError, match="leaving@corp.cn is not an active seat"):
        seats.remove_seats(seats.find_seats(["staying@corp.cn"]), User.get_by_id(leaving.user.id), boss.user)
    with pytest.raises(SeatError, match="cannot take over its own records"):
        seats.remove_seats(seats.find_seats(["staying@corp.cn"]), staying.user, boss.user)


def test_the_last_boss_is_kept_unless_customer_it_stops_a_stolen_one_and_gives_it_back(tmp_path, settings, make_seat):
    config = _config_file(tmp_path, settings)
    first, second = make_seat("first.boss@corp.cn", role="boss"), make_seat("second.boss@corp.cn", role="boss")
    agent = make_seat("agent@corp.cn")
    acc = audit.create(first.user, Account, {"name": "Boss Ltd"})
    refused = "nothing was changed: second.boss@corp.cn is the last active seat with administration rights that " \
              "can log in"
    invited = seats.add_seat(settings, "invited.boss@corp.cn", "Invited", "boss")  # no password yet: no help

    both = CliRunner().invoke(main, ["--config", config, "seats", "disable", first.email, second.email])
    assert both.exit_code == 1 and refused in both.output, both.output
    assert User.select().where(User.active).count() == 4, "the whole operation is undone"
    one = CliRunner().invoke(main, ["--config", config, "seats", "disable", first.email])
    assert one.exit_code == 0 and "Seats disabled: 1" in one.output, one.output
    for args in (["disable", second.email], ["remove", second.email, "--reassign-to", agent.email, "--yes"]):
        result = CliRunner().invoke(main, ["--config", config, "seats", *args])
        assert result.exit_code == 1 and refused in result.output and "Traceback" not in result.output, result.output
        assert User.get_by_id(second.user.id).active
    with pytest.raises(SeatError, match=refused):
        seats.suspend(User.get_by_id(second.user.id))
    assert Account.get_by_id(acc.id).owner_id == first.user.id
    # A seat without administration rights is stopped as before, the last boss still active.
    seats.disable_seats([User.get_by_id(agent.user.id), User.get_by_id(invited.user.id)])
    assert [u.email for u in User.select().where(User.active)] == [second.email]
    # A stolen boss account with no other boss: customer IT stops it all the same, when asked so.
    refused_disable = CliRunner().invoke(main, ["--config", config, "seats", "disable", second.email])
    assert refused_disable.exit_code == 1 and "run this again with --even-the-last-boss" in refused_disable.output
    forced = CliRunner().invoke(main, ["--config", config, "seats", "disable", second.email, "--even-the-last-boss"])
    assert forced.exit_code == 0 and "Seats disabled: 1" in forced.output, forced.output
    assert "No active seat has administration rights now" in forced.output
    assert not User.select().where(User.active).exists()
    assert AuditLog.select().where(AuditLog.record_id == second.user.id, AuditLog.action == "suspend").count() == 1
    # Its owner gets the account back with a new link; the thief's password no longer works.
    refused_link = CliRunner().invoke(main, ["--config", config, "seats", "link", second.email])
    assert refused_link.exit_code == 1 and f"'crm-appliance seats reactivate {second.email}'" in refused_link.output
    back = CliRunner().invoke(main, ["--config", config, "seats", "reactivate", second.email])
    assert back.exit_code == 0 and "its old password no longer works" in back.output, back.output
    token = re.search(r"/auth/set-password/(\S+)", back.output).group(1)
    returned = User.get_by_id(second.user.id)
    assert returned.active and returned.password_hash is None and seats.find_token(token).user_id == returned.id
    again = CliRunner().invoke(main, ["--config", config, "seats", "link", second.email])  # the link got lost
    assert again.exit_code == 0 and seats.find_token(token) is None, "the earlier link stops working"
    assert seats.find_token(re.search(r"/auth/set-password/(\S+)", again.output).group(1)).user_id == returned.id
    assert [r.action for r in AuditLog.select().where(AuditLog.record_id == returned.id,
                                                      AuditLog.action.in_(["reactivate", "new_link"]))
            .order_by(AuditLog.id)] == ["reactivate", "new_link"]


# ----------------------------------------------------------------------------- the commands


def test_the_seats_commands_add_disable_and_remove_in_bulk(tmp_path, settings, db):
    config = _config_file(tmp_path, settings)
    file = tmp_path / "seats.csv"
    file.write_bytes(_csv(3))
    added = CliRunner().invoke(main, ["--config", config, "seats", "add", "--file", str(file)])
    assert added.exit_code == 0, added.output
    assert added.output.count("/auth/set-password/") == 3 and "Seats added: 3; in use: 3 of 50 licensed." \
        in added.output
    again = CliRunner().invoke(main, ["--config", config, "seats", "add", "--file", str(file)])
    assert again.exit_code == 1 and "no seat was added: 3 lines are wrong" in again.output
    assert "Traceback" not in again.output

    disabled = CliRunner().invoke(main, ["--config", config, "seats", "disable", "seat0@corp.cn"])
    assert disabled.exit_code == 0 and "Seats disabled: 1 (disabled already: 0); in use: 2 of 50" in disabled.output
    heir = User.get(User.email == "seat2@corp.cn")
    audit.create(User.get(User.email == "seat1@corp.cn"), Account, {"name": "Handed Ltd"})
    removed = CliRunner().invoke(main, ["--config", config, "seats", "remove", "seat1@corp.cn",
                                        "--reassign-to", "seat2@corp.cn", "--yes"])
    assert removed.exit_code == 0, removed.output
    assert "Seats removed: 1; handed to seat2@corp.cn: 1 account; in use: 1 of 50" in removed.output
    assert Account.get(Account.name == "Handed Ltd").owner_id == heir.id

    both = CliRunner().invoke(main, ["--config", config, "seats", "add", "--file", str(file), "--email", "x@corp.cn"])
    assert both.exit_code == 2 and "either --file or --email" in both.output


@pytest.mark.parametrize("days_ago", [1, 40])  # in the grace period (30 days), and after it
def test_once_the_licence_has_ended_seats_are_neither_added_nor_removed_but_can_be_disabled(
        tmp_path, settings, make_seat, days_ago):
    import datetime as dt

    from appliance.lifecycle import local_today

    make_seat("boss@corp.cn", role="boss")
    make_seat("stolen@corp.cn")
    config = _config_file(tmp_path, settings)
    expires = local_today(settings) - dt.timedelta(days=days_ago)
    with open(config) as f:
        text = f.read().replace("[seats]\n", f"[seats]\nexpires = {expires.isoformat()}\n")
    with open(config, "w") as f:
        f.write(text)
    file = tmp_path / "seats.csv"
    file.write_bytes(_csv(2))
    for args in (["add", "--email", "new@corp.cn", "--name", "New", "--role", "agent"], ["add", "--file", str(file)],
                 ["remove", "stolen@corp.cn", "--reassign-to", "boss@corp.cn", "--yes"]):
        result = CliRunner().invoke(main, ["--config", config, "seats", *args])
        assert result.exit_code == 1, result.output
        assert f"refused: the licence expired on {expires.isoformat()} and the data is read-only" in result.output
        assert f"set [seats] expires in {config} to the new last day" in result.output
        assert "'crm-appliance seats disable' still stops a seat" in result.output
    assert sorted(u.email for u in User.select().where(User.active)) == ["boss@corp.cn", "stolen@corp.cn"]
    disabled = CliRunner().invoke(main, ["--config", config, "seats", "disable", "stolen@corp.cn"])
    assert disabled.exit_code == 0 and "Seats disabled: 1" in disabled.output, disabled.output


def test_a_seats_file_of_101_is_refused_whole_and_one_of_100_is_added(tmp_path, settings, db):
    config = _config_file(tmp_path, settings)
    with open(config) as f:
        text = f.read().replace("licensed = 50", "licensed = 200")
    with open(config, "w") as f:
        f.write(text)
    file = tmp_path / "seats.csv"
    file.write_bytes(_csv(101))
    refused = CliRunner().invoke(main, ["--config", config, "seats", "add", "--file", str(file)])
    assert refused.exit_code == 1 and "Traceback" not in refused.output
    assert f"{file} holds 101 seats; one operation adds at most 100: split the file" in refused.output
    assert User.select().count() == 0
    file.write_bytes(_csv(100))
    added = CliRunner().invoke(main, ["--config", config, "seats", "add", "--file", str(file)])
    assert added.exit_code == 0 and "Seats added: 100; in use: 100 of 200 licensed." in added.output, added.output
    assert added.output.count("/auth/set-password/") == 100 and User.select().count() == 100


# ----------------------------------------------------------------------------- the boss's page


@pytest.fixture
def roomy_browser(pg_cluster, secrets_dir, db, make_seat):
    """The boss's browser on an appliance licensed for 200 seats."""
    from tests.conftest import Browser, make_settings
    from webapp import create_app

    app = create_app(make_settings(pg_cluster, secrets_dir, seats={"licensed": 200}), database=db)
    app.config.update(TESTING=True)
    boss = make_seat("boss@corp.cn", role="boss")
    browser = Browser(app.test_client())
    assert browser.login(boss.email).status_code == 302
    return browser


def test_the_boss_adds_100_seats_at_once_but_not_101(roomy_browser):
    resp = roomy_browser.post("/admin/seats/bulk", {"text": _csv(101).decode()}, token_from="/admin/seats/bulk")
    assert resp.status_code == 400
    assert "the pasted text holds 101 seats; one operation adds at most 100: split the file" in resp.get_data(
        as_text=True)
    assert User.select().count() == 1, "only the boss"
    resp = roomy_browser.post("/admin/seats/bulk", {"text": _csv(100).decode()}, token_from="/admin/seats/bulk")
    assert resp.status_code == 200 and resp.get_data(as_text=True).count("/auth/set-password/") == 100
    assert User.select().count() == 101


def test_a_bulk_add_without_the_csrf_token_is_refused_and_adds_nothing(make_seat, browser_for):
    b = browser_for(make_seat("boss@corp.cn", role="boss"))
    for data in ({"text": _csv(2).decode()}, {"text": _csv(2).decode(), "csrf_token": "forged"}):
        assert b.client.post("/admin/seats/bulk", data=data).status_code == 400
    assert User.select().count() == 1, "only the boss"
    assert b.post("/admin/seats/bulk", {"text": _csv(2).decode()}, token_from="/admin/seats/bulk").status_code == 200
    assert User.select().count() == 3, "the same post with the token works"




def test_the_boss_pastes_seats_from_a_spreadsheet_and_gets_their_links(make_seat, browser_for):
    import io

    boss = make_seat("boss@corp.cn", role="boss")
    b = browser_for(boss)
    pasted = "邮箱\t姓名\t角色\t团队\nwang.wei@corp.cn\t王伟\tagent\t华东\nli.na@corp.cn\t李娜\tmanager\t华东\n"
    resp = b.post("/admin/seats/bulk", {"text": pasted}, token_from="/admin/seats/bulk")
    page = resp.get_data(as_text=True)
    assert resp.status_code == 200 and page.count("/auth/set-password/") == 2
    assert {u.email for u in User.select().where(User.role != boss.user.role)} == {"wang.wei@corp.cn", "li.na@corp.cn"}

    upload = b.post("/admin/seats/bulk", {"file": (io.BytesIO(_csv(2).decode().encode("gbk")), "seats.csv")},
                    token_from="/admin/seats/bulk", content_type="multipart/form-data")
    assert upload.status_code == 200 and upload.get_data(as_text=True).count("/auth/set-password/") == 2


def test_bad_pasted_seats_keep_the_text_say_what_is_wrong_and_add_nothing(make_seat, browser_for):
    boss = make_seat("boss@corp.cn", role="boss")
    pasted = "email,name,role\nfine@corp.cn,Fine,agent\nbroken,Broken,agent\n"
    resp = browser_for(boss).post("/admin/seats/bulk", {"text": pasted}, token_from="/admin/seats/bulk")
    page = resp.get_data(as_text=True)
    assert resp.status_code == 400
    assert "no seat was added: 1 lines are wrong: line 3: &#39;broken&#39; is not an e-mail address" in page
    assert "fine@corp.cn,Fine,agent" in page, "the pasted text is still there to fix"
    assert not User.select().where(User.email == "fine@corp.cn").exists()


def test_a_long_paste_is_answered_by_the_form_not_by_a_size_limit(make_seat, browser_for):
    """199,000 characters of Chinese (600 KB, over Flask's default 500 KB for a form's text) as
    a browser sends them, multipart: the page's own rules answer, with the text kept."""
    boss = make_seat("boss@corp.cn", role="boss")
    pasted = ("email,name,role,team\n" + "\n".join(f"s{i}@corp.cn,张伟{'很' * 90},agent,东区"
                                                   for i in range(3000)))[:199_000]
    assert len(pasted.encode()) > 500_000
    resp = browser_for(boss).post("/admin/seats/bulk", {"text": pasted}, token_from="/admin/seats/bulk",
                                  content_type="multipart/form-data")
    page = resp.get_data(as_text=True)
    assert resp.status_code == 400 and "seats; one operation adds at most 100: split the file" in page
    assert "s1700@corp.cn" in page and User.select().count() == 1, "the text is kept, nothing added"


def test_an_agent_cannot_reach_the_bulk_seats_page(make_seat, browser_for):
    agent = make_seat("agent@corp.cn")
    b = browser_for(agent)
    assert b.get("/admin/seats/bulk").status_code == 404
    assert b.post("/admin/seats/bulk", {"text": "email,name,role\nx@corp.cn,X,boss\n"}).status_code == 404
    assert not User.select().where(User.email == "x@corp.cn").exists()


def test_the_boss_disables_and_removes_ticked_seats(make_seat, browser_for):
    boss = make_seat("boss@corp.cn", role="boss")
    a, b_, heir = make_seat("a@corp.cn"), make_seat("b@corp.cn"), make_seat("heir@corp.cn")
    acc = audit.create(b_.user, Account, {"name": "B's Ltd"})
    browser = browser_for(boss)
    page = browser.get("/admin/seats").get_data(as_text=True)
    assert f'name="seat" value="{a.user.id}" form="change-seats"' in page
    assert f'name="seat" value="{boss.user.id}"' not in page, "no box for the boss's own seat"

    resp = browser.post("/admin/seats/change", {"seat": [a.user.id], "action": "disable"}, token_from="/admin/seats")
    assert resp.status_code == 302 and not User.get_by_id(a.user.id).active
    resp = browser.post("/admin/seats/change", {"seat": [b_.user.id], "action": "remove", "heir": heir.user.id},
                        token_from="/admin/seats")
    assert resp.status_code == 302 and not User.get_by_id(b_.user.id).active
    assert Account.get_by_id(acc.id).owner_id == heir.user.id
    follow = browser.get("/admin/seats").get_data(as_text=True)
    assert "Seats removed: 1; records handed to heir@corp.cn: 1." in follow

    own = browser.post("/admin/seats/change", {"seat": [boss.user.id, heir.user.id], "action": "disable"},
                       token_from="/admin/seats")
    assert own.status_code == 302 and User.get_by_id(heir.user.id).active
    assert "You cannot disable or remove your own seat." in browser.get("/admin/seats").get_data(as_text=True)
    for bad in ({"seat": ["x"], "action": "disable"}, {"seat": [heir.user.id], "action": "explode"}):
        assert browser.post("/admin/seats/change", bad, token_from="/admin/seats").status_code == 400
    huge = browser.post("/admin/seats/change", {"seat": [heir.user.id], "action": "remove", "heir": "9" * 30},
                        token_from="/admin/seats")
    assert huge.status_code == 302 and User.get_by_id(heir.user.id).active, "an absurd heir id: chosen again"
    no_csrf = browser.client.post("/admin/seats/change", data={"seat": [heir.user.id], "action": "disable"})
    assert no_csrf.status_code == 400 and User.get_by_id(heir.user.id).active
    agent = browser_for(heir)
    assert agent.post("/admin/seats/change", {"seat": [boss.user.id], "action": "disable"}).status_code == 404


# ----------------------------------------------------------------------------- smaller mends


def test_roles_are_matched_in_any_case_and_by_their_chinese_names(settings, db):
    from webapp.models import Role

    Role.create(name="Sales", permissions={})
    data = ("email,name,role\na@corp.cn,A,AGENT\nb@corp.cn,B,老板\nc@corp.cn,C,Manager\nd@corp.cn,D, 专员 \n"
            "e@corp.cn,E,sales\nf@corp.cn,F,经理\n").encode()
    created = seats.add_seats(settings, seats.read_seat_rows(data, "seats.csv"))
    assert [c.user.role.name for c in created] == ["agent", "boss", "manager", "agent", "Sales", "manager"]
    with pytest.raises(SeatError, match=r"unknown role '主管'; expected one of: Sales, agent, boss, manager"):
        seats.add_seat(settings, "g@corp.cn", "G", "主管")


def test_the_chinese_role_names_are_those_the_chinese_pages_show():
    from pathlib import Path

    from babel.support import Translations

    from webapp.i18n import ROLE_NAMES

    catalogue = Translations.load(str(Path(__file__).parent.parent / "webapp" / "translations"), ["zh"])
    shown = {name: catalogue.ugettext(str(label)) for name, label in ROLE_NAMES.items()}
    assert {v: k for k, v in shown.items()} == seats._ROLE_NAMES_ZH


def test_a_team_name_over_100_characters_is_refused_with_its_line(settings, db):
    data = f"email,name,role,team\na@corp.cn,A,agent,East\nb@corp.cn,B,agent,{'T' * 101}\n".encode()
    with pytest.raises(SeatError, match=r"^no seat was added: 1 lines are wrong: line 3: the team name 'T+' is "
                                        r"longer than 100 characters$"):
        seats.add_seats(settings, seats.read_seat_rows(data, "seats.csv"))
    assert User.select().count() == 0
    seats.add_seat(settings, "c@corp.cn", "C", "agent", "T" * 100)


def test_the_teams_an_add_creates_are_named_by_the_command_and_the_page(tmp_path, settings, make_seat, browser_for):
    boss = make_seat("boss@corp.cn", role="boss", team="East")
    config = _config_file(tmp_path, settings)
    file = tmp_path / "seats.csv"
    file.write_text("email,name,role,team\na@corp.cn,A,agent,East\nb@corp.cn,B,agent,Eats\nc@corp.cn,C,agent,Eats\n"
                    "d@corp.cn,D,agent,West\n")
    added = CliRunner().invoke(main, ["--config", config, "seats", "add", "--file", str(file)])
    assert added.exit_code == 0 and "New teams created: Eats, West.\n" in added.output, added.output
    one = CliRunner().invoke(main, ["--config", config, "seats", "add", "--email", "e@corp.cn", "--name", "E",
                                    "--role", "agent", "--team", "East"])
    assert one.exit_code == 0 and "New teams created" not in one.output

    b = browser_for(boss)
    page = b.post("/admin/seats/bulk", {"text": "email,name,role,team\nf@corp.cn,F,agent,North\ng@corp.cn,G,agent,"
                                                 "West\n"}, token_from="/admin/seats/bulk").get_data(as_text=True)
    assert '<p id="new-teams">New teams created: North.</p>' in page
    page = b.post("/admin/seats", {"email": "h@corp.cn", "name": "H", "role": "agent", "team": "South"},
                  token_from="/admin/seats").get_data(as_text=True)
    assert '<p id="new-teams">New teams created: South.</p>' in page
    page = b.post("/admin/seats", {"email": "i@corp.cn", "name": "I", "role": "agent", "team": "South"},
                  token_from="/admin/seats").get_data(as_text=True)
    assert "/auth/set-password/" in page and "new-teams" not in page


def test_pasting_seats_and_choosing_a_file_at_once_is_refused(make_seat, browser_for):
    import io

    b = browser_for(make_seat("boss@corp.cn", role="boss"))
    resp = b.post("/admin/seats/bulk", {"text": _csv(1).decode(), "file": (io.BytesIO(_csv(2, start=5)), "seats.csv")},
                  token_from="/admin/seats/bulk", content_type="multipart/form-data")
    assert resp.status_code == 400
    assert "You both pasted seats and chose a file: choose one" in resp.get_data(as_text=True)
    assert User.select().count() == 1, "only the boss"


def test_suspending_an_inactive_seat_changes_and_audits_nothing(make_seat, browser_for):
    boss = make_seat("boss@corp.cn", role="boss")
    gone, heir = make_seat("gone@corp.cn"), make_seat("heir@corp.cn")
    seats.remove_seats([User.get_by_id(gone.user.id)], heir.user, boss.user)
    rows = AuditLog.select().count()
    b = browser_for(boss)
    resp = b.post(f"/admin/seats/{gone.user.id}/suspend", token_from="/admin/seats")
    assert resp.status_code == 302
    assert "Seat gone@corp.cn is not active; nothing was changed." in b.get("/admin/seats").get_data(as_text=True)
    assert AuditLog.select().count() == rows
    assert seats.is_removed(User.get_by_id(gone.user.id)), "still shown as removed"


def test_ticked_seats_that_do_not_exist_are_an_error_and_nothing_is_changed(make_seat, browser_for):
    boss = make_seat("boss@corp.cn", role="boss")
    agent = make_seat("agent@corp.cn")
    b = browser_for(boss)
    resp = b.post("/admin/seats/change", {"seat": [agent.user.id, agent.user.id + 1000], "action": "disable"},
                  token_from="/admin/seats")
    assert resp.status_code == 302 and User.get_by_id(agent.user.id).active
    assert "1 of the ticked seats do not exist (any more); nothing was changed." in b.get("/admin/seats").get_data(
        as_text=True)
