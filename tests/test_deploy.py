"""installer.deploy and installer.progress without touching the host: the extra variables and the
rendered configuration, the event handler, the error mapping, the inventory and the wheel's version.

The real install runs in tests/e2e/test_install.py.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import io
import json
import subprocess
import sys
import tomllib
from pathlib import Path

import jinja2
import pytest
import yaml
from rich.console import Console

from appliance import config
from appliance.errors import ConfigError, DeployError
from installer import deploy, progress

ROLES = deploy.PLAYBOOK_DIR / "roles"


def _settings(**sections) -> config.Settings:
    data = {"web": {"public_url": "http://localhost:8000", "bind": "0.0.0.0:8000"}, "seats": {"licensed": 50}}
    for name, values in sections.items():
        data.setdefault(name, {}).update(values)
    return config.from_mapping(data, source="/etc/crm-appliance/appliance.toml")


def _render_appliance_toml(sections: list[dict]) -> str:
    """appliance.toml.j2 as Ansible's template module renders it (trim_blocks on)."""
    env = jinja2.Environment(trim_blocks=True, undefined=jinja2.StrictUndefined)
    env.filters["comment"] = lambda text, **kw: "#\n# " + text + "\n#"
    source = (ROLES / "webapp" / "templates" / "appliance.toml.j2").read_text()
    return env.from_string(source).render(webapp_config_sections=sections, ansible_managed="Managed.")


# ----------------------------------------------------------------------------- configuration


def test_adopting_the_quickstart_config_puts_gunicorn_behind_nginx_over_https():
    adopted, notes = deploy.adopt_settings(_settings())
    assert adopted.web.bind == "127.0.0.1:8000"
    assert adopted.web.trusted_proxies == 1
    assert adopted.web.public_url == "https://localhost"
    assert len(notes) == 3 and all("->" in n for n in notes)


def test_a_config_already_behind_nginx_is_kept_as_it_is():
    settings = _settings(web={"public_url": "https://crm.corp.lan:8443", "bind": "127.0.0.1:8000",
                              "trusted_proxies": 1})
    adopted, notes = deploy.adopt_settings(settings)
    assert adopted == settings and notes == []


def test_a_remote_database_host_is_refused_in_one_line():
    with pytest.raises(ConfigError) as err:
        deploy.adopt_settings(_settings(database={"host": "db.corp.lan"}))
    assert str(err.value) == ("/etc/crm-appliance/appliance.toml: [database] host: expected 127.0.0.1 "
                              "(the appliance's own cluster), found 'db.corp.lan'")


@pytest.mark.parametrize("text, expected", [
    ("[web\n", "not valid TOML"),
    ('[web]\npublic_url = "https://x"\nworkers = "four"\n[seats]\nlicensed = 5\n',
     '[web] workers: expected an integer from 1 to 256, found "four" (a string)'),
])
def test_a_bad_config_stops_the_install_before_anything_runs(tmp_path, text, expected):
    path = tmp_path / "appliance.toml"
    path.write_text(text)
    ctx = deploy.InstallContext(config_path=path, console=Console(file=io.StringIO()))
    with pytest.raises(ConfigError) as err:
        deploy.load_settings(ctx)
    assert expected in str(err.value) and "\n" not in str(err.value)


def test_an_unreadable_config_is_one_line(tmp_path):
    ctx = deploy.InstallContext(config_path=tmp_path / "missing.toml", console=Console(file=io.StringIO()))
    with pytest.raises(ConfigError, match="missing.toml: no such configuration file"):
        deploy.load_settings(ctx)


def test_the_rendered_appliance_toml_reads_back_as_the_same_settings():
    settings = _settings(web={"public_url": 'https://crm.corp.lan/a "quoted" \\ path 客户', "bind": "127.0.0.1:8000",
                              "trusted_proxies": 1, "timezone": "Europe/Berlin"},
                         seats={"licensed": 7, "expires": "2027-12-31"})
    text = _render_appliance_toml(deploy.config_sections(settings))
    again = config.from_mapping(tomllib.loads(text), source=settings.source)
    assert again == settings
    # Every key of the schema is written, with its meaning where the schema has one.
    for section, keys in config.schema_keys().items():
        assert f"[{section}]" in text
        for key in keys:
            assert f"\n{key} = " in text
    assert "# Rows per list page.\npage_size = 50" in text
    assert "set by the installer: nginx is the one proxy in front" in text


