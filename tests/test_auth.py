"""Authentication (R-10) and the login log (R-7): hashes, links, lock-out, CSRF, sessions."""

from __future__ import annotations

import datetime as dt
import logging
import re
import threading
import time

import pytest

from appliance import seats
from appliance.errors import SeatError
from tests.conftest import PASSWORD
from webapp.forms import seat_label
from webapp.models import LoginLog, SetPasswordToken, User, utcnow


def test_password_is_stored_only_as_an_argon2_hash(make_seat):
    seat = make_seat("a@corp.cn")
    stored = User.get_by_id(seat.user.id).password_hash
    assert stored.startswith("$argon2id$")
    assert PASSWORD not in stored


def test_at_most_two_argon2_checks_run_at_once_per_process(monkeypatch):
    """A login storm must not hold 64 MiB per request thread (docs/performance.md)."""
    running, most, lock = 0, 0, threading.Lock()

    class CountingHasher:
        def verify(self, *args):
            nonlocal running, most
            with lock:
                running += 1
                most = max(most, running)
            time.sleep(0.05)
            with lock:
                running -= 1
            return True

        hash = verify

    monkeypatch.setattr(seats, "_hasher", CountingHasher())
    threads = [threading.Thread(target=seats.verify_password, args=(None, "x")) for _ in range(8)]
    threads += [threading.Thread(target=seats.hash_password, args=("x",)) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert most == 2


def test_set_password_link_works_once(settings, db, browser_for):
    created = seats.add_seat(settings, "new@corp.cn", "New Person", "agent")
    path = "/auth/set-password/" + created.link.rsplit("/", 1)[1]
    b = browser_for(None)
    assert b.get(path).status_code == 200
    resp = b.post(path, {"password": PASSWORD, "confirm": PASSWORD}, token_from=path)
    assert resp.status_code == 302 and "/auth/login" in resp.headers["Location"]
    assert b.get(path).status_code == 404, "a used link must not work again"
    assert b.login("new@corp.cn").status_code == 302


def test_set_password_link_expires(settings, db, browser_for):
    created = seats.add_seat(settings, "late@corp.cn", "Late", "agent")
    SetPasswordToken.update(expires_at=utcnow() - dt.timedelta(seconds=1)).execute()
    token = created.link.rsplit("/", 1)[1]
    assert browser_for(None).get(f"/auth/set-password/{token}").status_code == 404


def test_new_link_revokes_the_old_one(settings, db):
    created = seats.add_seat(settings, "twice@corp.cn", "Twice", "agent")
    old = created.link.rsplit("/", 1)[1]
    new_link, _ = seats.issue_link(settings, created.user)
    assert seats.find_token(old) is None
    assert seats.find_token(new_link.rsplit("/", 1)[1]) is not None


@pytest.mark.parametrize("password,problem", [
    ("short", "at least"), ("aaaaaaaaaaaa", "different"), ("x" * 300, "longer than 256"), ("weak@corp.cn", "e-mail"),
])
def test_weak_passwords_are_refused_with_a_field_error(settings, db, browser_for, password, problem):
    created = seats.add_seat(settings, "weak@corp.cn", "Weak", "agent")
    path = "/auth/set-password/" + created.link.rsplit("/", 1)[1]
    b = browser_for(None)
    resp = b.post(path, {"password": password, "confirm": password}, token_from=path)
    assert resp.status_code == 400
    assert problem in resp.get_data(as_text=True)
    assert User.get(User.email == "weak@corp.cn").password_hash is None


def test_login_log_records_success_and_failure_with_reason(make_seat, browser_for):
    seat = make_seat("a@corp.cn")
    b = browser_for(None)
    assert b.login("a@corp.cn", "wrong password!!").status_code == 401
    assert b.login("nobody@corp.cn", "whatever password").status_code == 401
    assert b.login("a@corp.cn").status_code == 302
    rows = list(LoginLog.select().order_by(LoginLog.id))
    assert [(r.email, r.success, r.reason) for r in rows] == [
        ("a@corp.cn", False, "wrong password"), ("nobody@corp.cn", False, "unknown user"),
        ("a@corp.cn", True, "ok")]
    assert rows[0].user_id == seat.user.id and rows[1].user_id is None
    assert rows[2].ip == "127.0.0.1" and rows[2].user_agent


def test_a_password_typed_in_the_e_mail_field_is_not_written_to_the_login_log(make_seat, browser_for, db):
    make_seat("a@corp.cn")
    b = browser_for(None)
    for typed in ("My Secret Pass 42", "a@corp.cn secret", "p@ssw0rd!"):
        assert b.login(typed, "whatever password").status_code == 401
    assert b.login(" A@Corp.cn ", "wrong password!!").status_code == 401
    rows = list(LoginLog.select().order_by(LoginLog.id))
    assert [(r.email, r.reason) for r in rows] == [("(not an e-mail address)", "unknown user")] * 3 + [
        ("a@corp.cn", "wrong password")]
    dump = " ".join(str(r) for r in db.execute_sql('SELECT * FROM "login_log"').fetchall())
    assert "My Secret Pass" not in dump and "secret" not in dump and "p@ss" not in dump


def test_lock_out_after_repeated_failures(settings, make_seat, browser_for):
    make_seat("a@corp.cn")
    b = browser_for(None)
    for _ in range(settings.web.login_max_failures):
        assert b.login("a@corp.cn", "wrong password!!").status_code == 401
    # Locked: even the right password is refused now, and the reason is logged.
    resp = b.login("a@corp.cn")
    assert resp.status_code == 401 and "Too many failed attempts" in resp.get_data(as_text=True)
    assert LoginLog.select().order_by(LoginLog.id.desc()).first().reason == "locked"
    # After the lock-out time the right password works again.
    User.update(locked_until=utcnow() - dt.timedelta(seconds=1)).execute()
    assert b.login("a@corp.cn").status_code == 302


def test_forms_without_csrf_token_are_rejected(make_seat, browser_for):
    seat = make_seat("a@corp.cn")
    b = browser_for(seat)
    resp = b.client.post("/accounts/new", data={"name": "no token", "owner": seat_label(seat.user)})
    assert resp.status_code == 400
    resp = b.client.post("/accounts/new", data={"name": "bad token", "owner": seat_label(seat.user), "csrf_token": "x"})
    assert resp.status_code == 400
    anon = browser_for(None)
    resp = anon.client.post("/auth/login", data={"email": "a@corp.cn", "password": PASSWORD})
    assert resp.status_code == 400
    from webapp.models import Account
    assert Account.select().count() == 0


def test_suspended_seat_is_logged_out_at_its_next_request(make_seat, browser_for):
    seat = make_seat("a@corp.cn")
    b = browser_for(seat)
    assert b.get("/accounts/").status_code == 200
    seats.suspend(User.get_by_id(seat.user.id), "stolen laptop")
    resp = b.get("/accounts/")
    assert resp.status_code == 302 and "/auth/login" in resp.headers["Location"]
    assert b.login(seat.email).status_code == 401
    assert LoginLog.select().order_by(LoginLog.id.desc()).first().reason == "suspended"


def test_boss_suspends_a_seat_from_the_admin_page(make_seat, browser_for):
    boss = make_seat("boss@corp.cn", role="boss")
    agent = make_seat("a@corp.cn")
    agent_browser = browser_for(agent)
    resp = browser_for(boss).post(f"/admin/seats/{agent.user.id}/suspend", token_from="/admin/seats")
    assert resp.status_code == 302
    assert agent_browser.get("/").status_code == 302
    assert not User.get_by_id(agent.user.id).active


def test_suspending_a_seat_ends_its_pending_set_password_link_for_good(settings, db):
    created = seats.add_seat(settings, "invited@corp.cn", "Invited", "agent")
    token = created.link.rsplit("/", 1)[1]
    seats.suspend(User.get_by_id(created.user.id), "stolen phone")
    assert not SetPasswordToken.select().where(SetPasswordToken.user == created.user.id).exists()
    again = seats.reactivate(settings, User.get_by_id(created.user.id))
    assert seats.find_token(token) is None, "the link sent before the suspension must not work after it"
    assert seats.find_token(again.link.rsplit("/", 1)[1]).user.id == created.user.id
    with pytest.raises(SeatError, match="invited@corp.cn is active already"):
        seats.reactivate(settings, User.get_by_id(created.user.id))


def test_a_reactivated_seat_needs_a_new_password_from_a_link_shown_to_the_boss(make_seat, browser_for):
    from webapp.models import AuditLog

    boss = make_seat("boss@corp.cn", role="boss")
    stolen = make_seat("stolen@corp.cn")
    b = browser_for(boss)
    b.post(f"/admin/seats/{stolen.user.id}/suspend", token_from="/admin/seats")
    # No link for a suspended seat (it would not work): Reactivate gives one.
    refused = b.post(f"/admin/seats/{stolen.user.id}/link", token_from="/admin/seats", follow_redirects=True)
    assert "Seat stolen@corp.cn is not active; nothing was changed." in refused.get_data(as_text=True)
    assert not SetPasswordToken.select().where(SetPasswordToken.user == stolen.user.id,
                                              SetPasswordToken.used_at.is_null()).exists()
    resp = b.post(f"/admin/seats/{stolen.user.id}/reactivate", token_from="/admin/seats")
    page = resp.get_data(as_text=True)
    assert resp.status_code == 200 and "Seat stolen@corp.cn is active again. Its old password no longer works." in page
    link = re.search(r'id="new-link">([^<]+)<', page).group(1)
    assert User.get_by_id(stolen.user.id).active
    thief = browser_for(None)
    assert thief.login(stolen.email).status_code == 401, "the old password no longer works"
    assert LoginLog.select().order_by(LoginLog.id.desc()).first().reason == "no password set"
    trail = AuditLog.get(AuditLog.action == "reactivate", AuditLog.record_id == stolen.user.id)
    assert trail.changes == {"active": [False, True], "password_set": [True, False]} and trail.actor == boss.email
    path = "/auth/set-password/" + link.rsplit("/", 1)[1]
    owner = browser_for(None)
    assert owner.post(path, {"password": "a brand new secret", "confirm": "a brand new secret"},
                      token_from=path).status_code == 302
    assert owner.login(stolen.email, "a brand new secret").status_code == 302


def test_a_removed_seat_is_shown_as_removed_and_comes_back_without_its_records(make_seat, browser_for):
    from webapp import audit
    from webapp.models import Account

    boss = make_seat("boss@corp.cn", role="boss")
    gone, heir = make_seat("gone@corp.cn"), make_seat("heir@corp.cn")
    acc = audit.create(gone.user, Account, {"name": "Kept Ltd"})
    b = browser_for(boss)
    b.post("/admin/seats/change", {"seat": [gone.user.id], "action": "remove", "heir": heir.user.id},
           token_from="/admin/seats")
    listed = seats.list_seats()
    assert [(r["email"], r["removed"]) for r in listed if not r["active"]] == [("gone@corp.cn", True)]
    assert '<span class="tag tag-lost">removed</span>' in b.get("/admin/seats").get_data(as_text=True)
    resp = b.post(f"/admin/seats/{gone.user.id}/reactivate", token_from="/admin/seats")
    page = resp.get_data(as_text=True)
    assert resp.status_code == 200 and "without records" in page and "/auth/set-password/" in page
    assert Account.get_by_id(acc.id).owner_id == heir.user.id, "the records stay with the heir"
    assert User.get_by_id(gone.user.id).password_hash is None and not seats.list_seats()[1]["removed"]


def test_pages_need_login(app, browser_for):
    b = browser_for(None)
    for path in ("/", "/accounts/", "/accounts/1", "/admin/seats", "/search/?q=a", "/accounts/export.csv"):
        resp = b.get(path)
        assert resp.status_code == 302 and "/auth/login" in resp.headers["Location"], path


def test_session_cookie_flags(make_seat, browser_for):
    make_seat("a@corp.cn")
    b = browser_for(None)
    resp = b.login("a@corp.cn")
    cookie = resp.headers["Set-Cookie"]
    assert "HttpOnly" in cookie and "SameSite=Lax" in cookie
    assert "Secure" not in cookie  # the test app is served over plain http


def test_secure_cookie_when_served_over_https(pg_cluster, secrets_dir, db):
    from tests.conftest import make_settings
    from webapp import create_app

    app = create_app(make_settings(pg_cluster, secrets_dir, web={"public_url": "https://crm.corp.lan"}), database=db)
    assert app.config["SESSION_COOKIE_SECURE"] is True


def test_open_redirect_after_login_is_refused(make_seat, browser_for):
    make_seat("a@corp.cn")
    b = browser_for(None)
    token = b.csrf()
    for target in ("https://evil.example/", "//evil.example/", "/\\evil.example"):
        resp = b.client.post(f"/auth/login?next={target}", data={"email": "a@corp.cn", "password": PASSWORD,
                                                                 "csrf_token": token})
        assert resp.headers["Location"] == "/", target
        b.client.post("/auth/logout", data={"csrf_token": b.csrf("/")})
        token = b.csrf()


def test_password_never_appears_in_logs_or_tables(make_seat, browser_for, db, caplog):
    caplog.set_level(logging.DEBUG)
    seat = make_seat("a@corp.cn")
    b = browser_for(None)
    b.login(seat.email, "a wrong password 123")
    b.login(seat.email)
    assert PASSWORD not in caplog.text and "a wrong password 123" not in caplog.text
    for table in ("login_log", "audit_log", "user"):
        dump = " ".join(str(r) for r in db.execute_sql(f'SELECT * FROM "{table}"').fetchall())
        assert PASSWORD not in dump and "a wrong password 123" not in dump, table


def test_licence_caps_the_seats(pg_cluster, secrets_dir, db):
    from tests.conftest import make_settings

    small = make_settings(pg_cluster, secrets_dir, seats={"licensed": 2})
    seats.add_seat(small, "one@corp.cn", "One", "boss")
    seats.add_seat(small, "two@corp.cn", "Two", "agent")
    with pytest.raises(SeatError, match="allows 2 seats"):
        seats.add_seat(small, "three@corp.cn", "Three", "agent")


@pytest.mark.parametrize("email,role,message", [
    ("not-an-email", "agent", "not an e-mail"), ("x@corp.cn", "emperor", "unknown role"),
])
def test_bad_seat_input_is_refused(settings, db, email, role, message):
    with pytest.raises(SeatError, match=message):
        seats.add_seat(settings, email, "X", role)


def test_duplicate_seat_email_is_refused_case_insensitively(settings, db):
    seats.add_seat(settings, "Dup@Corp.cn", "Dup", "agent")
    with pytest.raises(SeatError, match="already exists"):
        seats.add_seat(settings, "dup@corp.CN", "Dup", "agent")
    assert re.fullmatch(r"dup@corp\.cn", User.get().email)


def test_the_session_cookie_is_reissued_every_few_minutes_not_on_every_page(make_seat, browser_for):
    """Its lifetime ([web] session_hours) counts from the seat's last activity, give or take
    SESSION_REFRESH_SECONDS, without signing a cookie for every response."""
    from webapp import auth

    seat = make_seat("a@corp.cn")
    b = browser_for(seat)
    assert b.get("/").status_code == 200
    quiet = b.get("/accounts/")
    assert quiet.status_code == 200 and "Set-Cookie" not in quiet.headers
    with b.client.session_transaction() as sess:
        issued = sess["t"]
        sess["t"] = issued - auth.SESSION_REFRESH_SECONDS
    renewed = b.get("/accounts/")
    assert renewed.status_code == 200 and "crm_session=" in renewed.headers["Set-Cookie"]
    assert "Expires=" in renewed.headers["Set-Cookie"]
    with b.client.session_transaction() as sess:
        assert sess["t"] >= issued


def test_a_sessions_csrf_token_is_signed_once_and_stays_valid(make_seat, browser_for):
    """webapp._reuse_signed_csrf_tokens: later pages carry the token signed for the first one,
    and a form posted with it is accepted; another session gets another token."""
    import time

    seat = make_seat("a@corp.cn")
    b = browser_for(seat)
    tokens = [b.csrf("/")]
    time.sleep(1.1)  # a token signed anew now would carry another timestamp
    tokens += [b.csrf(path) for path in ("/accounts/", "/accounts/new")]
    assert tokens[0] == tokens[1] == tokens[2]
    resp = b.client.post("/accounts/new", data={"csrf_token": tokens[0], "name": "Acme", "owner": seat_label(seat.user)})
    assert resp.status_code == 302, resp.get_data(as_text=True)[:300]
    other = browser_for(make_seat("b@corp.cn"))
    assert other.csrf("/") != tokens[0]
    resp = other.client.post("/accounts/new", data={"csrf_token": tokens[0], "name": "Stolen", "owner": seat_label(seat.user)})
    assert resp.status_code == 400
