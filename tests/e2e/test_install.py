"""The installer for real, on this machine: install, use the CRM through nginx, re-run, drift,
upgrade and roll back, uninstall.

The steps run in order and share one state (the host). Through nginx over HTTPS
(the self-signed certificate is not verified; 127.0.0.1 only): the login page loads,
the printed one-time link sets a password, the seat logs in and creates a contact.
A second install changes nothing; hand edits show as drift; uninstall stops
everything and keeps the data, which a new install finds again. Bad input (a
broken config, an unreachable host, a port held by another program) fails in one
line and leaves an install that can be re-run to completion.

The installer adopts what it finds: on a fresh host install creates the boss seat
and prints its link; where a boss has set a password already (a developer machine
after the quick start) it prints none, and the test uses a seat of its own.
"""

from __future__ import annotations

import functools
import html
import http.client
import http.cookiejar
import io
import json
import os
import re
import socket
import ssl
import shutil
import subprocess
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from html.parser import HTMLParser
from pathlib import Path

import psutil
import pytest
from rich.console import Console

from appliance.errors import ConfigError, DeployError
from installer import deploy, progress

pytestmark = pytest.mark.e2e

BASE = "https://127.0.0.1"
VENV = deploy.CURRENT_RELEASE
SITE = Path("/etc/nginx/sites-available/crm-appliance.conf")
CONFIG = Path("/etc/crm-appliance/appliance.toml")
QUICKSTART_PIDFILE = Path("/run/crm-appliance/web.pid")
E2E_SEAT = "e2e-install@crm.local"
PASSWORD = "e2e install password 7"


class Output(io.StringIO):
    """The installer's console output, echoed to the test's stdout (pytest -s shows it live)."""

    def write(self, text):
        print(text, end="")
        return super().write(text)


def _ctx(**kwargs) -> deploy.InstallContext:
    return deploy.InstallContext(profile="eval", yes=True, console=Console(file=Output(), width=160), **kwargs)


@pytest.fixture(scope="module")
def state():
    """What the steps pass on. The last step purges the appliance, data included; then the
    host gets a fresh install, so it is left running."""
    shared: dict = {"contact": f"E2E-{uuid.uuid4().hex[:8]}"}
    yield shared
    if deploy.status(_ctx())["health"].get("ok") is not True:
        deploy.install(_ctx())


# ----------------------------------------------------------------------------- an HTTPS client


class _FromAddress(urllib.request.HTTPSHandler):
    """HTTPS from a chosen loopback address, so nginx sees a client that is not itself."""

    def __init__(self, context, source: str):
        super().__init__(context=context)
        self.source = source

    def https_open(self, req):
        return self.do_open(functools.partial(http.client.HTTPSConnection, source_address=(self.source, 0)), req,
                            context=self._context)


class Browser:
    """urllib with a cookie jar; CSRF tokens and the Referer Flask-WTF wants over HTTPS."""

    def __init__(self, source: str = "127.0.0.2"):
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE  # the appliance's self-signed certificate, on 127.0.0.1
        self.jar = http.cookiejar.CookieJar()
        self.opener = urllib.request.build_opener(_FromAddress(context, source),
                                                  urllib.request.HTTPCookieProcessor(self.jar))

    def get(self, url: str):
        return self._open(urllib.request.Request(url))

    def post(self, url: str, fields: dict):
        data = urllib.parse.urlencode(fields).encode()
        return self._open(urllib.request.Request(url, data=data, headers={"Referer": url}))

    def _open(self, request):
        try:
            with self.opener.open(request, timeout=30) as resp:
                return resp.status, resp.geturl(), resp.read().decode(), resp.headers
        except urllib.error.HTTPError as exc:
            return exc.code, exc.geturl(), exc.read().decode(), exc.headers

    def submit(self, url: str, values: dict):
        """GET the form at ``url``, fill ``values`` over its fields, POST it back."""
        status, _, page, _ = self.get(url)
        assert status == 200, f"GET {url}: {status}"
        fields = form_fields(page)
        assert "csrf_token" in fields, f"no CSRF token in the form at {url}"
        fields.update(values)
        return self.post(url, fields)