def test_a_perpetual_licence_is_written_as_none():
    sections = deploy.config_sections(_settings())
    seats = next(s for s in sections if s["name"] == "seats")
    assert {"name": "expires", "value": '"none"', "doc": "Licence end date (YYYY-MM-DD); none = perpetual."} \
        in seats["keys"]


# ----------------------------------------------------------------------------- extra variables


def _context(tmp_path) -> deploy.InstallContext:
    settings, _ = deploy.adopt_settings(_settings(database={"password_file": str(tmp_path / "db-password")},
                                                  web={"secret_key_file": str(tmp_path / "secret-key")},
                                                  backup={"key_file": str(tmp_path / "backup-key"),
                                                          "db_password_file": str(tmp_path / "backup-db-password")},
                                                  attachments={"max_upload_mb": 40}))
    ctx = deploy.InstallContext(console=Console(file=io.StringIO()), profile="eval")
    ctx.settings = settings
    ctx.target = deploy.Target(name="localhost", inventory=deploy.DEFAULT_INVENTORY, local=True)
    ctx.plan = {"postgresql": {"shared_buffers": "1024MB", "max_connections": "24"}, "nginx_workers": 2}
    ctx.release = deploy.Release(path=Path("/cache/crm_appliance-0.1.0+src.abc-py3-none-any.whl"),
                                 version="0.1.0+src.abc")
    return ctx


def test_extra_vars_carry_no_secret(tmp_path):
    ctx = _context(tmp_path)
    deploy.ensure_secrets(ctx)
    values = [p.read_text().strip() for p in tmp_path.iterdir()]
    assert len(values) == 4 and all(len(v) >= 40 for v in values)
    assert all(p.stat().st_mode & 0o777 == 0o600 for p in tmp_path.iterdir())
    text = json.dumps(deploy.render_extra_vars(ctx))
    assert not any(v in text for v in values)
    # A second run keeps the secrets it finds.
    deploy.ensure_secrets(ctx)
    assert [p.read_text().strip() for p in tmp_path.iterdir()] == values


def test_extra_vars_follow_the_settings_and_the_plan(tmp_path):
    ctx = _context(tmp_path)
    ctx.secrets = deploy.secret_files(ctx.settings, ctx.target)
    extra = deploy.render_extra_vars(ctx)
    assert extra["proxy_server_name"] == "localhost"
    assert extra["proxy_upstream"] == "127.0.0.1:8000"
    assert extra["proxy_client_max_body_size_mb"] == 41
    assert extra["proxy_worker_processes"] == 2
    settings = extra["postgresql_settings"]
    assert {k: settings[k] for k in ("shared_buffers", "max_connections")} == {"shared_buffers": "1024MB",
                                                                              "max_connections": "24"}
    # Continuous WAL archiving: the current release's Python as postgres, its own copy of the key.
    assert settings["archive_mode"] == "on" and settings["archive_timeout"] == 60
    assert settings["archive_command"] == (
        "/opt/crm-appliance/current/bin/python -m installer.backup_commands wal-push "
        "--archive-dir /var/lib/crm-appliance/wal-archive --key-file /var/lib/postgresql/crm-appliance-backup-key %p %f")
    assert extra["appliance_backup_db_password_source"] == str(tmp_path / "backup-db-password")
    assert extra["webapp_package_version"] == "0.1.0+src.abc"
    assert extra["appliance_db_password_source"] == str(tmp_path / "db-password")
    assert [p["port"] for p in extra["appliance_ports"]] == [80, 443, 5432, 8000]
    # Every variable is one a playbook or role declares.
    declared = set()
    for defaults in ROLES.glob("*/defaults/main.yml"):
        declared |= set(__import__("yaml").safe_load(defaults.read_text()))
    declared |= set(__import__("yaml").safe_load((deploy.PLAYBOOK_DIR / "site.yml").read_text())[0]["vars"])
    assert set(extra) <= declared, set(extra) - declared


