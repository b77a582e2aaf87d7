"""Facts about the host, read once: the only module in ``sizing/`` that touches the machine.

Everything here answers "what is this machine?" and nothing judges it; the
judging is pure (``sizing.check``, ``sizing.plan``) and works on the frozen
``HostFacts`` this module returns, so tests build facts by hand instead of
needing a 32 GB machine.

Where a fact cannot be told (no privilege, no clock interface, a listener
owned by another user) the fact says so (``None`` / ``"unknown"``) rather than
guessing, and the checks never turn that into a silent PASS.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import math
import os
import platform
import shlex
import shutil
import socket
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import psutil

APPLIANCE_MARKER = Path("/etc/crm-appliance/appliance.toml")
"""Written by the installer (and quickstart); its presence means "the appliance lives here"."""

DEFAULT_PORTS = (80, 443, 5432)
"""nginx (HTTP, HTTPS) and the appliance's PostgreSQL cluster."""

PortState = Literal["free", "held", "unknown"]


@dataclass(frozen=True)
class PortFact:
    """Who, if anyone, listens on one TCP port (any local address)."""

    port: int
    state: PortState
    process: str | None = None  # the listener's process name, when it can be told
    pid: int | None = None


@dataclass(frozen=True)
class HostFacts:
    """Everything preflight and the plan need to know about a host, as plain data."""

    hostname: str
    memory_bytes: int  # usable: physical memory, or the cgroup memory limit if lower
    cpu_affinity: int  # CPUs this process may be scheduled on
    cpu_quota: float | None  # cgroup CPU quota in cores (quota / period); None = no quota
    data_dir: Path  # the directory asked about
    disk_mount: Path  # mount point of the filesystem that holds (or will hold) data_dir
    disk_total_bytes: int
    disk_free_bytes: int  # available to unprivileged users (statvfs f_bavail)
    os_id: str  # /etc/os-release ID, e.g. "debian"; "unknown" without the file
    os_version: str | None  # VERSION_ID, e.g. "12"; None on Debian testing/sid
    os_name: str  # PRETTY_NAME, for people
    arch: str  # normalised machine: x86_64, aarch64, ...
    is_root: bool
    hostname_resolves: bool
    hostname_addresses: tuple[str, ...]
    clock_synchronised: bool | None  # None when it cannot be told
    clock_source: str  # how the clock state was read: adjtimex, timedatectl, or unknown
    ports: tuple[PortFact, ...]
    appliance_marker: bool  # APPLIANCE_MARKER exists

    @property
    def cores(self) -> int:
        """Whole cores this process can use: the smaller of affinity and quota.

        A fractional quota rounds down (a 3.5-core quota does not meet a 4-core
        requirement), but never below one core.
        """
        cores = self.cpu_affinity
        if self.cpu_quota is not None:
            cores = min(cores, max(1, math.floor(self.cpu_quota)))
        return max(1, cores)

    def port(self, number: int) -> PortFact:
        """The fact for one port; "unknown" if it was not probed."""
        for fact in self.ports:
            if fact.port == number:
                return fact
        return PortFact(number, "unknown")


def gather(data_dir: str | os.PathLike, ports: tuple[int, ...] = DEFAULT_PORTS,
           marker: Path = APPLIANCE_MARKER) -> HostFacts:
    """Read every fact about this host (about 0.1 s; resolving the host name can take as long as DNS does)."""
    data_dir = Path(data_dir)
    probe = _existing_ancestor(data_dir)
    usage = shutil.disk_usage(probe)
    os_release = _os_release()
    hostname = socket.gethostname()
    resolves, addresses = _resolve(hostname)
    synced, clock_source = _clock_synchronised()
    physical = psutil.virtual_memory().total
    memberships, mounts = _read("/proc/self/cgroup"), _read("/proc/self/mountinfo")
    memory_limit = cgroup_memory_limit(cgroup_dirs("memory", memberships, mounts))
    return HostFacts(
        hostname=hostname,
        memory_bytes=min(physical, memory_limit) if memory_limit else physical,
        cpu_affinity=_affinity(),
        cpu_quota=cgroup_cpu_quota(cgroup_dirs("cpu", memberships, mounts)),
        data_dir=data_dir,
        disk_mount=_mount_point(probe),
        disk_total_bytes=usage.total,
        disk_free_bytes=usage.free,
        os_id=os_release.get("ID", "unknown"),
        os_version=os_release.get("VERSION_ID"),
        os_name=os_release.get("PRETTY_NAME", platform.platform()),
        arch=normalise_arch(platform.machine()),
        is_root=os.geteuid() == 0,
        hostname_resolves=resolves,
        hostname_addresses=addresses,
        clock_synchronised=synced,
        clock_source=clock_source,
        ports=tuple(_port_fact(p) for p in ports),
        appliance_marker=marker.exists(),
    )


