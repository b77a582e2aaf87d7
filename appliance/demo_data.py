"""A realistic data set for a team of seats over some years: demos, benchmarks, capacity tests.

``crm-appliance demo-data --seats 50 --years 3 [--scale K] [--seed S] [--attachments]`` makes,
for 50 seats over three years at scale 1: 50k accounts, 200k contacts, 100k leads, 40k
opportunities, 20k tickets, 600k activities and 400k notes, with one audit row per record,
and with ``--attachments`` 2.5 GB of files on accounts (at most 95% of the attachment
quota, so that uploads still fit). The numbers grow with seats, years and ``scale``.

PostgreSQL makes the rows itself (``INSERT ... SELECT`` over ``generate_series``), so the
set builds in minutes, not hours. Every value comes from ``hashtextextended(row, seed)``:
the same seed gives the same data set, whatever the order the server works in.

It refuses a database that holds real data (records, or seats that are not demo seats)
unless ``force`` is given, and runs in one transaction: it all lands, or nothing does.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Callable

from appliance.attachments import quota_bytes
from appliance.config import Settings
from appliance.errors import ApplianceError
from webapp.models import utcnow

log = logging.getLogger(__name__)

DEMO_DOMAIN = "demo.invalid"  # RFC 2606: never a real address
#: Rows per 50 seats and 3 years at scale 1.
BASE_COUNTS = {"account": 50_000, "contact": 200_000, "lead": 100_000, "opportunity": 40_000, "ticket": 20_000,
               "activity": 600_000, "note": 400_000}
TEAMS = ("East", "West", "North", "South", "Key Accounts")

SURNAMES = ("王", "李", "张", "刘", "陈", "杨", "黄", "赵", "吴", "周", "徐", "孙", "马", "朱", "胡", "郭", "何", "林",
            "Smith", "Müller", "Tanaka", "Kim", "Nguyen", "Garcia")
GIVEN = ("伟", "芳", "娜", "敏", "静", "强", "磊", "军", "洋", "勇", "艳", "杰", "涛", "明", "超", "秀英", "华", "丽",
         "Anna", "David", "Yuki", "Min-jun", "Lan", "Carlos")
COMPANY_WORDS = ("华信", "东方", "长城", "天成", "恒通", "金桥", "瑞丰", "新元", "博远", "中科", "Apex", "Nordic",
                 "Pacific", "Summit", "Blue River", "Golden Gate")
COMPANY_KINDS = ("科技有限公司", "贸易有限公司", "制造股份有限公司", "咨询有限公司", "Ltd.", "GmbH", "Inc.")
INDUSTRIES = ("制造", "零售", "金融", "医疗", "教育", "物流", "软件", "能源", "Manufacturing", "Retail")
CITIES = ("上海", "北京", "深圳", "广州", "杭州", "成都", "武汉", "南京", "苏州", "Hong Kong", "Singapore", "Tokyo")
SUBJECTS = ("报价跟进", "合同续签", "产品演示", "需求沟通", "发票问题", "交付进度", "Follow-up call", "Quarterly review",
            "Onboarding", "Renewal", "Support request", "Pricing question")
NOTE_TEXTS = ("客户对方案满意，下周再联系。", "需要法务审核合同条款。", "已发送报价单，等待回复。", "客户要求延期交付。",
              "Met the buyer; budget approved for Q3.", "Sent the proposal; waiting for feedback.",
              "Escalated to the product team.", "Customer asked for a discount on volume.")


class DemoDataError(ApplianceError):
    """The database holds real data, or the parameters are out of range."""


@dataclass
class DemoResult:
    seats: int
    counts: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0

    def __str__(self) -> str:
        rows = ", ".join(f"{n:,} {entity}" for entity, n in self.counts.items())
        return f"{self.seats} seats; {rows}; built in {self.seconds:.1f} s"


def planned_counts(seats: int, years: float, scale: float) -> dict[str, int]:
    factor = seats / 50 * years / 3 * scale
    return {entity: max(1, round(n * factor)) for entity, n in BASE_COUNTS.items()}


def _array(values: tuple[str, ...]) -> str:
    return "ARRAY[" + ", ".join("'" + v.replace("'", "''") + "'" for v in values) + "]"


def _pick(values: tuple[str, ...], salt: str) -> str:
    """SQL: one of ``values``, chosen by the row number ``i`` and the seed (deterministic)."""
    return f"({_array(values)})[1 + (abs(hashtextextended(i::text || '{salt}', :seed)) % {len(values)})]"


def _num(salt: str, modulo: int) -> str:
    """SQL: a whole number from 0 to modulo - 1, from the row number ``i`` and the seed."""
    return f"(abs(hashtextextended(i::text || '{salt}', :seed)) % {modulo})"


def generate(settings: Settings, seats: int = 50, years: float = 3, scale: float = 1.0, seed: int = 1,
             force: bool = False, password_hash: str | None = None, attachments: bool = False,
             progress: Callable[[str], None] = lambda message: None) -> DemoResult:
    """Fill the appliance's database with a demo data set (see the module's docstring)."""
    from appliance.db import open_database
    from webapp.permissions import ensure_builtin_roles

    if not 1 <= seats <= 10_000:
        raise DemoDataError(f"seats: expected 1 to 10000, found {seats}")
    if not 0 < years <= 20 or not 0 < scale <= 100:
        raise DemoDataError(f"years (0-20] and scale (0-100]: found years {years}, scale {scale}")
    counts = planned_counts(seats, years, scale)
    started = time.monotonic()
    db = open_database(settings)
    try:
        with db.connection_context(), db.atomic():
            ensure_builtin_roles()
            _refuse_real_data(db, force)
            span = int(years * 365 * 86400)
            params = {"seed": seed, "span": span}

            def run(sql: str, what: str) -> None:
                progress(what)
                step = time.monotonic()
                db.execute_sql(_bind(sql), params)
                log.info("%s in %.1f s", what, time.monotonic() - step)

            run(_teams_sql(), "teams")
            run(_seats_sql(seats, password_hash), f"{seats} seats")
            db.execute_sql("CREATE TEMPORARY TABLE demo_seat ON COMMIT DROP AS SELECT row_number() OVER (ORDER BY u.id) "
                           "AS n, u.id, u.team_id, u.email FROM \"user\" u WHERE u.email LIKE %s",
                           (f"%@{DEMO_DOMAIN}",))
            for entity in ("account", "contact", "lead", "opportunity", "ticket", "activity"):
                run(_records_sql(entity, counts, seats), f"{counts[entity]:,} {entity} rows")
                run(_audit_sql(entity), f"audit rows for {entity}")
            run(_notes_sql(counts, seats), f"{counts['note']:,} notes")
            if attachments:
                target = min(int(ATTACHMENT_BYTES * seats / 50 * years / 3 * scale),
                             int(0.95 * quota_bytes(settings)))
                progress(f"attachment files, {target / 1e9:.2f} GB")
                counts["attachment"], written = _attachments(settings, db, target, seed)
                log.info("%d attachment files, %d bytes", counts["attachment"], written)
            progress("statistics (ANALYZE)")
        db.execute_sql("ANALYZE")
    finally:
        db.close_all()
    return DemoResult(seats=seats, counts=counts, seconds=time.monotonic() - started)


#: Bytes of attachments per 50 seats and 3 years at scale 1 (issue 7).
ATTACHMENT_BYTES = 2_500_000_000
_FILE_SIZES = (30_000, 120_000, 400_000, 1_500_000, 4_000_000)  # a mix of notes, offers, scans


def _attachments(settings: Settings, db, target: int, seed: int) -> tuple[int, int]:
    """Files on random accounts, owned by the account's owner, until ``target`` bytes: written
    straight into the attachment store (content-addressed, as uploads are), rows and audit
    rows in the caller's transaction. A failed run leaves files no row names; the retention
    job's sweep shreds them."""
    import hashlib
    import os
    import random

    from appliance.attachments import blob_path
    from webapp.models import Attachment

    rng = random.Random(seed)
    accounts = db.execute_sql("SELECT id, owner_id FROM account ORDER BY id").fetchall()
    rows, written = [], 0
    while written < target and accounts:
        size = min(rng.choice(_FILE_SIZES) + rng.randrange(10_000), target - written)
        data = b"%PDF-1.4\n" + rng.randbytes(max(0, size - 9))
        sha = hashlib.sha256(data).hexdigest()
        path = blob_path(settings, sha)
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            tmp = path.with_name(f".{sha}.demo")
            tmp.write_bytes(data)
            os.replace(tmp, path)
        account_id, owner_id = rng.choice(accounts)
        rows.append({"parent_type": "account", "parent_id": account_id, "owner": owner_id,
                     "filename": f"demo-{len(rows) + 1:06d}.pdf", "content_type": "application/pdf",
                     "size": len(data), "sha256": sha, "created_at": utcnow()})
        written += len(data)
    first_id = db.execute_sql("SELECT coalesce(max(id), 0) + 1 FROM attachment").fetchone()[0]
    for start in range(0, len(rows), 1000):
        Attachment.insert_many(rows[start:start + 1000]).execute()
    db.execute_sql(
        "INSERT INTO audit_log (at, user_id, actor, entity, record_id, action, changes) "
        "SELECT a.created_at, a.owner_id, 'demo-data', 'attachment', a.id, 'create', jsonb_build_object("
        "'parent', jsonb_build_array(NULL, a.parent_type || ':' || a.parent_id), "
        "'filename', jsonb_build_array(NULL, a.filename), 'size', jsonb_build_array(NULL, a.size)) "
        "FROM attachment a WHERE a.id >= %s", (first_id,))
    return len(rows), written