class _FormParser(HTMLParser):
    def __init__(self):
        super().__init__()
        self.fields: dict[str, str] = {}
        self._select = None
        self._first_option = None

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "input" and a.get("name") and a.get("type") not in ("submit", "checkbox", "radio"):
            self.fields[a["name"]] = a.get("value") or ""
        elif tag == "select" and a.get("name"):
            self._select, self._first_option = a["name"], None
        elif tag == "option" and self._select:
            if self._first_option is None:
                self._first_option = a.get("value") or ""
                self.fields.setdefault(self._select, self._first_option)
            if "selected" in a:
                self.fields[self._select] = a.get("value") or ""

    def handle_endtag(self, tag):
        if tag == "select":
            self._select = None


def form_fields(page: str) -> dict[str, str]:
    parser = _FormParser()
    parser.feed(page)
    return parser.fields


def local(url: str) -> str:
    """The printed link, with its host replaced by 127.0.0.1 (the test talks to nginx here)."""
    parts = urllib.parse.urlsplit(url)
    return urllib.parse.urlunsplit(("https", "127.0.0.1", parts.path, parts.query, ""))


def login(browser: Browser, email: str, password: str) -> str:
    status, where, page, _ = browser.submit(f"{BASE}/auth/login", {"email": email, "password": password})
    assert status == 200 and "/auth/login" not in where, f"login as {email} failed: {status} {where}"
    return page


def e2e_seat_link() -> str:
    """A one-time link for the test's own seat (an agent), made with the deployed appliance."""
    code = (
        "from appliance import config, seats\n"
        "from appliance.db import open_database\n"
        "from webapp.models import User\n"
        f"s = config.load('{CONFIG}')\n"
        "db = open_database(s)\n"
        "with db.connection_context():\n"
        f"    u = User.get_or_none(User.email == '{E2E_SEAT}')\n"
        f"    print(seats.add_seat(s, '{E2E_SEAT}', 'E2E Install', 'agent').link if u is None\n"
        "          else seats.issue_link(s, u)[0])\n"
    )
    out = subprocess.run([str(VENV / "bin" / "python"), "-c", code], capture_output=True, text=True, check=True,
                         cwd="/")
    return out.stdout.strip().splitlines()[-1]


# ----------------------------------------------------------------------------- the steps


def test_1_install_brings_up_the_whole_appliance(state):
    quickstart_ran = QUICKSTART_PIDFILE.exists()  # crm-appliance quickstart's gunicorn, to take over
    result = deploy.install(_ctx())
    state["first"] = result
    assert result.host == "localhost" and result.public_url.startswith("https://")
    assert re.fullmatch(r"\d+\.\d+\.\d+\+src\.[0-9a-f]{12}", result.version)
    assert result.log_path.exists() and result.log_path.stat().st_mode & 0o777 == 0o600
    assert result.boss is not None and result.boss.state in ("created", "reissued", "kept", "pending")
    if result.boss.state in ("created", "reissued"):
        assert result.boss.link and "/auth/set-password/" in result.boss.link
        assert result.boss.link not in result.log_path.read_text()  # console only, never the log
    else:
        assert result.boss.link is None  # an adopted boss with a password gets no new link

    status = deploy.status(_ctx())
    assert status["health"]["ok"] is True, status["health"]
    web, scheduler = status["services"]
    assert web["state"] in ("running", "active") and scheduler["state"] in ("running", "active")
    assert status["nginx"] == "running" and status["postgresql"].endswith("online")
    assert status["version"] == result.version and status["schema"]["pending"] == []

    # Secrets: generated once, owner-only.
    for name in ("db-password", "secret-key", "backup-key", "backup-db-password"):
        path = Path("/etc/crm-appliance") / name
        assert path.stat().st_mode & 0o777 == 0o600 and path.owner() == "crm"
    if quickstart_ran:
        assert "services : Ensure the quick start's web server, which ran outside any supervisor, is stopped." \
            in result.changed_tasks
    assert not QUICKSTART_PIDFILE.exists()
    # gunicorn listens on 127.0.0.1 only; nginx in front.
    listeners = subprocess.run(["ss", "-Hltn"], capture_output=True, text=True).stdout
    assert "127.0.0.1:8000" in listeners and "0.0.0.0:8000" not in listeners


