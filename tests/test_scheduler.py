"""The scheduler: its config section, job history and notices, and the real daemon on real time."""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import signal
import subprocess
import sys
import time
import zoneinfo
from pathlib import Path

import pytest
from apscheduler.schedulers.background import BackgroundScheduler

from appliance import config, scheduler
from appliance.errors import ApplianceError, ConfigError


def test_every_schedule_key_has_a_job_function_and_every_job_a_key():
    keys = [f.name for f in dataclasses.fields(config.ScheduleSection)]
    assert sorted(keys) == sorted(scheduler.CRON_JOBS)
    example = Path(config.__file__).resolve().parent.parent / "config.example.toml"
    import tomllib

    assert sorted(tomllib.loads(example.read_text())["schedule"]) == sorted(keys)


@pytest.mark.parametrize("expression, days", [
    ("0 4 * * 6", {"Sat"}), ("0 4 * * 0", {"Sun"}), ("0 4 * * 7", {"Sun"}),
    ("0 4 * * 1-5", {"Mon", "Tue", "Wed", "Thu", "Fri"}), ("0 4 * * */2", {"Sun", "Tue", "Thu", "Sat"}),
    ("0 4 * * 1-5/2", {"Mon", "Wed", "Fri"}), ("0 4 * * sat,sun", {"Sat", "Sun"}),
])
def test_weekdays_count_from_sunday_as_in_cron(expression, days):
    """APScheduler 3 counts weekdays from Monday; the appliance reads them as cron does."""
    trigger = config.cron_trigger(expression)
    fire, seen = dt.datetime(2026, 11, 23, tzinfo=dt.timezone.utc), set()
    for _ in range(14):
        fire = trigger.get_next_fire_time(None, fire + dt.timedelta(minutes=1))
        seen.add(fire.strftime("%a"))
    assert seen == days


@pytest.mark.parametrize("value, problem", [
    ("0 4 * * 8", "weekday '8': expected 0-7 (0 and 7 are Sunday) or sun-sat"),
    ("61 * * * *", "[schedule] base_backup: expected a cron expression such as \"30 1 * * *\""),
    ("30 1 * *", "4 fields instead of 5"),
    ("every day", "2 fields instead of 5"),
])
def test_a_bad_cron_expression_is_refused_naming_the_key(value, problem):
    with pytest.raises(ConfigError) as err:
        config.from_mapping({"web": {"public_url": "https://crm.lan"}, "seats": {"licensed": 5},
                             "schedule": {"base_backup": value}}, source="appliance.toml")
    message = str(err.value)
    assert message.startswith("appliance.toml: [schedule] base_backup: expected a cron expression")
    assert problem in message and f'"{value}"' in message


def test_none_turns_a_job_off_and_jobs_get_their_next_time_in_the_appliance_zone():
    settings = config.from_mapping({"web": {"public_url": "https://crm.lan", "timezone": "Asia/Shanghai"},
                                    "seats": {"licensed": 5}, "schedule": {"logical_dump": "none"}})
    assert settings.schedule.logical_dump is None
    sched = BackgroundScheduler(timezone="Asia/Shanghai")
    lines = scheduler.schedule_jobs(sched, settings)
    assert "logical_dump: off" in lines and "base_backup: 30 1 * * *" in lines
    ids = {job.id for job in sched.get_jobs()}
    assert ids == {"base_backup", "prune", "wal_check", "restore_drill", "retention", "quota_check",
                   "uptime_probe", "heartbeat"}
    zone = zoneinfo.ZoneInfo("Asia/Shanghai")
    now = dt.datetime(2026, 11, 23, 12, 0, tzinfo=zone)
    fire = sched.get_job("base_backup").trigger.get_next_fire_time(None, now)
    assert fire == dt.datetime(2026, 11, 24, 1, 30, tzinfo=zone)
    weekly = sched.get_job("restore_drill").trigger.get_next_fire_time(None, now)
    assert weekly.weekday() == 5 and (weekly.hour, weekly.minute) == (4, 0)  # cron 6 = Saturday


