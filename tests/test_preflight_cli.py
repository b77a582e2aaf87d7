"""`crm-appliance preflight` and `plan` through Click's CliRunner.

Two kinds of test: smoke tests against the real host where the outcome is
deterministic on the CI machine (2 cores, about 24 GiB, root, the quickstart's
PostgreSQL on 5432 with the appliance marker present), and exact tests where
``sizing.host.gather`` (the one function that reads the machine) returns
fabricated ``HostFacts``, so that the command's wiring, rendering and exit
codes are checked on any machine.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import pytest
from click.testing import CliRunner

from installer.cli import main
from sizing import host
from sizing.check import CHECK_IDS
from sizing.host import HostFacts, PortFact
from sizing.profiles import GB, GIB, TOLERANCE

# The CI machine as data: fails standard-50 on cores, memory, disk size and clock; passes eval.
CI_HOST = HostFacts(
    hostname="vm", memory_bytes=25_276_510_208, cpu_affinity=2, cpu_quota=None, data_dir=Path("/var/lib/crm-appliance"),
    disk_mount=Path("/"), disk_total_bytes=270 * GB, disk_free_bytes=84 * GB, os_id="debian", os_version="12",
    os_name="Debian GNU/Linux 12 (bookworm)", arch="x86_64", is_root=True, hostname_resolves=True,
    hostname_addresses=("127.0.0.1",), clock_synchronised=False, clock_source="adjtimex",
    ports=(PortFact(80, "free"), PortFact(443, "free"), PortFact(5432, "held", "postgres", 30130)),
    appliance_marker=True,
)


@pytest.fixture
def fake_host(monkeypatch):
    """Make the commands see fabricated facts; records the data directory each call asked about."""
    seen: list[Path] = []
    state = {"facts": CI_HOST}

    def gather(data_dir, *args, **kwargs):
        seen.append(Path(data_dir))
        return dataclasses.replace(state["facts"], data_dir=Path(data_dir))

    monkeypatch.setattr(host, "gather", gather)

    def use(**changes):
        state["facts"] = dataclasses.replace(CI_HOST, **changes)

    use.seen = seen
    return use


def run(*args: str, config: str = "/nonexistent/appliance.toml"):
    return CliRunner().invoke(main, ["--config", config, *args])


def _error_lines(result) -> list[str]:
    return [line for line in result.output.splitlines() if line.startswith("Error:")]


# ----------------------------------------------------------------------------- the real host

_REAL = host.gather("/var/lib/crm-appliance")
_CI_SHAPED = _REAL.cores < 4 and _REAL.memory_bytes < TOLERANCE.memory_floor(32 * GIB)


@pytest.mark.skipif(not _CI_SHAPED, reason="needs a host smaller than standard-50 (the CI machine: 2 cores, 24 GiB)")
def test_real_host_fails_standard_50_naming_cores_and_memory():
    result = run("preflight", "--profile", "standard-50")
    assert result.exit_code == 1, result.output
    [error] = _error_lines(result)
    assert error.startswith("Error: preflight failed for profile standard-50: cores, memory")
    assert "expected 4 cores, found" in result.output and "give the VM 4 vCPUs or use --profile eval" in result.output
    assert "Traceback" not in result.output


@pytest.mark.skipif(os.geteuid() != 0, reason="preflight passes only as root")
def test_real_host_passes_eval():
    """On the CI machine the quickstart's PostgreSQL holds 5432: the port rule counts it as the appliance's."""
    result = run("preflight", "--profile", "eval")
    assert result.exit_code == 0, result.output
    assert "profile eval (NOT for production), 10 seats" in result.output
    assert " FAIL " not in result.output


def test_real_host_json_lists_every_check_and_accepting_every_failure_passes():
    first = run("preflight", "--json")
    report = json.loads(first.stdout)
    assert [v["check"] for v in report["verdicts"]] == list(CHECK_IDS)
    assert report["facts"]["data_dir"] == "/var/lib/crm-appliance"
    failed = [v["check"] for v in report["verdicts"] if v["status"] == "FAIL"]
    assert first.exit_code == (1 if failed else 0) and report["ok"] is (not failed)
    accepted = run("preflight", "--json", *[arg for c in failed for arg in ("--accept-risk", c)])
    assert accepted.exit_code == 0, accepted.output
    statuses = {v["check"]: v["status"] for v in json.loads(accepted.stdout)["verdicts"]}
    assert all(statuses[c] == "ACCEPTED" for c in failed)


def test_real_host_plan():
    result = run("plan", "--profile", "eval", "--json")
    plan = json.loads(result.stdout)
    assert result.exit_code == (0 if plan["disk"]["fits"] else 1)
    assert plan["seats"] == 10 and plan["resources"]["cores"] == _REAL.cores
    assert plan["pg_max_connections"] >= plan["request_slots"] + 14
    assert set(plan["postgresql_conf"]) == {"max_connections", "shared_buffers", "effective_cache_size",
                                            "work_mem", "maintenance_work_mem"}


# ----------------------------------------------------------------------------- bad input: exit 2, one line

@pytest.mark.parametrize("args, message", [
    (["preflight", "--profile", "huge"],
     "Error: Invalid value for '--profile': 'huge' is not one of 'eval', 'standard-50', 'standard-100', 'standard-200'."),
    (["preflight", "--seats", "0"],
     "Error: Invalid value for '--seats': expected 1 to 50 seats for profile standard-50, found 0"),
    (["preflight", "--profile", "eval", "--seats", "11"],
     "Error: Invalid value for '--seats': expected 1 to 10 seats for profile eval, found 11; use --profile standard-50"),
    (["preflight", "--accept-risk", "cpu"], "Error: Invalid value for '--accept-risk': 'cpu' is not one of 'seats', "),
    (["plan", "--profile", "huge"], "Error: Invalid value for '--profile': 'huge' is not one of 'eval', "),
    (["plan", "--seats", "-1"], "Error: Invalid value for '--seats': expected 1 to 50 seats for profile standard-50, found -1"),
])
def test_bad_input_is_a_usage_error_with_one_clear_line(fake_host, args, message):
    result = run(*args)
    assert result.exit_code == 2, result.output
    [error] = _error_lines(result)
    assert error.startswith(message)
    assert "Traceback" not in result.output
    assert fake_host.seen == []  # nothing was probed


# ----------------------------------------------------------------------------- fabricated hosts: exact outcomes

def test_standard_50_on_the_ci_machine_fails_naming_each_check(fake_host):
    result = run("preflight")
    assert result.exit_code == 1
    assert _error_lines(result) == ["Error: preflight failed for profile standard-50: cores, memory, disk-total, "
                                    "clock; fix them, or take the risk with --accept-risk CHECK"]
    lines = {line.split()[0]: line for line in result.stdout.splitlines()[2:]}
    assert lines["cores"].split()[:4] == ["cores", "4", "cores", "2"] and " FAIL " in lines["cores"]
    assert lines["cores"].endswith("expected 4 cores, found 2: give the VM 4 vCPUs or use --profile eval (up to 10 seats)")
    assert " PASS" in lines["port-5432"] and "the appliance's" in lines["port-5432"]


def test_accepted_risks_let_preflight_pass_and_stay_visible(fake_host):
    result = run("preflight", "--accept-risk", "cores", "--accept-risk", "memory",
                 "--accept-risk", "disk-total", "--accept-risk", "clock")
    assert result.exit_code == 0, result.output
    assert result.stdout.count(" ACCEPTED ") == 4


def test_debian_postgresql_before_the_first_install_only_warns(fake_host):
    assert run("preflight", "--profile", "eval").exit_code == 0
    fake_host(appliance_marker=False)  # Debian's own cluster on a host the appliance never touched
    result = run("preflight", "--profile", "eval")
    assert result.exit_code == 0, result.output
    line = next(l for l in result.stdout.splitlines() if l.startswith("port-5432"))
    assert " WARN " in line and "install adopts this PostgreSQL cluster" in line


def test_a_foreign_web_server_on_443_fails(fake_host):
    from sizing.host import PortFact

    fake_host(appliance_marker=False, ports=(PortFact(80, "free", None, None), PortFact(443, "held", "apache2", 77),
                                             PortFact(5432, "free", None, None)))
    result = run("preflight", "--profile", "eval")
    assert result.exit_code == 1
    assert _error_lines(result) == ["Error: preflight failed for profile eval: port-443; fix them, "
                                    "or take the risk with --accept-risk CHECK"]
    assert "held by apache2 (pid 77) (no appliance installed here)" in result.stdout


def test_data_dir_comes_from_the_flag_then_the_config_then_the_default(fake_host, tmp_path):
    run("preflight", "--data-dir", str(tmp_path / "data"))
    run("preflight")  # no config file: preflight works before install
    config = tmp_path / "appliance.toml"
    config.write_text('[web]\npublic_url = "https://crm.corp.lan"\n[seats]\nlicensed = 50\n'
                      f'[appliance]\ndata_dir = "{tmp_path / "configured"}"\n')
    run("preflight", config=str(config))
    run("plan", config=str(config))
    assert fake_host.seen == [tmp_path / "data", Path("/var/lib/crm-appliance"),
                              tmp_path / "configured", tmp_path / "configured"]


def test_preflight_json_is_the_verdicts(fake_host):
    result = run("preflight", "--profile", "eval", "--seats", "5", "--json")
    assert result.exit_code == 0
    report = json.loads(result.stdout)
    assert (report["profile"], report["seats"], report["ok"], report["accepted"]) == ("eval", 5, True, [])
    clock = next(v for v in report["verdicts"] if v["check"] == "clock")
    assert clock == {"check": "clock", "required": "NTP-synchronised", "found": "not synchronised (adjtimex)",
                     "status": "WARN", "remedy": "expected an NTP-synchronised clock, found none: apt-get install chrony "
                                                 "(in a container, synchronise the host's clock)"}


def test_plan_prints_the_tuning(fake_host):
    fake_host(cpu_affinity=4, memory_bytes=32 * GIB, disk_total_bytes=500 * GB)
    result = run("plan")
    assert result.exit_code == 0, result.output
    assert "gunicorn    workers 9, threads 6 (54 requests at once); database pool 6 per worker" in result.stdout
    assert ("postgresql  max_connections = 68, shared_buffers = 7726MB, effective_cache_size = 23179MB, "
            "work_mem = 37MB, maintenance_work_mem = 1931MB") in result.stdout
    assert "nginx       worker_processes 4" in result.stdout
    assert "= 44.0 GB of 400.0 GB usable; room for 24 years of growth" in result.stdout
    assert "WARNING" not in result.stdout


def test_plan_exits_1_when_the_disk_budget_does_not_fit(fake_host):
    fake_host(cpu_affinity=4, memory_bytes=32 * GIB, disk_total_bytes=40 * GB)
    result = run("plan", "--json")
    assert result.exit_code == 1
    assert json.loads(result.stdout)["disk"]["fits"] is False
    assert _error_lines(result) == ["Error: the year-one disk budget of 44.0 GB does not fit the 32.0 GB usable: "
                                    "give the data directory a larger disk"]