def test_2_through_nginx_a_seat_sets_its_password_logs_in_and_creates_a_contact(state):
    access_log = Path("/var/log/nginx/access.log")
    log_start = access_log.stat().st_size if access_log.exists() else 0
    browser = Browser()
    status, _, page, headers = browser.get(f"{BASE}/auth/login")
    assert status == 200 and 'name="csrf_token"' in page
    assert headers["Strict-Transport-Security"].startswith("max-age=")
    assert headers.get_all("X-Frame-Options") == ["DENY"]  # one copy, from nginx

    # HTTP answers with a redirect to HTTPS and nothing else.
    no_redirect = urllib.request.build_opener(type("NoRedirect", (urllib.request.HTTPRedirectHandler,),
                                                   {"redirect_request": lambda *a, **k: None}))
    with pytest.raises(urllib.error.HTTPError) as redirect:
        no_redirect.open("http://127.0.0.1/contacts/?q=x", timeout=10)
    assert redirect.value.code == 301
    assert redirect.value.headers["Location"] == "https://127.0.0.1/contacts/?q=x"

    boss = state["first"].boss
    if boss.link:
        email, link = boss.email, boss.link
    else:
        email, link = E2E_SEAT, e2e_seat_link()
    state["email"] = email
    status, where, page, _ = browser.submit(local(link), {"password": PASSWORD, "confirm": PASSWORD})
    assert status == 200 and "/auth/login" in where, f"set-password: {status} {where}"

    # nginx logs neither the one-time token nor query strings (search text is customer data).
    with access_log.open("rb") as log:
        log.seek(log_start)
        logged = log.read().decode()
    token = urllib.parse.urlsplit(link).path.rsplit("/", 1)[1]
    assert "/auth/set-password/- " in logged and token not in logged
    assert "/contacts/ " in logged and "?q=" not in logged

    page = login(browser, email, PASSWORD)
    status, where, page, _ = browser.submit(f"{BASE}/contacts/new",
                                            {"first_name": "Wei", "last_name": state["contact"],
                                             "email": "wei@example.cn", "phone": "+86 21 5555 0100"})
    assert status == 200 and re.search(r"/contacts/\d+$", where), f"new contact: {status} {where}"
    assert html.escape(state["contact"]) in page
    state["contact_url"] = where.replace(urllib.parse.urlsplit(where).netloc, "127.0.0.1")

    # The app sees the client's address (127.0.0.2) through nginx (trusted_proxies = 1), not nginx's.
    logins = subprocess.run(
        ["runuser", "-u", "postgres", "--", "psql", "-XAtd", "crm", "-c",
         f"SELECT ip FROM login_log WHERE email = '{email}' ORDER BY id DESC LIMIT 1"],
        capture_output=True, text=True, cwd="/").stdout.strip()
    assert logins == "127.0.0.2"


def test_3_a_second_install_changes_nothing(state):
    result = deploy.install(_ctx())
    assert result.changed == 0, result.changed_tasks
    assert result.version == state["first"].version
    assert result.boss.link is None


def test_4_check_finds_no_drift_then_names_hand_edits(state):
    clean = deploy.check(_ctx())
    assert not clean.drifted, [d.task for d in clean.items]

    SITE.write_text(SITE.read_text().replace("client_max_body_size 26m;", "client_max_body_size 500m;"))
    CONFIG.write_text(CONFIG.read_text().replace("trusted_proxies = 1", "trusted_proxies = 0"))
    report = deploy.check(_ctx())
    paths = {d.path: d for d in report.items}
    assert report.drifted and set(paths) == {str(SITE), str(CONFIG)}, [(d.task, d.path) for d in report.items]
    assert "-    client_max_body_size 500m;" in paths[str(SITE)].diff
    assert "+    client_max_body_size 26m;" in paths[str(SITE)].diff
    assert "-trusted_proxies = 0" in paths[str(CONFIG)].diff and "+trusted_proxies = 1" in paths[str(CONFIG)].diff
    # Check mode changed nothing.
    assert "client_max_body_size 500m;" in SITE.read_text()


def test_5_uninstall_stops_everything_and_keeps_the_data(state):
    result = deploy.uninstall(_ctx())
    assert result.changed_tasks
    status = deploy.status(_ctx())
    assert status["health"]["ok"] is False
    assert status["nginx"] == "stopped" and status["postgresql"].endswith("down")
    assert status["services"][0]["state"] not in ("running", "active") and status["version"] is None
    for port in (80, 443, 8000, 5432):
        with socket.socket() as sock:
            assert sock.connect_ex(("127.0.0.1", port)) != 0, f"port {port} still answers"
    assert Path("/var/lib/postgresql/15/main/PG_VERSION").exists()
    assert Path("/var/lib/crm-appliance").is_dir() and (Path("/etc/crm-appliance") / "db-password").exists()
    assert not SITE.exists() and not Path("/opt/crm-appliance").exists()


