"""The sizing plan: how many gunicorn workers, how much memory PostgreSQL gets, how the disk is spent.

Pure arithmetic over ``Resources`` (cores, memory, disk) and a number of seats.
Every number the formulas use is declared once, in ``Constants`` below, with its
unit and its source; ``docs/sizing.md`` repeats that table and a test keeps the
two equal, so the documentation cannot drift from the code.

The appliance is one host running nginx, gunicorn, the scheduler and
PostgreSQL side by side. Tuning guides such as PGTune assume a dedicated
database server, so the plan first sets aside memory for the operating system
and the web workers and applies the PostgreSQL rules to what is left.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

from appliance.errors import SizingError
from sizing.host import HostFacts
from sizing.profiles import GB, Profile, validate_seats

MIB = 1024**2
MB = 1000**2


def _k(value, unit: str, source: str):
    """Declare one constant with its unit and where the number comes from."""
    return field(default=value, metadata={"unit": unit, "source": source})


@dataclass(frozen=True)
class Constants:
    """Every number the plan uses: the one table that ``docs/sizing.md`` repeats."""

    gunicorn_workers_per_core: int = _k(2, "workers per core", "gunicorn docs, Design: How Many Workers? (2 x cores) + 1")
    gunicorn_workers_extra: int = _k(1, "workers", "gunicorn docs, same rule: the + 1")
    gunicorn_worker_mib: int = _k(150, "MiB per worker", "measured: 47-49 MiB RSS per idle gthread worker (quickstart), x3 for requests in flight")
    app_memory_share: float = _k(0.25, "of memory", "ours: web workers take at most a quarter of memory (caps workers on small hosts)")
    gunicorn_threads_min: int = _k(2, "threads per worker", "ours: one thread may wait on the database while another serves")
    gunicorn_threads_max: int = _k(8, "threads per worker", "ours: [web] threads default; more threads per process only contend for the GIL")
    os_reserve_mib: int = _k(512, "MiB", "estimate: Debian, nginx, the scheduler daemon, sshd and journald, with room to spare")
    scheduler_connections: int = _k(4, "connections", "estimate: backup, prune, probe and purge jobs, one connection each")
    connection_headroom: int = _k(10, "connections", "PostgreSQL docs: superuser_reserved_connections = 3, plus psql, pg_dump, migrations")
    pg_shared_buffers_share: float = _k(0.25, "of database memory", "PostgreSQL docs, Resource Consumption: shared_buffers, 25% of memory")
    pg_effective_cache_share: float = _k(0.75, "of database memory", "PGTune: effective_cache_size = 3/4 of memory")
    pg_maintenance_divisor: int = _k(16, "divisor", "PGTune: maintenance_work_mem = memory / 16")
    pg_maintenance_max_mib: int = _k(2048, "MiB", "PGTune: maintenance_work_mem at most 2 GB")
    pg_work_mem_nodes: int = _k(3, "sort/hash nodes per query", "after PGTune: (memory - shared_buffers) / (max_connections x 3)")
    pg_processes_per_query: int = _k(3, "processes per query", "PostgreSQL docs: max_parallel_workers_per_gather = 2 (default), plus the leader")
    pg_work_mem_min_mib: int = _k(4, "MiB", "PostgreSQL docs: work_mem default 4MB; never plan below it")
    pg_min_database_mib: int = _k(256, "MiB", "ours: below this PostgreSQL and the CRM cannot share the host")
    nginx_workers_per_core: int = _k(1, "workers per core", "nginx docs: worker_processes auto = one per core (explicit, as auto ignores cgroup quotas)")
    db_mb_per_seat_year: int = _k(100, "MB per seat per year", "estimate: 5x Salesforce's 20 MB data storage per user, for indexes and the audit log")
    attachments_mb_per_seat: int = _k(50, "MB per seat", "REQUIREMENTS R-9: 50 MB of attachment space per seat")
    backup_days: int = _k(7, "days", "REQUIREMENTS R-18: a cold backup a day and the transaction log, kept 7 days")
    backup_db_ratio: float = _k(0.3, "of database size", "estimate: pg_dump stores no indexes and compresses the rest at least 2x")
    wal_mb_per_seat_day: int = _k(10, "MB per seat per day", "estimate: 25x the daily data growth, for full-page writes and updates")
    pg_wal_gb: int = _k(1, "GB", "PostgreSQL docs: max_wal_size default 1GB (pg_wal itself)")
    system_gb: int = _k(4, "GB", "ours: Debian, PostgreSQL, nginx, two releases of the appliance, logs")
    disk_headroom: float = _k(0.2, "of the disk", "ours: fill at most 80%, room for VACUUM FULL, REINDEX and a restore")
    budget_years: int = _k(1, "years", "ours: the disk must hold at least the first year")


CONSTANTS = Constants()


def constants_table(k: Constants = CONSTANTS) -> list[tuple[str, object, str, str]]:
    """(name, value, unit, source) for every constant, in declaration order (docs and tests)."""
    return [(f.name, getattr(k, f.name), f.metadata["unit"], f.metadata["source"]) for f in dataclasses.fields(k)]


@dataclass(frozen=True)
class Resources:
    """What the plan is computed for: a real host, or a profile's nominal hardware."""

    cores: int
    memory_bytes: int
    disk_bytes: int

    @classmethod
    def of_host(cls, facts: HostFacts) -> Resources:
        return cls(facts.cores, facts.memory_bytes, facts.disk_total_bytes)

    @classmethod
    def of_profile(cls, profile: Profile) -> Resources:
        return cls(profile.cores, profile.memory_bytes, profile.disk_bytes)


