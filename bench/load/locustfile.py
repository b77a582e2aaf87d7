"""Seats at work: the locust user classes of the capacity benchmark (bench/load/run.py drives them).

``CrmSeat`` is one seat user in a browser. It logs in once through the real form (CSRF
token included), then loops through a mix of what a sales or support seat does, with
1-3 s of think time: dashboard, a list searched and filtered, a record opened, a note or an
activity added, a field edited, an opportunity moved to another stage, a ticket handed
over, the global search, now and then a new lead or a small attachment (a 20 KB PDF,
different each time, so every upload writes a file). Every request carries a ``name`` so the
statistics are per action, whatever the record id.

Seats are the demo data set's: seat number k is ``seatKKKK@demo.invalid`` (seat 1 is the
boss, 2-6 the managers, the rest agents who see only their own records), so the
permission gate filters as in real use. Simulated user n logs in as seat
``CRM_SEAT_FIRST + n - 1``.

``CeilingUser`` hammers ``/_bench/ceiling`` (one row through the same connection pool; it
exists only under bench/load/serve_bench.py), without think time: the stack's ceiling.

Environment (set by run.py): ``CRM_PASSWORD`` (every demo seat's password), ``CRM_SEAT_FIRST``
(default 1), ``CRM_THINK_MIN`` / ``CRM_THINK_MAX`` seconds (default 1 and 3; 0 and 0
saturate the server), ``CRM_RUN_SEATS`` (a JSON file of the run's seats as ``[[id, name], ...]``:
tickets are handed over among them only; without it, to any seat the lookup suggests).

Run alone (against a server that run.py or you started on 127.0.0.1):

    CRM_PASSWORD=... .venv/bin/locust -f bench/load/locustfile.py --headless -u 50 -r 5 -t 60s \\
        -H http://127.0.0.1:8000 CrmSeat
"""

from __future__ import annotations

import itertools
import json
import os
import random
import re
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import quote, urlsplit

import gevent
from locust import between, constant, task
from locust.contrib.fasthttp import FastHttpUser

PASSWORD = os.environ.get("CRM_PASSWORD", "")
SEAT_FIRST = int(os.environ.get("CRM_SEAT_FIRST", "1"))
THINK = (float(os.environ.get("CRM_THINK_MIN", "1")), float(os.environ.get("CRM_THINK_MAX", "3")))
#: with CRM_USERS, statistics restart once that many seats have logged in, and the run ends CRM_STEADY s later
USERS = int(os.environ.get("CRM_USERS", "0"))
STEADY = float(os.environ.get("CRM_STEADY", "0"))
RAMP_OUT = os.environ.get("CRM_RAMP_OUT")  # where the ramp-up's login figures go (JSON)
DEMO_DOMAIN = "demo.invalid"
#: The run's seats, [[id, name], ...]: a hand-over to a seat outside the run would take the ticket out of
#: the mix for good, so a data set's later runs would start with fewer tickets than its first.
RUN_SEATS = json.loads(Path(os.environ["CRM_RUN_SEATS"]).read_text()) if os.environ.get("CRM_RUN_SEATS") else []

_seat_numbers = itertools.count(SEAT_FIRST)
_logged_in = itertools.count(1)


def _ramp_done(environment) -> None:
    """Every seat has logged in: keep the ramp's login figures, restart the statistics, end after STEADY s.

    Logging in is an argon2 hash check (about 0.15 s of CPU each, by design) that happens once a day per
    seat; measured apart, it does not blur the steady-state figures of the mix.
    """
    stats = environment.runner.stats
    if RAMP_OUT:
        ramp = {}
        for name in ("login form", "login", "dashboard"):
            entry = stats.entries.get((name, "GET" if name != "login" else "POST"))
            if entry and entry.num_requests:
                ramp[name] = {"requests": entry.num_requests, "failures": entry.num_failures,
                              "50%": entry.get_response_time_percentile(0.5),
                              "95%": entry.get_response_time_percentile(0.95),
                              "99%": entry.get_response_time_percentile(0.99)}
        ramp["failures"] = stats.total.num_failures
        with open(RAMP_OUT, "w") as fh:
            json.dump(ramp, fh)
    stats.reset_all()
    if STEADY:
        gevent.spawn_later(STEADY, environment.runner.quit)