def test_a_remote_host_gets_its_secrets_from_a_folder_on_the_controller(tmp_path):
    ctx = _context(tmp_path)
    target = deploy.Target(name="crm.corp.lan", inventory=Path("hosts.ini"), local=False)
    files = deploy.secret_files(ctx.settings, target)
    assert [f.src for f in files] == [deploy.REMOTE_SECRETS_DIR / "crm.corp.lan" / n
                                      for n in ("db-password", "secret-key", "backup-key", "backup-db-password")]
    assert files[0].dest == tmp_path / "db-password"


def test_the_plan_sets_gunicorn_and_the_pool_in_the_settings(tmp_path):
    ctx = _context(tmp_path)
    ctx.plan.update(workers=5, threads=2, pool_size=2)
    deploy._apply_plan(ctx)
    assert (ctx.settings.web.workers, ctx.settings.web.threads, ctx.settings.database.pool_size) == (5, 2, 2)
    assert "[web] workers: 2 -> 5 (sizing plan)" in ctx.notes


# ----------------------------------------------------------------------------- inventory


def test_the_default_inventory_is_this_host_over_a_local_connection():
    ctx = deploy.InstallContext(console=Console(file=io.StringIO()))
    deploy.load_inventory(ctx)
    assert (ctx.target.name, ctx.target.local) == ("localhost", True)


def test_a_remote_inventory_is_reached_over_ssh(tmp_path):
    inventory = tmp_path / "hosts.ini"
    inventory.write_text("[appliance]\ncrm.corp.lan ansible_user=root\n")
    ctx = deploy.InstallContext(inventory=inventory, console=Console(file=io.StringIO()))
    deploy.load_inventory(ctx)
    assert (ctx.target.name, ctx.target.local) == ("crm.corp.lan", False)


@pytest.mark.parametrize("text, expected", [
    (None, "cannot read the inventory file: No such file or directory"),
    ("[web]\nhost1\n", 'expected exactly one host in group "appliance", found none'),
    ("[appliance]\na\nb\n", 'expected exactly one host in group "appliance", found a, b'),
])
def test_a_bad_inventory_is_one_line(tmp_path, text, expected):
    inventory = tmp_path / "hosts.ini"
    if text is not None:
        inventory.write_text(text)
    ctx = deploy.InstallContext(inventory=inventory, console=Console(file=io.StringIO()))
    with pytest.raises(DeployError) as err:
        deploy.load_inventory(ctx)
    assert expected in str(err.value) and "\n" not in str(err.value)


# ----------------------------------------------------------------------------- the release's version


def _tree(root: Path) -> Path:
    (root / "appliance").mkdir(parents=True)
    (root / "appliance" / "__init__.py").write_text('__version__ = "1.2.3"\n')
    (root / "setup.py").write_text("# setup\n")
    for folder in ("installer", "sizing", "webapp", "playbooks"):
        (root / folder).mkdir()
        (root / folder / "__init__.py").write_text("")
    return root


def test_the_source_fingerprint_follows_the_package_files_only(tmp_path):
    root = _tree(tmp_path / "src")
    first = deploy.source_fingerprint(root)
    assert first == deploy.source_fingerprint(root) and len(first) == 12
    (root / "webapp" / "__pycache__").mkdir()
    (root / "webapp" / "__pycache__" / "x.pyc").write_bytes(b"\0")
    (root / "tests").mkdir()
    (root / "tests" / "test_x.py").write_text("x = 1\n")
    assert deploy.source_fingerprint(root) == first
    (root / "webapp" / "views.py").write_text("x = 1\n")
    assert deploy.source_fingerprint(root) != first
    assert deploy.base_version(root) == "1.2.3"


def test_a_cached_release_is_not_built_again(tmp_path, monkeypatch):
    root = _tree(tmp_path / "src")
    cache = tmp_path / "cache"
    version = f"1.2.3+src.{deploy.source_fingerprint(root)}"
    cache.mkdir()
    (cache / f"crm_appliance-{version}-py3-none-any.whl").write_bytes(b"wheel")
    monkeypatch.setattr(deploy, "_build_wheel", lambda *a: pytest.fail("built again"))
    ctx = deploy.InstallContext(source_dir=root, wheel_cache=cache, console=Console(file=io.StringIO()))
    deploy.build_release(ctx)
    assert ctx.release.version == version


