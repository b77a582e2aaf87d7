"""The scheduler daemon: backups, pruning, WAL checks, restore drills and the uptime probe.

``crm-appliance scheduler`` runs :func:`run` in the foreground; the installer runs it as
a service. It is APScheduler 3's ``BlockingScheduler`` with the in-memory job store: the
``[schedule]`` section of the configuration is the one source of truth for which jobs
run when, and SIGHUP reads it again. Every job runs with ``coalesce`` (missed runs fold
into one), ``max_instances=1`` and a misfire grace time, and a lock file in the data
directory keeps a second scheduler of the same appliance from starting.

A job is a plain function ``job(settings) -> str`` returning a one-line summary, in
:data:`CRON_JOBS` under the name of its ``[schedule]`` key: adding one is that function
and that key. :func:`run_job` records each run in the ``job_run`` table; a job that
raises is recorded as failed and leaves a notice for the boss (``notice`` table, shown
in the web UI, e-mailed when ``[smtp]`` names a host), and the scheduler goes on.

Two jobs run on an interval instead and keep no history: the uptime probe (every
``[monitor] probe_interval_seconds``; its ledger is its history) and the heartbeat, a
file whose age ``/healthz`` reads.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import fcntl
import logging
import os
import signal
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from appliance.config import ScheduleSection, Settings, cron_trigger
from appliance.errors import ApplianceError, ConfigError

log = logging.getLogger(__name__)

LOCK_FILE = "scheduler.lock"
HEARTBEAT_FILE = "scheduler.heartbeat"  # webapp/health.py reads its age
HEARTBEAT_SECONDS = 30
MISFIRE_GRACE_SECONDS = 15 * 60
MESSAGE_LIMIT = 2000


class SchedulerError(ApplianceError):
    """The scheduler cannot start: another one runs, or the data directory is unusable."""


# ----------------------------------------------------------------------------- the jobs


def base_backup(settings: Settings) -> str:
    from appliance import backup

    info = backup.take_backup(settings, "base")
    return f"base backup {info.id} taken"


def logical_dump(settings: Settings) -> str:
    from appliance import backup

    info = backup.take_backup(settings, "logical")
    return f"logical dump {info.id} taken"


def prune(settings: Settings) -> str:
    from appliance import backup

    result = backup.prune(settings)
    return str(result)


def wal_check(settings: Settings) -> str:
    """PostgreSQL's own archiver statistics: archiving on, and its last attempt succeeded."""
    from appliance.db import open_database

    db = open_database(dataclasses.replace(settings, database=dataclasses.replace(settings.database, pool_size=1)),
                       bind=False)
    try:
        with db.connection_context():
            mode = db.execute_sql("SELECT current_setting('archive_mode')").fetchone()[0]
            archived, last_archived, failed, last_failed, last_failed_wal = db.execute_sql(
                "SELECT archived_count, last_archived_time, failed_count, last_failed_time, last_failed_wal "
                "FROM pg_stat_archiver").fetchone()
    finally:
        db.close_all()
    if mode == "off":
        raise ApplianceError("WAL archiving is off (archive_mode = off): point-in-time restore is impossible; "
                             "run crm-appliance install to configure it")
    if last_failed is not None and (last_archived is None or last_failed > last_archived):
        raise ApplianceError(f"WAL archiving fails: {failed} failed attempts, the last for {last_failed_wal} "
                             f"at {last_failed:%Y-%m-%d %H:%M:%S}; see the PostgreSQL log")
    return f"WAL archiving works: {archived} segments archived, the last at " + (
        f"{last_archived:%Y-%m-%d %H:%M:%S}" if last_archived else "none yet")


def restore_drill(settings: Settings) -> str:
    from appliance import restore

    result = restore.drill(settings)
    return str(result)


def retention(settings: Settings) -> str:
    from appliance import lifecycle

    return str(lifecycle.run_retention(settings))


def quota_check(settings: Settings) -> str:
    from appliance import attachments

    return str(attachments.check_quota(settings))


#: The [schedule] key of each job, and its function.
CRON_JOBS: dict[str, Callable[[Settings], str]] = {
    "base_backup": base_backup,
    "logical_dump": logical_dump,
    "prune": prune,
    "wal_check": wal_check,
    "restore_drill": restore_drill,
    "retention": retention,
    "quota_check": quota_check,
}