def test_6_bad_input_fails_in_one_line_and_changes_nothing(state, tmp_path):
    bad = tmp_path / "appliance.toml"
    bad.write_text('[web]\npublic_url = "https://crm.corp.lan"\nworkers = "four"\n[seats]\nlicensed = 5\n')
    with pytest.raises(ConfigError) as err:
        deploy.install(_ctx(config_path=bad))
    assert str(err.value) == (f'{bad}: [web] workers: expected an integer from 1 to 256, found "four" (a string)')

    inventory = tmp_path / "hosts.ini"
    inventory.write_text("[appliance]\ncrm.nosuchhost.invalid ansible_user=root\n")
    with pytest.raises(DeployError) as err:
        deploy.install(_ctx(inventory=inventory))
    assert str(err.value).startswith("crm.nosuchhost.invalid is unreachable: ")
    assert "hint: check that the host is up and that ssh" in str(err.value) and "\n" not in str(err.value)
    assert not (deploy.REMOTE_SECRETS_DIR / "crm.nosuchhost.invalid").exists()

    with pytest.raises(DeployError) as err:  # uninstalled: nothing to upgrade
        deploy.upgrade(_ctx())
    assert str(err.value) == ("no release is installed on localhost (/opt/crm-appliance/current is missing): "
                              "run crm-appliance install first; nothing was changed")


def test_7_a_port_held_by_another_program_stops_the_install_in_one_line(state):
    server = socket.socket()  # this test's own process holds port 443
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    server.bind(("0.0.0.0", 443))
    server.listen()
    try:
        with pytest.raises(DeployError) as err:  # caught by the sizing preflight, before Ansible
            deploy.install(_ctx())
        assert "port-443" in str(err.value) and "nothing was changed" in str(err.value)
        with pytest.raises(DeployError) as err:  # risk accepted: the playbook's own check, before any change
            deploy.install(_ctx(accept_risks=("port-443",)))
        message = str(err.value)
        assert message.startswith("install failed at task \"Check that the appliance's ports are free")
        me = psutil.Process().name()  # "pytest", or "python" under python -m pytest
        assert f"port 443 (HTTPS for nginx) is held by {me} (pid {os.getpid()})" in message
        assert "\n" not in message
    finally:
        server.close()
    assert not Path("/opt/crm-appliance").exists()  # nothing half-installed


def test_8_a_new_install_finds_the_data_again(state):
    result = deploy.install(_ctx())
    assert result.changed > 0 and result.version == state["first"].version
    assert result.boss.link is None  # the boss (or the test's seat) kept its password
    assert "client_max_body_size 26m;" in SITE.read_text()  # the drifted files are back
    assert "trusted_proxies = 1" in CONFIG.read_text()

    browser = Browser()
    login(browser, state["email"], PASSWORD)
    status, _, page, _ = browser.get(f"{BASE}/contacts/?q={urllib.parse.quote(state['contact'])}")
    assert status == 200 and html.escape(state["contact"]) in page
    status, _, page, _ = browser.get(state["contact_url"])
    assert status == 200 and "wei@example.cn" in page

    again = deploy.install(_ctx())
    assert again.changed == 0, again.changed_tasks
    print(json.dumps({"first_install_s": round(state["first"].elapsed_seconds, 1),
                      "reinstall_s": round(result.elapsed_seconds, 1), "rerun_s": round(again.elapsed_seconds, 1)}))


def test_9_status_reports_the_running_appliance(state):
    status = deploy.status(_ctx())
    assert status["health"]["ok"] is True and status["health"]["status"] == 200
    assert status["health"]["url"].endswith("/healthz") and status["health"]["checks"]["database"]["ok"] is True
    assert status["service_manager"] == "supervisord"
    pid = int(Path("/run/crm-appliance/supervisord.pid").read_text())
    assert "/opt/crm-appliance/current/bin/supervisord" in " ".join(psutil.Process(pid).cmdline()), \
        "supervisord runs from the appliance's virtual environment, not a system package"
    assert status["disk"]["data_dir"] == "/var/lib/crm-appliance" and status["disk"]["disk_free_bytes"] > 0
    assert status["disk"]["plan_budget_bytes"] > 0 and 0 <= status["disk"]["plan_budget_used"] < 1
    assert status["last_install_log"] and Path(status["last_install_log"]).name.startswith("install-")
    assert status["maintenance"] is None and status["releases"] == [status["version"]]
    assert status["availability"]["month"] and "error" not in status["availability"]
    progress.print_status(Console(file=io.StringIO()), status)  # renders without error


