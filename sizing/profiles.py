"""Sizing profiles: what a host needs for a number of seats, as data defined once.

``standard-50`` carries the contract's numbers (50 concurrent seats on 32 GB
RAM, 4 cores, 500 GB disk). ``standard-100`` and ``standard-200`` scale the same
per-seat ratios; ``tests/test_sizing.py`` shows the plan formulas support them
(enough request slots for every seat, the disk budget fits). Past 200 seats the
appliance grows onto several hosts (ARCHITECTURE.md, "Where it grows"), not a
bigger profile. ``eval`` is for trying the product on a small machine and is not
for production. ``docs/sizing.md`` repeats this table; a test keeps them equal.

Units, because hardware is sold in two kinds of gigabyte: memory is sold in
binary units (a "32 GB" DIMM set is 32 GiB), disks in decimal ones (a "500 GB"
disk is 500 × 10⁹ bytes, which the OS shows as 465 GiB). Each profile states
its sizes the way they are sold, and the byte properties convert them.
"""

from __future__ import annotations

from dataclasses import dataclass

from appliance.errors import SizingError

GIB = 1024**3
GB = 1000**3


@dataclass(frozen=True)
class Tolerance:
    """How far below nominal a host may report before a check FAILs (it WARNs in between).

    Memory: the kernel keeps its page tables (``struct page``: 64 bytes per
    4 KiB page, 1.6 %), its image and often a crash-kernel reservation, and
    firmware keeps holes, so a host sold as 32 GB reports about 31.3 GiB. The
    band is 5 % of nominal, but never less than 512 MiB so that a 4 GB
    evaluation VM (fixed reservations weigh more on small hosts) is not failed.
    Disk: filesystem metadata (ext4 inode tables, journal) takes about 2 %.
    """

    memory_share: float = 0.05
    memory_min_bytes: int = 512 * 1024**2
    disk_share: float = 0.05

    def memory_floor(self, nominal_bytes: int) -> int:
        """The fewest bytes of memory that still WARN rather than FAIL."""
        return nominal_bytes - max(round(nominal_bytes * self.memory_share), self.memory_min_bytes)

    def disk_floor(self, nominal_bytes: int) -> int:
        """The fewest bytes of disk that still WARN rather than FAIL."""
        return nominal_bytes - round(nominal_bytes * self.disk_share)


TOLERANCE = Tolerance()


@dataclass(frozen=True)
class Profile:
    """The host a number of seats needs, in the units the hardware is sold in."""

    name: str
    max_seats: int
    cores: int
    memory_gb: int  # as sold: binary gigabytes (GiB)
    disk_gb: int  # as sold: decimal gigabytes (10^9 bytes)
    production: bool
    summary: str

    @property
    def memory_bytes(self) -> int:
        return self.memory_gb * GIB

    @property
    def disk_bytes(self) -> int:
        return self.disk_gb * GB


PROFILES: tuple[Profile, ...] = (
    Profile("eval", max_seats=10, cores=2, memory_gb=4, disk_gb=20, production=False,
            summary="Evaluation only, NOT for production: try the product on a small machine."),
    Profile("standard-50", max_seats=50, cores=4, memory_gb=32, disk_gb=500, production=True,
            summary="The contract's reference host: 50 concurrent seats."),
    Profile("standard-100", max_seats=100, cores=8, memory_gb=64, disk_gb=1000, production=True,
            summary="standard-50 doubled: 100 concurrent seats."),
    Profile("standard-200", max_seats=200, cores=16, memory_gb=128, disk_gb=2000, production=True,
            summary="standard-50 times four: 200 concurrent seats; beyond this, several hosts."),
)

DEFAULT_PROFILE = "standard-50"


def names() -> tuple[str, ...]:
    """Profile names, smallest first."""
    return tuple(p.name for p in PROFILES)


def get(name: str) -> Profile:
    """The profile called ``name``; SizingError listing the profiles otherwise."""
    for profile in PROFILES:
        if profile.name == name:
            return profile
    raise SizingError(f"unknown profile {name!r}; expected one of: {', '.join(names())}")


def validate_seats(profile: Profile, seats: int) -> int:
    """``seats`` if the profile can carry them; SizingError naming the limit otherwise.

    Defined here, not in the CLI, so that every caller of preflight and plan
    meets the same rule.
    """
    if seats < 1 or seats > profile.max_seats:
        bigger = next((p.name for p in PROFILES if p.max_seats >= seats), None) if seats > 0 else None
        hint = f"; use --profile {bigger}" if bigger and bigger != profile.name else ""
        if seats > PROFILES[-1].max_seats:
            hint = f"; beyond {PROFILES[-1].max_seats} seats the appliance needs several hosts"
        raise SizingError(
            f"expected 1 to {profile.max_seats} seats for profile {profile.name}, found {seats}{hint}"
        )
    return seats


def smaller_fitting(profile: Profile, cores: int, memory_bytes: int) -> Profile | None:
    """The largest profile below ``profile`` that ``cores`` and memory satisfy, for remedies."""
    fitting = [p for p in PROFILES
               if p.max_seats < profile.max_seats and p.cores <= cores
               and memory_bytes >= TOLERANCE.memory_floor(p.memory_bytes)]
    return fitting[-1] if fitting else None