def _bind(sql: str) -> str:
    """The SQL with its named values as psycopg2 parameters (and literal % doubled)."""
    return sql.replace("%", "%%").replace(":seed", "%(seed)s").replace(":span", "%(span)s")


def _refuse_real_data(db, force: bool) -> None:
    records = db.execute_sql("SELECT (SELECT count(*) FROM account) + (SELECT count(*) FROM contact) + "
                             "(SELECT count(*) FROM lead) + (SELECT count(*) FROM ticket)").fetchone()[0]
    people = db.execute_sql("SELECT count(*) FROM \"user\" WHERE email NOT LIKE %s",
                            (f"%@{DEMO_DOMAIN}",)).fetchone()[0]
    if (records or people > 1) and not force:
        raise DemoDataError(f"the database {db.database!r} already holds {records:,} records and {people} seats: "
                            f"demo data goes only into an empty appliance; pass --force to add it anyway")


def _teams_sql() -> str:
    values = ", ".join(f"('{name}')" for name in TEAMS)
    return f"INSERT INTO team (name) VALUES {values} ON CONFLICT (name) DO NOTHING"


def _seats_sql(seats: int, password_hash: str | None) -> str:
    # One boss, a manager per team, the rest agents, spread over the teams.
    hash_sql = "NULL" if password_hash is None else "'" + password_hash.replace("'", "''") + "'"
    return f"""
        INSERT INTO "user" (email, name, role_id, team_id, password_hash, active, created_at)
        SELECT 'seat' || lpad(i::text, 4, '0') || '@{DEMO_DOMAIN}',
               {_pick(SURNAMES, 'sn')} || {_pick(GIVEN, 'gn')},
               (SELECT id FROM role WHERE name = CASE WHEN i = 1 THEN 'boss'
                                                      WHEN i <= 1 + {len(TEAMS)} THEN 'manager' ELSE 'agent' END),
               (SELECT id FROM team WHERE name = ({_array(TEAMS)})[1 + (i % {len(TEAMS)})]),
               {hash_sql}, true, now() AT TIME ZONE 'utc'
        FROM generate_series(1, {seats}) AS i
        ON CONFLICT (email) DO NOTHING"""