def test_9b_the_customers_certificate_from_the_config_is_served(state, tmp_path):
    from cryptography import x509
    from cryptography.x509.oid import NameOID

    cert, key = tmp_path / "customer.crt", tmp_path / "customer.key"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj",
                    "/CN=crm.customer.test", "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True)
    key.chmod(0o600)
    text = CONFIG.read_text()
    assert 'certificate_file = "none"' in text and 'key_file = "none"' in text
    CONFIG.write_text(text.replace('certificate_file = "none"', f'certificate_file = "{cert}"')
                          .replace('key_file = "none"', f'key_file = "{key}"'))
    try:
        result = deploy.install(_ctx())
        assert result.changed > 0
        served = x509.load_pem_x509_certificate(ssl.get_server_certificate(("127.0.0.1", 443)).encode())
        assert served.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "crm.customer.test"
        assert deploy.install(_ctx()).changed == 0
    finally:
        CONFIG.write_text(text)  # back to the self-signed certificate for the steps after this one


def release_tree(tmp_path: Path, name: str, migration: str, broken_health: bool = False) -> Path:
    """A copy of this source tree with one more migration (and, if asked, a /healthz that fails):
    another release, as a customer would receive it."""
    tree = tmp_path / name
    for path in deploy.source_files(deploy.SOURCE_DIR):
        dest = tree / path.relative_to(deploy.SOURCE_DIR)
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, dest)
    table = migration.split("_", 1)[1]
    (tree / "webapp" / "migrations" / f"{migration}.py").write_text(
        f'def up(migrator, db):\n    db.execute_sql(\'CREATE TABLE "{table}" ("id" SERIAL PRIMARY KEY)\')\n')
    if broken_health:
        health = tree / "webapp" / "health.py"
        text = health.read_text()
        assert 'checks = {"web": {"ok": True},' in text
        health.write_text(text.replace('checks = {"web": {"ok": True},', 'checks = {"web": {"ok": False},'))
    return tree


class Watcher(threading.Thread):
    """Asks nginx for the login page every 0.2 s while an upgrade runs; keeps (status, maintenance page?)."""

    def __init__(self):
        super().__init__(daemon=True)
        self.seen: list[tuple[int, bool]] = []
        self.done = threading.Event()

    def look(self, browser) -> None:
        status, _, page, _ = browser.get(f"{BASE}/auth/login")
        self.seen.append((status, "CRM 正在更新" in page and "The CRM is being updated" in page))

    def run(self):
        browser = Browser()
        while not self.done.is_set():
            self.look(browser)
            time.sleep(0.2)

    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *exc):
        self.done.set()
        self.join(timeout=40)
        # The last look is taken after the operation returned (one in flight may predate its end).
        self.look(Browser())


def psql(sql: str) -> str:
    return subprocess.run(["runuser", "-u", "postgres", "--", "psql", "-XAtd", "crm", "-c", sql],
                          capture_output=True, text=True, check=True, cwd="/").stdout.strip()


