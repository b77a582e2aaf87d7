"""Preflight: host facts x profile -> one verdict per check, each with a remedy a person can act on.

Pure functions over ``HostFacts`` (see ``sizing.host``): the same facts always
give the same verdicts, so tests fabricate facts for exact outcomes.

Statuses: PASS; WARN (works, but look: inside a tolerance band, or a fact that
cannot be told); FAIL (install would break or under-serve); ACCEPTED (a FAIL the
operator accepted with ``--accept-risk CHECK``: still listed, no longer
blocking). Every non-PASS verdict carries one line in the form
"expected X, found Y: do Z".
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable, Iterable, Literal

from appliance.errors import SizingError
from sizing.host import HostFacts
from sizing.plan import CONSTANTS, disk_budget
from sizing.profiles import GB, GIB, TOLERANCE, Profile, smaller_fitting, validate_seats

Status = Literal["PASS", "WARN", "FAIL", "ACCEPTED"]

SUPPORTED_ARCHES = ("x86_64", "aarch64")
MIN_DEBIAN = 12

APPLIANCE_LISTENERS: dict[int, tuple[str, ...]] = {
    80: ("nginx",),
    443: ("nginx",),
    5432: ("postgres", "postmaster"),
}
"""Which process names may hold each port when the appliance is already installed.