def uptime_probe(settings: Settings) -> None:
    from appliance import monitor

    monitor.probe_once(settings)


def heartbeat(settings: Settings) -> None:
    path = settings.appliance.data_dir / HEARTBEAT_FILE
    path.touch()
    os.utime(path)


# ----------------------------------------------------------------------------- running one job


@dataclass
class JobResult:
    job: str
    outcome: str  # ok, failed
    message: str
    started_at: dt.datetime
    seconds: float


def _utcnow() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc).replace(tzinfo=None)


@contextlib.contextmanager
def _database(settings: Settings, db=None):
    """A connection for this thread from ``db`` (the daemon's pool, bound to the models), or
    from a small pool of its own; None (logged) when PostgreSQL is unreachable."""
    from appliance.db import open_database

    own = db is None
    try:
        if own:
            db = open_database(dataclasses.replace(settings, database=dataclasses.replace(settings.database,
                                                                                          pool_size=2)))
        db.connect(reuse_if_open=True)
    except Exception as exc:  # the history is best effort: the job itself must still run
        log.warning("job history not recorded: the database is unreachable: %s", exc)
        yield None
        return
    try:
        yield db
    finally:
        db.close_all() if own else db.close()


def _record(db, func: Callable[[], object]) -> None:
    if db is None:
        return
    try:
        func()
    except Exception as exc:  # best effort, as above
        log.warning("job history not recorded: %s", exc)


def run_job(settings: Settings, name: str, func: Callable[[Settings], str] | None = None, db=None) -> JobResult:
    """Run one job now, recording it in ``job_run``; a failure also leaves a notice for the boss.

    ``db``: the daemon's pool; without it a small pool of its own is opened and closed.
    """
    from appliance.notices import N_, raise_notice
    from webapp.models import JobRun

    func = func or CRON_JOBS[name]
    started = _utcnow()
    clock = time.monotonic()
    with _database(settings, db) as db:
        row = None

        def start():
            nonlocal row
            row = JobRun.create(job=name, started_at=started, outcome="running")

        _record(db, start)
        try:
            message = str(func(settings) or "done")
            outcome = "ok"
        except Exception as exc:  # a job that raises must not stop the scheduler
            outcome = "failed"
            if isinstance(exc, ApplianceError):  # an expected failure: its message says it all
                message = str(exc)
                log.error("job %s failed: %s", name, message)
            else:
                message = f"{type(exc).__name__}: {exc}"
                log.error("job %s failed: %s\n%s", name, message, traceback.format_exc())
        message = message[:MESSAGE_LIMIT]
        seconds = time.monotonic() - clock

        def finish():
            if row is not None:
                row.finished_at, row.outcome, row.message = _utcnow(), outcome, message
                row.save()
            if outcome == "failed":
                raise_notice(settings, "error", f"job:{name}", N_("%(job)s failed: %(message)s"),
                             {"job": name, "message": message})

        _record(db, finish)
    log.info("job %s %s in %.1f s: %s", name, outcome, seconds, message)
    return JobResult(job=name, outcome=outcome, message=message, started_at=started, seconds=seconds)


def history(settings: Settings, limit: int = 50) -> list[dict]:
    """The latest job runs, newest first (for the CLI and the diagnostics bundle)."""
    from webapp.models import JobRun

    with _database(settings) as db:
        if db is None:
            raise ApplianceError("cannot read the job history: the database is unreachable")
        rows = JobRun.select().order_by(JobRun.started_at.desc(), JobRun.id.desc()).limit(limit)
        return [{"job": r.job, "started_at": r.started_at.isoformat(timespec="seconds") + "Z",
                 "finished_at": r.finished_at.isoformat(timespec="seconds") + "Z" if r.finished_at else None,
                 "outcome": r.outcome, "message": r.message} for r in rows]


# ----------------------------------------------------------------------------- the daemon


