"""The CRM appliance: one installable package with the ``crm-appliance`` command."""

from pathlib import Path

from setuptools import find_namespace_packages, setup


def _version() -> str:
    for line in Path(__file__).with_name("appliance").joinpath("__init__.py").read_text().splitlines():
        if line.startswith("__version__"):
            return line.split("=")[1].strip().strip('"')
    raise RuntimeError("appliance/__init__.py has no __version__")


setup(
    name="crm-appliance",
    version=_version(),
    description="Self-hosted, on-premise CRM appliance: installer, web CRM, backups and diagnostics.",
    python_requires=">=3.11",
    # Folders of templates, static files, translations and playbooks are namespace
    # packages whose every file ships as package data.
    packages=find_namespace_packages(include=["appliance*", "installer*", "sizing*", "webapp*", "playbooks*"]),
    package_data={"": ["*"]},
    exclude_package_data={"": ["*.pyc", "*.pot"]},
    install_requires=[
        "flask>=3.0,<4",
        "flask-wtf>=1.2,<2",
        # SelectChoice (the choices API that replaces tuples) arrived in 3.3.
        "wtforms>=3.3,<4",
        "flask-babel>=4.0,<5",
        "email-validator>=2.1,<3",
        "peewee>=4.5,<5",
        "psycopg2-binary>=2.9.9,<3",
        "argon2-cffi>=23.1,<26",
        "gunicorn>=23,<28",
        "psutil>=5.9,<8",
        "click>=8.1,<9",
        # ansible-core 2.19 is the last release that runs on Debian 12's Python 3.11.
        "ansible-core>=2.17,<2.20",
        "ansible-runner>=2.4,<3",
        "apscheduler>=3.10,<4",
        # AES-256-GCM, HKDF and X25519 from a well-audited library rather than our own: the
        # encrypted backups (appliance/encryption.py) and the diagnostics bundle sealed to the
        # vendor's key (appliance/diagnostics.py).
        "cryptography>=42,<52",
        "rich>=13,<15",
        # Runs the services where systemd is not PID 1 (containers, CI): from the appliance's
        # own virtual environment, so no system package or system-wide daemon is involved.
        "supervisor>=4.2,<5",
        # Excel files for the list exports (and, later, imports): the standard library for
        # .xlsx, whose write-only mode streams rows to disk instead of holding the sheet.
        "openpyxl>=3.1,<4",
    ],
    extras_require={
        "test": [
            "pytest>=8,<10",
            "playwright>=1.45,<2",
            "babel>=2.14",
            # A real SMTP server on 127.0.0.1 for the notice e-mail tests.
            "aiosmtpd>=1.4,<2",
        ],
        # The seat load test and capacity figures: bench/load/run.py (docs/performance.md).
        "bench": [
            "locust>=2.20,<3",
            # Samples the running server's workers (--gil: CPU only) without slowing them
            # the way cProfile does; how docs/performance.md found where the CPU goes.
            "py-spy>=0.3,<0.5",
        ],
    },
    entry_points={"console_scripts": ["crm-appliance = installer.cli:main"]},
)
