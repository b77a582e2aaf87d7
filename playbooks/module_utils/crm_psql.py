# -*- coding: utf-8 -*-
"""Shared by the crm_pg_* modules: psql as the postgres superuser, quoting, SCRAM verifiers.

ansible-core ships no PostgreSQL modules and Galaxy is out of reach, so the appliance
carries these few helpers. SQL always goes to psql on stdin (never on a command line),
and a role's password is turned into a SCRAM-SHA-256 verifier here, so the plain
password never reaches the server or its log.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import re

IDENTIFIER_RE = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")
SCRAM_RE = re.compile(r"^SCRAM-SHA-256\$(\d+):([^$]+)\$([^:]+):(.+)$")
SCRAM_ITERATIONS = 4096  # PostgreSQL's own default (scram_iterations)


def check_identifier(module, value, what):
    """Only plain lower-case names: they need no quoting beyond the double quotes we add."""
    if not IDENTIFIER_RE.match(value or ""):
        module.fail_json(msg="%s %r: expected a lower-case PostgreSQL name (letters, digits, _), found %r"
                         % (what, value, value))


def quote_ident(name):
    return '"' + name.replace('"', '""') + '"'


def quote_literal(text):
    return "'" + text.replace("'", "''") + "'"


def psql(module, sql, port, database="postgres", superuser="postgres"):
    """Run ``sql`` as the cluster's superuser through the local socket; return stdout lines."""
    cmd = ["runuser", "-u", superuser, "--", "psql", "-X", "-q", "-At", "-v", "ON_ERROR_STOP=1",
           "-p", str(port), "-d", database, "-f", "-"]
    rc, out, err = module.run_command(cmd, data=sql, cwd="/")
    if rc != 0:
        module.fail_json(msg="psql on port %s failed: %s" % (port, (err or out).strip().splitlines()[-1:]),
                         rc=rc)
    return [line for line in out.splitlines() if line]


def scram_verifier(password, salt=None, iterations=SCRAM_ITERATIONS):
    """The SCRAM-SHA-256 verifier PostgreSQL stores for ``password`` (RFC 5802, RFC 7677)."""
    salt = salt if salt is not None else os.urandom(16)
    salted = hashlib.pbkdf2_hmac("sha256", password.encode("utf-8"), salt, iterations)
    client_key = hmac.new(salted, b"Client Key", "sha256").digest()
    stored_key = hashlib.sha256(client_key).digest()
    server_key = hmac.new(salted, b"Server Key", "sha256").digest()
    b64 = lambda raw: base64.b64encode(raw).decode("ascii")  # noqa: E731
    return "SCRAM-SHA-256$%d:%s$%s:%s" % (iterations, b64(salt), b64(stored_key), b64(server_key))


def password_matches(stored, password, user):
    """Whether ``stored`` (pg_authid.rolpassword) is a verifier of ``password``; md5 too."""
    if not stored:
        return False
    match = SCRAM_RE.match(stored)
    if match:
        iterations, salt = int(match.group(1)), base64.b64decode(match.group(2))
        return hmac.compare_digest(scram_verifier(password, salt, iterations), stored)
    if stored.startswith("md5"):
        digest = "md5" + hashlib.md5((password + user).encode("utf-8")).hexdigest()
        return hmac.compare_digest(digest, stored)
    return False
