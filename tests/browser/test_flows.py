"""End-to-end flows in a real Chromium against the live app and its PostgreSQL database.

Every test checks what the user sees and what the database holds afterwards.
"""

from __future__ import annotations

import re
from decimal import Decimal
from pathlib import Path
from urllib.parse import urlsplit

from playwright.sync_api import Page, expect

from appliance import seats
from tests.browser.conftest import SCREENSHOT_DIR
from tests.conftest import PASSWORD
from webapp import audit
from webapp.models import (Account, Contact, Lead, LoginLog, Note, Opportunity, SetPasswordToken, Ticket,
                           User)

ZH_MO = Path(__file__).resolve().parents[2] / "webapp" / "translations" / "zh" / "LC_MESSAGES" / "messages.mo"


def login(page: Page, email: str, password: str = PASSWORD) -> None:
    """Log in through the real form and wait for the dashboard greeting."""
    page.goto("/auth/login")
    page.fill("#email", email)
    page.fill("#password", password)
    page.get_by_role("button", name="Log in", exact=True).click()
    expect(page.locator("main h1")).to_have_text(re.compile(r"^Hello, "))


def path_of(page: Page) -> str:
    return urlsplit(page.url).path


def flash(page: Page):
    return page.locator("main .flash")


# ----------------------------------------------------------------------------- a. first login

def test_new_seat_sets_password_and_logs_in(page, live_server, settings):
    created = seats.add_seat(settings, "nora.new@corp.cn", "Nora Newcomer", "agent", "East")
    link = live_server.link(created.link)

    page.goto(link)
    expect(page.locator("main h1")).to_have_text("Set your password")
    expect(page.locator("main")).to_contain_text("Welcome, Nora Newcomer")

    # Two different passwords: refused, the link stays usable.
    page.fill("#password", "a long enough secret 1")
    page.fill("#confirm", "a long enough secret 2")
    page.get_by_role("button", name="Set password").click()
    expect(page.locator(".field.has-error")).to_contain_text("The two passwords differ.")
    assert SetPasswordToken.get(SetPasswordToken.user == created.user.id).used_at is None
    assert User.get_by_id(created.user.id).password_hash is None

    page.fill("#password", PASSWORD)
    page.fill("#confirm", PASSWORD)
    page.get_by_role("button", name="Set password").click()

    expect(page).to_have_url(re.compile(r"/auth/login\?email=nora\.new(@|%40)corp\.cn$"))
    expect(flash(page)).to_contain_text("Your password is set")
    expect(page.locator("#email")).to_have_value("nora.new@corp.cn")
    user = User.get_by_id(created.user.id)
    assert user.password_hash and user.password_hash.startswith("$argon2")
    assert SetPasswordToken.get(SetPasswordToken.user == user.id).used_at is not None

    page.fill("#password", PASSWORD)
    page.get_by_role("button", name="Log in", exact=True).click()
    expect(page.locator("main h1")).to_have_text("Hello, Nora Newcomer")
    expect(page.locator(".userbox .who")).to_have_text("Nora Newcomer")
    assert path_of(page) == "/"
    assert User.get_by_id(user.id).last_login_at is not None
    assert [(r.success, r.reason) for r in LoginLog.select().where(LoginLog.user == user.id)] == [(True, "ok")]

    # The link is one-time.
    response = page.goto(link)
    assert response.status == 404
    expect(page.locator("main h1")).to_have_text("Link not valid")


# ----------------------------------------------------------------------------- b. account + contact