def test_9c_upgrade_switches_the_release_and_a_failing_release_rolls_back(state, tmp_path):
    running = deploy.installed_release()
    assert running == state["first"].version
    migrations = psql("SELECT string_agg(name, ',' ORDER BY name) FROM schema_migration")

    # A good release: built beside the running one, migrated, switched, behind the maintenance page.
    with Watcher() as watcher:
        result = deploy.upgrade(_ctx(source_dir=release_tree(tmp_path, "next", "0900_upgrade_probe")))
    assert result.previous_version == running and result.version != running
    assert any(n.startswith("backup ") and n.endswith(" taken before the upgrade") for n in result.notes), result.notes
    assert deploy.installed_release() == result.version
    assert (deploy.PREFIX / "releases" / running).is_dir(), "the previous release stays, for a manual way back"
    assert psql("SELECT count(*) FROM schema_migration WHERE name = '0900_upgrade_probe'") == "1"
    assert (503, True) in watcher.seen, "seat users saw the maintenance page during the switch"
    assert watcher.seen[-1] == (200, False) and not deploy.MAINTENANCE_FLAG.exists()
    assert psql("SELECT count(*) FROM pg_database WHERE datname LIKE '%before_upgrade'") == "0"
    browser = Browser()
    login(browser, state["email"], PASSWORD)
    status, _, page, _ = browser.get(state["contact_url"])
    assert status == 200 and "wei@example.cn" in page
    good = result.version

    # A release whose /healthz fails after its migration ran: everything goes back.
    with Watcher() as watcher, pytest.raises(DeployError) as err:
        deploy.upgrade(_ctx(source_dir=release_tree(tmp_path, "broken", "0901_broken_release", broken_health=True)))
    message = str(err.value)
    assert message.startswith(f"localhost: the upgrade from {good} to ") and "\n" not in message
    assert "failed at Check that the new release answers /healthz with 200: Status code was 503" in message
    assert (f"rolled back: {good} is current again, the database is as it was before the upgrade "
            f"and answers /healthz") in message
    assert deploy.installed_release() == good
    assert psql("SELECT count(*) FROM schema_migration WHERE name = '0901_broken_release'") == "0"
    assert psql("SELECT to_regclass('broken_release') IS NULL") == "t"
    assert psql("SELECT count(*) FROM pg_database WHERE datname LIKE '%before_upgrade'") == "0"
    assert not deploy.MAINTENANCE_FLAG.exists(), "a failed upgrade never leaves the maintenance page on"
    assert (503, True) in watcher.seen and watcher.seen[-1] == (200, False)
    status = deploy.status(_ctx())
    assert status["health"]["ok"] is True and status["version"] == good and status["maintenance"] is None
    browser = Browser()
    login(browser, state["email"], PASSWORD)
    status, _, page, _ = browser.get(state["contact_url"])
    assert status == 200 and "wei@example.cn" in page

    # The same release again is nothing to do; then back to this source tree, as the steps after expect,
    # on a host that came back without its services (what CI's reused machines look like): the backup
    # before the upgrade starts PostgreSQL, the playbook the rest.
    same = deploy.upgrade(_ctx(source_dir=tmp_path / "next"))
    assert same.changed == 0 and same.version == good and "nothing to upgrade" in " ".join(same.notes)
    stop_everything()
    back = deploy.install(_ctx())
    assert back.previous_version == good and deploy.installed_release() == state["first"].version
    notes = " ".join(back.notes)
    assert "was down: started it for the backup before the upgrade" in notes and " taken before the upgrade" in notes
    # Migrations only go forward: the good release's table stays, and this release runs on it.
    applied = set(psql("SELECT string_agg(name, ',' ORDER BY name) FROM schema_migration").split(","))
    assert applied == set(migrations.split(",")) | {"0900_upgrade_probe"}
    assert deploy.status(_ctx())["health"]["ok"] is True


def stop_everything() -> None:
    """The host as after a power cut: PostgreSQL, supervisord (and with it the app) and nginx down."""
    postgresql = deploy.status(_ctx())["postgresql"]  # "15/main online"
    pid_file = Path("/run/crm-appliance/supervisord.pid")
    pid = int(pid_file.read_text())
    os.kill(pid, 15)
    psutil.Process(pid).wait(60)
    subprocess.run(["nginx", "-s", "stop"], check=True, capture_output=True)
    version, name = postgresql.split()[0].split("/")
    subprocess.run(["pg_ctlcluster", version, name, "stop", "-m", "fast"], check=True, capture_output=True)
    assert deploy.status(_ctx())["postgresql"].endswith("down")


def crm(*args: str, user: str | None = None) -> subprocess.CompletedProcess:
    """The installed release's crm-appliance, as root or (like the scheduler) as another user."""
    cmd = [str(VENV / "bin" / "crm-appliance"), *args]
    return subprocess.run((["runuser", "-u", user, "--"] if user else []) + cmd, capture_output=True, text=True,
                          cwd="/", timeout=900)