@dataclass(frozen=True)
class DiskBudget:
    """What the appliance writes over ``years`` for a number of seats, in bytes, against one disk."""

    seats: int
    years: int
    system_bytes: int
    database_bytes: int
    wal_bytes: int
    attachments_bytes: int
    backups_bytes: int
    disk_bytes: int
    usable_bytes: int  # disk_bytes less the headroom
    years_that_fit: float  # how many years of growth the usable disk holds

    @property
    def total_bytes(self) -> int:
        return self.system_bytes + self.data_bytes

    @property
    def data_bytes(self) -> int:
        """Everything but the system: what must still find room on an installed host."""
        return self.database_bytes + self.wal_bytes + self.attachments_bytes + self.backups_bytes

    @property
    def fits(self) -> bool:
        return self.total_bytes <= self.usable_bytes


def disk_budget(seats: int, disk_bytes: int, k: Constants = CONSTANTS) -> DiskBudget:
    """Year-one disk use: database, WAL (pg_wal plus 7 days archived), attachment quota, 7 daily backups.

    Database and backups grow with time; the rest is fixed. Hence
    ``total(years) = fixed + years * growth``, which gives ``years_that_fit``.
    """
    years = k.budget_years
    db_per_year = seats * k.db_mb_per_seat_year * MB
    attachments = seats * k.attachments_mb_per_seat * MB
    wal = k.pg_wal_gb * GB + k.backup_days * seats * k.wal_mb_per_seat_day * MB
    system = k.system_gb * GB
    usable = math.floor(disk_bytes * (1 - k.disk_headroom))
    fixed = system + wal + attachments * (1 + k.backup_days)
    growth = db_per_year * (1 + k.backup_days * k.backup_db_ratio)
    database = years * db_per_year
    return DiskBudget(
        seats=seats, years=years, system_bytes=system, database_bytes=database, wal_bytes=wal,
        attachments_bytes=attachments,
        backups_bytes=round(k.backup_days * (database * k.backup_db_ratio + attachments)),
        disk_bytes=disk_bytes, usable_bytes=usable,
        years_that_fit=max(0.0, (usable - fixed) / growth) if growth else math.inf,
    )