def test_contact_linked_to_account(page, live_server, make_seat):
    agent = make_seat("ann@corp.cn", role="agent", name="Ann Agent")
    login(page, agent.email)

    page.goto("/accounts/new")
    page.fill("#name", "Acme Trading Ltd")
    page.fill("#city", "Shanghai")
    page.get_by_role("button", name="Save").click()
    expect(page.locator("main h1")).to_have_text("Acme Trading Ltd")
    expect(flash(page)).to_have_text("Saved.")
    account = Account.get(Account.name == "Acme Trading Ltd")
    assert (account.owner_id, account.city) == (agent.user.id, "Shanghai")
    assert path_of(page) == f"/accounts/{account.id}"

    # A name that matches no visible account is a field error, and nothing is stored.
    page.goto("/contacts/new")
    page.fill("#first_name", "Wei")
    page.fill("#last_name", "Li")
    page.fill("#account", "Acme Trading")
    page.get_by_role("button", name="Save").click()
    expect(page.locator(".field.has-error")).to_contain_text("No record by that name that you can see.")
    assert Contact.select().count() == 0

    # The exact name is resolved to the account.
    page.fill("#account", "Acme Trading Ltd")
    page.get_by_role("button", name="Save").click()
    expect(page.locator("main h1")).to_have_text("Wei Li")
    account_link = page.locator(f'dl.fields dd a[href="/accounts/{account.id}"]')
    expect(account_link).to_have_text("Acme Trading Ltd")
    wei = Contact.get(Contact.last_name == "Li")
    assert wei.account_id == account.id
    assert wei.owner_id == agent.user.id

    # From the account page, "Add" contact pre-fills "Name (#id)", which resolves too.
    account_link.click()
    expect(page.locator("main h1")).to_have_text("Acme Trading Ltd")
    contacts_card = page.locator("section.card").filter(has=page.locator("h2", has_text="Contacts"))
    expect(contacts_card.locator("li")).to_have_text(["Wei Li"])
    contacts_card.get_by_role("link", name="Add").click()
    expect(page.locator("#account")).to_have_value(f"Acme Trading Ltd (#{account.id})")
    page.fill("#first_name", "Fang")
    page.fill("#last_name", "Chen")
    page.get_by_role("button", name="Save").click()
    expect(page.locator("main h1")).to_have_text("Fang Chen")
    expect(page.locator(f'dl.fields dd a[href="/accounts/{account.id}"]')).to_have_text("Acme Trading Ltd")
    assert Contact.get(Contact.last_name == "Chen").account_id == account.id

    page.goto(f"/accounts/{account.id}")
    expect(contacts_card.locator("li")).to_have_count(2)


# ----------------------------------------------------------------------------- c. lead conversion

def test_convert_lead(page, live_server, make_seat):
    agent = make_seat("leo@corp.cn", role="agent", name="Leo Agent")
    login(page, agent.email)

    page.goto("/leads/new")
    page.fill("#first_name", "Mei")
    page.fill("#last_name", "Zhang")
    page.fill("#company", "Zhang Logistics")
    page.fill("#email", "mei@zhang-logistics.cn")
    page.get_by_role("button", name="Save").click()
    expect(page.locator("main h1")).to_have_text("Mei Zhang")
    lead = Lead.get(Lead.last_name == "Zhang")
    assert lead.status == "new"

    page.get_by_role("link", name="Convert", exact=True).click()
    expect(page.locator("main h1")).to_have_text("Convert lead")
    expect(page.locator("#account_name")).to_have_value("Zhang Logistics")
    expect(page.locator("#opportunity_name")).to_have_value("Zhang Logistics")
    expect(page.locator("#create_opportunity")).to_be_checked()
    page.fill("#opportunity_name", "Zhang Logistics fleet deal")
    page.fill("#amount", "25000")
    page.select_option("#stage", "proposal")
    page.get_by_role("button", name="Convert", exact=True).click()

    expect(flash(page)).to_have_text("Lead converted.")
    expect(page.locator("main h1")).to_have_text("Zhang Logistics fleet deal")
    lead = Lead.get_by_id(lead.id)
    account = Account.get(Account.name == "Zhang Logistics")
    contact = Contact.get(Contact.last_name == "Zhang")
    opportunity = Opportunity.get(Opportunity.lead == lead.id)
    assert lead.status == "converted"
    assert (lead.converted_account_id, lead.converted_contact_id) == (account.id, contact.id)
    assert lead.converted_at is not None
    assert (contact.first_name, contact.email, contact.account_id) == ("Mei", "mei@zhang-logistics.cn", account.id)
    assert (opportunity.account_id, opportunity.contact_id) == (account.id, contact.id)
    assert (opportunity.stage, opportunity.amount) == ("proposal", Decimal("25000.00"))
    assert {account.owner_id, contact.owner_id, opportunity.owner_id} == {agent.user.id}
    assert path_of(page) == f"/opportunities/{opportunity.id}"
    expect(page.locator(f'dl.fields dd a[href="/accounts/{account.id}"]')).to_have_text("Zhang Logistics")
    expect(page.locator(f'dl.fields dd a[href="/contacts/{contact.id}"]')).to_have_text("Mei Zhang")

    # A converted lead offers no second conversion.
    page.goto(f"/leads/{lead.id}")
    expect(page.locator("dl.fields .tag-converted")).to_be_visible()
    expect(page.get_by_role("link", name="Convert", exact=True)).to_have_count(0)


# ----------------------------------------------------------------------------- d. pipeline board

def _card(scope, opp_id: int):
    return scope.locator(f'li.card.opp[data-id="{opp_id}"]')


