"""The demo data set: its size, its shape, the same set for the same seed, and no real data touched."""

from __future__ import annotations

import pytest

from appliance import demo_data


def _fingerprint(db) -> str:
    return db.execute_sql("SELECT md5(string_agg(name || email || phone || city, ',' ORDER BY id)) FROM account"
                          ).fetchone()[0] + db.execute_sql(
        "SELECT md5(string_agg(last_name || coalesce(account_id::text, '') || owner_id, ',' ORDER BY id)) FROM contact"
    ).fetchone()[0]


def _sql(db, query: str):
    return db.execute_sql(query).fetchone()[0]


def test_the_data_set_has_the_planned_size_and_shape(settings, db):
    result = demo_data.generate(settings, seats=12, years=3, scale=0.01, seed=7)
    assert result.counts == demo_data.planned_counts(12, 3, 0.01)
    assert result.counts["contact"] == round(200_000 * 12 / 50 * 0.01)
    for entity, n in result.counts.items():
        assert _sql(db, f"SELECT count(*) FROM {entity}") == n, entity
        if entity != "note":  # one create row in the audit log per record, by its owner
            assert _sql(db, f"SELECT count(*) FROM audit_log a JOIN {entity} r ON r.id = a.record_id "
                            f"AND a.entity = '{entity}' AND a.action = 'create' AND a.user_id = r.owner_id") == n
    roles = dict(db.execute_sql("SELECT r.name, count(*) FROM \"user\" u JOIN role r ON r.id = u.role_id "
                                "GROUP BY r.name").fetchall())
    assert roles == {"boss": 1, "manager": len(demo_data.TEAMS), "agent": 12 - 1 - len(demo_data.TEAMS)}
    # Every record belongs to a demo seat, in that seat's team; links point at demo rows.
    assert _sql(db, "SELECT count(*) FROM contact c JOIN \"user\" u ON u.id = c.owner_id "
                    "WHERE u.email NOT LIKE '%%@demo.invalid' OR c.team_id IS DISTINCT FROM u.team_id") == 0
    assert _sql(db, "SELECT count(*) FROM contact WHERE account_id NOT IN (SELECT id FROM account)") == 0
    assert _sql(db, "SELECT count(*) FROM activity WHERE parent_id NOT IN (SELECT id FROM contact)") == 0
    # Spread over the three years, not all made today.
    days = _sql(db, "SELECT extract(day FROM max(created_at) - min(created_at)) FROM contact")
    assert 900 < days <= 3 * 365
    # Written as time passes, as in a real CRM: each row no more than a day older than the one
    # before it (so the newest rows sit together, not scattered over the table), changed after
    # it was written and never in the future.
    for table in ("account", "contact", "lead", "opportunity", "ticket", "activity", "note"):
        assert _sql(db, f"SELECT count(*) FROM {table} a JOIN {table} b ON b.id = a.id + 1 "
                        "WHERE b.created_at < a.created_at - interval '1 day'") == 0, table
    for table in ("account", "contact", "lead", "opportunity", "ticket", "activity"):
        assert _sql(db, f"SELECT count(*) FROM {table} WHERE updated_at < created_at "
                        "OR updated_at > now() AT TIME ZONE 'utc'") == 0, table
    assert _sql(db, "SELECT count(DISTINCT stage) FROM opportunity") == 6


def test_the_same_seed_gives_the_same_data_and_another_seed_other_data(settings, db):
    demo_data.generate(settings, seats=5, scale=0.005, seed=42)
    first = _fingerprint(db)
    db.execute_sql("TRUNCATE note, activity, ticket, opportunity, lead, contact, account, audit_log, \"user\", team "
                   "RESTART IDENTITY CASCADE")
    demo_data.generate(settings, seats=5, scale=0.005, seed=42)
    assert _fingerprint(db) == first
    db.execute_sql("TRUNCATE note, activity, ticket, opportunity, lead, contact, account, audit_log, \"user\", team "
                   "RESTART IDENTITY CASCADE")
    demo_data.generate(settings, seats=5, scale=0.005, seed=43)
    assert _fingerprint(db) != first


def test_a_database_with_real_data_is_refused_and_left_as_it_was(settings, db, make_seat):
    from webapp.models import Account

    boss = make_seat("boss@corp.cn", role="boss")
    make_seat("li@corp.cn", role="agent")
    Account.create(name="A real customer", owner=boss.user)
    with pytest.raises(demo_data.DemoDataError, match=r"already holds 1 records and 2 seats: .* pass --force"):
        demo_data.generate(settings, seats=3, scale=0.001)
    assert _sql(db, "SELECT count(*) FROM account") == 1 and _sql(db, "SELECT count(*) FROM \"user\"") == 2
    with pytest.raises(demo_data.DemoDataError, match="seats: expected 1 to 10000, found 0"):
        demo_data.generate(settings, seats=0, force=True)
    added = demo_data.generate(settings, seats=3, scale=0.001, force=True)
    assert _sql(db, "SELECT count(*) FROM account") == 1 + added.counts["account"]


def test_attachments_are_real_files_owned_like_their_accounts_and_the_same_for_a_seed(settings, db, tmp_path):
    import dataclasses
    import hashlib

    from appliance import attachments

    own = dataclasses.replace(settings, appliance=dataclasses.replace(settings.appliance, data_dir=tmp_path))
    result = demo_data.generate(own, seats=5, scale=0.01, seed=9, attachments=True)
    target = round(demo_data.ATTACHMENT_BYTES * 5 / 50 * 0.01)  # 2.5 MB
    rows = db.execute_sql("SELECT a.id, a.sha256, a.size, a.owner_id = c.owner_id FROM attachment a "
                          "JOIN account c ON c.id = a.parent_id AND a.parent_type = 'account' ORDER BY a.id").fetchall()
    assert result.counts["attachment"] == len(rows) > 1
    assert sum(r[2] for r in rows) == target
    assert all(same_owner for *_, same_owner in rows)
    for _id, sha, size, _ in rows:
        data = attachments.blob_path(own, sha).read_bytes()
        assert len(data) == size and hashlib.sha256(data).hexdigest() == sha and data.startswith(b"%PDF-")
    assert _sql(db, "SELECT count(*) FROM audit_log WHERE entity = 'attachment' AND action = 'create'") == len(rows)
    first = [sha for _id, sha, *_ in rows]
    db.execute_sql('TRUNCATE attachment, account, contact, lead, opportunity, ticket, activity, note, audit_log, '
                   '"user", team RESTART IDENTITY CASCADE')
    demo_data.generate(own, seats=5, scale=0.01, seed=9, attachments=True)
    assert [sha for (sha,) in db.execute_sql("SELECT sha256 FROM attachment ORDER BY id").fetchall()] == first