def test_a_run_is_recorded_and_a_failure_leaves_a_notice_for_the_boss(settings, db):
    from webapp.models import JobRun, Notice

    ok = scheduler.run_job(settings, "prune", func=lambda s: "pruned 2 backups")
    assert (ok.outcome, ok.message) == ("ok", "pruned 2 backups")

    def broken(s):
        raise KeyError("manifest")

    failed = scheduler.run_job(settings, "base_backup", func=broken)
    assert failed.outcome == "failed" and failed.message == "KeyError: 'manifest'"
    friendly = scheduler.run_job(settings, "wal_check",
                                 func=lambda s: (_ for _ in ()).throw(ApplianceError("archive is 2 h behind")))
    assert friendly.message == "archive is 2 h behind"  # the appliance's own errors are already readable

    rows = list(JobRun.select().order_by(JobRun.id))
    assert [(r.job, r.outcome, r.message) for r in rows] == [
        ("prune", "ok", "pruned 2 backups"), ("base_backup", "failed", "KeyError: 'manifest'"),
        ("wal_check", "failed", "archive is 2 h behind")]
    assert all(r.finished_at >= r.started_at for r in rows)
    notices = list(Notice.select().order_by(Notice.id))
    assert [(n.level, n.source, n.message) for n in notices] == [
        ("error", "job:base_backup", "base_backup failed: KeyError: 'manifest'"),
        ("error", "job:wal_check", "wal_check failed: archive is 2 h behind")]
    assert [h["job"] for h in scheduler.history(settings)] == ["wal_check", "base_backup", "prune"]


def test_the_job_runs_even_when_its_history_cannot_be_written(settings):
    down = dataclasses.replace(settings, database=dataclasses.replace(settings.database, port=1,
                                                                       connect_timeout_seconds=1))
    ran = []
    result = scheduler.run_job(down, "prune", func=lambda s: ran.append(1) or "done")
    assert ran == [1] and result.outcome == "ok"


def test_wal_check_says_when_archiving_is_off(settings, db):
    result = scheduler.run_job(settings, "wal_check")
    assert result.outcome == "failed" and result.message.startswith("WAL archiving is off (archive_mode = off)")


# ----------------------------------------------------------------------------- the daemon, for real


def _toml(data: dict) -> str:
    lines = []
    for section, values in data.items():
        lines.append(f"[{section}]")
        lines.extend(f"{key} = {json.dumps(value)}" for key, value in values.items())
    return "\n".join(lines) + "\n"


def _config_file(tmp_path, pg_cluster, secrets_dir, schedule: dict) -> tuple[Path, config.Settings]:
    data = {
        "appliance": {"data_dir": str(tmp_path / "data"), "log_dir": str(tmp_path / "log")},
        "database": {"host": "127.0.0.1", "port": pg_cluster.port, "name": "crm_test", "user": "crm",
                     "password_file": str(secrets_dir / "db-password"), "pool_size": 4},
        "web": {"public_url": "http://127.0.0.1:5000", "secret_key_file": str(secrets_dir / "secret-key"),
                "timezone": "UTC"},
        "seats": {"licensed": 5},
        # Nothing listens on port 9: every probe fails and lands in the ledger as down.
        "monitor": {"probe_interval_seconds": 5, "probe_url": "http://127.0.0.1:9/healthz"},
        "schedule": {"base_backup": "none", "logical_dump": "none", "prune": "none", "wal_check": "none",
                     "restore_drill": "none", **schedule},
    }
    (tmp_path / "data").mkdir()
    path = tmp_path / "appliance.toml"
    path.write_text(_toml(data))
    return path, config.load(path)