The port rule: a held port counts as "held by the appliance" (PASS, so that
preflight can be re-run on an installed host) only when BOTH the listener's
process name is the one the appliance runs there AND the appliance marker
``/etc/crm-appliance/appliance.toml`` exists. An nginx on a host the appliance
never touched is somebody else's and FAILs. A PostgreSQL on 5432 there only WARNs:
it is Debian's own cluster (the postgresql package starts it), which install adopts.
"""

POSTGRES_PORT = 5432

CHECK_IDS: tuple[str, ...] = (
    "seats", "cores", "memory", "disk-total", "disk-free", "os", "arch", "root",
    *(f"port-{p}" for p in APPLIANCE_LISTENERS), "hostname", "clock",
)


@dataclass(frozen=True)
class Verdict:
    """One line of the preflight table."""

    check: str
    required: str
    found: str
    status: Status
    remedy: str = ""  # empty for PASS


@dataclass(frozen=True)
class PreflightResult:
    """Every verdict for one profile and seat count, after accepted risks are applied."""

    profile: str
    seats: int
    verdicts: tuple[Verdict, ...]
    accepted: tuple[str, ...]

    @property
    def ok(self) -> bool:
        """True when no FAIL is left (ACCEPTED and WARN do not block)."""
        return not self.failed

    @property
    def failed(self) -> tuple[Verdict, ...]:
        return tuple(v for v in self.verdicts if v.status == "FAIL")

    def verdict(self, check: str) -> Verdict:
        return next(v for v in self.verdicts if v.check == check)


def preflight(facts: HostFacts, profile: Profile, seats: int, accepted: Iterable[str] = ()) -> PreflightResult:
    """Check ``facts`` against ``profile`` for ``seats``.

    ``accepted`` names checks whose FAIL the operator takes responsibility for;
    they become ACCEPTED (still shown). An unknown check id is a SizingError,
    because a typo would otherwise silently accept nothing.
    """
    validate_seats(profile, seats)
    accepted = tuple(dict.fromkeys(accepted))
    unknown = [a for a in accepted if a not in CHECK_IDS]
    if unknown:
        raise SizingError(f"--accept-risk {unknown[0]}: unknown check; expected one of: {', '.join(CHECK_IDS)}")
    verdicts = [check(facts, profile, seats) for check in _CHECKS]
    verdicts = [replace(v, status="ACCEPTED") if v.status == "FAIL" and v.check in accepted else v
                for v in verdicts]
    return PreflightResult(profile.name, seats, tuple(verdicts), accepted)


# ----------------------------------------------------------------------------- formatting

def _gib(n: int) -> str:
    return f"{n / GIB:.1f} GiB"


def _gb(n: int) -> str:
    return f"{n / GB:.1f} GB"


def _or_profile(profile: Profile, facts: HostFacts) -> str:
    smaller = smaller_fitting(profile, facts.cores, facts.memory_bytes)
    return f" or use --profile {smaller.name} (up to {smaller.max_seats} seats)" if smaller else ""


# ----------------------------------------------------------------------------- checks

def check_seats(facts: HostFacts, profile: Profile, seats: int) -> Verdict:
    """Shown for the record: ``preflight`` refuses seats beyond the profile before this runs."""
    return Verdict("seats", f"at most {profile.max_seats}", str(seats), "PASS")


def check_cores(facts: HostFacts, profile: Profile, seats: int) -> Verdict:
    found = str(facts.cores)
    if facts.cpu_quota is not None and facts.cpu_quota < facts.cpu_affinity:
        found += f" (cgroup quota {facts.cpu_quota:g} of {facts.cpu_affinity})"
    required = f"{profile.cores} cores"
    if facts.cores >= profile.cores:
        return Verdict("cores", required, found, "PASS")
    return Verdict("cores", required, found, "FAIL",
                   f"expected {profile.cores} cores, found {facts.cores}: "
                   f"give the VM {profile.cores} vCPUs{_or_profile(profile, facts)}")


def check_memory(facts: HostFacts, profile: Profile, seats: int) -> Verdict:
    nominal, floor = profile.memory_bytes, TOLERANCE.memory_floor(profile.memory_bytes)
    required, found = f"{profile.memory_gb} GB", _gib(facts.memory_bytes)
    if facts.memory_bytes >= nominal:
        return Verdict("memory", required, found, "PASS")
    if facts.memory_bytes >= floor:
        return Verdict("memory", required, found, "WARN",
                       f"expected {profile.memory_gb} GiB, found {found}, within the tolerance down to "
                       f"{_gib(floor)}: normal for a host sold as {profile.memory_gb} GB, nothing to do")
    return Verdict("memory", required, found, "FAIL",
                   f"expected {profile.memory_gb} GB (at least {_gib(floor)} usable), found {found}: "
                   f"give the VM {profile.memory_gb} GB of memory{_or_profile(profile, facts)}")


def check_disk_total(facts: HostFacts, profile: Profile, seats: int) -> Verdict:
    nominal, floor = profile.disk_bytes, TOLERANCE.disk_floor(profile.disk_bytes)
    required = f"{profile.disk_gb} GB"
    found = f"{_gb(facts.disk_total_bytes)} at {facts.disk_mount}"
    if facts.disk_total_bytes >= nominal:
        return Verdict("disk-total", required, found, "PASS")
    if facts.disk_total_bytes >= floor:
        return Verdict("disk-total", required, found, "WARN",
                       f"expected {profile.disk_gb} GB, found {_gb(facts.disk_total_bytes)}, within the tolerance "
                       f"down to {_gb(floor)}: normal for a {profile.disk_gb} GB disk after filesystem overhead")
    return Verdict("disk-total", required, found, "FAIL",
                   f"expected a {profile.disk_gb} GB disk, found {_gb(facts.disk_total_bytes)} at {facts.disk_mount}: "
                   f"grow that filesystem to {profile.disk_gb} GB or point --data-dir at a larger disk")


def check_disk_free(facts: HostFacts, profile: Profile, seats: int) -> Verdict:
    """Free space against the year-one data budget (``sizing.plan.disk_budget``), not the nominal disk."""
    budget = disk_budget(seats, facts.disk_total_bytes)
    need = budget.data_bytes
    comfortable = round(need / (1 - CONSTANTS.disk_headroom))
    required = f"{_gb(need)} for year one"
    found = f"{_gb(facts.disk_free_bytes)} free at {facts.disk_mount}"
    if facts.disk_free_bytes >= comfortable:
        return Verdict("disk-free", required, found, "PASS")
    if facts.disk_free_bytes >= need:
        return Verdict("disk-free", required, found, "WARN",
                       f"expected {_gb(comfortable)} free (the year-one budget plus headroom), found "
                       f"{_gb(facts.disk_free_bytes)}: free space on {facts.disk_mount} soon")
    return Verdict("disk-free", required, found, "FAIL",
                   f"expected {_gb(need)} free for {seats} seats' first year, found {_gb(facts.disk_free_bytes)}: "
                   f"free space on {facts.disk_mount} or point --data-dir at a larger disk")


def check_os(facts: HostFacts, profile: Profile, seats: int) -> Verdict:
    required = f"Debian {MIN_DEBIAN} or newer"
    found = facts.os_name
    if facts.os_id != "debian":
        return Verdict("os", required, found, "FAIL",
                       f"expected Debian {MIN_DEBIAN} or newer, found {found}: install on Debian {MIN_DEBIAN} (bookworm) or newer")
    if facts.os_version is None:
        return Verdict("os", required, found, "WARN",
                       f"expected a Debian release, found {found} without a version (testing or unstable): "
                       f"use a stable release, Debian {MIN_DEBIAN} or newer")
    try:
        major = int(facts.os_version.split(".")[0])
    except ValueError:
        major = -1
    if major >= MIN_DEBIAN:
        return Verdict("os", required, found, "PASS")
    return Verdict("os", required, found, "FAIL",
                   f"expected Debian {MIN_DEBIAN} or newer, found Debian {facts.os_version}: upgrade to Debian {MIN_DEBIAN} (bookworm)")


def check_arch(facts: HostFacts, profile: Profile, seats: int) -> Verdict:
    required = " or ".join(SUPPORTED_ARCHES)
    if facts.arch in SUPPORTED_ARCHES:
        return Verdict("arch", required, facts.arch, "PASS")
    return Verdict("arch", required, facts.arch, "FAIL",
                   f"expected {required}, found {facts.arch}: use an x86_64 or aarch64 host")


def check_root(facts: HostFacts, profile: Profile, seats: int) -> Verdict:
    if facts.is_root:
        return Verdict("root", "root", "root", "PASS")
    return Verdict("root", "root", "not root", "FAIL",
                   "expected to run as root, found another user: run it again with sudo")


def held_by_appliance(facts: HostFacts, port: int) -> bool:
    """The port rule (see ``APPLIANCE_LISTENERS``): the right process name AND the appliance marker."""
    fact = facts.port(port)
    return (fact.state == "held" and facts.appliance_marker
            and fact.process in APPLIANCE_LISTENERS.get(port, ()))


def _check_port(port: int) -> Callable[[HostFacts, Profile, int], Verdict]:
    def check(facts: HostFacts, profile: Profile, seats: int) -> Verdict:
        fact, check_id = facts.port(port), f"port-{port}"
        required = "free or the appliance's"
        holder = f"{fact.process} (pid {fact.pid})" if fact.process else "a process this user cannot see"
        if fact.state == "free":
            return Verdict(check_id, required, "free", "PASS")
        if held_by_appliance(facts, port):
            return Verdict(check_id, required, f"{holder}, the appliance's", "PASS")
        if port == POSTGRES_PORT and fact.process in APPLIANCE_LISTENERS[port]:
            # Debian's postgresql package starts its 15/main cluster, which install adopts.
            return Verdict(check_id, required, f"{holder}, Debian's PostgreSQL", "WARN",
                           "install adopts this PostgreSQL cluster and adds the crm role and database to it; "
                           "if it holds other data, move that data to another host first")
        if fact.state == "unknown":
            return Verdict(check_id, required, "unknown", "WARN",
                           f"expected to tell whether port {port} is free, could not: run preflight as root")
        if not fact.process:
            return Verdict(check_id, required, f"held by {holder}", "FAIL",
                           f"expected port {port} free, found it held by {holder}: "
                           f"run preflight as root to name it, then stop it")
        why = "" if facts.appliance_marker else " (no appliance installed here)"
        return Verdict(check_id, required, f"held by {holder}", "FAIL",
                       f"expected port {port} free, found it held by {holder}{why}: "
                       f"stop and disable {fact.process} (e.g. systemctl disable --now {fact.process}) or move it to another port")

    check.__name__ = f"check_port_{port}"
    return check


def check_hostname(facts: HostFacts, profile: Profile, seats: int) -> Verdict:
    if facts.hostname_resolves:
        return Verdict("hostname", "resolves", f"{facts.hostname} -> {', '.join(facts.hostname_addresses)}", "PASS")
    return Verdict("hostname", "resolves", f"{facts.hostname} does not resolve", "FAIL",
                   f"expected the host name {facts.hostname} to resolve, found no address: "
                   f"add '127.0.1.1 {facts.hostname}' to /etc/hosts or fix DNS")


def check_clock(facts: HostFacts, profile: Profile, seats: int) -> Verdict:
    """A production host must keep time: audit and login logs (R-7) and the SLA ledger (R-22) are evidence.

    Not synchronised FAILs on production profiles and WARNs on ``eval``; a
    state that cannot be told only WARNs.
    """
    required = "NTP-synchronised"
    if facts.clock_synchronised:
        return Verdict("clock", required, f"synchronised ({facts.clock_source})", "PASS")
    if facts.clock_synchronised is None:
        return Verdict("clock", required, "unknown", "WARN",
                       "expected to tell whether the clock is synchronised, could not: "
                       "make sure chrony or systemd-timesyncd runs")
    return Verdict("clock", required, f"not synchronised ({facts.clock_source})",
                   "FAIL" if profile.production else "WARN",
                   "expected an NTP-synchronised clock, found none: apt-get install chrony "
                   "(in a container, synchronise the host's clock)")


_CHECKS: tuple[Callable[[HostFacts, Profile, int], Verdict], ...] = (
    check_seats, check_cores, check_memory, check_disk_total, check_disk_free, check_os, check_arch,
    check_root, *(_check_port(p) for p in APPLIANCE_LISTENERS), check_hostname, check_clock,
)