def schedule_jobs(scheduler, settings: Settings, db=None) -> list[str]:
    """(Re)create every job of ``settings`` on ``scheduler``; returns one line per job."""
    scheduler.remove_all_jobs()
    lines = []
    for key in (f.name for f in dataclasses.fields(ScheduleSection)):
        expression = getattr(settings.schedule, key)
        if expression is None:
            lines.append(f"{key}: off")
            continue
        trigger = cron_trigger(expression, settings.web.timezone)
        scheduler.add_job(run_job, trigger, args=(settings, key), kwargs={"db": db}, id=key, name=key)
        lines.append(f"{key}: {expression}")
    interval = settings.monitor.probe_interval_seconds
    scheduler.add_job(uptime_probe, "interval", seconds=interval, args=(settings,), id="uptime_probe",
                      name="uptime_probe", next_run_time=dt.datetime.now(dt.timezone.utc))
    lines.append(f"uptime_probe: every {interval} s")
    scheduler.add_job(heartbeat, "interval", seconds=HEARTBEAT_SECONDS, args=(settings,), id="heartbeat",
                      name="heartbeat", next_run_time=dt.datetime.now(dt.timezone.utc))
    return lines


def warn_about_settings(settings: Settings, db=None) -> list[str]:
    """At start and on SIGHUP: log, and leave a notice for, a setting that silently defeats a
    duty of the appliance; returns the English texts. ``[schedule] retention = "none"`` with
    ``[seats] expires`` set sends no licence-end notice and never destroys the data (R-16), nor
    what was deleted past ``[retention] undo_days`` (R-15)."""
    from appliance.notices import N_, raise_notice

    if settings.schedule.retention is not None or settings.seats.expires is None:
        return []
    params = {"file": settings.source, "expires": settings.seats.expires.isoformat()}
    message_id = N_('[schedule] retention is "none" in %(file)s although [seats] expires is set (%(expires)s): no '
                    'licence-end notice is sent, the data is not destroyed when the licence ends, and nothing '
                    'deleted is ever destroyed. Set retention to a cron expression (the default is "15 3 * * *") '
                    'and reload the scheduler.')
    log.error("WARNING: %s", message_id % params)
    with _database(settings, db) as conn:
        _record(conn, lambda: raise_notice(settings, "error", "scheduler", message_id, params))
    return [message_id % params]


@contextlib.contextmanager
def single_instance(data_dir: Path):
    """Hold the data directory's scheduler lock, or fail naming the holder."""
    path = data_dir / LOCK_FILE
    try:
        handle = open(path, "a+")
    except OSError as exc:
        raise SchedulerError(f"{path}: cannot open the scheduler's lock file: {exc.strerror}; "
                             f"check that {data_dir} exists and belongs to the service user") from None
    with handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "unknown"
            raise SchedulerError(f"another scheduler runs for {data_dir} (pid {holder}); only one may run") from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"{os.getpid()}\n")
        handle.flush()
        yield


def run(load_settings: Callable[[], Settings]) -> None:
    """The daemon, in the foreground, until SIGTERM or SIGINT. SIGHUP reloads the configuration."""
    from apscheduler.schedulers.blocking import BlockingScheduler

    from appliance.db import open_database

    settings = load_settings()
    with single_instance(settings.appliance.data_dir):
        # One pool for the daemon's life (connections open lazily, so a database that is
        # down at start only costs those jobs their history).
        db = open_database(dataclasses.replace(settings, database=dataclasses.replace(settings.database,
                                                                                      pool_size=4)))
        scheduler = BlockingScheduler(
            timezone=settings.web.timezone,
            job_defaults={"coalesce": True, "max_instances": 1, "misfire_grace_time": MISFIRE_GRACE_SECONDS})
        for line in schedule_jobs(scheduler, settings, db):
            log.info("scheduled %s", line)
        warn_about_settings(settings, db)

        def reload(signum, frame):
            try:
                fresh = load_settings()
            except ConfigError as exc:
                log.error("SIGHUP: the configuration is invalid, the jobs stay as they were: %s", exc)
                return
            for line in schedule_jobs(scheduler, fresh, db):
                log.info("rescheduled %s", line)
            warn_about_settings(fresh, db)

        def stop(signum, frame):
            log.info("%s: stopping after the running jobs", signal.Signals(signum).name)
            scheduler.shutdown(wait=False)

        signal.signal(signal.SIGHUP, reload)
        signal.signal(signal.SIGTERM, stop)
        signal.signal(signal.SIGINT, stop)
        log.info("scheduler started (pid %d)", os.getpid())
        try:
            scheduler.start()
        finally:
            db.close_all()
        log.info("scheduler stopped")