# ----------------------------------------------------------------------------- the event handler


def _task(name, role="", n=None, path="roles/x/tasks/main.yml:1", action="ansible.builtin.file"):
    return {"event": "playbook_on_task_start",
            "event_data": {"task": name, "role": role, "task_path": path, "task_action": action}}


def _result(kind, name, res, role="", action="ansible.builtin.file", **extra):
    data = {"task": name, "role": role, "host": "crm", "res": res, "task_action": action, **extra}
    return {"event": kind, "event_data": data}


def _handler(total=4, check=False):
    out, log = io.StringIO(), io.StringIO()
    handler = progress.EventHandler(total, Console(file=out, width=200), log, check=check)
    return handler, out, log


def test_the_handler_counts_tasks_shows_changes_and_logs_every_event():
    handler, out, log = _handler()
    events = [
        _task("Gathering Facts"), _result("runner_on_ok", "Gathering Facts", {"changed": False}),
        _task("Ensure nginx is installed.", "proxy"),
        _result("runner_on_ok", "Ensure nginx is installed.", {"changed": True}, "proxy", "ansible.builtin.apt"),
        _task("Check if nginx runs.", "proxy"),
        _result("runner_on_skipped", "Check if nginx runs.", {}, "proxy"),
        _task("reload nginx", "proxy", path="/p/roles/proxy/handlers/main.yml:2"),
        _result("runner_on_ok", "reload nginx", {"changed": True}, "proxy"),
        {"event": "playbook_on_stats", "event_data": {"ok": {"crm": 3}, "changed": {"crm": 2}, "failures": {}}},
    ]
    assert all(handler(e) is True for e in events)
    record = handler.record
    assert record.tasks_started == 3  # the handler is not a task of the count
    assert (record.total("changed"), record.total("ok"), record.failure) == (2, 3, None)
    assert [r.title for r in record.changed] == ["proxy : Ensure nginx is installed.", "proxy : reload nginx"]
    text = out.getvalue()
    assert "[  2/4] changed      proxy : Ensure nginx is installed.  (crm)" in text
    assert "[handler] changed      proxy : reload nginx  (crm)" in text
    assert "[  1/4] ok" in text  # not a terminal: one line per task
    assert len(log.getvalue().splitlines()) == len(events)


def test_a_failed_task_is_recorded_with_its_most_telling_line():
    handler, out, _ = _handler()
    handler(_task("Ensure the database schema is migrated.", "webapp"))
    handler(_result("runner_on_failed", "Ensure the database schema is migrated.",
                    {"rc": 1, "msg": "non-zero return code", "stdout": "",
                     "stderr": "Traceback...\nError: cannot connect to PostgreSQL at 127.0.0.1:5432"},
                    "webapp", "ansible.builtin.command"))
    failure = handler.record.failure
    assert failure.status == "failed"
    assert failure.message == "Error: cannot connect to PostgreSQL at 127.0.0.1:5432"
    assert "failed       webapp : Ensure the database schema is migrated." in out.getvalue()


def test_an_ignored_failure_is_not_a_failure():
    handler, _, _ = _handler()
    handler(_task("Probe."))
    handler(_result("runner_on_failed", "Probe.", {"msg": "nope"}, ignore_errors=True))
    assert handler.record.failure is None


def test_the_boss_link_is_shown_once_and_kept_out_of_the_log_and_artifacts():
    handler, _, log = _handler()
    link = "https://crm.corp.lan/auth/set-password/abcDEF123_-xyz"
    stdout = json.dumps({"changed": True, "state": "created", "email": "boss@crm.local", "link": link,
                         "expires_at": "2026-11-26T10:00:00Z"})
    handler(_task(progress.BOSS_TASK, "webapp"))
    keep = handler(_result("runner_on_ok", progress.BOSS_TASK, {"changed": True, "stdout": stdout}, "webapp",
                           "ansible.builtin.script"))
    assert keep is False  # ansible-runner then does not store the event
    assert handler.record.boss == progress.BossSeat("boss@crm.local", "created", link, "2026-11-26T10:00:00Z")
    assert link not in log.getvalue() and progress.REDACTED in log.getvalue()