def _owner_join(seats: int, salt: str) -> str:
    return f"JOIN demo_seat s ON s.n = 1 + {_num(salt, seats)}"


def _created(salt: str, count: int) -> str:
    """SQL: when row ``i`` of ``count`` was written. A CRM's rows are written as time passes,
    so the times grow with the row number (give or take a day, from ``salt``), and the rows
    a list shows first, the newest, sit together at the end of the table as after years of
    use. Scattered over the whole table instead, as random times put them, a walk over the
    newest rows at ten times the data took five times as long as over the same rows in time
    order (docs/performance.md, "Changes made")."""
    return (f"(now() AT TIME ZONE 'utc') - make_interval(secs => :span::float8 * ({count} - i) / {count} "
            f"+ {_num(salt, 86400)})")


def _updated(count: int) -> str:
    """SQL: the last change, up to a month after the row was written, never in the future."""
    return (f"least({_created('c', count)} + make_interval(days => {_num('u', 30)}::int), "
            f"now() AT TIME ZONE 'utc')")


def _records_sql(entity: str, counts: dict[str, int], seats: int) -> str:
    n = counts[entity]
    accounts, contacts = counts["account"], counts["contact"]
    common = "owner_id, team_id, created_at, updated_at"
    common_values = f"s.id, s.team_id, {_created('c', n)}, {_updated(n)}"
    if entity == "account":
        return f"""
            INSERT INTO account ({common}, name, industry, email, phone, city, country, website)
            SELECT {common_values},
                   {_pick(COMPANY_WORDS, 'w1')} || {_pick(COMPANY_WORDS, 'w2')} || {_pick(COMPANY_KINDS, 'k')}
                       || ' ' || i,
                   {_pick(INDUSTRIES, 'in')}, 'info' || i || '@company' || (i % 997) || '.example',
                   '+86 21 ' || lpad({_num('ph', 100000000)}::text, 8, '0'), {_pick(CITIES, 'ci')},
                   'CN', 'https://company' || i || '.example'
            FROM generate_series(1, {n}) AS i {_owner_join(seats, 'o')}
            ORDER BY i"""
    if entity == "contact":
        return f"""
            INSERT INTO contact ({common}, first_name, last_name, job_title, email, phone, account_id)
            SELECT {common_values}, {_pick(GIVEN, 'gn')}, {_pick(SURNAMES, 'sn')} || i,
                   {_pick(('经理', '总监', '采购', '工程师', 'CEO', 'Buyer'), 'jt')},
                   'contact' || i || '@mail' || (i % 991) || '.example',
                   '+86 13' || lpad({_num('ph', 1000000000)}::text, 9, '0'),
                   (SELECT max(id) - {accounts} + 1 FROM account) + {_num('a', accounts)}
            FROM generate_series(1, {n}) AS i {_owner_join(seats, 'o')}
            ORDER BY i"""
    if entity == "lead":
        return f"""
            INSERT INTO lead ({common}, first_name, last_name, company, email, phone, source, status)
            SELECT {common_values}, {_pick(GIVEN, 'gn')}, {_pick(SURNAMES, 'sn')} || i,
                   {_pick(COMPANY_WORDS, 'w1')} || {_pick(COMPANY_KINDS, 'k')},
                   'lead' || i || '@mail' || (i % 983) || '.example',
                   '+86 15' || lpad({_num('ph', 1000000000)}::text, 9, '0'),
                   {_pick(('web', 'referral', 'trade show', 'cold call', 'partner'), 'so')},
                   {_pick(('new', 'contacted', 'qualified', 'lost', 'new'), 'st')}
            FROM generate_series(1, {n}) AS i {_owner_join(seats, 'o')}
            ORDER BY i"""
    if entity == "opportunity":
        return f"""
            INSERT INTO opportunity ({common}, name, account_id, stage, amount, currency, probability,
                                     expected_close)
            SELECT {common_values}, {_pick(SUBJECTS, 'su')} || ' #' || i,
                   (SELECT max(id) - {accounts} + 1 FROM account) + {_num('a', accounts)},
                   {_pick(('prospecting', 'qualification', 'proposal', 'negotiation', 'won', 'lost'), 'sg')},
                   ({_num('am', 5000000)} + 1000)::numeric / 10, 'CNY', {_num('pr', 10)} * 10 + 10,
                   (now() AT TIME ZONE 'utc')::date + ({_num('ec', 365)} - 120)::int
            FROM generate_series(1, {n}) AS i {_owner_join(seats, 'o')}
            ORDER BY i"""
    if entity == "ticket":
        return f"""
            INSERT INTO ticket ({common}, subject, description, status, priority, account_id, contact_id)
            SELECT {common_values}, {_pick(SUBJECTS, 'su')} || ' #' || i, {_pick(NOTE_TEXTS, 'nt')},
                   {_pick(('new', 'open', 'pending', 'solved', 'closed', 'closed'), 'st')},
                   {_pick(('low', 'normal', 'normal', 'high', 'urgent'), 'pr')},
                   (SELECT max(id) - {accounts} + 1 FROM account) + {_num('a', accounts)},
                   (SELECT max(id) - {contacts} + 1 FROM contact) + {_num('ct', contacts)}
            FROM generate_series(1, {n}) AS i {_owner_join(seats, 'o')}
            ORDER BY i"""
    if entity == "activity":
        return f"""
            INSERT INTO activity ({common}, kind, subject, due_at, status, parent_type, parent_id)
            SELECT {common_values}, {_pick(('task', 'call', 'meeting'), 'kd')}, {_pick(SUBJECTS, 'su')},
                   {_created('d', n)} + interval '7 days',
                   {_pick(('planned', 'done', 'done', 'done', 'cancelled'), 'st')}, 'contact',
                   (SELECT max(id) - {contacts} + 1 FROM contact) + {_num('ct', contacts)}
            FROM generate_series(1, {n}) AS i {_owner_join(seats, 'o')}
            ORDER BY i"""
    raise ValueError(entity)


def _audit_sql(entity: str) -> str:
    """One 'create' audit row per demo record, by its owner, at its creation time."""
    return f"""
        INSERT INTO audit_log (at, user_id, actor, entity, record_id, action, changes)
        SELECT r.created_at, r.owner_id, s.email, '{entity}', r.id, 'create', '{{}}'::jsonb
        FROM {entity} r JOIN demo_seat s ON s.id = r.owner_id
        WHERE NOT EXISTS (SELECT 1 FROM audit_log a WHERE a.entity = '{entity}' AND a.record_id = r.id)"""


def _notes_sql(counts: dict[str, int], seats: int) -> str:
    return f"""
        INSERT INTO note (parent_type, parent_id, author_id, body, created_at)
        SELECT 'contact', (SELECT max(id) - {counts['contact']} + 1 FROM contact) + {_num('ct', counts['contact'])}, s.id,
               {_pick(NOTE_TEXTS, 'nt')}, {_created('c', counts['note'])}
        FROM generate_series(1, {counts['note']}) AS i {_owner_join(seats, 'o')}
        ORDER BY i"""
