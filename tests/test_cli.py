"""The crm-appliance command, driven through Click's CliRunner against the real database."""

from __future__ import annotations

import json

from click.testing import CliRunner

from installer.cli import main
from webapp.models import AuditLog, User


def _config_file(tmp_path, settings) -> str:
    db = settings.database
    path = tmp_path / "appliance.toml"
    path.write_text(
        f'[web]\npublic_url = "https://crm.corp.lan"\nsecret_key_file = "{settings.web.secret_key_file}"\n'
        f'[seats]\nlicensed = 50\n'
        f'[database]\nport = {db.port}\nname = "{db.name}"\nuser = "{db.user}"\npassword_file = "{db.password_file}"\n'
    )
    return str(path)


def test_version_names_the_install_path():
    result = CliRunner().invoke(main, ["--version"])
    assert result.exit_code == 0 and "crm-appliance" in result.output and "Python" in result.output


def test_db_migrate_twice(tmp_path, settings, db):
    config = _config_file(tmp_path, settings)
    first = CliRunner().invoke(main, ["--config", config, "db", "migrate"])
    assert first.exit_code == 0, first.output
    assert "up to date" in first.output  # the session fixture already migrated
    status = CliRunner().invoke(main, ["--config", config, "db", "status", "--json"])
    assert json.loads(status.output)[0] == {"name": "0001_initial", "applied": True}


def test_seats_add_prints_a_link_and_is_audited(tmp_path, settings, db):
    config = _config_file(tmp_path, settings)
    result = CliRunner().invoke(main, ["--config", config, "seats", "add", "--email", "Li.Wei@Corp.cn",
                                       "--name", "Li Wei", "--role", "agent", "--team", "East"])
    assert result.exit_code == 0, result.output
    assert "https://crm.corp.lan/auth/set-password/" in result.output
    user = User.get(User.email == "li.wei@corp.cn")
    assert user.team.name == "East" and user.password_hash is None
    assert AuditLog.get(AuditLog.entity == "user", AuditLog.record_id == user.id).actor.startswith("cli:")
    listed = CliRunner().invoke(main, ["--config", config, "seats", "list", "--json"])
    assert [r["email"] for r in json.loads(listed.output)] == ["li.wei@corp.cn"]


def test_seat_errors_exit_1_with_one_line(tmp_path, settings, db):
    config = _config_file(tmp_path, settings)
    result = CliRunner().invoke(main, ["--config", config, "seats", "add", "--email", "x@corp.cn",
                                       "--name", "X", "--role", "emperor"])
    assert result.exit_code == 1
    assert "unknown role 'emperor'; expected one of: agent, boss, manager" in result.output
    assert "Traceback" not in result.output


def test_bad_config_names_the_file_and_key(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text('[web]\npublic_url = "http://x"\nworkers = "four"\n[seats]\nlicensed = 1\n')
    result = CliRunner().invoke(main, ["--config", str(path), "db", "migrate"])
    assert result.exit_code == 1
    assert f'{path}: [web] workers: expected an integer from 1 to 256, found "four" (a string)' in result.output


def test_config_from_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("CRM_APPLIANCE_CONFIG", str(tmp_path / "missing.toml"))
    result = CliRunner().invoke(main, ["seats", "list"])
    assert result.exit_code == 1 and "missing.toml: no such configuration file" in result.output


def test_unreachable_database_is_one_clear_line(tmp_path, settings):
    config = _config_file(tmp_path, settings)
    text = open(config).read().replace(f"port = {settings.database.port}", "port = 1")
    open(config, "w").write(text)
    result = CliRunner().invoke(main, ["--config", config, "db", "migrate"])
    assert result.exit_code == 1
    assert "cannot connect to PostgreSQL at 127.0.0.1:1" in result.output


def test_usage_error_exits_2():
    result = CliRunner().invoke(main, ["seats", "add", "--email"])
    assert result.exit_code == 2


def test_install_usage_errors_exit_2_before_touching_the_host():
    for args in (["install", "--profile", "huge"], ["install", "--accept-risk", "luck"], ["install", "--seats", "0"],
                 ["uninstall", "--purge"]):
        result = CliRunner().invoke(main, args)
        assert result.exit_code == 2, (args, result.output)


def test_status_json_is_read_only_and_complete(tmp_path):
    result = CliRunner().invoke(main, ["--config", str(tmp_path / "absent.toml"), "status", "--json"])
    assert result.exit_code == 0, result.output
    status = json.loads(result.output)
    for key in ("services", "nginx", "postgresql", "health", "schema", "accepted_risks", "disk"):
        assert key in status, key
    assert "absent.toml" in status["config_error"]
