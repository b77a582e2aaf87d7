"""Prepared statements (webapp/prepared.py): the SQL text built once, the rows as the query gives them."""

from __future__ import annotations

import pytest

from webapp import audit, prepared
from webapp.models import Account, AuditLog, Note, Role, User
from webapp.prepared import Prepared


def _seat_query(uid, email):
    return User.select(User.id, User.name, User.email, Role).join(Role).where((User.id == uid) | (User.email == email))


def test_rows_equal_the_built_querys_for_every_value_and_the_text_is_built_once(make_seat, db):
    seats = [make_seat(f"p{i}@corp.cn", role=role) for i, role in enumerate(("agent", "manager", "boss"))]
    builds = []
    prepared = Prepared(lambda uid, email: builds.append(1) or _seat_query(uid, email))
    cases = [(s.user.id, "nobody@corp.cn") for s in seats] + [(0, seats[2].email), (seats[0].user.id, seats[1].email),
                                                              (999_999, "none@corp.cn")]
    for uid, email in cases:
        got = prepared.rows(uid, email)
        want = list(_seat_query(uid, email).order_by(User.id))
        assert sorted((u.id, u.name, u.email, u.role.name) for u in got) == \
            [(u.id, u.name, u.email, u.role.name) for u in want], (uid, email)
    assert len(builds) == 1


def test_two_equal_values_are_still_two_parameters_each_in_its_place(make_seat, db):
    """The notes of record 2 with a limit of 2: each 2 goes where its own stand-in stood."""
    seat = make_seat("a@corp.cn")
    accounts = [audit.create(seat.user, Account, {"name": f"acc {i}"}) for i in range(3)]
    for account in accounts:
        for n in range(3):
            audit.add_note(seat.user, account, f"note {n} on {account.id}")
    notes = Prepared(lambda entity, record_id, limit: (
        Note.select().where(Note.parent_type == entity, Note.parent_id == record_id)
        .order_by(Note.id).limit(limit)))
    target = accounts[1]
    assert [n.body for n in notes.rows("account", target.id, 2)] == [f"note 0 on {target.id}", f"note 1 on {target.id}"]
    assert target.id == 2
    assert [n.body for n in notes.rows("account", target.id, target.id)] == [f"note {n} on 2" for n in (0, 1)]
    assert len(notes.rows("account", accounts[2].id, 10)) == 3
    assert notes.rows("contact", target.id, 10) == []
    changes = Prepared(lambda entity, record_id: AuditLog.select().where(AuditLog.entity == entity,
                                                                         AuditLog.record_id == record_id))
    assert {r.action for r in changes.rows("account", target.id)} == {"create"}


def test_values_of_another_type_or_a_builder_that_drops_one_are_refused(db):
    prepared = Prepared(lambda uid: User.select().where(User.id == uid))
    prepared.rows(1)
    for value in (None, "1", 1.0, True):
        with pytest.raises(TypeError):
            prepared.rows(value)
    with pytest.raises(TypeError):
        Prepared(lambda at: User.select().where(User.created_at > at)).rows(None)
    with pytest.raises(ValueError, match="not parameters"):
        Prepared(lambda uid, unused: User.select().where(User.id == uid)).rows(1, 2)


def _prepared_here(db) -> dict[str, str]:
    """The statements prepared on the current connection: name -> text."""
    return dict(db.execute_sql("SELECT name, statement FROM pg_prepared_statements").fetchall())


def test_the_statement_is_prepared_once_per_connection_and_survives_a_rollback(make_seat, db):
    seats = [make_seat(f"s{i}@corp.cn") for i in range(2)]
    statement = Prepared(lambda uid: User.select(User.id, User.email).where(User.id == uid))
    sent = []
    real_execute = db.execute_sql
    db.execute_sql = lambda sql, params=None: sent.append(sql.split()[0]) or real_execute(sql, params)
    sent_by_prepared = lambda: [word for word in sent if word in ("PREPARE", "EXECUTE")]  # noqa: E731
    try:
        assert [u.email for u in statement.rows(seats[0].user.id)] == [seats[0].email]
        text = _prepared_here(db)[statement._name]
        assert text.startswith(f"PREPARE {statement._name} AS SELECT") and '"id" = $1' in text
        with db.atomic() as transaction:
            assert [u.email for u in statement.rows(seats[1].user.id)] == [seats[1].email]
            transaction.rollback()
        assert [u.email for u in statement.rows(seats[0].user.id)] == [seats[0].email]
        assert sent_by_prepared() == ["PREPARE", "EXECUTE", "EXECUTE", "EXECUTE"]
        first_connection = db.connection()
        db.manual_close()  # closed for good, not back to the pool: the next connection has nothing prepared
        sent.clear()
        assert [u.email for u in statement.rows(seats[1].user.id)] == [seats[1].email]
        assert sent_by_prepared() == ["PREPARE", "EXECUTE"] and db.connection() is not first_connection
    finally:
        db.execute_sql = real_execute


def test_constants_are_literals_of_the_prepared_text_and_as_select_gives_what_an_execute_runs(make_seat, db):
    seat = make_seat("a@corp.cn")
    account = audit.create(seat.user, Account, {"name": "50% off"})
    audit.add_note(seat.user, account, "first")
    notes = Prepared(lambda record_id: (Note.select().where(Note.parent_type == "account", Note.parent_id == record_id)
                                        .order_by(Note.id).limit(5)))
    assert [n.body for n in notes.rows(account.id)] == ["first"]
    text = _prepared_here(db)[notes._name]
    assert "= 'account'" in text and "LIMIT 5" in text and "$1" in text and "$2" not in text
    sql, params = prepared.as_select(f"EXECUTE {notes._name}(%s)", (account.id,))
    assert sql.startswith("SELECT") and params == ["account", account.id, 5]
    assert [row[0] for row in db.execute_sql(sql, params).fetchall()] == [n.id for n in notes.rows(account.id)]
    assert prepared.as_select("SELECT 1", []) == ("SELECT 1", [])