def normalise_arch(machine: str) -> str:
    """One name per architecture: Debian says amd64/arm64 where the kernel says x86_64/aarch64."""
    machine = machine.lower()
    return {"amd64": "x86_64", "arm64": "aarch64"}.get(machine, machine)


# ----------------------------------------------------------------------------- disk

def _existing_ancestor(path: Path) -> Path:
    """The path itself or its nearest existing parent: before install the data dir does not exist yet."""
    path = path.absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _mount_point(path: Path) -> Path:
    path = path.resolve()
    while not os.path.ismount(path) and path != path.parent:
        path = path.parent
    return path


# ----------------------------------------------------------------------------- cpu and memory

def _affinity() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        return os.cpu_count() or 1


def _read(path: str) -> str:
    try:
        return Path(path).read_text()
    except OSError:
        return ""


def cgroup_dirs(controller: str, proc_cgroup: str, mountinfo: str) -> list[Path]:
    """This process's cgroup directories for one controller, innermost first, up to the mount root.

    ``proc_cgroup`` and ``mountinfo`` are the texts of ``/proc/self/cgroup`` and
    ``/proc/self/mountinfo`` (parameters so that a test can point them at a fake
    tree). A limit on any ancestor applies too, hence the walk. Inside a
    container with its own cgroup namespace the path in ``/proc/self/cgroup`` is
    relative to the mount's root; ``mountinfo`` says which part of the tree each
    mount shows.
    """
    memberships = proc_cgroup.splitlines()
    found: list[Path] = []
    for line in mountinfo.splitlines():
        left, _, right = line.partition(" - ")
        fields, fstype = left.split(), right.split()
        if len(fields) < 5 or len(fstype) < 3:
            continue
        root, mount_point = fields[3], Path(fields[4])
        if fstype[0] == "cgroup2":
            wanted = next((m.split(":", 2)[2] for m in memberships if m.startswith("0::")), None)
            if wanted is None or controller not in _read(str(mount_point / "cgroup.controllers")).split():
                continue  # not this process's hierarchy, or the controller lives in a v1 hierarchy
        elif fstype[0] == "cgroup" and controller in fstype[2].split(","):
            wanted = next((m.split(":", 2)[2] for m in memberships
                           if controller in m.split(":", 2)[1].split(",")), None)
            if wanted is None:
                continue
        else:
            continue
        relative = os.path.relpath(wanted, root) if wanted.startswith(root) else "."
        start = (mount_point / relative).resolve() if relative != "." else mount_point
        if not start.is_dir():
            start = mount_point
        here = start
        while True:
            found.append(here)
            if here == mount_point or here == here.parent:
                break
            here = here.parent
    return found


def cgroup_cpu_quota(dirs: list[Path]) -> float | None:
    """The tightest CPU quota, in cores, over cgroup directories (v2 ``cpu.max`` or v1 CFS)."""
    quotas: list[float] = []
    for directory in dirs:
        try:
            if (directory / "cpu.max").exists():
                quota, period = (directory / "cpu.max").read_text().split()[:2]
                if quota != "max":
                    quotas.append(int(quota) / int(period))
            elif (directory / "cpu.cfs_quota_us").exists():
                quota_us = int((directory / "cpu.cfs_quota_us").read_text())
                period_us = int((directory / "cpu.cfs_period_us").read_text())
                if quota_us > 0 and period_us > 0:
                    quotas.append(quota_us / period_us)
        except (OSError, ValueError):
            continue
    return min(quotas) if quotas else None


def cgroup_memory_limit(dirs: list[Path]) -> int | None:
    """The tightest memory limit in bytes over cgroup directories; None when unlimited."""
    limits: list[int] = []
    for directory in dirs:
        for name in ("memory.max", "memory.limit_in_bytes"):
            try:
                text = (directory / name).read_text().strip()
            except OSError:
                continue
            if text.isdigit():
                limits.append(int(text))  # v1 "unlimited" is a huge number; min() ignores it
    return min(limits) if limits else None