@dataclass(frozen=True)
class Plan:
    """The tuning ``install`` applies: gunicorn, the database pool, PostgreSQL, nginx, and the disk budget."""

    seats: int
    resources: Resources
    gunicorn_workers: int
    gunicorn_threads: int
    db_pool_size: int  # [database] pool_size: one connection per thread is enough
    pg_max_connections: int
    pg_shared_buffers_mib: int
    pg_effective_cache_size_mib: int
    pg_work_mem_mib: int
    pg_maintenance_work_mem_mib: int
    nginx_worker_processes: int
    disk: DiskBudget
    warnings: tuple[str, ...]

    @property
    def request_slots(self) -> int:
        """Requests served at once: gunicorn workers x threads."""
        return self.gunicorn_workers * self.gunicorn_threads

    def postgresql_conf(self) -> dict[str, str]:
        """The settings as ``postgresql.conf`` spells them."""
        return {
            "max_connections": str(self.pg_max_connections),
            "shared_buffers": f"{self.pg_shared_buffers_mib}MB",
            "effective_cache_size": f"{self.pg_effective_cache_size_mib}MB",
            "work_mem": f"{self.pg_work_mem_mib}MB",
            "maintenance_work_mem": f"{self.pg_maintenance_work_mem_mib}MB",
        }


def make_plan(seats: int, resources: Resources, k: Constants = CONSTANTS) -> Plan:
    """The plan for ``seats`` on ``resources``; SizingError if the memory cannot hold the services.

    Web first (the appliance exists to serve the seats), then the database gets
    the memory that is left, divided by the PGTune/PostgreSQL-docs shares.
    """
    if seats < 1:
        raise SizingError(f"expected at least 1 seat, found {seats}")
    cores = max(1, resources.cores)
    memory_mib = resources.memory_bytes // MIB

    by_cores = k.gunicorn_workers_per_core * cores + k.gunicorn_workers_extra
    by_memory = math.floor(memory_mib * k.app_memory_share / k.gunicorn_worker_mib)
    workers = max(1, min(by_cores, by_memory))
    threads = min(k.gunicorn_threads_max, max(k.gunicorn_threads_min, math.ceil(seats / workers)))
    max_connections = workers * threads + k.scheduler_connections + k.connection_headroom

    database_mib = memory_mib - k.os_reserve_mib - workers * k.gunicorn_worker_mib
    if database_mib < k.pg_min_database_mib:
        need = (k.pg_min_database_mib + k.os_reserve_mib + workers * k.gunicorn_worker_mib) / 1024
        raise SizingError(
            f"expected at least {need:.1f} GiB of memory for {workers} web workers and PostgreSQL, "
            f"found {resources.memory_bytes / 1024**3:.1f} GiB: add memory"
        )
    shared_buffers = math.floor(database_mib * k.pg_shared_buffers_share)
    work_mem = math.floor((database_mib - shared_buffers)
                          / (max_connections * k.pg_work_mem_nodes * k.pg_processes_per_query))
    disk = disk_budget(seats, resources.disk_bytes, k)

    warnings = []
    if workers * threads < seats:
        warnings.append(
            f"expected a request slot per seat, found {workers * threads} for {seats} seats: "
            f"give the host more cores or memory"
        )
    if not disk.fits:
        warnings.append(
            f"expected the year-one disk budget of {disk.total_bytes / GB:.1f} GB to fit in "
            f"{disk.usable_bytes / GB:.1f} GB ({1 - k.disk_headroom:.0%} of {disk.disk_bytes / GB:.1f} GB), "
            f"it does not: give the data directory a larger disk"
        )
    return Plan(
        seats=seats,
        resources=resources,
        gunicorn_workers=workers,
        gunicorn_threads=threads,
        db_pool_size=threads,
        pg_max_connections=max_connections,
        pg_shared_buffers_mib=shared_buffers,
        pg_effective_cache_size_mib=math.floor(database_mib * k.pg_effective_cache_share),
        pg_work_mem_mib=max(k.pg_work_mem_min_mib, work_mem),
        pg_maintenance_work_mem_mib=min(k.pg_maintenance_max_mib, database_mib // k.pg_maintenance_divisor),
        nginx_worker_processes=max(1, k.nginx_workers_per_core * cores),
        disk=disk,
        warnings=tuple(warnings),
    )


def plan_for(profile: Profile, seats: int, facts: HostFacts) -> Plan:
    """The plan ``install`` would apply on this host: seats checked against the profile first."""
    return make_plan(validate_seats(profile, seats), Resources.of_host(facts))