def _daemon(path: Path, *args: str) -> subprocess.Popen:
    exe = Path(sys.executable).with_name("crm-appliance")
    return subprocess.Popen([str(exe), "--config", str(path), "scheduler", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def test_the_daemon_runs_jobs_on_time_survives_failures_reloads_on_sighup_and_runs_once(
        tmp_path, pg_cluster, secrets_dir, db):
    from webapp.models import JobRun, Notice

    path, settings = _config_file(tmp_path, pg_cluster, secrets_dir, {"wal_check": "* * * * *"})
    daemon = _daemon(path)
    try:
        beat = settings.appliance.data_dir / scheduler.HEARTBEAT_FILE
        deadline = time.monotonic() + 20
        while not beat.exists() and time.monotonic() < deadline:
            time.sleep(0.2)
        assert beat.exists() and time.time() - beat.stat().st_mtime < 20, "the heartbeat is written at start"

        second = _daemon(path)
        out, _ = second.communicate(timeout=30)
        assert second.returncode == 1
        assert f"another scheduler runs for {settings.appliance.data_dir} (pid {daemon.pid})" in out

        # wal_check every minute: it fails on this cluster (archive_mode off) and is recorded on time.
        deadline = time.monotonic() + 75
        while JobRun.select().where(JobRun.job == "wal_check", JobRun.outcome != "running").count() < 1:
            assert time.monotonic() < deadline, "wal_check did not run within a minute"
            assert daemon.poll() is None, daemon.stdout.read()
            time.sleep(0.5)
        run = JobRun.get(JobRun.job == "wal_check")
        assert run.outcome == "failed" and "archive_mode = off" in run.message
        assert run.started_at.second <= 3, f"started at {run.started_at}, expected on the minute"
        assert Notice.select().where(Notice.source == "job:wal_check").count() == 1
        assert daemon.poll() is None, "a failing job does not stop the scheduler"

        from appliance import monitor

        probes = [line for f in monitor.ledger_files(settings) for line in f.read_text().splitlines()]
        assert probes and all(line.split()[1] == "0" for line in probes), "the uptime probe records the outage"

        # A broken configuration on SIGHUP keeps the jobs; then SIGTERM stops the daemon cleanly.
        path.write_text(path.read_text().replace('wal_check = "* * * * *"', 'wal_check = "99 * * * *"'))
        daemon.send_signal(signal.SIGHUP)
        time.sleep(1)
        assert daemon.poll() is None
        daemon.send_signal(signal.SIGTERM)
        out, _ = daemon.communicate(timeout=30)
        assert daemon.returncode == 0, out
        assert "SIGHUP: the configuration is invalid, the jobs stay as they were" in out
        assert "[schedule] wal_check" in out and "scheduler stopped" in out
    finally:
        if daemon.poll() is None:
            daemon.kill()
            daemon.wait()

    # `scheduler run JOB` runs one job now, with its history, and says how it went.
    exe = Path(sys.executable).with_name("crm-appliance")
    path.write_text(path.read_text().replace('wal_check = "99 * * * *"', 'wal_check = "none"'))
    once = subprocess.run([str(exe), "--config", str(path), "scheduler", "run", "wal_check"],
                          capture_output=True, text=True)
    assert once.returncode == 1 and once.stdout.startswith("wal_check: failed in ")
    assert JobRun.select().where(JobRun.job == "wal_check").count() == 2


# ----------------------------------------------------------------------------- notices in the web UI


def test_the_boss_sees_a_failed_job_as_a_notice_and_acknowledges_it(settings, db, make_seat, browser_for):
    from webapp.models import Notice

    boss = browser_for(make_seat("boss@corp.cn", role="boss"))
    agent = browser_for(make_seat("agent@corp.cn", role="agent"))
    assert 'class="badge"' not in boss.get("/").get_data(as_text=True)

    scheduler.run_job(settings, "base_backup", func=lambda s: (_ for _ in ()).throw(
        ApplianceError("no space left for the backup: 3.1 GB needed, 1.2 GB free")))
    page = boss.get("/").get_data(as_text=True)
    assert 'href="/admin/notices"' in page and '<span class="badge" title="Notices">1</span>' in page
    assert 'class="badge"' not in agent.get("/").get_data(as_text=True)
    assert agent.get("/admin/notices").status_code == 404

    page = boss.get("/admin/notices").get_data(as_text=True)
    assert "base_backup failed: no space left for the backup: 3.1 GB needed, 1.2 GB free" in page
    assert "job:base_backup" in page
    notice = Notice.get()
    assert boss.client.post(f"/admin/notices/{notice.id}/acknowledge").status_code == 400  # no CSRF token
    assert Notice.get().acknowledged_at is None
    resp = boss.post(f"/admin/notices/{notice.id}/acknowledge", token_from="/admin/notices")
    assert resp.status_code == 302
    acknowledged = Notice.get()
    assert acknowledged.acknowledged_at is not None and acknowledged.acknowledged_by.email == "boss@corp.cn"
    page = boss.get("/admin/notices").get_data(as_text=True)
    assert "No open notices." in page and 'class="badge"' not in page
    assert boss.post("/admin/notices/999999/acknowledge", token_from="/admin/notices").status_code == 404


# ----------------------------------------------------------------------------- notice e-mail


def test_a_failed_job_is_mailed_to_every_active_boss_when_smtp_is_configured(settings, db, make_seat, smtp_server):
    from appliance import seats
    from webapp.models import Notice

    controller, inbox = smtp_server
    make_seat("boss@corp.cn", role="boss")
    gone = make_seat("old.boss@corp.cn", role="boss")
    seats.suspend(gone.user)
    make_seat("agent@corp.cn", role="agent")
    mailing = dataclasses.replace(settings, smtp=dataclasses.replace(
        settings.smtp, host="127.0.0.1", port=controller.port, security="none", from_address="crm@corp.cn"))

    result = scheduler.run_job(mailing, "base_backup", func=lambda s: (_ for _ in ()).throw(
        ApplianceError("no space left for the backup")))
    assert result.outcome == "failed" and Notice.select().count() == 1
    assert len(inbox.messages) == 1
    envelope = inbox.messages[0]
    assert envelope.mail_from == "crm@corp.cn" and envelope.rcpt_tos == ["boss@corp.cn"]
    import email
    from email import policy

    mail = email.message_from_bytes(envelope.content, policy=policy.default)
    assert mail["Subject"] == "[CRM error] base_backup failed: no space left for the backup"
    body = mail.get_content()
    assert "base_backup failed: no space left for the backup" in body and "Source: job:base_backup" in body
    assert "Administration -> Notices" in body

    # No mail server answering: the notice is still recorded and the job's outcome stands.
    from tests.pgcluster import free_port

    nobody = dataclasses.replace(mailing, smtp=dataclasses.replace(mailing.smtp, port=free_port()))
    again = scheduler.run_job(nobody, "prune", func=lambda s: (_ for _ in ()).throw(ApplianceError("disk gone")))
    assert again.outcome == "failed" and Notice.select().count() == 2 and len(inbox.messages) == 1


def test_retention_turned_off_with_an_expiring_licence_is_warned_about_loudly(settings, db, caplog):
    from webapp.models import Notice

    assert scheduler.warn_about_settings(settings) == [], "the defaults: nothing to say"
    expiring = dataclasses.replace(settings, seats=dataclasses.replace(settings.seats, expires=dt.date(2027, 6, 30)))
    assert scheduler.warn_about_settings(expiring) == []
    off = dataclasses.replace(expiring, schedule=dataclasses.replace(settings.schedule, retention=None))
    [said] = scheduler.warn_about_settings(off)
    assert said.startswith('[schedule] retention is "none" in <test settings> although [seats] expires is set '
                           '(2027-06-30): no licence-end notice is sent, the data is not destroyed')
    assert "Set retention to a cron expression" in said
    assert any(r.levelname == "ERROR" and said in r.getMessage() for r in caplog.records)
    [notice] = Notice.select()
    assert (notice.level, notice.source, notice.message) == ("error", "scheduler", said)
