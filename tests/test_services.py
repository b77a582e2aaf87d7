"""The services role: one description yields systemd units and supervisord programs alike.

This machine and CI have no systemd as PID 1, so the systemd path cannot run here. What
can be checked is checked for real: Ansible itself renders the role's templates from
``services_list`` (as the role does), ``systemd-analyze verify`` (from Debian's systemd
package) parses each unit as systemd would load it, and the supervisord configuration
is parsed back and compared with the units, service by service.
"""

from __future__ import annotations

import configparser
import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from installer import deploy

ROLE = deploy.PLAYBOOK_DIR / "roles" / "services"


def render(tmp_path: Path, services: list[dict] | None = None) -> tuple[Path, Path]:
    """Run the role's variables.yml and templates through ansible-playbook; returns (units dir, supervisord.conf)."""
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    stub = venv / "bin" / "crm-appliance"
    stub.write_text("#!/bin/sh\nexit 0\n")
    stub.chmod(0o755)
    units, conf = tmp_path / "units", tmp_path / "supervisord.conf"
    units.mkdir()
    playbook = tmp_path / "render.yml"
    playbook.write_text(yaml.safe_dump([{
        "hosts": "localhost", "connection": "local", "gather_facts": False,
        "tasks": [
            {"ansible.builtin.import_role": {"name": "services", "tasks_from": "variables.yml"}},
            {"ansible.builtin.template": {"src": str(ROLE / "templates" / "service.unit.j2"),
                                          "dest": f"{units}/{{{{ item.name }}}}.service"},
             "loop": "{{ __services_enabled }}"},
            {"ansible.builtin.template": {"src": str(ROLE / "templates" / "supervisord.conf.j2"),
                                          "dest": str(conf)}},
        ],
    }]))
    extra = {"services_venv": str(venv), "ansible_managed": "rendered by tests/test_services.py"}
    if services is not None:
        extra["services_list"] = services
    env = {**os.environ, "ANSIBLE_CONFIG": str(deploy.PLAYBOOK_DIR / "ansible.cfg"),
           "ANSIBLE_ROLES_PATH": str(deploy.PLAYBOOK_DIR / "roles"),
           "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    result = subprocess.run(
        [str(Path(sys.executable).with_name("ansible-playbook")), "-i", "localhost,", str(playbook),
         "-e", json.dumps(extra)], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    return units, conf


def programs(conf: Path) -> dict[str, configparser.SectionProxy]:
    parser = configparser.ConfigParser(interpolation=None)
    parser.read(conf)
    return {name.split(":", 1)[1]: parser[name] for name in parser.sections() if name.startswith("program:")}


def unit_service(path: Path) -> dict[str, str]:
    parser = configparser.ConfigParser(interpolation=None, strict=False)
    parser.optionxform = str
    parser.read(path)
    return dict(parser["Service"])


def test_each_enabled_service_is_a_unit_and_a_program_with_the_same_command_and_user(tmp_path):
    services = yaml.safe_load((ROLE / "defaults" / "main.yml").read_text())["services_list"]
    units, conf = render(tmp_path)
    enabled = [s["name"] for s in services if s.get("enabled", True)]
    assert enabled, "the web service at least is enabled"
    assert sorted(p.stem for p in units.glob("*.service")) == sorted(enabled)
    found = programs(conf)
    assert sorted(found) == sorted(enabled)
    for name in enabled:
        service = unit_service(units / f"{name}.service")
        assert shlex.split(service["ExecStart"]) == shlex.split(found[name]["command"])
        assert service["User"] == found[name]["user"] == "crm"
        assert shlex.split(service["ExecStart"])[0] == str(tmp_path / "venv" / "bin" / "crm-appliance")
    for disabled in {s["name"] for s in services} - set(enabled):
        assert f"; {disabled}: " in conf.read_text(), "a disabled service is named, with why, as a comment"


def test_a_service_added_to_the_one_description_appears_in_both(tmp_path):
    services = [
        {"name": "crm-appliance-web", "description": "web", "command": "{{ services_venv }}/bin/crm-appliance serve",
         "user": "crm"},
        {"name": "crm-appliance-extra", "description": "another program", "user": "crm",
         "command": "{{ services_venv }}/bin/crm-appliance --config /etc/x.toml extra --flag"},
        {"name": "crm-appliance-off", "description": "off", "command": "/bin/true", "user": "crm",
         "enabled": False, "note": "not yet"},
    ]
    units, conf = render(tmp_path, services)
    assert sorted(p.stem for p in units.glob("*.service")) == ["crm-appliance-extra", "crm-appliance-web"]
    assert sorted(programs(conf)) == ["crm-appliance-extra", "crm-appliance-web"]
    assert unit_service(units / "crm-appliance-extra.service")["ExecStart"].endswith("extra --flag")
    assert "; crm-appliance-off: off.\n; Disabled: not yet." in conf.read_text()


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze comes with Debian's systemd")
def test_systemd_accepts_the_rendered_units(tmp_path):
    units, _ = render(tmp_path)
    for unit in sorted(units.glob("*.service")):
        result = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True)
        assert result.returncode == 0 and unit.name not in result.stderr, result.stderr

    # The check has teeth: a unit whose command is missing or whose keys are wrong fails it.
    broken = tmp_path / "broken.service"
    text = next(units.glob("*.service")).read_text()
    broken.write_text(text.replace("Restart=on-failure", "Restart=sometimes")
                      .replace(str(tmp_path / "venv"), str(tmp_path / "missing")))
    result = subprocess.run(["systemd-analyze", "verify", str(broken)], capture_output=True, text=True)
    assert result.returncode != 0 and "is not executable" in result.stderr
    assert "Failed to parse service restart specifier" in result.stderr