def test_check_mode_reports_would_change_with_the_diff():
    handler, out, _ = _handler(check=True)
    handler(_task("Ensure the appliance's site is configured.", "proxy"))
    diff = {"before": "a\nclient_max_body_size 100m;\n", "after": "a\nclient_max_body_size 26m;\n",
            "before_header": "/etc/nginx/sites-available/crm-appliance.conf", "after_header": "/tmp/x/site.conf.j2"}
    handler(_result("runner_on_ok", "Ensure the appliance's site is configured.", {"changed": True, "diff": [diff]},
                    "proxy", "ansible.builtin.template"))
    [drift] = handler.record.changed
    assert drift.path == "/etc/nginx/sites-available/crm-appliance.conf"
    assert "-client_max_body_size 100m;" in drift.diff and "+client_max_body_size 26m;" in drift.diff
    assert "would change" in out.getvalue()


def test_ansible_errors_before_any_task_are_kept():
    handler, _, _ = _handler()
    handler({"event": "verbose", "stdout": "[ERROR]: the playbook: site.yml could not be found"})
    assert handler.record.errors == ["the playbook: site.yml could not be found"]


def test_the_static_task_count_matches_ansible_list_tasks():
    for playbook in ("site.yml", "uninstall.yml"):
        listed = subprocess.run(
            [str(Path(sys.executable).with_name("ansible-playbook")), "--list-tasks", playbook],
            capture_output=True, text=True, cwd=deploy.PLAYBOOK_DIR, check=True,
            env={"ANSIBLE_CONFIG": str(deploy.PLAYBOOK_DIR / "ansible.cfg"), "PATH": "/usr/bin:/bin"},
        ).stdout
        tasks = [line for line in listed.splitlines() if line.strip().endswith("TAGS: []")
                 and not line.strip().startswith("play #")]
        # --list-tasks leaves out a block's `always` tasks, which every run starts.
        switch = yaml.safe_load((deploy.PLAYBOOK_DIR / "roles" / "webapp" / "tasks" / "switch.yml").read_text())
        always = sum(len(entry.get("always") or []) for entry in switch)
        expected = len(tasks) + 1 + (always if playbook == "site.yml" else 0)  # + Gathering Facts
        assert progress.count_tasks(deploy.PLAYBOOK_DIR / playbook) == expected


# ----------------------------------------------------------------------------- error mapping


def test_an_unreachable_host_names_ssh():
    record = progress.RunRecord(failure=progress.TaskResult(
        task="Check that Ansible reaches the host and runs Python there.", role="", host="crm.corp.lan",
        status="unreachable", message="ssh: Could not resolve hostname crm.corp.lan", action="ansible.builtin.ping"))
    err = deploy.deploy_error(record, "failed", 4, Path("/var/log/crm-appliance/reach-x.log"))
    assert str(err).startswith("crm.corp.lan is unreachable: ssh: Could not resolve hostname crm.corp.lan; "
                               "hint: check that the host is up and that ssh to it works")
    assert err.log_path == Path("/var/log/crm-appliance/reach-x.log") and "\n" not in str(err)


@pytest.mark.parametrize("role, action, task, hint", [
    ("", "crm_port_check", "Check that the appliance's ports are free or held by the appliance's own programs.",
     "ss -ltnp"),
    ("proxy", "ansible.builtin.apt", "Ensure nginx and openssl are installed.", "Debian mirrors"),
    ("webapp", "ansible.builtin.pip", "Ensure this release is installed in the virtual environment.", "PyPI"),
    ("postgresql", "crm_pg_user", "Ensure the login roles exist with their passwords.", "/var/log/postgresql/"),
    ("proxy", "ansible.builtin.command", "Check that the nginx configuration is valid.", "nginx -t"),
    ("", "ansible.builtin.uri", "Check that the CRM answers through nginx over HTTPS and reports itself healthy.",
     "crm-appliance-web.log"),
    ("", "ansible.builtin.assert", "Check that the host runs Debian 12 or later.", "run install again"),
])
def test_a_failed_task_names_task_message_and_hint(role, action, task, hint):
    record = progress.RunRecord(failure=progress.TaskResult(task=task, role=role, host="crm", status="failed",
                                                           message="it broke", action=action))
    err = deploy.deploy_error(record, "failed", 2, Path("/l.log"))
    assert str(err).startswith(f"install failed at task {task!r} on crm: it broke; hint: ")
    assert hint in err.hint and str(err).endswith("full log: /l.log")


