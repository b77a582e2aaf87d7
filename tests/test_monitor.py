"""The uptime probe against real HTTP servers on 127.0.0.1, the sla / maintenance / probe
commands through CliRunner, the boss's availability page and the maintenance banner."""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import re
import shutil
import socket
import threading
import time
import zoneinfo
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import click
import pytest
from click.testing import CliRunner
from werkzeug.serving import make_server

from appliance import config, monitor
from appliance.monitor import Probe
from installer.cli import Context
from installer.monitor_commands import register

SHANGHAI = zoneinfo.ZoneInfo("Asia/Shanghai")
ZH = {"Accept-Language": "zh-CN,zh;q=0.9"}


# ----------------------------------------------------------------------------- helpers

class _Handler(BaseHTTPRequestHandler):
    def do_GET(self):
        srv = self.server
        srv.seen.append((self.path, self.headers.get("Host"), self.headers.get("User-Agent")))
        if srv.delay:
            time.sleep(srv.delay)
        body = json.dumps(srv.body).encode()
        try:
            self.send_response(srv.status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        except OSError:  # the probe gave up waiting
            pass

    def log_message(self, *args):
        pass


@contextlib.contextmanager
def http_server(status: int = 200, body: dict | None = None, delay: float = 0):
    """A tiny /healthz stand-in on 127.0.0.1 that records the path, Host and User-Agent it saw."""
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    srv.daemon_threads = True
    srv.status, srv.body, srv.delay, srv.seen = status, body or {"status": "ok"}, delay, []
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    try:
        yield srv
    finally:
        srv.shutdown()
        srv.server_close()


@contextlib.contextmanager
def serve_app(flask_app):
    """The real Flask app behind werkzeug's server on 127.0.0.1."""
    srv = make_server("127.0.0.1", 0, flask_app, threaded=True)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{srv.server_port}"
    finally:
        srv.shutdown()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def local_settings(tmp_path, **monitor_keys) -> config.Settings:
    return config.from_mapping({"web": {"public_url": "https://crm.corp.lan", "timezone": "Asia/Shanghai"},
                                "seats": {"licensed": 5}, "appliance": {"data_dir": str(tmp_path / "data")},
                                "monitor": monitor_keys}, source="<monitor test>")


def ledger_lines(settings) -> list[str]:
    return [line for path in monitor.ledger_files(settings) for line in path.read_text().splitlines()]


def write_ledger(directory: Path, probes: list[Probe]) -> None:
    """Many probes at once (append_probe fsyncs each one: too slow for a month of them)."""
    directory.mkdir(parents=True, exist_ok=True)
    files: dict[Path, list[str]] = {}
    for p in probes:
        files.setdefault(monitor.ledger_path(directory, p.t), []).append(p.line())
    for path, lines in files.items():
        path.write_text("".join(lines))


def ts(text: str, tz=SHANGHAI) -> int:
    return int(dt.datetime.fromisoformat(text).replace(tzinfo=tz).timestamp())


# ----------------------------------------------------------------------------- the probe

def test_probe_up_against_the_real_app(app, settings, tmp_path):
    mine = local_settings(tmp_path)
    with serve_app(app) as base:
        result = monitor.probe_once(mine, url=f"{base}/healthz")
    assert result.ok is True and result.detail == "200" and result.ms >= 0
    assert ledger_lines(mine) == [f"{result.t} 1 {result.ms} 200"]
    assert abs(result.t - time.time()) < 30


def test_probe_down_when_the_database_is_down(pg_cluster, secrets_dir, db, tmp_path):
    from appliance.db import open_database
    from tests.conftest import make_settings
    from webapp import create_app

    broken = make_settings(pg_cluster, secrets_dir, database={"port": 1})
    mine = local_settings(tmp_path)
    with serve_app(create_app(broken, database=open_database(broken))) as base:
        result = monitor.probe_once(mine, url=f"{base}/healthz")
    assert result.ok is False and result.detail == "503:database"
    assert ledger_lines(mine) == [f"{result.t} 0 {result.ms} 503:database"]


def test_probe_down_when_nothing_listens(tmp_path):
    mine = local_settings(tmp_path)
    result = monitor.probe_once(mine, url=f"http://127.0.0.1:{free_port()}/healthz")
    assert (result.ok, result.detail) == (False, "refused")
    assert ledger_lines(mine)[0].endswith(" 0 %d refused" % result.ms)


def test_probe_times_out(tmp_path):
    mine = local_settings(tmp_path, probe_timeout_seconds=1)
    # The stand-in answers after 30 s: a probe that ignored its timeout would wait and report ok.
    with http_server(delay=30) as srv:
        result = monitor.probe_once(mine, url=f"http://127.0.0.1:{srv.server_port}/healthz")
    assert (result.ok, result.detail) == (False, "timeout")
    assert 900 <= result.ms < 30_000  # waited for its timeout, gave up before the answer


@pytest.mark.parametrize("status,checks,ok,detail", [
    (503, {"web": {"ok": True}, "database": {"ok": True}, "disk": {"ok": False}, "scheduler": {"ok": True}},
     True, "503:disk"),  # seat users can still work: not an outage
    (503, {"web": {"ok": True}, "database": {"ok": False}, "disk": {"ok": False}, "scheduler": {"ok": True}},
     False, "503:database,disk"),
    (502, None, False, "502"),  # nginx without gunicorn behind it
    (404, None, False, "404"),
])
def test_probe_reads_what_healthz_says(tmp_path, status, checks, ok, detail):
    mine = local_settings(tmp_path)
    with http_server(status=status, body={"status": "fail", "checks": checks} if checks else {}) as srv:
        result = monitor.probe_once(mine, url=f"http://127.0.0.1:{srv.server_port}/healthz")
    assert (result.ok, result.detail) == (ok, detail)


def test_the_default_url_goes_through_the_public_port_with_its_host_name_and_no_proxy(tmp_path, monkeypatch):
    with http_server() as srv:
        port = srv.server_port
        mine = config.from_mapping({"web": {"public_url": f"http://crm.corp.lan:{port}"}, "seats": {"licensed": 5},
                                    "appliance": {"data_dir": str(tmp_path / "data")}})
        assert monitor.probe_url(mine) == (f"http://127.0.0.1:{port}/healthz", f"crm.corp.lan:{port}")
        # A proxy in the environment must not catch the probe.
        monkeypatch.setenv("http_proxy", f"http://127.0.0.1:{free_port()}")
        monkeypatch.setenv("HTTP_PROXY", f"http://127.0.0.1:{free_port()}")
        result = monitor.probe_once(mine)
    assert result.ok is True
    path, host, agent = srv.seen[0]
    assert (path, host) == ("/healthz", f"crm.corp.lan:{port}") and agent.startswith("crm-appliance-probe/")


def test_probe_url_defaults_and_override(tmp_path):
    assert monitor.probe_url(local_settings(tmp_path)) == ("https://127.0.0.1/healthz", "crm.corp.lan")
    mine = config.from_mapping({"web": {"public_url": "https://crm.corp.lan:8443/crm/"}, "seats": {"licensed": 5}})
    assert monitor.probe_url(mine) == ("https://127.0.0.1:8443/crm/healthz", "crm.corp.lan:8443")
    mine = local_settings(tmp_path, probe_url="http://127.0.0.1:8000/healthz")
    assert monitor.probe_url(mine) == ("http://127.0.0.1:8000/healthz", None)


def test_probes_feed_the_report(tmp_path):
    mine = local_settings(tmp_path)
    with http_server(status=503, body={"checks": {"web": {"ok": True}, "database": {"ok": False}}}) as srv:
        first = monitor.probe_once(mine, url=f"http://127.0.0.1:{srv.server_port}/healthz")
        srv.status, srv.body = 200, {"status": "ok"}
        monitor.probe_once(mine, url=f"http://127.0.0.1:{srv.server_port}/healthz")
    year, month = monitor.current_month(SHANGHAI, first.t)
    report = monitor.report_for_month(mine, year, month, now=first.t + 5)
    assert report.probes == 2 and report.failed_probes == 1
    # The first probe ever marks when monitoring began: earlier time is not unknown.
    assert monitor.first_probe_time(mine) == first.t
    assert report.unknown_seconds == 0 and report.before_seconds == first.t - report.start


# ----------------------------------------------------------------------------- the commands

@pytest.fixture
def cli(tmp_path):
    """``crm-appliance`` with the monitor commands, on a config of its own (no database needed)."""

    @click.group()
    @click.option("--config", "config_path", required=True)
    @click.pass_context
    def group(ctx, config_path):
        ctx.obj = Context(Path(config_path))

    register(group)
    path = tmp_path / "appliance.toml"
    path.write_text(f'[web]\npublic_url = "https://crm.corp.lan"\ntimezone = "Asia/Shanghai"\n'
                    f'[seats]\nlicensed = 5\n[appliance]\ndata_dir = "{tmp_path / "data"}"\n')

    def run(*args):
        return CliRunner().invoke(group, ["--config", str(path), *args])

    run.settings = config.load(path)
    return run


def _local(t: int) -> str:
    return monitor.format_local(t, SHANGHAI)


def test_maintenance_add_list_remove(cli):
    start = (int(time.time()) // 60 + 2 * 60) * 60  # in two hours, on the minute
    result = cli("maintenance", "add", "--from", _local(start), "--to", _local(start + 5400),
                 "--reason", "Upgrade to 1.4")
    assert result.exit_code == 0, result.output
    assert f"Added maintenance window 1: {_local(start)} to {_local(start + 5400)} Asia/Shanghai" in result.output
    # Entered in Asia/Shanghai, stored in UTC.
    stored = json.loads((cli.settings.appliance.data_dir / "monitor" / "maintenance.json").read_text())
    first = stored["windows"][0]
    assert first["start"] == monitor.iso(start) and first["end"] == monitor.iso(start + 5400)
    assert first["reason"] == "Upgrade to 1.4" and first["created_by"].startswith("cli:")

    second = cli("maintenance", "add", "--from", _local(start + 86400), "--to", _local(start + 90000),
                 "--reason", "Disk swap", "--json")
    assert second.exit_code == 0 and json.loads(second.output)["id"] == 2

    listed = json.loads(cli("maintenance", "list", "--json").output)
    assert [(w["id"], w["reason"], w["state"]) for w in listed] == [(1, "Upgrade to 1.4", "upcoming"),
                                                                   (2, "Disk swap", "upcoming")]
    table = cli("maintenance", "list").output
    assert "Upgrade to 1.4" in table and _local(start) in table and "upcoming" in table

    removed = cli("maintenance", "remove", "1")
    assert removed.exit_code == 0 and "Removed maintenance window 1" in removed.output
    assert [w["id"] for w in json.loads(cli("maintenance", "list", "--json").output)] == [2]
    again = cli("maintenance", "remove", "1")
    assert again.exit_code == 1 and "no maintenance window 1 (windows: 2)" in again.output


@pytest.mark.parametrize("start,end,expected", [
    ("+2h", "+1h", '"to" ({end}) must be after "from" ({start})'),
    ("tomorrow", "+1h", 'maintenance window "from": expected a local time like "2026-03-01 22:00" (Asia/Shanghai), '
                        'found "tomorrow"'),
    ("-2h", "+1h", 'is in the past; a window is announced before it starts'),
    ("+1h", "+200h", "expected at most 7 days, found 8.3 days"),
])
def test_bad_maintenance_windows_give_one_clear_line(cli, start, end, expected):
    base = (int(time.time()) // 60) * 60

    def when(text):
        return _local(base + int(text[:-1]) * 3600) if text[0] in "+-" else text

    result = cli("maintenance", "add", "--from", when(start), "--to", when(end), "--reason", "x")
    assert result.exit_code == 1, result.output
    assert expected.format(start=when(start), end=when(end)) in result.output
    assert "Traceback" not in result.output and len(result.output.strip().splitlines()) == 1
    assert not (cli.settings.appliance.data_dir / "monitor" / "maintenance.json").exists()


def test_sla_command_table_and_json(cli):
    lo, hi = monitor.month_bounds(2026, 4, SHANGHAI)
    outage = ts("2026-04-10 10:00:00")
    probes = [Probe(t, not outage <= t < outage + 600, 9, "200") for t in range(lo - 86400, hi + 86400, 30)]
    write_ledger(cli.settings.appliance.data_dir / "monitor", probes)

    result = cli("sla", "--month", "2026-04")
    assert result.exit_code == 0, result.output
    rows = dict(re.split(r"\s{2,}", line, maxsplit=1) for line in result.output.splitlines()[:12])
    assert rows["month"] == "2026-04 (Asia/Shanghai), 43200 minutes"
    assert rows["budget"] == "43.20 min" and rows["counted downtime"] == "10.00 min"
    assert rows["outages"].startswith("1 counted, 0 ignored")
    assert rows["unknown"].startswith("0.00 min")
    assert rows["availability"].startswith("99.9769% as measured")
    assert rows["left"] == "33.20 min" and rows["SLA"] == "met" and rows["compensation"] == "0.00 min"
    assert "2026-04-10 10:00:00  2026-04-10 10:10:00" in result.output

    data = json.loads(cli("sla", "--month", "2026-04", "--json").output)
    assert data["budget_minutes"] == 43.2 and data["counted_downtime_minutes"] == 10.0
    assert data["verdict"] == "met" and data["outages"][0]["start"] == monitor.iso(outage)

    bad = cli("sla", "--month", "April")
    assert bad.exit_code == 2 and 'expected YYYY-MM such as 2026-02, found "April"' in bad.output


def test_probe_command_records_one_result(cli):
    with http_server() as srv:
        result = cli("probe", "--url", f"http://127.0.0.1:{srv.server_port}/healthz")
    assert result.exit_code == 0, result.output
    assert result.output.startswith("up  200  ") and "probes-" in result.output
    assert len(ledger_lines(cli.settings)) == 1
    down = cli("probe", "--url", f"http://127.0.0.1:{free_port()}/healthz", "--json")
    assert down.exit_code == 0 and json.loads(down.output)["detail"] == "refused"
    assert len(ledger_lines(cli.settings)) == 2


# ----------------------------------------------------------------------------- the page and the banner

@pytest.fixture
def monitor_files(settings):
    """The shared test data directory's monitor files, removed afterwards (other tests must not see a banner)."""
    directory = settings.appliance.data_dir / "monitor"
    shutil.rmtree(directory, ignore_errors=True)
    yield directory
    shutil.rmtree(directory, ignore_errors=True)


def test_the_boss_sees_the_month_and_others_do_not(make_seat, browser_for, monitor_files):
    lo, hi = monitor.month_bounds(2026, 4, SHANGHAI)
    outage = ts("2026-04-10 10:00:00")
    gap = (ts("2026-04-20 03:00:00"), ts("2026-04-20 04:00:00"))
    probes = [Probe(t, not outage <= t < outage + 600, 9, "200" if not outage <= t < outage + 600 else "503:database")
              for t in range(lo - 86400, hi + 86400, 30) if not gap[0] < t < gap[1]]
    write_ledger(monitor_files, probes)
    (monitor_files / "maintenance.json").write_text(json.dumps({"format": 1, "windows": [
        {"id": 1, "start": monitor.iso(ts("2026-04-12 22:00:00")), "end": monitor.iso(ts("2026-04-12 23:00:00")),
         "reason": "Upgrade to 1.4", "created_at": monitor.iso(ts("2026-04-10 09:00:00")), "created_by": "cli:root"}]}))

    boss = browser_for(make_seat("boss@corp.cn", role="boss"))
    resp = boss.get("/admin/sla?month=2026-04")
    html = resp.get_data(as_text=True)
    assert resp.status_code == 200, html[:2000]
    figures = dict(re.findall(r"<dt>([^<]+)</dt><dd[^>]*>([^<]+)", html))
    assert figures["Minutes in the month"] == "43200"
    assert figures["Downtime budget"].strip() == "43.20 min"
    assert figures["Counted downtime"].strip() == "10.00 min"
    assert figures["Unknown time"].strip() == "60.00 min"
    assert figures["Maintenance windows"].strip() == "60.00 min"
    assert figures["Availability as measured"].strip() == "99.9769 %"
    assert figures["Worst case"].strip() == "99.8380 %"  # 70 of 43200 minutes
    assert figures["Left of the budget"].strip() == "33.20 min"
    assert "Undetermined" in html  # 70 minutes in the worst case is over the 43.2-minute budget
    assert "2026-04-10 10:00:00" in html and "503:database" in html and "Upgrade to 1.4" in html
    assert "2026-04-20 03:00:00" in html  # the unknown period
    assert html.count('<svg class="daybar"') == 30
    # Strict CSP: no inline style or script.
    assert 'style="' not in html and "<script>" not in html and "<style" not in html

    zh = boss.get("/admin/sla?month=2026-04", headers=ZH).get_data(as_text=True)
    assert "2026-04 的可用性" in zh and "计入的中断时长" in zh and "无法确定" in zh

    assert boss.get("/admin/sla?month=April").status_code == 400
    for role in ("manager", "agent"):
        other = browser_for(make_seat(f"{role}@corp.cn", role=role))
        assert other.get("/admin/sla?month=2026-04").status_code == 404
        assert other.get("/admin/sla").status_code == 404


def test_the_page_for_this_month_without_any_data(make_seat, browser_for, monitor_files):
    boss = browser_for(make_seat("boss@corp.cn", role="boss"))
    html = boss.get("/admin/sla").get_data(as_text=True)
    assert "the month is not over" in html and "No outages this month." in html


def test_the_banner_announces_a_window_to_every_seat(settings, make_seat, browser_for, monitor_files):
    agent = browser_for(make_seat("agent@corp.cn", role="agent"))
    assert "maintenance-banner" not in agent.get("/").get_data(as_text=True)

    now = int(time.time())
    start = (now // 60 + 120) * 60
    monitor.add_window(settings, _local(start), _local(start + 3600), "Upgrade <b>1.4</b>")
    html = agent.get("/").get_data(as_text=True)
    assert (f"Maintenance is planned from {_local(start)} to {_local(start + 3600)}: Upgrade &lt;b&gt;1.4&lt;/b&gt;."
            in html)
    zh = agent.get("/", headers=ZH).get_data(as_text=True)
    assert (f"系统维护计划于 {_local(start)} 至 {_local(start + 3600)} 进行：Upgrade &lt;b&gt;1.4&lt;/b&gt;。"
            in zh)

    # The login page (nobody logged in) shows no banner.
    assert "maintenance-banner" not in browser_for(None).get("/auth/login").get_data(as_text=True)


def test_the_banner_during_a_window_and_not_days_before_one(settings, make_seat, browser_for, monitor_files):
    agent = browser_for(make_seat("agent@corp.cn", role="agent"))
    now = int(time.time())
    far = (now // 60 + 3 * 24 * 60) * 60
    monitor.add_window(settings, _local(far), _local(far + 3600), "Later")
    assert "maintenance-banner" not in agent.get("/").get_data(as_text=True)

    monitor.add_window(settings, _local(now), _local(now + 1800), "Disk swap")
    html = agent.get("/").get_data(as_text=True)
    assert f"Maintenance in progress until {_local(now + 1800)}: Disk swap." in html
    assert "Later" not in html