def _column(page: Page, stage: str):
    return page.locator(f'section.column[data-stage="{stage}"]')


def test_pipeline_drag_and_drop(page, live_server, make_seat):
    seller = make_seat("sam@corp.cn", role="agent", name="Sam Seller")
    opp = audit.create(seller.user, Opportunity, {"name": "Harbour cranes", "stage": "prospecting",
                                                  "amount": Decimal("120000")})
    login(page, seller.email)
    page.goto("/opportunities/board")
    expect(_card(_column(page, "prospecting"), opp.id)).to_be_visible()

    # Grab the card by its padding, not by the link or the stage picker inside it.
    _card(page, opp.id).drag_to(_column(page, "proposal"), source_position={"x": 4, "y": 4})

    # The script moves the card only after the server accepted the move.
    expect(_card(_column(page, "proposal"), opp.id)).to_be_visible()
    expect(_card(_column(page, "prospecting"), opp.id)).to_have_count(0)
    expect(flash(page)).to_have_count(0)  # moved by the script's fetch, not by a form post and reload
    assert Opportunity.get_by_id(opp.id).stage == "proposal"

    page.reload()
    expect(_card(_column(page, "proposal"), opp.id)).to_be_visible()
    expect(_card(_column(page, "prospecting"), opp.id)).to_have_count(0)
    expect(_column(page, "proposal").locator("header")).to_contain_text("1 ·")
    expect(_card(page, opp.id).locator("select[name=stage]")).to_have_value("proposal")
    stored = Opportunity.get_by_id(opp.id)
    assert stored.stage == "proposal"
    assert stored.probability == 10  # only won/lost settle the probability


def test_pipeline_move_without_javascript(new_page, live_server, make_seat):
    seller = make_seat("sue@corp.cn", role="agent", name="Sue Seller")
    opp = audit.create(seller.user, Opportunity, {"name": "Cold storage", "stage": "negotiation",
                                                  "amount": Decimal("5000")})
    page = new_page("nojs", java_script_enabled=False)
    login(page, seller.email)
    page.goto("/opportunities/board")
    card = _card(_column(page, "negotiation"), opp.id)
    expect(card).to_be_visible()

    card.locator("select[name=stage]").select_option("won")
    card.get_by_role("button", name="Move").click()

    expect(flash(page)).to_have_text("Moved.")
    assert path_of(page) == "/opportunities/board"
    expect(_card(_column(page, "won"), opp.id)).to_be_visible()
    expect(_card(_column(page, "negotiation"), opp.id)).to_have_count(0)
    stored = Opportunity.get_by_id(opp.id)
    assert (stored.stage, stored.probability) == ("won", 100)


# ----------------------------------------------------------------------------- e. ticket hand-over

def test_hand_ticket_to_another_agent(page, new_page, live_server, make_seat):
    alice = make_seat("alice@corp.cn", role="agent", name="Alice Agent")
    bob = make_seat("bob@corp.cn", role="agent", name="Bob Agent")
    comment = "Customer prefers a call after 3pm; the invoice is attached to the account."

    login(page, alice.email)
    page.goto("/tickets/new")
    page.fill("#subject", "Printer on fire")
    page.select_option("#priority", "high")
    page.get_by_role("button", name="Save").click()
    expect(page.locator("main h1")).to_have_text("Printer on fire")
    ticket = Ticket.get(Ticket.subject == "Printer on fire")
    assert (ticket.owner_id, ticket.priority) == (alice.user.id, "high")

    page.get_by_role("link", name="Hand over").click()
    expect(page.locator("main h1")).to_have_text("Hand over ticket")
    # The picker suggests seats as one types (static/app.js); a suggestion is "Name (#id)".
    page.locator("#to_user").press_sequentially("bob")
    suggestion = page.locator("#to_user-options option")
    expect(suggestion).to_have_count(1)
    assert suggestion.get_attribute("value") == f"Bob Agent (#{bob.user.id})"
    page.fill("#to_user", suggestion.get_attribute("value"))
    page.fill("#comment", comment)
    page.get_by_role("button", name="Hand over").click()

    expect(flash(page)).to_have_text("Ticket handed over to Bob Agent.")
    assert path_of(page) == "/tickets/"  # Alice may no longer read it
    expect(page.locator("table.list tbody")).not_to_contain_text("Printer on fire")
    ticket = Ticket.get_by_id(ticket.id)
    assert ticket.owner_id == bob.user.id
    note = Note.get((Note.parent_type == "ticket") & (Note.parent_id == ticket.id))
    assert (note.author_id, note.body) == (alice.user.id, comment)

    response = page.goto(f"/tickets/{ticket.id}")
    assert response.status == 404
    expect(page.locator("main h1")).to_have_text("Not found")
    expect(page.locator("main")).not_to_contain_text("Printer on fire")

    page_b = new_page("bob")
    login(page_b, bob.email)
    expect(page_b.locator("main section.card", has_text="My open tickets")).to_contain_text("Printer on fire")
    response = page_b.goto(f"/tickets/{ticket.id}")
    assert response.status == 200
    expect(page_b.locator("main h1")).to_have_text("Printer on fire")
    note_item = page_b.locator("#timeline li.tl-note")
    expect(note_item).to_have_count(1)
    expect(note_item).to_contain_text("Alice Agent")
    expect(note_item).to_contain_text(comment)
    expect(page_b.get_by_role("link", name="Hand over")).to_be_visible()  # Bob may edit it now