# ----------------------------------------------------------------------------- os, names, clock

def _os_release() -> dict[str, str]:
    for candidate in (Path("/etc/os-release"), Path("/usr/lib/os-release")):
        try:
            text = candidate.read_text(encoding="utf-8")
        except OSError:
            continue
        values: dict[str, str] = {}
        for line in text.splitlines():
            key, sep, value = line.partition("=")
            if sep and key.strip() and not key.startswith("#"):
                try:
                    parts = shlex.split(value)
                except ValueError:
                    parts = [value]
                values[key.strip()] = parts[0] if parts else ""
        return values
    return {}


def _resolve(hostname: str) -> tuple[bool, tuple[str, ...]]:
    try:
        infos = socket.getaddrinfo(hostname, None)
    except (socket.gaierror, UnicodeError, OSError):
        return False, ()
    return True, tuple(sorted({info[4][0] for info in infos}))


class _Timex(ctypes.Structure):
    """``struct timex`` from <sys/timex.h> (Linux, LP64 and ILP32), with spare room at the end."""

    _fields_ = [
        ("modes", ctypes.c_uint), ("offset", ctypes.c_long), ("freq", ctypes.c_long),
        ("maxerror", ctypes.c_long), ("esterror", ctypes.c_long), ("status", ctypes.c_int),
        ("constant", ctypes.c_long), ("precision", ctypes.c_long), ("tolerance", ctypes.c_long),
        ("time_sec", ctypes.c_long), ("time_usec", ctypes.c_long), ("tick", ctypes.c_long),
        ("ppsfreq", ctypes.c_long), ("jitter", ctypes.c_long), ("shift", ctypes.c_int),
        ("stabil", ctypes.c_long), ("jitcnt", ctypes.c_long), ("calcnt", ctypes.c_long),
        ("errcnt", ctypes.c_long), ("stbcnt", ctypes.c_long), ("tai", ctypes.c_int),
        ("spare", ctypes.c_int * 32),
    ]


_TIME_ERROR = 5  # adjtimex's return value when the kernel clock is not synchronised (STA_UNSYNC)


def _clock_synchronised() -> tuple[bool | None, str]:
    """Ask the kernel (read-only adjtimex, as timedated itself does), else ``timedatectl``.

    adjtimex reports whether an NTP daemon (chrony, ntpd, systemd-timesyncd) is
    disciplining the kernel clock. It needs no privilege with ``modes = 0``.
    """
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        timex = _Timex()
        state = libc.adjtimex(ctypes.byref(timex))
        if state >= 0:
            return state != _TIME_ERROR, "adjtimex"
    except (OSError, AttributeError):
        pass
    if shutil.which("timedatectl"):
        try:
            out = subprocess.run(["timedatectl", "show", "--property=NTPSynchronized", "--value"],
                                 capture_output=True, text=True, timeout=5, check=False)
        except (OSError, subprocess.SubprocessError):
            out = None
        if out is not None and out.returncode == 0 and out.stdout.strip() in ("yes", "no"):
            return out.stdout.strip() == "yes", "timedatectl"
    return None, "unknown"


# ----------------------------------------------------------------------------- ports

def _port_fact(port: int) -> PortFact:
    """Who listens on ``port``: the socket table first, a trial bind when that is not readable.

    On Linux the socket table (``/proc/net/tcp*``) shows every listener in this
    network namespace; the owning process needs root to be named. Elsewhere, or
    when the table is denied, binding 0.0.0.0:port tells free from held, though
    not by whom.
    """
    try:
        listeners = [c for c in psutil.net_connections(kind="tcp")
                     if c.status == psutil.CONN_LISTEN and c.laddr and c.laddr.port == port]
    except (psutil.AccessDenied, OSError):
        return PortFact(port, _try_bind(port))
    if not listeners:
        return PortFact(port, "free")
    for conn in listeners:
        if conn.pid:
            try:
                return PortFact(port, "held", psutil.Process(conn.pid).name(), conn.pid)
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
    return PortFact(port, "held")


def _try_bind(port: int) -> PortState:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # ignore TIME_WAIT leftovers
        sock.bind(("0.0.0.0", port))
    except OSError as exc:
        return "held" if exc.errno == errno.EADDRINUSE else "unknown"  # EACCES: not root
    finally:
        sock.close()
    return "free"