#: url prefix -> (filters a seat may apply, a search word found in the demo data)
MODULES = {
    "accounts": ({"mine": ["1"]}, ["上海", "华信", "Ltd", "Nordic", "深圳", "12"]),
    "contacts": ({"mine": ["1"]}, ["王", "Smith", "李", "经理", "mail7", "38"]),
    "leads": ({"status": ["new", "contacted", "qualified"], "mine": ["1"]}, ["张", "Apex", "GmbH", "15"]),
    "opportunities": ({"stage": ["proposal", "negotiation", "prospecting"], "mine": ["1"]},
                      ["Renewal", "报价", "Onboarding", "#12"]),
    "tickets": ({"status": ["open", "new", "pending"], "priority": ["high", "urgent", "normal"]},
                ["发票", "Support", "交付", "#7"]),
    "activities": ({"status": ["planned", "done"], "kind": ["call", "meeting", "task"], "mine": ["1"]},
                   ["Follow-up", "演示", "review"]),
}
ENTITY = {"accounts": "account", "contacts": "contact", "leads": "lead", "opportunities": "opportunity",
          "tickets": "ticket", "activities": "activity"}
GLOBAL_SEARCH = ["王伟", "华信", "Renewal", "上海", "Smith", "发票", "Apex", "12345", "contact42"]
STAGES = ("prospecting", "qualification", "proposal", "negotiation", "won", "lost")
NOTES = ("客户确认下周会议。", "Called back; sent the revised quote.", "需要技术支持跟进。", "Waiting for the PO.")
#: what "edit a field" changes, per module: field -> new value
EDITS = {
    "accounts": lambda: {"phone": f"+86 21 {random.randrange(10**8):08d}"},
    "contacts": lambda: {"phone": f"+86 13{random.randrange(10**9):09d}"},
    "leads": lambda: {"status": random.choice(["contacted", "qualified", "new"])},
    "opportunities": lambda: {"probability": str(random.choice(range(10, 100, 10)))},
    "tickets": lambda: {"priority": random.choice(["low", "normal", "high", "urgent"])},
}

_CSRF = re.compile(r'name="csrf_token" (?:type="hidden" )?value="([^"]+)"')
_OWNER = re.compile(r"Currently assigned to ([^<]+?)\.</p>")
#: what a seat types to find a colleague: the most common surnames of the demo seats (appliance/demo_data.py)
SEAT_SURNAMES = ("王", "李", "张", "刘", "陈", "杨")
_ALERT = re.compile(r'<p class="error" role="alert">([^<]*)</p>')
# An activity's record was handed to another seat between the form and the save: the gate at work.
_LINK_GONE = "The linked record does not exist or is not yours to see."
_RECORD_LINK = re.compile(r'href="/(accounts|contacts|leads|opportunities|tickets|activities)/(\d+)"')