def test_a_run_without_a_failed_task_reports_ansibles_own_error():
    record = progress.RunRecord(errors=["the playbook: site.yml could not be found"])
    err = deploy.deploy_error(record, "failed", 1, Path("/l.log"))
    assert str(err) == "install failed: the playbook: site.yml could not be found; full log: /l.log"


def test_without_yes_and_without_a_terminal_nothing_happens():
    ctx = deploy.InstallContext(console=Console(file=io.StringIO()))
    with pytest.raises(DeployError, match="pass --yes to confirm; nothing was changed"):
        deploy.confirm(ctx, "Install?")
    ctx.confirm = lambda question: False
    with pytest.raises(DeployError, match="cancelled; nothing was changed"):
        deploy.confirm(ctx, "Install?")


# ----------------------------------------------------------------------------- the boss seat script


def _ensure_boss_module():
    path = ROLES / "webapp" / "files" / "ensure_boss.py"
    spec = importlib.util.spec_from_file_location("ensure_boss", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_ensure_boss_creates_once_then_waits_for_the_password(tmp_path, settings, db, capsys):
    from appliance import seats

    ensure_boss = _ensure_boss_module()
    dbs = settings.database
    cfg = tmp_path / "appliance.toml"
    cfg.write_text(
        f'[web]\npublic_url = "https://crm.corp.lan"\nsecret_key_file = "{settings.web.secret_key_file}"\n'
        f'[seats]\nlicensed = 5\n[database]\nport = {dbs.port}\nname = "{dbs.name}"\nuser = "{dbs.user}"\n'
        f'password_file = "{dbs.password_file}"\n')
    base = ["--config", str(cfg), "--email", "Boss@Corp.cn", "--name", "The Boss"]

    def run(*flags):
        assert ensure_boss.main(base + list(flags)) == 0
        return json.loads(capsys.readouterr().out)

    try:
        assert run("--dry-run") == {"email": "boss@corp.cn", "link": None, "expires_at": None,
                                    "state": "created", "changed": True}
        created = run()
        assert created["state"] == "created" and created["link"].startswith("https://crm.corp.lan/auth/set-password/")
        assert run()["state"] == "pending"  # the first link still works: no new one
        reissued = run("--new-link")
        assert reissued["state"] == "reissued" and reissued["link"] != created["link"]
        from webapp import models

        models.database.initialize(db)
        token = reissued["link"].rsplit("/", 1)[1]
        seats.set_password(seats.find_token(token), "a good long password")
        assert run() == {"email": "boss@corp.cn", "link": None, "expires_at": None, "state": "kept",
                         "changed": False}
    finally:
        from webapp import models

        models.database.initialize(db)


def test_scram_verifiers_match_what_postgresql_stores(pg_cluster):
    sys.path.insert(0, str(deploy.PLAYBOOK_DIR / "module_utils"))
    try:
        import crm_psql
    finally:
        sys.path.pop(0)
    pg_cluster.psql("CREATE ROLE scram_probe LOGIN PASSWORD 'pa''ss word'")
    try:
        stored = pg_cluster.psql("SELECT rolpassword FROM pg_authid WHERE rolname = 'scram_probe'").strip()
        assert crm_psql.password_matches(stored, "pa'ss word", "scram_probe")
        assert not crm_psql.password_matches(stored, "other", "scram_probe")
        ours = crm_psql.scram_verifier("pa'ss word")
        assert crm_psql.password_matches(ours, "pa'ss word", "scram_probe") and ours != stored  # fresh salt
        assert crm_psql.password_matches("md5" + __import__("hashlib").md5(b"pwu").hexdigest(), "pw", "u")
    finally:
        pg_cluster.psql("DROP ROLE scram_probe")


def test_settings_are_frozen_so_adopting_returns_a_copy():
    settings = _settings()
    adopted, _ = deploy.adopt_settings(settings)
    assert settings.web.bind == "0.0.0.0:8000" and dataclasses.is_dataclass(adopted)
