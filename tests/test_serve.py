"""`crm-appliance serve` runs the real CRM under gunicorn (gthread workers)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from tests.pgcluster import free_port


def test_serve_answers_over_http_and_stops_cleanly(tmp_path, settings, db):
    port = free_port()
    config = tmp_path / "appliance.toml"
    dbs = settings.database
    config.write_text(
        f'[web]\npublic_url = "http://127.0.0.1:{port}"\nbind = "127.0.0.1:{port}"\nworkers = 2\nthreads = 4\n'
        f'secret_key_file = "{settings.web.secret_key_file}"\n[seats]\nlicensed = 5\n'
        f'[database]\nport = {dbs.port}\nname = "{dbs.name}"\nuser = "{dbs.user}"\npassword_file = "{dbs.password_file}"\n'
        f'[appliance]\ndata_dir = "{tmp_path}"\nlog_dir = "{tmp_path}"\n'
    )
    exe = Path(sys.executable).with_name("crm-appliance")
    proc = subprocess.Popen([str(exe), "--config", str(config), "serve"], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, cwd=tmp_path, start_new_session=True)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/auth/login", timeout=2) as resp:
                    body = resp.read().decode()
                    headers = resp.headers
                break
            except (urllib.error.URLError, ConnectionError):
                assert proc.poll() is None, proc.stdout.read()
                assert time.monotonic() < deadline, "gunicorn did not answer within 30 s"
                time.sleep(0.2)
        assert "csrf_token" in body and headers["X-Frame-Options"] == "DENY"
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/auth/set-password/SECRET-TOKEN-123", timeout=5)
        except urllib.error.HTTPError as exc:
            assert exc.code == 404
        assert "frame-ancestors 'none'" in headers["Content-Security-Policy"]
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        output = proc.communicate(timeout=30)[0]
    assert proc.returncode == 0, output
    assert "gthread" in output
    assert "/auth/set-password/<redacted>" in output and "SECRET-TOKEN-123" not in output


def test_serve_refuses_a_bad_secret_before_starting(tmp_path, settings):
    config = tmp_path / "appliance.toml"
    config.write_text(f'[web]\npublic_url = "http://x"\nsecret_key_file = "{tmp_path}/absent"\n[seats]\nlicensed = 5\n')
    exe = Path(sys.executable).with_name("crm-appliance")
    result = subprocess.run([str(exe), "--config", str(config), "serve"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert "absent: [web] secret_key_file: the secret file does not exist" in result.stderr