# ----------------------------------------------------------------------------- f. language

def test_switch_ui_to_chinese(page, live_server, make_seat):
    seat = make_seat("zoe@corp.cn", role="agent", name="Zoe Agent")
    login(page, seat.email)
    page.goto("/accounts/")
    expect(page.locator("html")).to_have_attribute("lang", "en")
    accounts_nav = page.locator('nav.mainnav a[href="/accounts/"]')
    expect(accounts_nav).to_have_text("Accounts")
    assert User.get_by_id(seat.user.id).locale is None

    page.locator(".userbox").get_by_role("button", name="中文").click()

    expect(page.locator("html")).to_have_attribute("lang", "zh-CN")
    assert path_of(page) == "/accounts/"  # back on the same page
    expect(page.locator(".userbox").get_by_role("button", name="English")).to_be_visible()
    assert User.get_by_id(seat.user.id).locale == "zh"
    if ZH_MO.exists():
        expect(accounts_nav).not_to_have_text("Accounts")

    # Remembered for the seat, not just this page.
    page.goto("/")
    expect(page.locator("html")).to_have_attribute("lang", "zh-CN")
    SCREENSHOT_DIR.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SCREENSHOT_DIR / "test_switch_ui_to_chinese-zh.png"), full_page=True)

    page.locator(".userbox").get_by_role("button", name="English").click()
    expect(page.locator("html")).to_have_attribute("lang", "en")
    expect(page.locator("main h1")).to_have_text("Hello, Zoe Agent")
    assert User.get_by_id(seat.user.id).locale == "en"


# ----------------------------------------------------------------------------- g. wrong password

def test_wrong_password_stays_on_login(page, live_server, make_seat):
    seat = make_seat("walt@corp.cn", role="agent", name="Walt Agent")
    page.goto("/auth/login")
    page.fill("#email", seat.email)
    page.fill("#password", "not the right password")
    page.get_by_role("button", name="Log in", exact=True).click()

    expect(page.locator("main p.error[role=alert]")).to_have_text("Wrong e-mail or password.")
    expect(page.locator("main h1")).to_have_text("Log in")
    assert path_of(page) == "/auth/login"
    expect(page.locator("#email")).to_have_value(seat.email)
    expect(page.locator("#password")).to_have_value("")
    expect(page.locator(".userbox .who")).to_have_count(0)
    user = User.get_by_id(seat.user.id)
    assert (user.failed_logins, user.last_login_at) == (1, None)
    log = LoginLog.select().where(LoginLog.user == user.id).order_by(LoginLog.id.desc()).first()
    assert (log.success, log.reason) == (False, "wrong password")

    # Still not logged in: a protected page sends the browser back to the login form.
    page.goto("/accounts/")
    assert path_of(page) == "/auth/login"
    expect(page.locator("main h1")).to_have_text("Log in")

    # The right password still works afterwards and clears the failure count.
    page.fill("#email", seat.email)
    page.fill("#password", PASSWORD)
    page.get_by_role("button", name="Log in", exact=True).click()
    expect(page.locator("main h1")).to_have_text("Accounts")  # back to where it was going
    assert User.get_by_id(user.id).failed_logins == 0


# ----------------------------------------------------------------------------- seats in bulk

