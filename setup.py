"""The CRM appliance: one installable package with the ``crm-appliance`` command."""

from pathlib import Path

from setuptools import setup


def _version() -> str:
    for line in Path(__file__).with_name("appliance").joinpath("__init__.py").read_text().splitlines():
        if line.startswith("__version__"):
            return line.split("=")[1].strip().strip('"')
    raise RuntimeError("appliance/__init__.py has no __version__")


def _data_files(package: str, *folders: str) -> list[str]:
    """Every file under the given folders, relative to the package (templates, static, ...)."""
    root = Path(__file__).parent / package
    found = []
    for folder in folders:
        for path in (root / folder).rglob("*"):
            if path.is_file() and "__pycache__" not in path.parts:
                found.append(str(path.relative_to(root)))
    return found


setup(
    name="crm-appliance",
    version=_version(),
    description="Self-hosted, on-premise CRM appliance: installer, web CRM, backups and diagnostics.",
    python_requires=">=3.11",
    packages=["appliance", "installer", "sizing", "webapp", "webapp.migrations", "playbooks"],
    package_data={
        "webapp": _data_files("webapp", "templates", "static", "translations"),
        "playbooks": _data_files("playbooks", "."),
    },
    include_package_data=True,
    install_requires=[
        "flask>=3.0,<4",
        "flask-wtf>=1.2,<2",
        # 3.4 drops tuple choices for SelectField; move to SelectChoice before lifting this.
        "wtforms>=3.1,<3.4",
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
        "rich>=13,<15",
    ],
    extras_require={
        "test": [
            "pytest>=8,<10",
            "playwright>=1.45,<2",
            "babel>=2.14",
        ],
    },
    entry_points={"console_scripts": ["crm-appliance = installer.cli:main"]},
)
