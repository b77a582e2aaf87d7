"""End-to-end tests: they install the appliance on THIS machine (apt, PostgreSQL, nginx, supervisord).

They run only as root on Debian 12 or later, and can be left out with ``-m "not e2e"``
or ``--ignore=tests/e2e``.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "e2e: installs the appliance on this machine for real (root, Debian 12, apt and PyPI reachable)")


def _debian_major() -> int:
    try:
        fields = dict(line.split("=", 1) for line in Path("/etc/os-release").read_text().splitlines() if "=" in line)
    except OSError:
        return 0
    if fields.get("ID") != "debian":
        return 0
    return int(fields.get("VERSION_ID", "0").strip('"') or 0)


def pytest_collection_modifyitems(config, items):
    reason = None
    if os.geteuid() != 0:
        reason = "the end-to-end install needs root"
    elif _debian_major() < 12:
        reason = "the end-to-end install needs Debian 12 or later"
    if reason:
        skip = pytest.mark.skip(reason=reason)
        for item in items:
            if "e2e" in item.keywords:
                item.add_marker(skip)