def test_boss_adds_seats_in_bulk_then_disables_one_and_an_agent_cannot_reach_the_page(page, new_page, live_server,
                                                                                       make_seat, settings):
    make_seat("boss@corp.cn", role="boss", name="Bo Boss")
    agent = make_seat("agent@corp.cn", name="Ada Agent")
    login(page, "boss@corp.cn")
    page.goto("/admin/seats")
    page.get_by_role("link", name="Add seats in bulk").click()
    expect(page.locator("main h1")).to_have_text("Add seats in bulk")
    page.fill("#text", "email\tname\trole\tteam\nwang.wei@corp.cn\t王伟\tagent\t华东\n"
                       "li.na@corp.cn\t李娜\tmanager\t华东\n")
    page.get_by_role("button", name="Add seats", exact=True).click()
    links = page.locator("#new-links tbody tr")
    expect(links).to_have_count(2)
    expect(links.nth(0)).to_contain_text("/auth/set-password/")
    assert {u.name for u in User.select().where(User.email.in_(["wang.wei@corp.cn", "li.na@corp.cn"]))} == {"王伟", "李娜"}
    page.screenshot(path=str(SCREENSHOT_DIR / "seats-bulk-added.png"), full_page=True)

    # A line that is wrong: nothing added, the text stays to be fixed.
    page.fill("#text", "email,name,role\nfine@corp.cn,Fine,agent\nbroken,Broken,agent\n")
    page.get_by_role("button", name="Add seats", exact=True).click()
    expect(page.locator(".field.has-error")).to_contain_text("line 3: 'broken' is not an e-mail address")
    expect(page.locator("#text")).to_have_value(re.compile("fine@corp.cn,Fine,agent"))
    assert not User.select().where(User.email == "fine@corp.cn").exists()

    # Disable a ticked seat from the list.
    page.goto("/admin/seats")
    page.get_by_role("checkbox", name="wang.wei@corp.cn").check()
    page.select_option("select[name=action]", "disable")
    page.get_by_role("button", name="Apply").click()
    expect(flash(page)).to_contain_text("Seats disabled: 1")
    assert not User.get(User.email == "wang.wei@corp.cn").active

    # The attachment space: the licence's seats x 50 MB, nothing used yet.
    page.locator("nav.subnav").get_by_role("link", name="Attachment space").click()
    expect(page.locator("main h1")).to_have_text("Attachment space")
    quota_gb = settings.seats.licensed * settings.attachments.per_seat_mb / 1024
    expect(page.locator("#quota-total")).to_contain_text(f"0 B of {quota_gb:.1f} GB used")
    expect(page.locator("#quota-total")).to_contain_text(f"{settings.seats.licensed} licensed seats")

    agent_page = new_page("agent")
    login(agent_page, agent.email)
    for url in ("/admin/seats/bulk", "/admin/seats", "/admin/quota"):
        assert agent_page.goto(url).status == 404, url


# ----------------------------------------------------------------------------- attachments and the quota

def test_agent_attaches_a_file_and_only_the_boss_sees_the_space_used(page, new_page, live_server, make_seat,
                                                                     settings, tmp_path):
    import shutil

    from appliance import attachments
    from webapp.models import Attachment

    shutil.rmtree(attachments.store_dir(settings), ignore_errors=True)
    make_seat("boss@corp.cn", role="boss", name="Bo Boss")
    agent = make_seat("agent@corp.cn", name="Ada Agent")
    account = audit.create(agent.user, Account, {"name": "华信科技"})
    quote = tmp_path / "报价单.pdf"
    quote.write_bytes(b"%PDF-1.4\n" + b"price list " * 15_000)  # 165,009 bytes = 161.1 KB

    agent_page = new_page("agent")
    login(agent_page, agent.email)
    agent_page.goto(f"/accounts/{account.id}")
    agent_page.set_input_files("#attachments input[type=file]", str(quote))
    agent_page.get_by_role("button", name="Upload").click()
    expect(flash(agent_page)).to_contain_text("报价单.pdf attached.")
    expect(agent_page.locator("#attachments table")).to_contain_text("报价单.pdf")
    with agent_page.expect_download() as download:
        agent_page.get_by_role("link", name="报价单.pdf").click()
    assert Path(download.value.path()).read_bytes() == quote.read_bytes()
    assert agent_page.goto("/admin/quota").status == 404

    login(page, "boss@corp.cn")
    page.goto("/admin/seats")
    page.locator("nav.subnav").get_by_role("link", name="Attachment space").click()
    expect(page.locator("main h1")).to_have_text("Attachment space")
    expect(page.locator("#quota-total")).to_contain_text("161.1 KB of 2.4 GB used")
    expect(page.locator("#quota-seats")).to_contain_text("agent@corp.cn")
    page.screenshot(path=str(SCREENSHOT_DIR / "attachment-space.png"), full_page=True)
    assert Attachment.get().size == quote.stat().st_size
    shutil.rmtree(attachments.store_dir(settings), ignore_errors=True)