def test_9d_backups_run_as_the_scheduler_and_a_point_in_time_restore_brings_back_the_past(state):
    # WAL archiving runs: PostgreSQL's archive_command as postgres, with its own copy of the key.
    wal_check = crm("scheduler", "run", "wal_check", user="crm")
    assert wal_check.returncode == 0 and "WAL archiving works" in wal_check.stdout, wal_check.stdout + wal_check.stderr
    key_copy = Path("/var/lib/postgresql/crm-appliance-backup-key")
    assert key_copy.owner() == "postgres" and key_copy.stat().st_mode & 0o777 == 0o600
    assert key_copy.read_bytes() == Path("/etc/crm-appliance/backup-key").read_bytes()

    # The scheduler's jobs, as the scheduler's user: a base backup and a logical dump, verified.
    for job in ("base_backup", "logical_dump"):
        run = crm("scheduler", "run", job, user="crm")
        assert run.returncode == 0 and ": ok in " in run.stdout, run.stdout + run.stderr
    listed = json.loads(crm("backups", "--json", user="crm").stdout)
    assert {b["kind"] for b in listed} >= {"base", "logical"}
    verify = crm("backup", "verify", "latest", user="crm")
    assert verify.returncode == 0 and "is intact" in verify.stdout, verify.stdout + verify.stderr

    # A contact made after the target time: the restore to that time must not have it.
    browser = Browser()
    login(browser, state["email"], PASSWORD)
    # To the microsecond: cut to the second, the target could fall before the end of the base
    # backup just taken (it ended at 10:37:00.001, the target read "10:37:00"), and the restore
    # then chose the backup before it, made by the upgrade test's release.
    target = psql("SELECT to_char(clock_timestamp() AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI:SS.US')")
    time.sleep(1.5)
    later = f"LATER-{uuid.uuid4().hex[:8]}"
    status, where, _, _ = browser.submit(f"{BASE}/contacts/new", {"first_name": "Too", "last_name": later})
    assert status == 200 and re.search(r"/contacts/\d+$", where)
    assert psql(f"SELECT count(*) FROM contact WHERE last_name = '{later}'") == "1"
    subprocess.run(["runuser", "-u", "postgres", "--", "psql", "-XAtc", "SELECT pg_switch_wal()"], check=True,
                   capture_output=True, cwd="/")

    with Watcher() as watcher:
        restored = crm("restore", "latest", "--to", f"{target}+00:00", "--yes")
    assert restored.returncode == 0, restored.stdout + restored.stderr
    assert "total (RTO)" in restored.stdout and "at most 72 h" in restored.stdout
    assert (503, True) in watcher.seen and watcher.seen[-1] == (200, False)
    assert not deploy.MAINTENANCE_FLAG.exists()
    status = deploy.status(_ctx())
    assert status["health"]["ok"] is True
    assert [s["state"] for s in status["services"]] == ["running", "running"]
    browser = Browser()
    login(browser, state["email"], PASSWORD)
    assert psql(f"SELECT count(*) FROM contact WHERE last_name = '{later}'") == "0", \
        "the contact written after the target time is gone"
    status, _, page, _ = browser.get(state["contact_url"])
    assert status == 200 and "wei@example.cn" in page, "the contact from before is there"

    for kept in Path("/var/lib/postgresql/15").glob("main.before-restore-*"):  # kept for the admin to remove
        shutil.rmtree(kept)

    # The weekly restore drill, as the scheduler runs it: a scratch copy checked against the manifest.
    crm("scheduler", "run", "base_backup", user="crm")
    subprocess.run(["runuser", "-u", "postgres", "--", "psql", "-XAtc", "SELECT pg_switch_wal()"], check=True,
                   capture_output=True, cwd="/")  # archive the restore point now, not within archive_timeout
    drill = crm("scheduler", "run", "restore_drill", user="crm")
    assert drill.returncode == 0 and "no corruption" in drill.stdout, drill.stdout + drill.stderr
    assert deploy.status(_ctx())["last_backups"]["base"]["state"] == "verified"


def test_10_uninstall_with_purge_data_destroys_the_data_and_keeps_the_logs(state):
    result = deploy.uninstall(_ctx(), purge_data=True)
    assert "/var/log/crm-appliance" in result.kept and not any("database" in k for k in result.kept)
    for path in ("/etc/crm-appliance", "/var/lib/crm-appliance", "/opt/crm-appliance"):
        assert not Path(path).exists(), path
    assert Path("/var/log/crm-appliance").is_dir()
    users = subprocess.run(["getent", "passwd", "crm"], capture_output=True, text=True)
    assert users.returncode == 2, "the service user is gone"
    subprocess.run(["pg_ctlcluster", "15", "main", "start"], check=False, capture_output=True)
    try:
        found = subprocess.run(["runuser", "-u", "postgres", "--", "psql", "-XAtc",
                                "SELECT count(*) FROM pg_database WHERE datname = 'crm'"],
                               capture_output=True, text=True, check=True, cwd="/").stdout.strip()
        roles = subprocess.run(["runuser", "-u", "postgres", "--", "psql", "-XAtc",
                                "SELECT count(*) FROM pg_roles WHERE rolname = 'crm'"],
                               capture_output=True, text=True, check=True, cwd="/").stdout.strip()
    finally:
        subprocess.run(["pg_ctlcluster", "15", "main", "stop"], check=False, capture_output=True)
    assert (found, roles) == ("0", "0")


