"""sizing/: profiles, tolerance bands, every check, the plan formulas, the disk budget, and the docs' tables.

Facts are fabricated as plain ``HostFacts`` (one host that passes standard-50,
changed one field at a time), so every outcome here is exact on any machine.
``sizing.host`` is exercised against the real host and a fake cgroup tree.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import socket
from pathlib import Path

import pytest

from appliance import config
from appliance.errors import SizingError
from sizing import check, host, plan, profiles
from sizing.check import CHECK_IDS, preflight
from sizing.host import HostFacts, PortFact
from sizing.plan import CONSTANTS, Resources, disk_budget, make_plan
from sizing.profiles import GB, GIB, TOLERANCE

MIB = 1024**2
DOCS = Path(__file__).resolve().parent.parent / "docs" / "sizing.md"
STANDARD_50 = profiles.get("standard-50")
EVAL = profiles.get("eval")

GOOD = HostFacts(
    hostname="crm", memory_bytes=32 * GIB, cpu_affinity=4, cpu_quota=None, data_dir=Path("/var/lib/crm-appliance"),
    disk_mount=Path("/"), disk_total_bytes=500 * GB, disk_free_bytes=450 * GB, os_id="debian", os_version="12",
    os_name="Debian GNU/Linux 12 (bookworm)", arch="x86_64", is_root=True, hostname_resolves=True,
    hostname_addresses=("127.0.1.1",), clock_synchronised=True, clock_source="adjtimex",
    ports=(PortFact(80, "free"), PortFact(443, "free"), PortFact(5432, "free")), appliance_marker=False,
)
"""A host that passes every standard-50 check."""


def facts(**changes) -> HostFacts:
    return dataclasses.replace(GOOD, **changes)


def verdict(f: HostFacts, check_id: str, profile=STANDARD_50, seats=None) -> check.Verdict:
    return preflight(f, profile, seats or profile.max_seats).verdict(check_id)


# ----------------------------------------------------------------------------- profiles

def test_profiles_grow_in_order_and_only_eval_is_not_production():
    assert profiles.names() == ("eval", "standard-50", "standard-100", "standard-200")
    for smaller, bigger in zip(profiles.PROFILES, profiles.PROFILES[1:]):
        assert smaller.max_seats < bigger.max_seats and smaller.cores <= bigger.cores
        assert smaller.memory_gb <= bigger.memory_gb and smaller.disk_gb <= bigger.disk_gb
    assert [p.name for p in profiles.PROFILES if not p.production] == ["eval"]
    assert "NOT for production" in EVAL.summary


def test_standard_50_is_the_contract_in_the_units_hardware_is_sold_in():
    assert (STANDARD_50.max_seats, STANDARD_50.cores, STANDARD_50.memory_gb, STANDARD_50.disk_gb) == (50, 4, 32, 500)
    assert STANDARD_50.memory_bytes == 32 * 1024**3  # RAM: binary
    assert STANDARD_50.disk_bytes == 500 * 10**9  # disks: decimal


def test_unknown_profile_lists_the_profiles():
    with pytest.raises(SizingError, match=r"unknown profile 'huge'; expected one of: eval, standard-50, standard-100, standard-200"):
        profiles.get("huge")


@pytest.mark.parametrize("name, seats, message", [
    ("eval", 0, "expected 1 to 10 seats for profile eval, found 0"),
    ("eval", -3, "expected 1 to 10 seats for profile eval, found -3"),
    ("eval", 11, "expected 1 to 10 seats for profile eval, found 11; use --profile standard-50"),
    ("standard-50", 51, "found 51; use --profile standard-100"),
    ("standard-200", 201, "found 201; beyond 200 seats the appliance needs several hosts"),
])
def test_seats_outside_the_profile_name_the_limit(name, seats, message):
    with pytest.raises(SizingError, match=re.escape(message)):
        profiles.validate_seats(profiles.get(name), seats)


@pytest.mark.parametrize("name, seats", [("eval", 1), ("eval", 10), ("standard-50", 50), ("standard-200", 200)])
def test_seats_within_the_profile_pass(name, seats):
    assert profiles.validate_seats(profiles.get(name), seats) == seats


# ----------------------------------------------------------------------------- tolerance bands

@pytest.mark.parametrize("profile, found_gib, status", [
    ("standard-50", 32.0, "PASS"),
    ("standard-50", 31.3, "WARN"),  # a host sold as 32 GB
    ("standard-50", 30.4, "WARN"),  # the floor: 5 % below
    ("standard-50", 30.39, "FAIL"),
    ("standard-50", 28.0, "FAIL"),
    ("standard-50", 23.5, "FAIL"),  # the CI machine
    ("eval", 4.0, "PASS"),
    ("eval", 3.7, "WARN"),  # 512 MiB floor: small hosts lose proportionally more
    ("eval", 3.5, "WARN"),
    ("eval", 3.4, "FAIL"),
    ("standard-200", 125.0, "WARN"),
    ("standard-200", 121.0, "FAIL"),
])
def test_memory_bands(profile, found_gib, status):
    assert verdict(facts(memory_bytes=round(found_gib * GIB)), "memory", profiles.get(profile)).status == status


@pytest.mark.parametrize("found_bytes, status", [
    (500 * GB, "PASS"),
    (465 * GIB, "WARN"),  # "a 500 GB disk is 465 GiB"
    (491 * GB, "WARN"),  # ext4 on a 500 GB disk
    (475 * GB, "WARN"),
    (475 * GB - 1, "FAIL"),
    (270 * GB, "FAIL"),
])
def test_disk_total_bands(found_bytes, status):
    assert verdict(facts(disk_total_bytes=found_bytes), "disk-total").status == status


def test_tolerance_floors():
    assert TOLERANCE.memory_floor(32 * GIB) == round(30.4 * GIB)
    assert TOLERANCE.memory_floor(4 * GIB) == round(3.5 * GIB)
    assert TOLERANCE.disk_floor(500 * GB) == 475 * GB


def test_memory_warn_and_fail_say_what_to_do():
    warn = verdict(facts(memory_bytes=round(31.3 * GIB)), "memory")
    assert warn.remedy == ("expected 32 GiB, found 31.3 GiB, within the tolerance down to 30.4 GiB: "
                           "normal for a host sold as 32 GB, nothing to do")
    fail = verdict(facts(memory_bytes=round(28 * GIB)), "memory")
    assert fail.remedy == ("expected 32 GB (at least 30.4 GiB usable), found 28.0 GiB: give the VM 32 GB of memory "
                           "or use --profile eval (up to 10 seats)")
    tiny = verdict(facts(memory_bytes=round(3 * GIB)), "memory")
    assert tiny.remedy.endswith("found 3.0 GiB: give the VM 32 GB of memory")  # no smaller profile fits either


# ----------------------------------------------------------------------------- hardware checks

@pytest.mark.parametrize("affinity, quota, cores", [
    (4, None, 4), (8, None, 8), (8, 4.0, 4), (8, 3.5, 3), (2, 8.0, 2), (4, 0.5, 1), (1, None, 1),
])
def test_usable_cores_are_affinity_and_quota_rounded_down(affinity, quota, cores):
    assert facts(cpu_affinity=affinity, cpu_quota=quota).cores == cores


def test_cores_fail_suggests_vcpus_and_the_profile_that_fits():
    v = verdict(facts(cpu_affinity=2, memory_bytes=round(23.5 * GIB)), "cores")
    assert v.status == "FAIL"
    assert v.remedy == "expected 4 cores, found 2: give the VM 4 vCPUs or use --profile eval (up to 10 seats)"
    quota = verdict(facts(cpu_affinity=8, cpu_quota=3.5), "cores")
    assert quota.status == "FAIL" and quota.found == "3 (cgroup quota 3.5 of 8)"
    assert verdict(facts(cpu_affinity=1, memory_bytes=round(23.5 * GIB)), "cores").remedy.endswith("4 vCPUs")


@pytest.mark.parametrize("free_gb, status", [(450, "PASS"), (50, "PASS"), (49.9, "WARN"), (40, "WARN"), (39.9, "FAIL"), (10, "FAIL")])
def test_disk_free_against_the_year_one_data_budget(free_gb, status):
    # 50 seats: database 5 + WAL 4.5 + attachments 2.5 + backups 28 = 40 GB of data; comfortable at 40/0.8 = 50 GB.
    v = verdict(facts(disk_free_bytes=round(free_gb * GB)), "disk-free")
    assert v.required == "40.0 GB for year one" and v.status == status


@pytest.mark.parametrize("os_id, version, status", [
    ("debian", "12", "PASS"), ("debian", "13", "PASS"), ("debian", "12.5", "PASS"),
    ("debian", "11", "FAIL"), ("debian", None, "WARN"), ("ubuntu", "24.04", "FAIL"), ("unknown", None, "FAIL"),
])
def test_os(os_id, version, status):
    assert verdict(facts(os_id=os_id, os_version=version, os_name=f"{os_id} {version}"), "os").status == status


@pytest.mark.parametrize("arch, status", [("x86_64", "PASS"), ("aarch64", "PASS"), ("armv7l", "FAIL"), ("riscv64", "FAIL")])
def test_arch(arch, status):
    assert verdict(facts(arch=arch), "arch").status == status


@pytest.mark.parametrize("machine, arch", [("x86_64", "x86_64"), ("AMD64", "x86_64"), ("arm64", "aarch64"), ("aarch64", "aarch64")])
def test_normalise_arch(machine, arch):
    assert host.normalise_arch(machine) == arch


def test_root_and_hostname():
    assert verdict(facts(is_root=False), "root").remedy == "expected to run as root, found another user: run it again with sudo"
    v = verdict(facts(hostname="crm01", hostname_resolves=False, hostname_addresses=()), "hostname")
    assert v.status == "FAIL" and "add '127.0.1.1 crm01' to /etc/hosts" in v.remedy


@pytest.mark.parametrize("synced, profile, status", [
    (True, "standard-50", "PASS"),
    (False, "standard-50", "FAIL"),  # production: logs and the SLA ledger are evidence
    (False, "eval", "WARN"),
    (None, "standard-50", "WARN"),  # cannot be told: never a FAIL
    (None, "eval", "WARN"),
])
def test_clock(synced, profile, status):
    assert verdict(facts(clock_synchronised=synced), "clock", profiles.get(profile)).status == status


# ----------------------------------------------------------------------------- the port rule

@pytest.mark.parametrize("port, fact, marker, status", [
    (80, PortFact(80, "free"), False, "PASS"),
    (5432, PortFact(5432, "held", "postgres", 30130), True, "PASS"),  # the appliance's cluster
    (5432, PortFact(5432, "held", "postgres", 30130), False, "WARN"),  # Debian's, which install adopts
    (5432, PortFact(5432, "held", "nginx", 7), True, "FAIL"),  # wrong process for the port
    (80, PortFact(80, "held", "nginx", 7), True, "PASS"),
    (443, PortFact(443, "held", "nginx", 7), True, "PASS"),
    (80, PortFact(80, "held", "apache2", 9), True, "FAIL"),
    (80, PortFact(80, "held"), True, "FAIL"),  # held, owner not visible: cannot be proven ours
    (443, PortFact(443, "unknown"), False, "WARN"),
])
def test_port_rule(port, fact, marker, status):
    ports = tuple(fact if p.port == port else p for p in GOOD.ports)
    v = verdict(facts(ports=ports, appliance_marker=marker), f"port-{port}")
    assert v.status == status
    assert check.held_by_appliance(facts(ports=ports, appliance_marker=marker), port) == (status == "PASS" and fact.state == "held")


def test_a_foreign_listener_is_named_with_the_fix():
    ports = (PortFact(80, "held", "apache2", 912), PortFact(443, "free"), PortFact(5432, "free"))
    v = verdict(facts(ports=ports), "port-80")
    assert v.found == "held by apache2 (pid 912)"
    assert v.remedy == ("expected port 80 free, found it held by apache2 (pid 912) (no appliance installed here): "
                        "stop and disable apache2 (e.g. systemctl disable --now apache2) or move it to another port")


# ----------------------------------------------------------------------------- preflight

def test_a_good_host_passes_every_check_in_order():
    result = preflight(GOOD, STANDARD_50, 50)
    assert [v.check for v in result.verdicts] == list(CHECK_IDS)
    assert {v.status for v in result.verdicts} == {"PASS"} and result.ok
    assert all(v.remedy == "" for v in result.verdicts)


def test_the_ci_machine_fails_standard_50_on_cores_and_memory_and_passes_eval():
    ci = facts(cpu_affinity=2, memory_bytes=25_276_510_208, disk_total_bytes=270 * GB, disk_free_bytes=84 * GB,
               clock_synchronised=False, appliance_marker=True,
               ports=(PortFact(80, "free"), PortFact(443, "free"), PortFact(5432, "held", "postgres", 30130)))
    standard = preflight(ci, STANDARD_50, 50)
    assert [v.check for v in standard.failed] == ["cores", "memory", "disk-total", "clock"]
    assert not standard.ok
    evaluation = preflight(ci, EVAL, 10)
    assert evaluation.ok and [v.check for v in evaluation.verdicts if v.status != "PASS"] == ["clock"]


def test_accepted_risks_stay_listed_and_stop_blocking():
    weak = facts(cpu_affinity=2, memory_bytes=round(28 * GIB))
    result = preflight(weak, STANDARD_50, 50, accepted=["cores"])
    assert result.verdict("cores").status == "ACCEPTED" and result.verdict("memory").status == "FAIL"
    assert not result.ok and result.accepted == ("cores",)
    both = preflight(weak, STANDARD_50, 50, accepted=["cores", "memory", "cores"])
    assert both.ok and both.accepted == ("cores", "memory")
    assert [v.status for v in both.verdicts if v.check in ("cores", "memory")] == ["ACCEPTED", "ACCEPTED"]
    assert preflight(GOOD, STANDARD_50, 50, accepted=["os"]).verdict("os").status == "PASS"  # nothing to accept


def test_an_unknown_accepted_check_is_an_error():
    with pytest.raises(SizingError, match="--accept-risk cpu: unknown check; expected one of: seats, cores, memory"):
        preflight(GOOD, STANDARD_50, 50, accepted=["cpu"])


def test_preflight_refuses_seats_beyond_the_profile():
    with pytest.raises(SizingError, match="expected 1 to 10 seats for profile eval, found 11"):
        preflight(GOOD, EVAL, 11)


# ----------------------------------------------------------------------------- plan formulas

@pytest.mark.parametrize("cores, memory_gib, workers, threads, max_conn, shared, cache, work, maint", [
    # 50 seats; memory for PostgreSQL = memory - 512 MiB - workers x 150 MiB
    (2, 4, 5, 8, 54, 708, 2125, 4, 177),  # db 2834 MiB; work_mem 4.37 -> 4
    (4, 32, 9, 6, 68, 7726, 23179, 37, 1931),  # standard-50: db 30906 MiB
    (8, 4, 6, 8, 62, 671, 2013, 4, 167),  # memory caps workers at floor(1024 / 150) = 6
    (16, 64, 33, 2, 80, 15018, 45055, 62, 2048),  # maintenance_work_mem capped at 2 GB
])
def test_plan_formulas_by_hand(cores, memory_gib, workers, threads, max_conn, shared, cache, work, maint):
    p = make_plan(50, Resources(cores, memory_gib * GIB, 500 * GB))
    assert (p.gunicorn_workers, p.gunicorn_threads, p.pg_max_connections) == (workers, threads, max_conn)
    assert (p.pg_shared_buffers_mib, p.pg_effective_cache_size_mib, p.pg_work_mem_mib,
            p.pg_maintenance_work_mem_mib) == (shared, cache, work, maint)
    assert p.nginx_worker_processes == cores and p.db_pool_size == threads


@pytest.mark.parametrize("cores", [2, 4, 8, 16])
@pytest.mark.parametrize("memory_gib", [4, 32, 64])
@pytest.mark.parametrize("seats", [1, 10, 50, 200])
def test_plan_invariants(cores, memory_gib, seats):
    k = CONSTANTS
    p = make_plan(seats, Resources(cores, memory_gib * GIB, 2000 * GB))
    assert 1 <= p.gunicorn_workers <= 2 * cores + 1
    assert p.gunicorn_workers * k.gunicorn_worker_mib <= memory_gib * 1024 * k.app_memory_share
    assert k.gunicorn_threads_min <= p.gunicorn_threads <= k.gunicorn_threads_max
    assert p.pg_max_connections >= p.gunicorn_workers * p.gunicorn_threads + k.scheduler_connections + k.connection_headroom
    database = memory_gib * 1024 - k.os_reserve_mib - p.gunicorn_workers * k.gunicorn_worker_mib
    assert p.pg_shared_buffers_mib == math.floor(database / 4)
    assert p.pg_effective_cache_size_mib == math.floor(database * 3 / 4)
    assert p.pg_shared_buffers_mib + p.pg_effective_cache_size_mib <= database
    assert p.pg_work_mem_mib >= 4 and p.pg_maintenance_work_mem_mib <= 2048
    assert (p.request_slots >= seats) == (not any("request slot" in w for w in p.warnings))
    conf = p.postgresql_conf()
    assert conf["shared_buffers"] == f"{p.pg_shared_buffers_mib}MB" and conf["max_connections"] == str(p.pg_max_connections)


def test_a_host_too_small_for_the_services_is_an_error():
    with pytest.raises(SizingError, match=r"expected at least 0\.9 GiB of memory for 1 web workers and PostgreSQL, found 0\.8 GiB"):
        make_plan(10, Resources(2, 768 * MIB, 20 * GB))
    assert make_plan(10, Resources(2, 1 * GIB, 20 * GB)).gunicorn_workers == 1


def test_too_few_cores_for_the_seats_is_flagged():
    p = make_plan(50, Resources(2, 24 * GIB, 270 * GB))
    assert p.request_slots == 40
    assert p.warnings == ("expected a request slot per seat, found 40 for 50 seats: give the host more cores or memory",)


@pytest.mark.parametrize("profile", profiles.PROFILES, ids=profiles.names())
def test_every_profile_is_supported_by_the_numbers(profile):
    """On its own nominal hardware at its maximum seats: a slot per seat, the disk fits, no warnings."""
    p = make_plan(profile.max_seats, Resources.of_profile(profile))
    assert p.request_slots >= profile.max_seats
    assert p.disk.fits and p.disk.years_that_fit >= 1
    assert p.warnings == ()
    # and the preflight floor of the profile (what a host sold at that size reports) still plans
    make_plan(profile.max_seats, Resources(profile.cores, TOLERANCE.memory_floor(profile.memory_bytes), profile.disk_bytes))


def test_constants_agree_with_the_config_schema():
    assert CONSTANTS.attachments_mb_per_seat == config.AttachmentsSection().per_seat_mb
    assert CONSTANTS.gunicorn_threads_max == config.schema_keys()["web"]["threads"].default


# ----------------------------------------------------------------------------- disk budget

def test_disk_budget_for_50_seats():
    b = disk_budget(50, 500 * GB)
    assert b.database_bytes == 5 * GB  # 50 x 100 MB x 1 year
    assert b.wal_bytes == 1 * GB + 3_500_000_000  # pg_wal + 7 days x 50 x 10 MB
    assert b.attachments_bytes == 2_500_000_000  # 50 x 50 MB
    assert b.backups_bytes == 28 * GB  # 7 x (5 GB x 0.3 + 2.5 GB)
    assert b.system_bytes == 4 * GB
    assert (b.data_bytes, b.total_bytes) == (40 * GB, 44 * GB)
    assert b.usable_bytes == 400 * GB and b.fits
    assert b.years_that_fit == pytest.approx(23.97, abs=0.01)


def test_years_that_fit_is_where_the_budget_stops_fitting():
    b = disk_budget(50, 500 * GB)
    fits = dataclasses.replace(CONSTANTS, budget_years=math.floor(b.years_that_fit))
    overflows = dataclasses.replace(CONSTANTS, budget_years=math.ceil(b.years_that_fit))
    assert disk_budget(50, 500 * GB, fits).fits and not disk_budget(50, 500 * GB, overflows).fits


@pytest.mark.parametrize("seats, disk_gb, fits", [(10, 20, True), (10, 15, False), (50, 55, True), (50, 54, False),
                                                   (200, 2000, True), (200, 150, False)])
def test_disk_budget_must_fit_80_percent_of_the_disk(seats, disk_gb, fits):
    assert disk_budget(seats, disk_gb * GB).fits is fits
    p = make_plan(seats, Resources(16, 128 * GIB, disk_gb * GB))
    assert any("disk budget" in w for w in p.warnings) is (not fits)


# ----------------------------------------------------------------------------- docs/sizing.md

def _doc_table(marker: str) -> list[list[str]]:
    """The body rows of the markdown table right after ``<!-- {marker}``."""
    lines = DOCS.read_text(encoding="utf-8").splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"<!-- {marker}"))
    rows = []
    for line in lines[start + 1:]:
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in line.strip().strip("|").split("|")])
    assert len(rows) > 2, f"no table after <!-- {marker} in {DOCS}"
    return rows[2:]  # header and separator


def test_docs_constants_table_is_the_code_table():
    documented = [(name.strip("`"), value, unit, source) for name, value, unit, source in _doc_table("constants table")]
    assert documented == [(name, str(value), unit, source) for name, value, unit, source in plan.constants_table()]


def test_docs_profiles_table_is_the_code_table():
    assert _doc_table("profiles table") == [
        [f"`{p.name}`", str(p.max_seats), str(p.cores), f"{p.memory_gb} GB", f"{p.disk_gb} GB",
         "yes" if p.production else "no"] for p in profiles.PROFILES]


def test_docs_tolerance_table_is_the_code_tolerance():
    assert _doc_table("tolerance table") == [
        ["memory", "≥ nominal GiB", f"≥ nominal − max({TOLERANCE.memory_share * 100:g} %, "
                                    f"{TOLERANCE.memory_min_bytes // MIB} MiB)", "below"],
        ["disk-total", "≥ nominal GB", f"≥ nominal − {TOLERANCE.disk_share * 100:g} %", "below"],
    ]


def test_docs_profile_plans_are_what_the_formulas_give():
    expected = []
    for profile in profiles.PROFILES:
        p = make_plan(profile.max_seats, Resources.of_profile(profile))
        conf = p.postgresql_conf()
        expected.append([f"`{profile.name}`", str(p.seats), f"{p.gunicorn_workers} x {p.gunicorn_threads}",
                         conf["max_connections"], conf["shared_buffers"], conf["effective_cache_size"],
                         conf["work_mem"], conf["maintenance_work_mem"], str(p.nginx_worker_processes),
                         f"{p.disk.total_bytes / GB:.1f} GB", str(int(p.disk.years_that_fit))])
    assert _doc_table("profile plans table") == expected


def test_docs_name_every_check():
    text = DOCS.read_text(encoding="utf-8")
    assert [c for c in CHECK_IDS if f"`{c}`" not in text] == []


# ----------------------------------------------------------------------------- host facts (the real host)

def test_gather_walks_up_to_an_existing_directory(tmp_path):
    f = host.gather(tmp_path / "not" / "yet", ports=(), marker=tmp_path / "appliance.toml")
    assert f.data_dir == tmp_path / "not" / "yet"
    assert f.disk_total_bytes >= f.disk_free_bytes > 0 and f.disk_mount.is_dir()
    assert f.memory_bytes > 0 and f.cores >= 1 and f.arch == host.normalise_arch(os.uname().machine)
    assert f.is_root == (os.geteuid() == 0) and f.hostname == socket.gethostname()
    assert f.appliance_marker is False and f.ports == ()
    assert f.clock_source in ("adjtimex", "timedatectl", "unknown")
    assert (f.clock_synchronised is None) == (f.clock_source == "unknown")
    (tmp_path / "appliance.toml").write_text("")
    assert host.gather(tmp_path, ports=(), marker=tmp_path / "appliance.toml").appliance_marker is True


def test_gather_names_the_listener_of_a_held_port_and_sees_a_free_one():
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    held = listener.getsockname()[1]
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    free = probe.getsockname()[1]
    probe.close()
    try:
        by_port = {p.port: p for p in host.gather("/", ports=(held, free)).ports}
    finally:
        listener.close()
    assert by_port[held].state == "held"
    if os.geteuid() == 0 or by_port[held].pid is not None:  # naming others' processes needs root; ours never
        assert by_port[held].pid == os.getpid()
    assert by_port[free].state == "free"


def _fake_cgroup(tmp_path: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


def test_cgroup_v2_takes_the_tightest_limit_on_the_path(tmp_path):
    _fake_cgroup(tmp_path, {
        "cg/cgroup.controllers": "cpuset cpu io memory pids\n",
        "cg/cpu.max": "max 100000\n",
        "cg/a/cpu.max": "150000 100000\n",
        "cg/a/b/cpu.max": "max 100000\n",
        "cg/a/memory.max": "max\n",
        "cg/a/b/memory.max": "2147483648\n",
    })
    mountinfo = f"30 23 0:26 / {tmp_path}/cg rw,nosuid - cgroup2 cgroup2 rw\n"
    dirs = host.cgroup_dirs("cpu", "0::/a/b\n", mountinfo)
    assert dirs == [tmp_path / "cg/a/b", tmp_path / "cg/a", tmp_path / "cg"]
    assert host.cgroup_cpu_quota(dirs) == 1.5
    assert host.cgroup_memory_limit(host.cgroup_dirs("memory", "0::/a/b\n", mountinfo)) == 2 * GIB
    assert host.cgroup_cpu_quota(host.cgroup_dirs("cpu", "0::/\n", mountinfo)) is None


def test_cgroup_v1_cfs_quota_and_a_container_view(tmp_path):
    _fake_cgroup(tmp_path, {
        "cpu/cpu.cfs_quota_us": "-1\n", "cpu/cpu.cfs_period_us": "100000\n",
        "cpu/x/cpu.cfs_quota_us": "200000\n", "cpu/x/cpu.cfs_period_us": "100000\n",
        "memory/memory.limit_in_bytes": "9223372036854771712\n",
    })
    mountinfo = (f"32 31 0:29 / {tmp_path}/cpu rw - cgroup cgroup rw,cpu,cpuacct\n"
                 f"35 31 0:32 / {tmp_path}/memory rw - cgroup cgroup rw,memory\n")
    assert host.cgroup_cpu_quota(host.cgroup_dirs("cpu", "2:cpu,cpuacct:/x\n4:memory:/\n", mountinfo)) == 2.0
    assert host.cgroup_memory_limit(host.cgroup_dirs("memory", "4:memory:/\n", mountinfo)) == 9223372036854771712
    # A container without its own cgroup namespace: the mount shows only its own subtree.
    container = f"32 31 0:29 /docker/abc {tmp_path}/cpu/x rw - cgroup cgroup rw,cpu\n"
    assert host.cgroup_dirs("cpu", "2:cpu:/docker/abc\n", container) == [tmp_path / "cpu/x"]