class FormFields(HTMLParser):
    """The fields a browser would submit from each POST <form> of a page (inputs, selected options, text areas)."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.forms: list[dict] = []  # each: {"fields": {name: value}}
        self._form = None
        self._select = self._textarea = None
        self._text = []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "form":
            self._form = None
            if a.get("method", "get").lower() == "post":
                self._form = {"fields": {}}
                self.forms.append(self._form)
            return
        if self._form is None:
            return
        fields, name = self._form["fields"], a.get("name")
        if tag == "input" and name and a.get("type") not in ("submit", "button"):
            if a.get("type") in ("checkbox", "radio"):
                if "checked" in a:
                    fields[name] = a.get("value", "on")
            else:
                fields[name] = a.get("value", "")
        elif tag == "select" and name:
            self._select = name
        elif tag == "option" and self._select:
            value = a.get("value", "")
            if "selected" in a or self._select not in fields:
                fields[self._select] = value
        elif tag == "textarea" and name:
            self._textarea, self._text = name, []

    def handle_data(self, data):
        if self._textarea:
            self._text.append(data)

    def handle_endtag(self, tag):
        if self._form is None:
            return
        if tag == "select":
            self._select = None
        elif tag == "textarea" and self._textarea:
            text = "".join(self._text)
            # HTML drops one newline right after <textarea>, as a browser does.
            self._form["fields"][self._textarea] = text[2:] if text.startswith("\r\n") else (
                text[1:] if text.startswith("\n") else text)
            self._textarea = None
        elif tag == "form":
            self._form = None


def form_fields(html: str) -> dict:
    """The page's main POST form (the one with the most fields; the header's logout and language forms are small)."""
    parser = FormFields()
    parser.feed(html)
    return max(parser.forms, key=lambda f: len(f["fields"]), default={"fields": {}})


class CrmSeat(FastHttpUser):
    """One seat user: logs in once, then works through the mix with think time."""

    wait_time = between(*THINK) if THINK[1] > 0 else constant(0)
    # A browser keeps its connection; gunicorn's keepalive is 5 s, longer than the think time.
    network_timeout = 30.0
    connection_timeout = 10.0

    def on_start(self):
        self.seat = next(_seat_numbers)
        self.email = f"seat{self.seat:04d}@{DEMO_DOMAIN}"
        self.ids: dict[str, list[int]] = {m: [] for m in MODULES}
        self.csrf = None
        self.logged_in = False
        try:
            self.login()
        finally:
            if USERS and next(_logged_in) == USERS:
                _ramp_done(self.environment)

    # ------------------------------------------------------------------ helpers

    def login(self) -> None:
        with self.client.get("/auth/login", name="login form", catch_response=True) as resp:
            token = _CSRF.search(resp.text or "")
            if resp.status_code != 200 or not token:
                resp.failure(f"login form: {resp.status_code}, token {'found' if token else 'missing'}")
                return
        with self.client.post("/auth/login", name="login",
                              data={"email": self.email, "password": PASSWORD, "csrf_token": token.group(1)},
                              allow_redirects=False, catch_response=True) as resp:
            if resp.status_code != 302 or "/auth/login" in resp.headers.get("Location", ""):
                resp.failure(f"login refused for {self.email}: {resp.status_code}")
                return
        self.logged_in = True
        self.dashboard()

    def page(self, path: str, name: str):
        """GET a page, fail on anything but 200 (a redirect to the login page means the session was lost).

        A ticket handed to someone else meanwhile (by a manager, or the boss) is no longer the agent's to
        see: its 404 is the gate at work, not an error, and the seat forgets that ticket. A seat without
        a session (its login failed, or was lost) logs in again first, as a person would.
        """
        if not self.logged_in:
            self.login()
            if not self.logged_in:
                return None
        with self.client.get(path, name=name, allow_redirects=False, catch_response=True) as resp:
            if resp.status_code == 404 and path.startswith("/tickets/"):
                resp.success()
                return None
            if resp.status_code != 200:
                resp.failure(f"{name}: {resp.status_code} {resp.headers.get('Location', '')}")
                if "/auth/login" in resp.headers.get("Location", ""):
                    self.logged_in = False
                return None
            html = resp.text or ""
            token = _CSRF.search(html)
            if token:
                self.csrf = token.group(1)
            for prefix, rid in _RECORD_LINK.findall(html):
                pool = self.ids[prefix]
                if int(rid) not in pool:
                    pool.append(int(rid))
                    del pool[:-40]
            return html

    def suggestions(self, path: str, name: str):
        """GET what a page's script asks for (the pickers' suggestions): the parsed JSON, or None."""
        with self.client.get(path, name=name, allow_redirects=False, catch_response=True) as resp:
            if resp.status_code != 200:
                resp.failure(f"{name}: {resp.status_code} {resp.headers.get('Location', '')}")
                return None
            return resp.json()

    def post(self, path: str, data: dict, name: str, follow_name: str = "detail") -> bool:
        """POST a form like a browser: expect a redirect, then load the page it points at (shows the flash)."""
        data = dict(data)
        data.setdefault("csrf_token", self.csrf or "")
        with self.client.post(path, data=data, name=name, allow_redirects=False, catch_response=True) as resp:
            location = resp.headers.get("Location", "")
            if resp.status_code == 404 and path.startswith("/tickets/"):
                resp.success()  # handed to someone else since its form was read: the gate, as in page()
                return False
            alerts = _ALERT.findall(resp.text or "") if resp.status_code == 400 else []
            if _LINK_GONE in alerts and str(data.get("parent", "")).startswith("ticket:"):
                resp.success()  # the ticket was handed over meanwhile, as the 404s above
                return False
            if resp.status_code != 302 or "/auth/login" in location:
                said = " | ".join(alerts) or (resp.text or "")[:200]
                resp.failure(f"{name}: {resp.status_code} {location} {said!r}")
                if "/auth/login" in location:
                    self.logged_in = False
                return False
        self.page(urlsplit(location).path or "/", follow_name)
        return True

    def record(self, prefix: str) -> int | None:
        """A record of this kind the seat has seen in a list (loads the list first if none yet)."""
        if not self.ids[prefix]:
            self.page(f"/{prefix}/", "list")
        return random.choice(self.ids[prefix]) if self.ids[prefix] else None

    # ------------------------------------------------------------------ the mix

    @task(2)
    def dashboard(self):
        self.page("/", "dashboard")

    @task(4)
    def list_search_filter(self):
        prefix = random.choice(list(MODULES))
        filters, words = MODULES[prefix]
        params = []
        if random.random() < 0.6:
            params.append(("q", random.choice(words)))
        name, values = random.choice(list(filters.items()))
        if random.random() < 0.7:
            params.append((name, random.choice(values)))
        query = "&".join(f"{k}={v}" for k, v in params)
        self.page(f"/{prefix}/?{query}" if query else f"/{prefix}/", "list search" if params else "list")

    @task(5)
    def open_record(self):
        prefix = random.choice(list(MODULES))
        rid = self.record(prefix)
        if rid is not None:
            if self.page(f"/{prefix}/{rid}", "detail") is None:
                self.ids[prefix].remove(rid)  # handed over or deleted meanwhile

    @task(2)
    def add_note(self):
        prefix = random.choice(["accounts", "contacts", "leads", "opportunities", "tickets"])
        rid = self.record(prefix)
        if rid is not None and self.page(f"/{prefix}/{rid}", "detail") is not None:
            self.post(f"/notes/{ENTITY[prefix]}/{rid}", {"body": random.choice(NOTES)}, "add note")

    @task(1)
    def add_activity(self):
        prefix = random.choice(["accounts", "contacts", "opportunities", "tickets"])
        rid = self.record(prefix)
        if rid is None:
            return
        html = self.page(f"/activities/new?parent={ENTITY[prefix]}:{rid}", "activity form")
        if html is None:
            return
        fields = form_fields(html)["fields"]
        fields.update({"kind": random.choice(["call", "meeting", "task"]), "subject": "Follow-up (load test)",
                       "due_at": "2030-01-15T10:00", "status": "planned"})
        self.post("/activities/new", fields, "add activity")

    @task(2)
    def edit_field(self):
        prefix = random.choice(list(EDITS))
        rid = self.record(prefix)
        if rid is None:
            return
        html = self.page(f"/{prefix}/{rid}/edit", "edit form")
        if html is None:
            self.ids[prefix].remove(rid)
            return
        fields = form_fields(html)["fields"]
        fields.update(EDITS[prefix]())
        self.post(f"/{prefix}/{rid}/edit", fields, "edit save")

    @task(1)
    def move_opportunity(self):
        rid = self.record("opportunities")
        if rid is not None:
            self.post(f"/opportunities/{rid}/stage", {"stage": random.choice(STAGES), "back": "detail"},
                      "move stage")

    @task(1)
    def hand_over_ticket(self):
        rid = self.record("tickets")
        if rid is None:
            return
        html = self.page(f"/tickets/{rid}/transfer", "transfer form")
        if html is None:
            self.ids["tickets"].remove(rid)
            return
        # Hand it to a colleague, picked as in a browser (never whoever holds it now: that is refused); an
        # agent then no longer sees it. In a run, a colleague of the run: the lookup a browser makes as the
        # name is typed, then the label its suggestion carries.
        owner = _OWNER.search(html)
        owner_name = owner.group(1).strip() if owner else None
        colleagues = [(seat_id, name) for seat_id, name in RUN_SEATS if name != owner_name]
        if colleagues:
            seat_id, name = random.choice(colleagues)
            self.suggestions(f"/search/seats?q={quote(name)}", "seat lookup")
            target = f"{name} (#{seat_id})"  # the label the suggestion carries (webapp.forms.picker_label)
        else:
            rows = self.suggestions(f"/search/seats?q={random.choice(SEAT_SURNAMES)}", "seat lookup") or []
            choices = [r["label"] for r in rows if r["label"].rsplit(" (#", 1)[0] != owner_name]
            if not choices:
                return
            target = random.choice(choices)
        ok = self.post(f"/tickets/{rid}/transfer", {"to_user": target, "comment": "Please take over."},
                       "hand over ticket", follow_name="detail")
        if ok and rid in self.ids["tickets"]:
            self.ids["tickets"].remove(rid)

    @task(2)
    def global_search(self):
        self.page(f"/search/?q={random.choice(GLOBAL_SEARCH)}", "global search")

    @task(1)
    def maybe_upload_attachment(self):
        # Now and then, as maybe_create_lead: a small file on an account the seat has seen.
        if random.random() > 0.25:
            return
        rid = self.record("accounts")
        if rid is None or self.page(f"/accounts/{rid}", "detail") is None:
            return
        body, content_type = _multipart({"csrf_token": self.csrf or ""},
                                        "file", f"offer-{random.randrange(10**9)}.pdf", _small_pdf())
        with self.client.post(f"/attachments/account/{rid}", data=body, headers={"Content-Type": content_type},
                              name="upload attachment", allow_redirects=False, catch_response=True) as resp:
            if resp.status_code != 302 or "/auth/login" in resp.headers.get("Location", ""):
                resp.failure(f"upload attachment: {resp.status_code} {resp.headers.get('Location', '')}")
                return
        html = self.page(f"/accounts/{rid}", "detail")
        if html is not None and "attached." not in html:
            # The flash says why it was refused (the quota, say): an error for the benchmark.
            self.environment.events.request.fire(request_type="POST", name="upload attachment refused",
                                                 response_time=0, response_length=0, exception=Exception(
                                                     "the upload was not attached"), context={})

    @task(1)
    def maybe_create_lead(self):
        # Now and then: one in four times this task is picked.
        if random.random() > 0.25:
            return
        html = self.page("/leads/new", "lead form")
        if html is None:
            return
        fields = form_fields(html)["fields"]
        n = random.randrange(10**6)
        fields.update({"first_name": "Load", "last_name": f"Test {n}", "company": f"Bench Co {n}",
                       "email": f"load{n}@bench.example", "phone": f"+86 15{n:09d}", "source": "web",
                       "status": "new"})
        self.post("/leads/new", fields, "create lead")


def _small_pdf() -> bytes:
    """About 20 KB that pass the upload's type check, different each call."""
    return b"%PDF-1.4\n" + os.urandom(10_000).hex().encode()


def _multipart(fields: dict, file_field: str, filename: str, data: bytes) -> tuple[bytes, str]:
    """A multipart/form-data body as a browser sends it (FastHttpUser posts bytes as given)."""
    boundary = f"----crmbench{random.randrange(10**12)}"
    parts = [f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode()
             for name, value in fields.items()]
    parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{file_field}"; filename="{filename}"\r\n'
                 f"Content-Type: application/pdf\r\n\r\n".encode() + data + b"\r\n")
    parts.append(f"--{boundary}--\r\n".encode())
    return b"".join(parts), f"multipart/form-data; boundary={boundary}"


class CeilingUser(FastHttpUser):
    """No think time, one trivial request: what gunicorn + Flask + the pool + PostgreSQL serve at most."""

    wait_time = constant(0)

    def on_start(self):
        if USERS and next(_logged_in) == USERS:
            _ramp_done(self.environment)

    @task
    def ceiling(self):
        self.client.get("/_bench/ceiling", name="ceiling")