# ----------------------------------------------------------------------------- another host, over ssh


@pytest.fixture
def ssh_host(tmp_path):
    """This machine as a "remote" host: Debian's sshd on a free 127.0.0.1 port, root by key only.

    The inventory names it ``remote-crm`` with ``ansible_host: 127.0.0.1``: Ansible goes
    through ssh exactly as it would to another server.
    """
    sshd = Path("/usr/sbin/sshd")
    assert sshd.exists(), "scripts/test.sh installs openssh-server"
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    for name in ("host_key", "client_key"):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(tmp_path / name)], check=True)
    authorized = tmp_path / "authorized_keys"
    authorized.write_text((tmp_path / "client_key.pub").read_text())
    authorized.chmod(0o600)
    Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # sshd's privilege separation directory
    server = subprocess.Popen(
        [str(sshd), "-D", "-e", "-f", "/dev/null", "-p", str(port), "-h", str(tmp_path / "host_key"),
         "-o", "ListenAddress=127.0.0.1", "-o", "PermitRootLogin=prohibit-password",
         "-o", "PasswordAuthentication=no", "-o", f"AuthorizedKeysFile={authorized}", "-o", "StrictModes=no",
         "-o", f"PidFile={tmp_path / 'sshd.pid'}", "-o", "Subsystem=sftp /usr/lib/openssh/sftp-server"],
        stdout=subprocess.DEVNULL, stderr=open(tmp_path / "sshd.log", "w"))
    for _ in range(50):
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                break
        time.sleep(0.1)
    inventory = tmp_path / "remote.yml"
    inventory.write_text(json.dumps({"appliance": {"hosts": {"remote-crm": {
        "ansible_host": "127.0.0.1", "ansible_port": port, "ansible_user": "root",
        "ansible_ssh_private_key_file": str(tmp_path / "client_key"),
        "ansible_ssh_common_args": "-o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null",
        "ansible_python_interpreter": "/usr/bin/python3"}}}}))
    try:
        yield inventory
    finally:
        server.terminate()
        server.wait(timeout=10)
        shutil.rmtree(deploy.REMOTE_SECRETS_DIR / "remote-crm", ignore_errors=True)


def test_11_an_install_over_ssh_works_the_same_way(state, ssh_host):
    """After the purge the host is bare: install it again, this time as a remote host over ssh."""
    assert not Path("/opt/crm-appliance").exists() and not CONFIG.exists()
    result = deploy.install(_ctx(inventory=ssh_host))
    assert result.host == "remote-crm" and result.changed > 0
    assert any("remote host: planned for profile eval" in note for note in result.notes)
    # The secrets were made on the controller, kept for that host, and copied over once.
    for name in ("db-password", "secret-key", "backup-key", "backup-db-password"):
        kept, placed = deploy.REMOTE_SECRETS_DIR / "remote-crm" / name, Path("/etc/crm-appliance") / name
        assert kept.stat().st_mode & 0o777 == 0o600 and placed.stat().st_mode & 0o777 == 0o600
        assert kept.read_bytes() == placed.read_bytes() and placed.owner() == "crm"
    assert result.boss is not None and result.boss.link and "/auth/set-password/" in result.boss.link

    browser = Browser()
    status, where, _, _ = browser.submit(local(result.boss.link), {"password": PASSWORD, "confirm": PASSWORD})
    assert status == 200 and "/auth/login" in where
    login(browser, result.boss.email, PASSWORD)
    status, _, page, _ = browser.get(f"{BASE}/contacts/")
    assert status == 200 and "csrf_token" in page

    again = deploy.install(_ctx(inventory=ssh_host))
    assert again.changed == 0, again.changed_tasks
    assert deploy.status(_ctx())["health"]["ok"] is True
