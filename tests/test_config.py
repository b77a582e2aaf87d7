"""The one config schema and its loader: every bad file names the file, the key, expected and found."""

from __future__ import annotations

import os
import tomllib
from pathlib import Path

import pytest

from appliance import config
from appliance.errors import ConfigError

EXAMPLE = Path(__file__).resolve().parent.parent / "config.example.toml"
MINIMAL = '[web]\npublic_url = "http://crm.lan"\n[seats]\nlicensed = 10\n'


def _write(tmp_path, text: str) -> Path:
    path = tmp_path / "appliance.toml"
    path.write_text(text, encoding="utf-8")
    return path


def test_example_documents_every_key_with_its_default():
    data = tomllib.loads(EXAMPLE.read_text())
    schema = config.schema_keys()
    assert set(data) == set(schema), "every section, and no other, in config.example.toml"
    for section, keys in schema.items():
        assert set(data[section]) == set(keys), f"[{section}] keys differ from the schema"
        loaded = getattr(config.load(EXAMPLE), section)
        for name, field in keys.items():
            if field.default is not config._REQUIRED:
                assert getattr(loaded, name) == field.default, f"[{section}] {name}: example is not the default"


def test_minimal_file_gets_the_defaults(tmp_path):
    settings = config.load(_write(tmp_path, MINIMAL))
    assert settings.web.workers == 2 and settings.database.port == 5432
    assert settings.seats.licensed == 10 and settings.seats.expires is None
    assert settings.source == str(tmp_path / "appliance.toml")


@pytest.mark.parametrize("text,expected", [
    (MINIMAL + "[web2]\n", "[web2]: unknown section"),
    (MINIMAL.replace("[seats]", "[seats]\nlicenced = 3"), "[seats] licenced: unknown key"),
    (MINIMAL + '[database]\nport = "5432"\n', '[database] port: expected an integer from 1 to 65535, found "5432" (a string)'),
    (MINIMAL + "[database]\nport = 70000\n", "[database] port: expected an integer from 1 to 65535, found 70000"),
    (MINIMAL + "[web2]\n", "appliance.toml"),
    ('[seats]\nlicensed = 10\n', "[web] public_url: required, but missing"),
    (MINIMAL.replace("licensed = 10", "licensed = true"), "[seats] licensed: expected an integer"),
    (MINIMAL.replace("licensed = 10", 'expires = "next year"\nlicensed = 1'), "[seats] expires: expected a date like 2027-12-31"),
    (MINIMAL.replace("[seats]", 'default_locale = "fr"\n[seats]'), '[web] default_locale: expected one of "en", "zh", found "fr"'),
    ("[web\n", "not valid TOML"),
    ("web = 3\n[seats]\nlicensed = 1\n", "[web]: expected a table, found 3 (an integer)"),
])
def test_bad_files_name_the_key_expected_and_found(tmp_path, text, expected):
    with pytest.raises(ConfigError) as err:
        config.load(_write(tmp_path, text))
    assert expected in str(err.value)
    assert str(tmp_path / "appliance.toml") in str(err.value)


def test_dates_and_none(tmp_path):
    s = config.load(_write(tmp_path, MINIMAL.replace("licensed = 10", "licensed = 10\nexpires = 2027-06-30")))
    assert str(s.seats.expires) == "2027-06-30"


def test_missing_and_non_utf8_files(tmp_path):
    with pytest.raises(ConfigError, match="no such configuration file"):
        config.load(tmp_path / "absent.toml")
    path = tmp_path / "latin1.toml"
    path.write_bytes(b'[web]\npublic_url = "caf\xe9"\n')
    with pytest.raises(ConfigError, match="expected UTF-8"):
        config.load(path)


def test_path_resolution_order(monkeypatch, tmp_path):
    monkeypatch.delenv(config.ENV_VAR, raising=False)
    assert config.resolve_path(None) == config.DEFAULT_PATH
    monkeypatch.setenv(config.ENV_VAR, str(tmp_path / "env.toml"))
    assert config.resolve_path(None) == tmp_path / "env.toml"
    assert config.resolve_path(str(tmp_path / "flag.toml")) == tmp_path / "flag.toml"


def test_secrets_are_written_0600_and_refused_when_readable_by_others(tmp_path):
    path = tmp_path / "secret-key"
    config.write_secret(path, "s" * 40)
    assert os.stat(path).st_mode & 0o777 == 0o600
    assert config.read_secret(path, "[web] secret_key_file") == "s" * 40
    os.chmod(path, 0o644)
    with pytest.raises(ConfigError, match="expected mode 0600.*found 0644.*chmod 600"):
        config.read_secret(path, "[web] secret_key_file")


def test_app_refuses_to_start_without_a_proper_secret_key(tmp_path):
    from webapp import create_app

    settings = config.from_mapping({"web": {"public_url": "http://x", "secret_key_file": str(tmp_path / "nope")},
                                    "seats": {"licensed": 1}})
    with pytest.raises(ConfigError, match="does not exist"):
        create_app(settings, database=object())
    config.write_secret(tmp_path / "short", "dev")
    settings = config.from_mapping({"web": {"public_url": "http://x", "secret_key_file": str(tmp_path / "short")},
                                    "seats": {"licensed": 1}})
    with pytest.raises(ConfigError, match="at least 32 characters"):
        create_app(settings, database=object())


@pytest.mark.parametrize("given,missing", [("certificate_file", "key_file"), ("key_file", "certificate_file")])
def test_proxy_certificate_and_key_go_together(tmp_path, given, missing):
    with pytest.raises(ConfigError, match=rf"\[proxy\] {missing}: required with {given}, but missing"):
        config.load(_write(tmp_path, MINIMAL + f'[proxy]\n{given} = "/etc/ssl/crm.pem"\n'))
    both = config.load(_write(tmp_path, MINIMAL + '[proxy]\ncertificate_file = "/etc/ssl/crm.pem"\n'
                                                  'key_file = "/etc/ssl/crm.key"\n'))
    assert str(both.proxy.certificate_file) == "/etc/ssl/crm.pem" and both.proxy.hsts_max_age == 31_536_000
