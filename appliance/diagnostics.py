"""The diagnostics bundle vendor support works from (R-24), with no customer data in it (R-10, R-17).

``crm-appliance diagnostics`` calls :func:`build_bundle`, which writes one ``.tar.gz``
(optionally encrypted to the vendor's public key, ``[diagnostics] vendor_public_key_file``)
holding ``manifest.json`` and the files it lists, each with the reason it is there.
docs/diagnostics.md is the long form of what follows.

Built from an allow-list of facts, never from a dump:

- every part is a *collector* below that asks one question (host facts, versions, service
  states, health, PostgreSQL statistics, backups, job history, SLA, config, logs, disk and
  memory) and writes only the fields it names. A part that cannot answer (not installed,
  database down, no supervisor) is listed under ``absent`` in the manifest with the reason;
  building the bundle never fails because one part is missing;
- no part writes a customer table's content: PostgreSQL parts are catalogue and statistics
  views, row *counts* and sizes. The one read of content is the *names* of seat users,
  contacts, leads and accounts, kept in memory so the scrubber can remove them from log
  text (a pattern cannot tell that "Cornelius" is a name), never written;
- logs are scrubbed line by line as they are read (:class:`Scrubber`). Where a log has a
  known format only the named fields are kept (the web access log: client, method, route
  template, status, bytes, duration; nginx errors: time, level, message, client, request as
  method + route template, upstream; install logs: time, event, task, role, host, status,
  and a failure's message); every free-text part goes through the deny rules (known secret
  values, password hashes, ``password=``/``token=``/cookies, URLs and paths reduced to the
  route template without query, e-mail addresses, the known names, phone-number-like
  digit runs, long random tokens, quoted literals, CJK text) and client IP addresses are
  replaced by per-bundle pseudonyms (``<ip-1>``; loopback and the host's own stay).

Encryption (``[diagnostics] vendor_public_key_file``): X25519 key agreement with a fresh
ephemeral key per bundle, HKDF-SHA256, AES-256-GCM over the whole ``.tar.gz``. The
file layout is in :func:`encrypt_for`; the vendor makes the key pair with
``crm-appliance diagnostics keygen`` and reads a bundle with ``crm-appliance diagnostics
decrypt`` (:func:`decrypt_bundle`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import gzip
import hashlib
import importlib
import io
import ipaddress
import json
import logging
import os
import platform
import pkgutil
import pwd
import grp
import re
import shutil
import socket
import ssl
import stat
import subprocess
import sys
import tarfile
import time
import urllib.error
import urllib.request
import zoneinfo
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable
from urllib.parse import unquote, urlsplit

from appliance import config as config_mod
from appliance.config import Settings, toml_value
from appliance.errors import ApplianceError
from appliance.files import write_private

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
REDACTED = "<redacted>"
MANIFEST = "manifest.json"
#: Where attachment files live under [appliance] data_dir (appliance.backup.attachments_dir).
ATTACHMENTS_DIR = "attachments"
#: A single log line longer than this is cut: a line that long is a dump, not a message.
MAX_LINE_CHARS = 2000
#: Reading a log's tail stops after this many bytes per requested line, whatever it finds.
TAIL_BYTES_PER_LINE = 4096
COMMAND_TIMEOUT_SECONDS = 15
HEALTH_TIMEOUT_SECONDS = 5
#: Exact row counts give up after this long per table and fall back to the planner's estimate.
COUNT_TIMEOUT_MS = 2000
SLOW_QUERIES = 25
#: The bundle is meant to be mailed or uploaded; the summary warns above this size.
SIZE_WARNING_BYTES = 5 * 1000**2

#: Encrypted bundle: magic, recipient key id, ephemeral public key, nonce, then AES-GCM output.
MAGIC = b"CRMDIAG\x01"
KEY_ID_BYTES = 8
NONCE_BYTES = 12
HKDF_INFO = b"crm-appliance diagnostics bundle v1"
HEADER_BYTES = len(MAGIC) + KEY_ID_BYTES + 32 + NONCE_BYTES

#: What the bundle never holds, whatever a part finds (repeated in the manifest and the docs).
NEVER_COLLECTED = (
    "customer records: accounts, contacts, leads, opportunities, tickets, activities, notes (only row counts)",
    "names, e-mail addresses and phone numbers of contacts and seat users",
    "attachment names or contents",
    "passwords, password hashes, set-password links and tokens, session ids and cookies, CSRF tokens",
    "the database password, the secret key, the backup key, TLS private keys, any other key",
    "query strings, search text and URL parts that are not route words or numeric ids",
    "SQL statement text with values (slow queries come normalised by pg_stat_statements, or not at all)",
    "the audit log, the login log and the contents of any application table",
    "PostgreSQL's own server log (its STATEMENT and DETAIL lines carry values)",
)


class DiagnosticsError(ApplianceError):
    """The bundle cannot be written, or an encrypted bundle cannot be read (wrong key, damaged file)."""


class Absent(Exception):
    """A part of the bundle that this host cannot provide now; the message says why."""


@dataclass(frozen=True)
class HostPaths:
    """Where the installed appliance's moving parts are on this host (tests point them elsewhere)."""

    release: Path = Path("/opt/crm-appliance/current")
    maintenance_flag: Path = Path("/opt/crm-appliance/maintenance")
    supervisord_conf: Path = Path("/etc/crm-appliance/supervisord.conf")
    systemd_marker: Path = Path("/run/systemd/system")
    nginx_error_log: Path = Path("/var/log/nginx/error.log")
    nginx_pid: Path = Path("/run/nginx.pid")
    services_file: Path = Path(__file__).resolve().parent.parent / "playbooks/roles/services/defaults/main.yml"
    #: Run dpkg-query and pg_lsclusters (read-only); off where their answers would be about another host.
    host_commands: bool = True


#: The production layout; build_bundle's default (tests replace it).
DEFAULT_HOST = HostPaths()


# ============================================================================= scrubbing


#: First path segments of filesystem paths: such a path is kept (unless under the attachments).
_FS_ROOTS = frozenset({"bin", "boot", "dev", "etc", "home", "lib", "lib64", "media", "mnt", "opt", "proc",
                       "root", "run", "sbin", "srv", "sys", "tmp", "usr", "var", "nonexistent"})
_METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")


class RouteMatcher:
    """URL paths -> the web app's route templates (``/contacts/12`` -> ``/contacts/<int:record_id>``).

    Built from the blueprints of the ``webapp`` package on a bare Flask app, so it needs
    no settings and stays in step with the routes. A path no route matches keeps only its
    first segment when that is a route word (``/contacts/<unmatched>``), else ``/<unmatched>``.
    """

    def __init__(self, url_map=None):
        self._map = url_map
        self.words: frozenset[str] = frozenset()
        if url_map is not None:
            self.words = frozenset(
                part for rule in url_map.iter_rules() for part in rule.rule.split("/")
                if part and "<" not in part)
        self._adapter = url_map.bind("localhost") if url_map is not None else None

    @classmethod
    def for_webapp(cls) -> "RouteMatcher":
        try:
            from flask import Blueprint, Flask

            import webapp

            app = Flask("crm-appliance-diagnostics")
            for info in pkgutil.iter_modules(webapp.__path__):
                module = importlib.import_module(f"webapp.{info.name}")
                bp = getattr(module, "bp", None)
                if isinstance(bp, Blueprint):
                    app.register_blueprint(bp)
            return cls(app.url_map)
        except Exception as exc:  # no routes: every URL path is reduced to /<unmatched>, still safe
            log.warning("diagnostics: cannot read the web app's routes (%s); URL paths are fully redacted", exc)
            return cls(None)

    def template(self, path: str, method: str | None = None) -> str:
        if self._adapter is None:
            return "/" if path in ("", "/") else "/<unmatched>"
        decoded = unquote(path or "/")
        # A segment already replaced (gunicorn logs /auth/set-password/<redacted>) stands for a value.
        decoded = re.sub(r"(?<=/)<(int|float)?[^/>]*>(?=/|$)", lambda m: "1" if m[1] else "x", decoded)
        rule = self._match(decoded, method)
        if rule is not None:
            return rule
        first = decoded.strip("/").split("/", 1)[0]
        if first in self.words:
            return f"/{first}/<unmatched>" if decoded.strip("/") != first else f"/{first}"
        return "/<unmatched>"

    def _match(self, path: str, method: str | None, redirected: bool = False) -> str | None:
        """The rule for ``path`` under any method (a 405 still names a route), following /x -> /x/."""
        from werkzeug.exceptions import MethodNotAllowed, NotFound
        from werkzeug.routing import RequestRedirect

        for candidate in dict.fromkeys((method or "GET", *_METHODS)):
            try:
                rule, _ = self._adapter.match(path, method=candidate, return_rule=True)
                return rule.rule
            except MethodNotAllowed:
                continue
            except RequestRedirect as redirect:
                new_path = urlsplit(redirect.new_url).path
                return None if redirected or new_path == path else self._match(new_path, method, True)
            except NotFound:
                return None
            except Exception:  # a converter that chokes on the input: no template
                return None
        return None


def _is_token(word: str) -> bool:
    """A long random-looking word (link token, session id, key, hash), not a name or a timestamp.

    Random: some ``-``/``_``-separated piece switches between letters and digits three
    times or more (``Xk3aB9z``, hex digests, UUIDs), or the word is 32+ characters of mixed
    case. Names such as ``postgresql-15-crmtest48181`` or ``ExecMainStartTimestamp`` stay.
    """
    if re.fullmatch(r"[0-9A-F]{24}", word):  # a WAL segment name: PostgreSQL's own, useful
        return False
    if re.search(r"\d{8}T\d{6}Z", word):  # backup ids and log names carry a timestamp
        return False
    for piece in re.split(r"[-_]", word):
        switches = sum(1 for a, b in zip(piece, piece[1:]) if a.isdigit() != b.isdigit())
        if switches >= 3:
            return True
    return len(word) >= 32 and any(c.isupper() for c in word) and any(c.islower() for c in word)


def _quoted_is_safe(text: str) -> bool:
    """A quoted literal that is the software's own vocabulary, not someone's words."""
    if not text or (text.startswith("<") and text.endswith(">")):
        return True
    return bool(
        re.fullmatch(r"/[\w./<>:+-]*", text)  # a path (URL paths are templated by now)
        or re.fullmatch(r"[a-z_][a-z0-9_]*(?:[._][a-z0-9_]+)+", text)  # module.name, snake_case_name
        or re.fullmatch(r"crm-appliance[\w-]*|%\w|[\d.:,+ -]+", text)  # our programs, %p, numbers
        or re.fullmatch(rf"(?:{'|'.join(_METHODS)}) /\S* HTTP/[\d.]+", text)  # a request line
        # One lower-case ASCII word ('supervisor', 'manifest'): program vocabulary; names are capitalised.
        or re.fullmatch(r"[a-z][a-z0-9_-]{0,30}", text))


class Scrubber:
    """Removes what must never leave the host from text, at collection time.

    ``known_secrets``: literal values (the database password, the secret key, ...) read from
    the secret files; ``names``: the names of seat users, contacts, leads and accounts, whose
    capitalised words are removed wherever they appear (a deny rule cannot know that
    "Cornelius" is a name). Both stay in memory and are never written.
    ``counts`` says how often each rule fired (the manifest reports it).
    """

    _PEM = re.compile(r"-----BEGIN [A-Z0-9 ]*-----.*?(?:-----END [A-Z0-9 ]*-----|\Z)", re.S)
    _HASH = re.compile(r"\$(?:argon2(?:id|i|d)|scrypt|2[abxy]?|pbkdf2(?:-sha\d+)?|[156])\$[^\s\"';]+"
                       r"|\b(?:pbkdf2|scrypt):[\w:]+\$[^\s\"';]+")
    _HEADER = re.compile(r"(?i)\b(set-cookie|cookie|authorization|proxy-authorization)(\s*[:=]\s*).*$", re.M)
    # password=, secret=, csrf_token=: everything after it (to a quote's end, the next & or the line's end).
    _KV_REST = re.compile(r"(?i)\b([\w-]*(?:passw(?:or)?d|pwd|passphrase|secret|csrf)[\w-]*)([\"']?[ \t]*[=:][ \t]*)"
                          r"(\"[^\"\n]*\"|'[^'\n]*'|[^&\n]+)")
    # token=, session=, api_key=: the one value that follows.
    _KV = re.compile(r"(?i)\b([\w-]*(?:token|api[_-]?key|private[_-]?key|session(?:id)?)[\w-]*)"
                     r"([\"']?[ \t]*[=:][ \t]*)(\"[^\"\n]*\"|'[^'\n]*'|[^\s&;,\"')}\]]+)")
    _PG_KEY = re.compile(r"(Key \([^)]*\)=\().*?(\)(?= already exists| is not present| is still referenced"
                         r"| conflicts with|\.?\s*$))")
    _PG_ROW = re.compile(r"(Failing row contains \().*(\))")
    _URL_OR_PATH = re.compile(r"(?P<url>\b[a-zA-Z][a-zA-Z0-9+.-]*://[^\s\"'<>]+)"
                              r"|(?P<path>(?<![\w.~:/<>@%*-])/[^\s\"'()\[\],;]*)")
    _EMAIL = re.compile(r"(?<![\w.+-])[\w.+-]+@[\w-]+(?:\.[\w-]+)*\.[^\W\d_]{2,24}(?![\w-])"
                        r"(?<!\.service)(?<!\.socket)(?<!\.target)(?<!\.timer)(?<!\.mount)")
    _IPV4 = re.compile(r"(?<![\w.])(?:\d{1,3}\.){3}\d{1,3}(?!\d|\.\d)")
    _IPV6 = re.compile(r"(?<![\w:.])[0-9A-Fa-f]{0,4}:[0-9A-Fa-f:]*:[0-9A-Fa-f:.]*(?![\w:])")
    _PHONE = re.compile(r"(?<![\w+./:-])(?:\+\d{1,3}[ .-]?(?:\(\d{1,4}\)[ .-]?)?\d{1,4}(?:[ .-]?\d{2,4}){1,4}"
                        r"|\(\d{2,4}\)[ .-]?\d{3,4}[ .-]?\d{3,4}|\d{2,4}[ .-]\d{3,4}[ .-]\d{3,4}|\d{3,4}-\d{7,8}"
                        r"|\d{7,15})(?![\w/:]|[.-]\d)")
    _TOKEN = re.compile(r"(?<![\w-])[A-Za-z0-9_-]{20,}(?![\w-])")
    # A quote after a letter is an apostrophe (Debian's), not the start of a literal.
    _QUOTED = re.compile(r"(?<!\w)'([^'\n]{1,300})'(?!\w)|\"([^\"\n]{1,300})\"")
    _WORD = re.compile(r"[^\W_]+(?:['-][^\W_]+)*")
    _CJK = re.compile(r"[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af\uf900-\ufaff]+")

    def __init__(self, *, routes: RouteMatcher | None = None, data_dir: Path | None = None,
                 known_secrets: Iterable[str] = (), names: Iterable[str] = (),
                 own_addresses: Iterable[str] = (), local_hosts: Iterable[str] = ()):
        self.routes = routes or RouteMatcher(None)
        self.data_dir = str(data_dir).rstrip("/") if data_dir else None
        self.counts: Counter[str] = Counter()
        self._ips: dict[str, str] = {}
        self._own = {self._norm_ip(a) for a in own_addresses if self._norm_ip(a)}
        self._local_hosts = {h.lower() for h in local_hosts if h} | {"localhost"}
        values = sorted({s for s in known_secrets if s and len(s) >= 6}, key=len, reverse=True)
        self._secrets = re.compile("|".join(re.escape(s) for s in values)) if values else None
        # Every capitalised word of a name ("Zhang Wei" -> Zhang, Wei), matched case-sensitively, so
        # that a contact called "Worker" does not blank out "Booting worker"; lower-case and short
        # words and a few that start our own log lines are left alone.
        self._names = {word for value in names for word in self._WORD.findall(value or "")
                       if len(word) >= 3 and not word.islower() and word.lower() not in _COMMON_WORDS}

    # -- the rules, in order

    def text(self, text: str, *, quoted: bool = True) -> str:
        """One piece of free text (a log line, a message) with every deny rule applied."""
        if not text:
            return text
        if len(text) > MAX_LINE_CHARS:
            text = text[:MAX_LINE_CHARS] + " <cut>"
            self.counts["long line cut"] += 1
        text = self._sub(self._PEM, "private key block", text, REDACTED)
        if self._secrets is not None:
            text = self._sub(self._secrets, "known secret value", text, "<redacted:secret>")
        text = self._sub(self._HASH, "password hash", text, "<redacted:hash>")
        text = self._sub(self._HEADER, "cookie or authorization header", text, lambda m: f"{m[1]}{m[2]}{REDACTED}")
        text = self._KV_REST.sub(lambda m: self._kv(m, "password/secret value"), text)
        text = self._KV.sub(lambda m: self._kv(m, "token/session value"), text)
        text = self._sub(self._PG_KEY, "database key value", text, lambda m: f"{m[1]}{REDACTED}{m[2]}")
        text = self._sub(self._PG_ROW, "database row", text, lambda m: f"{m[1]}{REDACTED}{m[2]}")
        text = self._URL_OR_PATH.sub(self._url_or_path, text)
        text = self._sub(self._EMAIL, "e-mail address", text, "<email>")
        if self._names:
            text = self._WORD.sub(self._name, text)
        text = self._IPV4.sub(self._ip_match, text)
        text = self._IPV6.sub(self._ip_match, text)
        text = self._PHONE.sub(self._phone, text)
        text = self._TOKEN.sub(self._token, text)
        if quoted:
            text = self._QUOTED.sub(self._quoted, text)
        text = self._sub(self._CJK, "CJK text", text, "<text>")
        return text

    def value(self, obj: Any, *, quoted: bool = True) -> Any:
        """``text`` applied to every string inside plain JSON-like data (keys are ours and kept)."""
        if isinstance(obj, str):
            return self.text(obj, quoted=quoted)
        if isinstance(obj, dict):
            return {k: self.value(v, quoted=quoted) for k, v in obj.items()}
        if isinstance(obj, (list, tuple)):
            return [self.value(v, quoted=quoted) for v in obj]
        return obj

    def url(self, url: str, method: str | None = None) -> str:
        """A URL or a path alone (an access line's), through every text rule; ``method`` picks the route."""
        match = self._URL_OR_PATH.fullmatch(url)
        return self.text(self._url_or_path(match, method) if match else url, quoted=False)

    def ip(self, address: str) -> str:
        """Loopback, unspecified and this host's own addresses stay; any other becomes ``<ip-N>``."""
        norm = self._norm_ip(address)
        if norm is None:
            return self.text(address)
        parsed = ipaddress.ip_address(norm)
        if parsed.is_loopback or parsed.is_unspecified or norm in self._own:
            return address
        if norm not in self._ips:
            self._ips[norm] = f"<ip-{len(self._ips) + 1}>"
        self.counts["client IP address (pseudonymised)"] += 1
        return self._ips[norm]

    # -- helpers

    def _sub(self, pattern: re.Pattern, rule: str, text: str, repl) -> str:
        new, n = pattern.subn(repl, text)
        if n:
            self.counts[rule] += n
        return new

    @staticmethod
    def _norm_ip(address: str) -> str | None:
        try:
            parsed = ipaddress.ip_address(address.strip("[]").split("%", 1)[0])
        except ValueError:
            return None
        if isinstance(parsed, ipaddress.IPv6Address) and parsed.ipv4_mapped:
            parsed = parsed.ipv4_mapped
        return str(parsed)

    def _ip_match(self, m: re.Match) -> str:
        return self.ip(m[0]) if self._norm_ip(m[0]) is not None else m[0]

    def _kv(self, m: re.Match, rule: str) -> str:
        # secret_key_file: /etc/..., set_password_link_hours: 72 name a setting, not a secret.
        if re.search(r"(?i)_(?:file|dir|hours|minutes|days|seconds|encryption|set|link|count)$", m[1]):
            return m[0]
        self.counts[rule] += 1
        return f"{m[1]}{m[2]}{REDACTED}"

    def _name(self, m: re.Match) -> str:
        if m[0] not in self._names:
            return m[0]
        self.counts["name of a seat user, contact, lead or account"] += 1
        return "<name>"

    def _phone(self, m: re.Match) -> str:
        digits = sum(c.isdigit() for c in m[0])
        if digits < 7 or digits > 15 or re.fullmatch(r"\d{4}[-/.]\d{2}[-/.]\d{2}(?:[ T]\d{2})?", m[0]):
            return m[0]
        self.counts["phone-like number"] += 1
        return "<phone>"

    def _token(self, m: re.Match) -> str:
        if not _is_token(m[0]):
            return m[0]
        self.counts["long token"] += 1
        return "<token>"

    def _quoted(self, m: re.Match) -> str:
        inner = m[1] if m[1] is not None else m[2]
        if _quoted_is_safe(inner):
            return m[0]
        self.counts["quoted literal"] += 1
        q = m[0][0]
        return f"{q}{REDACTED}{q}"

    def _url_or_path(self, m: re.Match, method: str | None = None) -> str:
        if m["url"]:
            parts = urlsplit(m["url"])
            netloc = parts.netloc
            if "@" in netloc:  # user:password@host
                netloc = netloc.rsplit("@", 1)[1]
                self.counts["credentials in URL"] += 1
            host = (parts.hostname or "").lower()
            ours = host in self._local_hosts or self._norm_ip(host) is not None
            path = self._path(parts.path, method) if ours else (parts.path or "")
            query = "?<query>" if parts.query else ""
            if parts.query and parts.query != "<query>":
                self.counts["query string"] += 1
            return f"{parts.scheme}://{netloc}{path}{query}"
        raw = m["path"]
        path, q, rest = raw.partition("?")
        if q and rest != "<query>":
            self.counts["query string"] += 1
        return self._path(path.partition("#")[0], method) + ("?<query>" if q else "")

    def _path(self, path: str, method: str | None = None) -> str:
        if not path:
            return path
        if self.data_dir and (path + "/").startswith(self.data_dir + "/"):
            below = path[len(self.data_dir):].strip("/").split("/")
            if below and below[0] == ATTACHMENTS_DIR and len(below) > 1:
                self.counts["attachment path"] += 1
                return f"{self.data_dir}/{ATTACHMENTS_DIR}/{REDACTED}"
            return path
        first = path.strip("/").split("/", 1)[0]
        if first in _FS_ROOTS:
            return path
        template = self.routes.template(path, method)
        if template != path:
            self.counts["URL path reduced to its route"] += 1
        return template


#: Never taken as a name: role words a seat may be named after, and words our logs start lines with.
_COMMON_WORDS = frozenset({
    "boss", "admin", "administrator", "agent", "manager", "sales", "support", "user", "test", "root", "team",
    "crm", "service", "none", "unknown", "true", "false", "error", "warning", "info", "debug", "critical",
    "traceback", "file", "key", "detail", "failing", "worker", "booting", "starting", "listening", "using",
    "handling", "shutting", "control", "ensure", "check", "request", "connection", "internal", "server"})


# ============================================================================= the bundle


@dataclass
class BundleFile:
    path: str  # inside the bundle, e.g. "logs/web.log"
    data: bytes
    reason: str
    scrubbed: dict[str, int] = field(default_factory=dict)

    def entry(self) -> dict:
        return {"path": self.path, "reason": self.reason, "bytes": len(self.data),
                "sha256": hashlib.sha256(self.data).hexdigest(),
                **({"scrubbed": self.scrubbed} if self.scrubbed else {})}


@dataclass
class BundleResult:
    """What :func:`build_bundle` made: the manifest, the files, and where the archive went (None in preview)."""

    manifest: dict
    files: list[BundleFile]
    archive_bytes: int
    output: Path | None
    encrypted_to: str | None
    seconds: float

    def file(self, path: str) -> bytes:
        """One file's content by its path in the bundle (``--show``)."""
        for f in self.files:
            if f.path == path:
                return f.data
        raise DiagnosticsError(f"no file {path!r} in the bundle; the manifest lists: "
                               + ", ".join(f.path for f in self.files))

    def summary(self) -> list[str]:
        """Lines for people: what is in it, what is missing and why, what was scrubbed, where it went."""
        m = self.manifest
        total = sum(len(f.data) for f in self.files)
        kind = "an encrypted" if self.encrypted_to else "a compressed"
        lines = [f"Diagnostics bundle for {m['host']} (crm-appliance {m['appliance_version']}), "
                 f"{m['created']}: {len(self.files)} files, {total / 1000:.0f} kB before compression, "
                 f"{self.archive_bytes / 1000:.0f} kB as {kind} archive, built in {self.seconds:.1f} s."]
        if self.archive_bytes > SIZE_WARNING_BYTES:
            lines.append(f"WARNING: larger than {SIZE_WARNING_BYTES // 1000**2} MB; lower [diagnostics] log_lines "
                         f"if it must go by e-mail.")
        lines.append("")
        lines.append("Files:")
        width = max(len(f.path) for f in self.files) if self.files else 10
        for f in self.files:
            lines.append(f"  {f.path:<{width}}  {len(f.data):>9} B  {f.reason}")
        lines.append("")
        if m["absent"]:
            lines.append("Absent (not installed, not running, or not readable):")
            for a in m["absent"]:
                lines.append(f"  {a['part']}: {a['reason']}")
        else:
            lines.append("Absent: nothing; every part answered.")
        lines.append("")
        counts = m["scrubbing"]["replaced"]
        if counts:
            lines.append("Scrubbed while collecting (replacements per rule):")
            for rule, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])):
                lines.append(f"  {n:>7}  {rule}")
        else:
            lines.append("Scrubbed while collecting: nothing needed replacing.")
        lines.append("")
        lines.append("Never collected: " + "; ".join(NEVER_COLLECTED) + ".")
        lines.append("")
        if self.encrypted_to:
            lines.append(f"Encrypted to the vendor key {self.encrypted_to} ([diagnostics] vendor_public_key_file); "
                         f"only the holder of its private key can read it.")
        else:
            lines.append("Not encrypted: set [diagnostics] vendor_public_key_file to encrypt it to the vendor's key.")
        if self.output:
            lines.append(f"Written to {self.output} (mode 0600). Send this file to vendor support.")
        else:
            lines.append("Preview only: nothing was written. Show one file's full content with --show PATH.")
        return lines


class _Build:
    """The state one bundle build carries between its parts."""

    def __init__(self, settings: Settings, host: HostPaths, log_lines: int, now: float):
        self.settings = settings
        self.host = host
        self.log_lines = log_lines
        self.now = now
        self.files: list[BundleFile] = []
        self.absent: list[dict] = []
        self.scrub = Scrubber()
        self._pg = None
        self._pg_error: str | None = None
        self._install_start: dict | None = None

    # -- adding files

    def add(self, path: str, data: bytes | str, reason: str, counts_before: Counter | None = None) -> None:
        raw = data.encode("utf-8") if isinstance(data, str) else data
        scrubbed = {}
        if counts_before is not None:
            scrubbed = {k: v for k, v in (self.scrub.counts - counts_before).items() if v}
        self.files.append(BundleFile(path, raw, reason, scrubbed))

    def add_json(self, path: str, obj: Any, reason: str, *, quoted: bool = True) -> None:
        before = Counter(self.scrub.counts)
        clean = self.scrub.value(obj, quoted=quoted)
        self.add(path, json.dumps(clean, indent=2, ensure_ascii=False, default=str) + "\n", reason, before)

    def missing(self, part: str, reason: str) -> None:
        self.absent.append({"part": part, "reason": self.scrub.text(reason)})

    # -- shared sources

    def pg(self):
        """A read-only psycopg2 connection as the appliance's role, or Absent (once, with the reason)."""
        if self._pg is not None:
            return self._pg
        if self._pg_error is not None:
            raise Absent(self._pg_error)
        import psycopg2

        cfg = self.settings.database
        try:
            self._pg = psycopg2.connect(
                host=cfg.host, port=cfg.port, dbname=cfg.name, user=cfg.user, password=cfg.password(),
                connect_timeout=cfg.connect_timeout_seconds, application_name="crm-appliance-diagnostics",
                options="-c default_transaction_read_only=on -c statement_timeout=10000")
            self._pg.autocommit = True
        except ApplianceError as exc:
            self._pg_error = f"cannot read the database password: {exc}"
            raise Absent(self._pg_error) from None
        except psycopg2.Error as exc:
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            self._pg_error = (f"PostgreSQL at {cfg.host}:{cfg.port} database {cfg.name!r} does not answer: {first}; "
                              f"is the cluster running (pg_lsclusters)?")
            raise Absent(self._pg_error) from None
        return self._pg

    def close(self) -> None:
        if self._pg is not None:
            with contextlib.suppress(Exception):
                self._pg.close()

    def query(self, sql: str, args: tuple = ()) -> list[tuple]:
        with self.pg().cursor() as cur:
            cur.execute(sql, args)
            return cur.fetchall()

    def install_start(self) -> dict:
        """The first record of the last install log: profile, plan, accepted risks (as ``deploy`` reads it)."""
        if self._install_start is None:
            logs = _logs_of(self.settings.appliance.log_dir, "install")
            self._install_start = _first_record(logs[-1]) if logs else {}
        return self._install_start


def _run(argv: list[str], timeout: float = COMMAND_TIMEOUT_SECONDS) -> subprocess.CompletedProcess:
    """Run a read-only command; Absent when it is not installed or hangs."""
    try:
        return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, cwd="/",
                              env={"PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"),
                                   "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8", "SYSTEMD_PAGER": ""})
    except FileNotFoundError:
        raise Absent(f"{argv[0]} is not installed") from None
    except subprocess.TimeoutExpired:
        raise Absent(f"{' '.join(argv[:2])} did not answer within {timeout:.0f} s") from None
    except OSError as exc:
        raise Absent(f"cannot run {argv[0]}: {exc.strerror}") from None


def _logs_of(log_dir: Path, kind: str) -> list[Path]:
    try:
        return sorted(log_dir.glob(f"{kind}-*.log"))
    except OSError:
        return []


def _first_record(path: Path) -> dict:
    try:
        with open(path, encoding="utf-8", errors="replace") as fh:
            first = json.loads(fh.readline() or "{}")
        return first if isinstance(first, dict) else {}
    except (OSError, ValueError):
        return {}


def _last_record(path: Path) -> dict:
    lines = tail_lines(path, 1)
    try:
        last = json.loads(lines[-1]) if lines else {}
        return last if isinstance(last, dict) else {}
    except ValueError:
        return {}


def tail_lines(path: Path, n: int) -> list[str]:
    """The last ``n`` lines of a file, reading backwards from its end (logs can be large)."""
    limit = max(n, 1) * TAIL_BYTES_PER_LINE
    with open(path, "rb") as fh:
        fh.seek(0, os.SEEK_END)
        end = fh.tell()
        pos, chunks, newlines = end, [], 0
        while pos > 0 and newlines <= n and end - pos < limit:
            step = min(65536, pos)
            pos -= step
            fh.seek(pos)
            chunk = fh.read(step)
            chunks.append(chunk)
            newlines += chunk.count(b"\n")
    data = b"".join(reversed(chunks))
    lines = data.decode("utf-8", errors="replace").splitlines()
    if pos > 0 and lines:
        lines = lines[1:]  # the first one is most likely cut
    return lines[-n:] if n else []


# ============================================================================= the parts


def _part_host(b: _Build) -> None:
    """Host facts, preflight verdicts against the installed profile, and the plan next to what is in force."""
    from sizing import check as sizing_check
    from sizing import host as sizing_host
    from sizing import plan as sizing_plan
    from sizing import profiles as sizing_profiles

    facts = sizing_host.gather(b.settings.appliance.data_dir)
    b.add_json("host/facts.json", {**dataclasses.asdict(facts), "cores": facts.cores},
               "What this machine is (sizing.host): memory, cores, disk, OS, ports, clock; what preflight judges.")
    start = b.install_start()
    profile_name = start.get("profile") or sizing_profiles.DEFAULT_PROFILE
    basis = ("the last install log" if start.get("profile")
             else f"no install log found: the installer's default profile {profile_name}")
    try:
        profile = sizing_profiles.get(profile_name)
        seats = int((start.get("plan") or {}).get("seats") or min(b.settings.seats.licensed, profile.max_seats))
        accepted = [a for a in start.get("accepted_risks") or [] if a in sizing_check.CHECK_IDS]
        result = sizing_check.preflight(facts, profile, seats, accepted)
    except ApplianceError as exc:
        b.missing("host/preflight.json", f"preflight for profile {profile_name!r} cannot run: {exc}")
        return
    b.add_json("host/preflight.json", {
        "profile": profile.name, "profile_from": basis, "seats": seats, "accepted_risks": list(result.accepted),
        "ok": result.ok, "verdicts": [dataclasses.asdict(v) for v in result.verdicts]},
        "Preflight verdicts of this host against the installed profile, with the accepted risks.")
    try:
        plan = sizing_plan.plan_for(profile, seats, facts)
    except ApplianceError as exc:
        b.missing("host/sizing.json", f"no sizing plan for {seats} seats on this host: {exc}")
        return
    in_force_pg: dict | str
    try:
        names = list(plan.postgresql_conf())
        in_force_pg = {name: value for name, value in b.query(
            "SELECT name, current_setting(name) FROM pg_settings WHERE name = ANY(%s) ORDER BY name", (names,))}
    except Absent as exc:
        in_force_pg = f"absent: {exc}"
    web, database = b.settings.web, b.settings.database
    b.add_json("host/sizing.json", {
        "plan": {"seats": plan.seats, "resources": dataclasses.asdict(plan.resources),
                 "gunicorn_workers": plan.gunicorn_workers, "gunicorn_threads": plan.gunicorn_threads,
                 "db_pool_size": plan.db_pool_size, "postgresql": plan.postgresql_conf(),
                 "nginx_worker_processes": plan.nginx_worker_processes,
                 "disk": {**dataclasses.asdict(plan.disk), "total_bytes": plan.disk.total_bytes,
                          "data_bytes": plan.disk.data_bytes, "fits": plan.disk.fits},
                 "warnings": list(plan.warnings)},
        "plan_at_last_install": start.get("plan") or None,
        "in_force": {"web.workers": web.workers, "web.threads": web.threads,
                     "database.pool_size": database.pool_size, "postgresql": in_force_pg}},
        "The sizing plan for this host and profile next to the settings actually in force.")


def _part_resources(b: _Build) -> None:
    """Disk and memory use: sizes only, no file names below the data directory."""
    import psutil

    def usage(path: Path) -> dict:
        probe = path
        while not probe.exists() and probe != probe.parent:
            probe = probe.parent
        u = shutil.disk_usage(probe)
        return {"path": str(path), "exists": path.exists(), "total_bytes": u.total, "used_bytes": u.used,
                "free_bytes": u.free, "used_percent": round(100 * u.used / u.total, 1) if u.total else None}

    def tree_bytes(path: Path, budget: list[int]) -> int | None:
        total = 0
        try:
            for root, dirs, files in os.walk(path):
                for name in files:
                    budget[0] -= 1
                    if budget[0] < 0:
                        return None  # too many files to walk in a support bundle's time
                    with contextlib.suppress(OSError):
                        total += os.lstat(os.path.join(root, name)).st_size
        except OSError:
            return None
        return total

    s = b.settings
    data_dir = s.appliance.data_dir
    budget = [500_000]
    known = {ATTACHMENTS_DIR: data_dir / ATTACHMENTS_DIR, "backups": s.backup.dir,
             "wal_archive": s.backup.wal_archive_dir, "monitor": data_dir / "monitor", "logs": s.appliance.log_dir}
    sizes = {name: (tree_bytes(path, budget) if path.exists() else None) for name, path in known.items()}
    data_total = tree_bytes(data_dir, budget) if data_dir.exists() else None
    vm, swap = psutil.virtual_memory(), psutil.swap_memory()
    processes: dict[str, dict] = {}
    for proc in psutil.process_iter(["name", "cmdline", "memory_info"]):
        try:
            cmdline = proc.info["cmdline"] or []
            name = proc.info["name"] or ""
            joined = " ".join(cmdline)
            if "crm-appliance" in joined or name.startswith("crm-appliance"):
                sub = next((a for a in cmdline if a in ("serve", "scheduler")), "")
                label = f"crm-appliance {sub}".strip() if "supervisord" not in joined else "supervisord"
            elif name in ("postgres", "postmaster", "nginx", "supervisord"):
                label = name
            else:
                continue
            entry = processes.setdefault(label, {"count": 0, "rss_bytes": 0})
            entry["count"] += 1
            entry["rss_bytes"] += proc.info["memory_info"].rss if proc.info["memory_info"] else 0
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    b.add_json("host/resources.json", {
        "memory": {"total_bytes": vm.total, "available_bytes": vm.available, "used_percent": vm.percent,
                   "swap_total_bytes": swap.total, "swap_used_bytes": swap.used},
        "load_average": list(os.getloadavg()), "cpu_count": os.cpu_count(),
        "boot_time": dt.datetime.fromtimestamp(psutil.boot_time(), dt.timezone.utc).isoformat(timespec="seconds"),
        "filesystems": {"data_dir": usage(data_dir), "log_dir": usage(s.appliance.log_dir),
                        "backup_dir": usage(s.backup.dir), "wal_archive_dir": usage(s.backup.wal_archive_dir)},
        "data_dir_bytes": {"total": data_total, **sizes,
                           "note": "sizes only; null = missing or too many files to count"},
        "processes": processes},
        "Disk and memory use: filesystems, the data directory's parts by size, the appliance's processes.")


def _part_versions(b: _Build) -> None:
    """The appliance's version, its Python packages (the running release), Debian packages, the OS."""
    import appliance
    from importlib import metadata

    out: dict[str, Any] = {"this_program": {"appliance": appliance.__version__, "python": platform.python_version(),
                                            "executable": sys.executable}}
    release = b.host.release
    site = sorted(release.glob("lib/python3*/site-packages")) if release.exists() else []
    if site:
        dists = sorted({(d.metadata["Name"] or "?", d.version) for d in metadata.distributions(path=[str(site[-1])])},
                       key=lambda x: x[0].lower())
        out["release"] = {"path": str(release.resolve()), "packages": {name: version for name, version in dists}}
        out["release"]["appliance"] = out["release"]["packages"].get("crm-appliance") or out["release"]["packages"].get(
            "crm_appliance")
    else:
        out["release"] = f"absent: no installed release at {release}"
        b.missing("versions: release packages", f"no installed release at {release} (not installed yet?)")
    if b.host.host_commands:
        try:
            res = _run(["dpkg-query", "-W", "-f", "${Package}\\t${Version}\\t${db:Status-Abbrev}\\n",
                        "postgresql*", "nginx*", "supervisor", "libpq5", "python3"])
            out["debian_packages"] = {p[0]: p[1] for p in (line.split("\t") for line in res.stdout.splitlines())
                                      if len(p) == 3 and p[2].startswith("ii")}
        except Absent as exc:
            out["debian_packages"] = f"absent: {exc}"
            b.missing("versions: Debian packages", str(exc))
    os_release: dict[str, str] = {}
    with contextlib.suppress(OSError):
        for line in Path("/etc/os-release").read_text(encoding="utf-8").splitlines():
            key, sep, value = line.partition("=")
            if sep and key in ("PRETTY_NAME", "ID", "VERSION_ID", "VERSION_CODENAME"):
                os_release[key] = value.strip().strip('"')
    out["os"] = {**os_release, "kernel": platform.release(), "machine": platform.machine()}
    b.add_json("versions.json", out, "Versions: the appliance, its Python packages, PostgreSQL/nginx packages, the OS.")


def _services_list(b: _Build) -> list[dict]:
    try:
        import yaml

        return list(yaml.safe_load(b.host.services_file.read_text())["services_list"])
    except Exception as exc:  # the description is ours; without it, the two known names
        log.warning("diagnostics: cannot read %s: %s", b.host.services_file, exc)
        return [{"name": "crm-appliance-web"}, {"name": "crm-appliance-scheduler"}]


_SYSTEMD_PROPS = ("Id", "LoadState", "ActiveState", "SubState", "NRestarts", "ExecMainStatus",
                  "ActiveEnterTimestamp", "Result")


def _part_services(b: _Build) -> None:
    """Service states and restart counts, from systemd or supervisord; nginx and PostgreSQL too."""
    listed = _services_list(b)
    out: dict[str, Any] = {"services": []}
    if b.host.systemd_marker.exists():
        out["manager"] = "systemd"
        version, _, name = b.settings.backup.cluster.partition("/")
        units = [s["name"] for s in listed] + ["nginx", f"postgresql@{version}-{name}"]
        for unit in units:
            res = _run(["systemctl", "show", "-p", ",".join(_SYSTEMD_PROPS), unit])
            props = dict(line.split("=", 1) for line in res.stdout.splitlines() if "=" in line)
            out["services"].append({"name": unit, **{k: props.get(k) for k in _SYSTEMD_PROPS if k != "Id"}})
    else:
        conf = b.host.supervisord_conf
        if not conf.exists():
            raise Absent(f"no service manager: systemd is not PID 1 and supervisord is not set up ({conf} does "
                         f"not exist); the services are installed by crm-appliance install")
        out["manager"] = "supervisord"
        ctl = b.host.release / "bin" / "supervisorctl"
        exe = str(ctl) if ctl.exists() else shutil.which("supervisorctl")
        if exe is None:
            raise Absent(f"supervisorctl not found at {ctl} nor on PATH")
        res = _run([exe, "--configuration", str(conf), "status"])
        states = {}
        for line in res.stdout.splitlines():
            parts = line.split(None, 2)
            if len(parts) >= 2:
                states[parts[0]] = {"state": parts[1], "detail": parts[2] if len(parts) > 2 else ""}
        if not states:
            out["supervisorctl"] = (res.stdout.strip() or res.stderr.strip() or f"exit status {res.returncode}")
        restarts = _supervisord_restarts(b)
        for s in listed:
            entry = {"name": s["name"], "enabled": s.get("enabled", True), **states.get(s["name"], {"state": "absent"})}
            if s.get("note") and not s.get("enabled", True):
                entry["note"] = s["note"]
            entry.update(restarts.get(s["name"], {}))
            out["services"].append(entry)
        out["restart_counts_from"] = f"the last {b.log_lines} lines of supervisord.log"
    out["nginx"] = _pid_state(b.host.nginx_pid)
    if b.host.host_commands:
        with contextlib.suppress(Absent):
            res = _run(["pg_lsclusters", "--no-header"])
            out["postgresql_clusters"] = [dict(zip(("version", "cluster", "port", "status", "owner", "data_dir",
                                                    "log_file"), line.split())) for line in res.stdout.splitlines()]
    flag = b.host.maintenance_flag
    out["maintenance_page"] = "on" if flag.exists() else "off"
    b.add_json("services.json", out, "Service states and restart counts (systemd or supervisord), nginx, PostgreSQL.")


def _supervisord_restarts(b: _Build) -> dict[str, dict]:
    path = b.settings.appliance.log_dir / "supervisord.log"
    counts: dict[str, Counter] = {}
    with contextlib.suppress(OSError):
        for line in tail_lines(path, b.log_lines):
            m = re.search(r"\b(spawned|exited|gave up|stopped): '?([\w.-]+)'?(.*)", line)
            if m:
                kind = m[1]
                if kind == "exited" and "not expected" in m[3]:
                    kind = "exited unexpectedly"
                counts.setdefault(m[2], Counter())[kind] += 1
    return {name: {"starts": c["spawned"], "unexpected_exits": c["exited unexpectedly"], "gave_up": c["gave up"]}
            for name, c in counts.items()}


def _pid_state(pidfile: Path) -> str:
    try:
        os.kill(int(pidfile.read_text().strip()), 0)
        return "running"
    except FileNotFoundError:
        return f"not running (no {pidfile})"
    except (OSError, ValueError):
        return "not running"


def _part_health(b: _Build) -> None:
    """The body of /healthz, fetched as the uptime probe fetches it (127.0.0.1, no certificate check)."""
    from appliance import monitor

    url, host_header = monitor.probe_url(b.settings)
    if urlsplit(url).hostname not in ("127.0.0.1", "localhost", "::1"):
        raise Absent(f"[monitor] probe_url {url} is not on this host; the bundle only asks 127.0.0.1")
    request = urllib.request.Request(url, headers={"Host": host_header} if host_header else {})
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}), urllib.request.HTTPSHandler(context=context))
    started = time.monotonic()
    try:
        with opener.open(request, timeout=HEALTH_TIMEOUT_SECONDS) as resp:
            status, body = resp.status, resp.read(65536)
    except urllib.error.HTTPError as exc:
        status, body = exc.code, exc.read(65536)
    except (OSError, urllib.error.URLError) as exc:
        raise Absent(f"{url} does not answer: {getattr(exc, 'reason', exc)}") from None
    out: dict[str, Any] = {"url": url, "status": status, "ms": round((time.monotonic() - started) * 1000)}
    try:
        data = json.loads(body)
        out["body"] = {"status": data.get("status"), "checks": data.get("checks")}
    except (ValueError, AttributeError):
        out["body"] = f"not JSON ({len(body)} bytes): not /healthz, or a proxy's error page"
    b.add_json("health.json", out, "The appliance's own health answer (/healthz: web, database, disk, scheduler).")


_SECRET_SETTING = re.compile(r"passw|passphrase|secret|key|token|conninfo|credential", re.I)


def _part_database(b: _Build) -> None:
    """PostgreSQL: version, non-default settings, sizes, row counts, slow queries, archiving, replication."""
    conn = b.pg()
    version, version_num = b.query("SELECT version(), current_setting('server_version_num')")[0]
    settings = [{"name": n, "setting": v, "unit": u, "source": s}
                for n, v, u, s in b.query(
                    "SELECT name, setting, unit, source FROM pg_settings "
                    "WHERE source NOT IN ('default', 'client', 'session') ORDER BY name")
                if n == "password_encryption" or not _SECRET_SETTING.search(n)]
    archiver = b.query("SELECT archived_count, last_archived_wal, last_archived_time, failed_count, "
                       "last_failed_wal, last_failed_time, stats_reset FROM pg_stat_archiver")[0]
    keys = ("archived_count", "last_archived_wal", "last_archived_time", "failed_count", "last_failed_wal",
            "last_failed_time", "stats_reset")
    replication = [{"state": s, "sync_state": y, "count": c, "max_replay_lag_seconds": lag}
                   for s, y, c, lag in b.query(
                       "SELECT state, sync_state, count(*), max(extract(epoch FROM replay_lag)) "
                       "FROM pg_stat_replication GROUP BY 1, 2 ORDER BY 1, 2")]
    slots = [{"slot_type": t, "active": a, "count": c} for t, a, c in b.query(
        "SELECT slot_type, active, count(*) FROM pg_replication_slots GROUP BY 1, 2 ORDER BY 1, 2")]
    activity = [{"state": s, "wait_event_type": w, "count": c, "oldest_seconds": o} for s, w, c, o in b.query(
        "SELECT coalesce(state, 'background'), wait_event_type, count(*), "
        "round(max(extract(epoch FROM now() - coalesce(xact_start, backend_start)))::numeric, 1) "
        "FROM pg_stat_activity GROUP BY 1, 2 ORDER BY 1, 2")]
    in_recovery = b.query("SELECT pg_is_in_recovery()")[0][0]
    b.add_json("database/server.json", {
        "version": version, "version_num": int(version_num), "in_recovery": in_recovery,
        "settings_not_default": settings,
        "settings_note": "every setting whose source is not the default, except password/key/conninfo-like ones",
        "archiving": dict(zip(keys, archiver)), "archive_mode": b.query("SELECT current_setting('archive_mode')")[0][0],
        "replication": {"standbys": replication, "slots": slots},
        "connections": activity}, "PostgreSQL: version, settings that differ from the defaults, WAL archiving, "
                                  "replication and connection counts (no query text, no client addresses).",
        quoted=False)

    tables = []
    for relname, estimate, total, heap, live, dead, vacuum, analyze, seq, idx in b.query(
            "SELECT c.relname, c.reltuples::bigint, pg_total_relation_size(c.oid), pg_relation_size(c.oid), "
            "s.n_live_tup, s.n_dead_tup, greatest(s.last_vacuum, s.last_autovacuum), "
            "greatest(s.last_analyze, s.last_autoanalyze), s.seq_scan, s.idx_scan "
            "FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
            "LEFT JOIN pg_stat_user_tables s ON s.relid = c.oid "
            "WHERE n.nspname = 'public' AND c.relkind IN ('r', 'p') ORDER BY c.relname"):
        tables.append({"table": relname, "rows": _exact_count(conn, relname), "rows_estimate": estimate,
                       "total_bytes": total, "table_bytes": heap, "live_tuples": live, "dead_tuples": dead,
                       "last_vacuum": vacuum, "last_analyze": analyze, "seq_scans": seq, "index_scans": idx})
    b.add_json("database/tables.json", {
        "database": b.settings.database.name,
        "database_bytes": b.query("SELECT pg_database_size(current_database())")[0][0],
        "tables": tables,
        "note": "numbers only: row counts (exact, or null when counting took over "
                f"{COUNT_TIMEOUT_MS} ms; then see rows_estimate), sizes and maintenance times"},
        "Database and table sizes and row counts per table: numbers only, never a row.")

    have = b.query("SELECT extversion FROM pg_extension WHERE extname = 'pg_stat_statements'")
    if not have:
        b.add_json("database/slow-queries.json", {
            "available": False,
            "reason": "the pg_stat_statements extension is not installed in this database, so no slow-query "
                      "summary is collected (query text with values is never collected)"},
            "Slow-query summary: absent, and why.")
        b.missing("database/slow-queries", "pg_stat_statements is not installed in the database")
        return
    rows = b.query(
        "SELECT queryid, calls, round(total_exec_time::numeric, 1), round(mean_exec_time::numeric, 2), "
        "round(max_exec_time::numeric, 2), rows, query FROM pg_stat_statements "
        "WHERE dbid = (SELECT oid FROM pg_database WHERE datname = current_database()) "
        "ORDER BY total_exec_time DESC LIMIT %s", (SLOW_QUERIES,))
    queries = []
    for queryid, calls, total_ms, mean_ms, max_ms, nrows, text in rows:
        text = " ".join((text or "").split())
        # Normalised DML only: utility statements (ALTER ROLE ... PASSWORD) keep their literals.
        if not re.match(r"(?i)(select|insert|update|delete|with)\b", text) or re.search(r"'|--|/\*|\$\$", text):
            text, omitted = None, "not a normalised SELECT/INSERT/UPDATE/DELETE, or it holds a literal"
        else:
            omitted = None
        queries.append({"queryid": str(queryid), "calls": calls, "total_ms": total_ms, "mean_ms": mean_ms,
                        "max_ms": max_ms, "rows": nrows, "query": text,
                        **({"query_omitted": omitted} if omitted else {})})
    b.add_json("database/slow-queries.json", {"available": True, "extension_version": have[0][0],
                                              "top_by_total_time": queries},
               "The slowest statements by total time, as pg_stat_statements normalises them ($1 for every value).")


def _exact_count(conn, table: str) -> int | None:
    from psycopg2 import sql

    try:
        with conn.cursor() as cur:
            cur.execute("SET statement_timeout = %s", (COUNT_TIMEOUT_MS,))
            try:
                cur.execute(sql.SQL("SELECT count(*) FROM public.{}").format(sql.Identifier(table)))
                return cur.fetchone()[0]
            finally:
                cur.execute("SET statement_timeout = 10000")
    except Exception:  # timeout or no privilege: the estimate is next to it
        return None


def _part_schema(b: _Build) -> None:
    """Which schema migrations are applied (names only)."""
    from appliance.db import migration_status, open_database

    b.pg()  # the same reason as the other database parts when PostgreSQL is down
    one = dataclasses.replace(b.settings, database=dataclasses.replace(b.settings.database, pool_size=1))
    db = open_database(one, bind=False)
    try:
        status = migration_status(db)
    finally:
        db.close_all()
    b.add_json("database/schema.json", {"applied": [n for n, done in status if done],
                                        "pending": [n for n, done in status if not done]},
               "Schema migrations applied and pending.")


def _part_backups(b: _Build) -> None:
    """The backup catalogue and restore (and drill) history, from appliance.backup when it exists."""
    try:
        backup = importlib.import_module("appliance.backup")
    except Exception as exc:
        raise Absent(f"appliance.backup is not part of this release ({type(exc).__name__}: {exc})") from None
    try:
        catalogue = [_plain(info) for info in backup.list_backups(b.settings)]
    except Exception as exc:
        raise Absent(f"cannot read the backup catalogue in {b.settings.backup.dir}: {exc}") from None
    out: dict[str, Any] = {"dir": str(b.settings.backup.dir), "backups": catalogue}
    for name in ("restore_history", "drill_history"):
        func = getattr(backup, name, None)
        if func is None:
            with contextlib.suppress(Exception):
                func = getattr(importlib.import_module("appliance.restore"), name, None)
        if func is None:
            out[name] = "absent: not provided by this release"
            continue
        try:
            out[name] = [_plain(x) for x in func(b.settings)]
        except Exception as exc:
            out[name] = f"absent: {exc}"
    b.add_json("backups.json", out, "The backup catalogue (ids, kinds, sizes, states, durations) and restore results.")


def _plain(obj: Any) -> Any:
    if hasattr(obj, "to_json"):
        return obj.to_json()
    if dataclasses.is_dataclass(obj):
        return dataclasses.asdict(obj)
    return obj


def _part_scheduler(b: _Build) -> None:
    from appliance import scheduler

    b.pg()  # the same reason as the database parts when PostgreSQL is down
    try:
        history = scheduler.history(b.settings, limit=200)
    except ApplianceError as exc:
        raise Absent(str(exc)) from None
    heartbeat = b.settings.appliance.data_dir / scheduler.HEARTBEAT_FILE
    try:
        age = round(time.time() - heartbeat.stat().st_mtime)
    except OSError:
        age = None
    b.add_json("scheduler/history.json", {"heartbeat_age_seconds": age, "runs": history},
               "The scheduler's job runs (backups, prune, WAL check, restore drills): outcome, time, message.")


def _part_sla(b: _Build) -> None:
    """This and last month's SLA report, the maintenance windows, and those months' probe ledgers."""
    from appliance import monitor

    tz = zoneinfo.ZoneInfo(b.settings.web.timezone)
    year, month = monitor.current_month(tz, b.now)
    for y, m in (monitor.shift_month(year, month, -1), (year, month)):
        report = monitor.report_for_month(b.settings, y, m, now=int(b.now))
        b.add_json(f"sla/report-{y:04d}-{m:02d}.json", report.to_dict(),
                   f"Availability for {y:04d}-{m:02d} (R-22): budget, counted downtime, outages, unknown time.")
    b.add_json("sla/maintenance-windows.json", [w.to_dict() for w in monitor.load_windows(b.settings)],
               "Announced maintenance windows (excluded from the SLA).")
    utc = dt.datetime.fromtimestamp(b.now, dt.timezone.utc)
    wanted = {f"probes-{y:04d}-{m:02d}.log" for y, m in (monitor.shift_month(utc.year, utc.month, -1),
                                                          (utc.year, utc.month))}
    for path in monitor.ledger_files(b.settings):
        if path.name not in wanted:
            continue
        probes, malformed = monitor.parse_ledger(path.read_bytes())
        # Rebuilt from parsed fields: only time, up/down, latency and a short known detail survive.
        lines = [monitor.Probe(p.t, p.ok, p.ms, p.detail if re.fullmatch(r"[\w:.,-]{1,40}", p.detail) else "-").line()
                 for p in probes]
        b.add(f"sla/{path.name}", "".join(lines),
              f"The probe ledger for {path.name[7:14]}: one line per /healthz probe (time, up, ms, status)"
              + (f"; {malformed} malformed lines left out" if malformed else ""))


_SECRET_KEY_NAME = re.compile(r"passw|secret|token|passphrase|(?:^|_)key(?:_|$)")
#: File keys whose file is public: named with a path, never read.
_PUBLIC_FILE_KEYS = frozenset({"certificate_file", "vendor_public_key_file"})


def _is_secret_file_key(key: str) -> bool:
    """``password_file``, ``secret_key_file``, ``key_file``, ...: a file holding a secret."""
    return key.endswith("_file") and key not in _PUBLIC_FILE_KEYS and bool(_SECRET_KEY_NAME.search(key[:-5]))


def _part_config(b: _Build) -> None:
    """The settings in force, every secret replaced; secret files by path and mode only."""
    before = Counter(b.scrub.counts)
    s = b.settings
    lines = [f"# The settings in force, from {s.source} with every default filled in.",
             "# Secrets are files; their paths and modes are in config/secret-files.json, never their content.", ""]
    files = []
    for section, keys in config_mod.schema_keys().items():
        lines.append(f"[{section}]")
        values = getattr(s, section)
        for key in keys:
            value = getattr(values, key)
            if _is_secret_file_key(key):
                files.append(_secret_file_state(f"[{section}] {key}", value))
                lines.append(f"{key} = {toml_value(value)}  # a secret file: content not collected")
            elif _SECRET_KEY_NAME.search(key) and isinstance(value, str) and not isinstance(value, Path):
                lines.append(f"{key} = \"{REDACTED}\"")
                b.scrub.counts["secret config value"] += 1
            else:
                shown = toml_value(value)
                lines.append(f"{key} = {b.scrub.text(shown, quoted=False) if isinstance(value, str) else shown}")
        lines.append("")
    b.add("config/appliance.toml", "\n".join(lines), "The configuration in force with every secret replaced by "
          f"{REDACTED} (the TOML schema of config.example.toml).", before)
    b.add_json("config/secret-files.json", files, "Secret files named in the configuration: path, whether it "
               "exists, mode and owner only (a wrong mode or owner stops services), never the content.")


def _secret_file_state(key: str, path: Path | None) -> dict:
    if path is None:
        return {"key": key, "path": None}
    try:
        st = path.stat()
    except FileNotFoundError:
        return {"key": key, "path": str(path), "exists": False}
    except OSError as exc:
        return {"key": key, "path": str(path), "exists": None, "error": exc.strerror}
    return {"key": key, "path": str(path), "exists": True, "mode": f"{stat.S_IMODE(st.st_mode):04o}",
            "owner": _user_name(st.st_uid), "group": _group_name(st.st_gid)}


def _user_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def _group_name(gid: int) -> str:
    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return str(gid)




# -- logs

#: install/upgrade event fields kept (everything else, e.g. extra_vars and task results, is dropped).
_START_KEYS = ("event", "kind", "playbook", "check", "host", "profile", "accepted_risks", "plan", "notes", "created")
_EXTRA_VARS_KEPT = ("webapp_package_version", "postgresql_port", "postgresql_settings", "proxy_worker_processes",
                    "proxy_client_max_body_size_mb", "services_web_port", "webapp_bind")
_TASK_EVENTS = {"runner_on_ok": "ok", "runner_on_failed": "failed", "runner_on_skipped": "skipped",
                "runner_on_unreachable": "unreachable", "playbook_on_task_start": "started",
                "playbook_on_handler_task_start": "started"}


def _install_event(scrub: Scrubber, line: str) -> dict | None:
    """One install-log line (installer/progress.py's JSON events) reduced to allow-listed fields."""
    try:
        event = json.loads(line)
    except ValueError:
        return {"unparsed": scrub.text(line)}
    if not isinstance(event, dict):
        return None
    kind = event.get("event")
    if kind == "crm_appliance_start":
        out = {k: event.get(k) for k in _START_KEYS if k in event}
        extra = event.get("extra_vars") or {}
        out["extra_vars"] = {k: extra[k] for k in _EXTRA_VARS_KEPT if k in extra}
        return scrub.value(out)
    if kind == "crm_appliance_end":
        return {k: event.get(k) for k in ("event", "status", "rc", "created")}
    data = event.get("event_data") or {}
    out: dict[str, Any] = {"t": event.get("created"), "event": kind}
    if kind in _TASK_EVENTS:
        res = data.get("res") or {}
        out.update(task=data.get("task"), role=data.get("role") or None, host=data.get("host"),
                   action=data.get("task_action"), status=_TASK_EVENTS[kind])
        if kind == "runner_on_ok" and isinstance(res, dict) and res.get("changed"):
            out["status"] = "changed"
        if data.get("duration") is not None:
            out["seconds"] = data.get("duration")
        if kind in ("runner_on_failed", "runner_on_unreachable") and isinstance(res, dict):
            out["message"] = _task_message(res)
        return scrub.value({k: v for k, v in out.items() if v is not None})
    if kind == "playbook_on_stats":
        out["stats"] = {k: data.get(k) for k in ("ok", "changed", "failures", "dark", "skipped", "rescued", "ignored")}
        return scrub.value(out)
    if kind in ("warning", "deprecated", "error") or (kind == "verbose" and "ERROR" in (event.get("stdout") or "")):
        out["message"] = " ".join((event.get("stdout") or "").split())[:MAX_LINE_CHARS]
        return scrub.value(out)
    if kind in ("playbook_on_start", "playbook_on_play_start"):
        out["play"] = data.get("play") or data.get("playbook")
        return scrub.value(out)
    return None  # runner_on_start, playbook_on_include, ...: nothing the vendor needs


def _task_message(res: dict) -> str:
    """A failed task's telling line (as installer.progress shows it): msg, else the end of stderr/stdout."""
    for key in ("msg", "stderr", "module_stderr", "stdout", "module_stdout"):
        text = res.get(key)
        if isinstance(text, list):
            text = "\n".join(str(t) for t in text)
        lines = [line.strip() for line in str(text or "").splitlines() if line.strip()]
        if lines:
            return " ".join(lines) if key == "msg" else lines[-1]
    for item in res.get("results") or []:
        if isinstance(item, dict) and item.get("failed"):
            return _task_message(item)
    return ""


def _part_install_logs(b: _Build) -> None:
    log_dir = b.settings.appliance.log_dir
    if not log_dir.is_dir():
        raise Absent(f"no log directory {log_dir} ([appliance] log_dir): not installed yet?")
    history = []
    for kind in ("install", "upgrade", "check", "uninstall", "reach"):
        for path in _logs_of(log_dir, kind):
            first, last = _first_record(path), _last_record(path)
            history.append({"log": path.name, "kind": kind, "started": first.get("created"),
                            "profile": first.get("profile"), "check": first.get("check"),
                            "ended": last.get("created") if last.get("event") == "crm_appliance_end" else None,
                            "status": last.get("status") if last.get("event") == "crm_appliance_end"
                            else "no end record (interrupted or running)", "rc": last.get("rc")})
    history.sort(key=lambda h: h["log"].split("-", 1)[-1])
    before = Counter(b.scrub.counts)
    b.add("logs/install-history.jsonl",
          "".join(json.dumps(b.scrub.value(h), ensure_ascii=False) + "\n" for h in history),
          "Every install, upgrade, drift check and uninstall run, one a line: when, profile, how it ended.", before)
    for kind in ("install", "upgrade"):
        logs = _logs_of(log_dir, kind)
        if not logs:
            b.missing(f"logs/{kind}", f"no {kind}-*.log in {log_dir}")
            continue
        path = logs[-1]
        before = Counter(b.scrub.counts)
        lines = tail_lines(path, b.log_lines)
        events = [e for e in (_install_event(b.scrub, line) for line in lines) if e]
        if lines and "crm_appliance_start" not in lines[0]:
            start = _first_record(path)  # the start record holds profile and plan: keep it even when cut
            if start:
                events.insert(0, _install_event(b.scrub, json.dumps(start)))
        text = "".join(json.dumps(e, ensure_ascii=False, default=str) + "\n" for e in events)
        b.add(f"logs/{path.stem}.jsonl", text,
              f"The last {kind} ({path.name}), last {b.log_lines} events, each cut to time, task, role, host, "
              "status and a failure's message.", before)


_ACCESS = re.compile(
    r'^(?P<t>\[[^\]]+\] )?(?P<h>\S+) "(?P<m>[A-Z]+) (?P<u>\S*)" (?P<s>\d{3}) (?P<b>\d+|-) (?P<ms>\d+)ms$')
_GUNICORN = re.compile(r"^(?P<t>\[[^\]]+\]) (?P<pid>\[\d+\]) (?P<lvl>\[[A-Z]+\]) (?P<msg>.*)$")
_JOURNAL = re.compile(r"^(?P<prefix>\S+ \S+ [^:\s]+\[\d+\]: )(?P<msg>.*)$")


def _web_line(scrub: Scrubber, line: str) -> str:
    """An access line keeps client, method, route template, status, bytes and duration; others are scrubbed."""
    m = _ACCESS.match(line)
    if m:
        return (f'{m["t"] or ""}{scrub.ip(m["h"])} "{m["m"]} {scrub.url(m["u"], m["m"])}" {m["s"]} {m["b"]} '
                f'{m["ms"]}ms')
    g = _GUNICORN.match(line)
    if g:
        return f'{g["t"]} {g["pid"]} {g["lvl"]} {scrub.text(g["msg"])}'
    return scrub.text(line)


_NGINX = re.compile(r"^(?P<t>\d{4}/\d{2}/\d{2} \d{2}:\d{2}:\d{2}) \[(?P<lvl>\w+)\] (?P<pid>\d+#\d+): (?P<rest>.*)$")
_NGINX_FIELD = re.compile(r'(\w+): ("(?:[^"\\]|\\.)*"|[^,]*)(?:, |$)')


def _nginx_line(scrub: Scrubber, line: str) -> str:
    """time, level, message; client (pseudonymised), server, request as method + route, upstream, referrer."""
    m = _NGINX.match(line)
    if not m:
        return scrub.text(line)
    rest = m["rest"]
    message, sep, fields = rest.partition(", client: ")
    out = [f"{m['t']} [{m['lvl']}] {m['pid']}: {scrub.text(message)}"]
    if sep:
        for name, raw in _NGINX_FIELD.findall("client: " + fields):
            value = raw[1:-1] if raw.startswith('"') and raw.endswith('"') else raw
            if name == "client":
                out.append(f"client: {scrub.ip(value)}")
            elif name == "request":
                parts = value.split(" ")
                if len(parts) == 3 and parts[0] in _METHODS:
                    out.append(f'request: "{parts[0]} {scrub.url(parts[1], parts[0])} {parts[2][:10]}"')
                else:
                    out.append(f'request: "{REDACTED}"')
            elif name in ("upstream", "referrer"):
                out.append(f'{name}: "{scrub.url(value)}"')
            elif name in ("server", "host"):
                shown = scrub.text(value, quoted=False)
                out.append(f'{name}: "{shown}"' if raw.startswith('"') else f"{name}: {shown}")
            else:
                out.append(f"{name}: {REDACTED}")
    return ", ".join(out)


def _journal_line(inner: Callable[[Scrubber, str], str]) -> Callable[[Scrubber, str], str]:
    """journald prefixes each line with time, host and process: keep it, parse the message as the file's."""
    def parse(scrub: Scrubber, line: str) -> str:
        m = _JOURNAL.match(line)
        return scrub.text(m["prefix"]) + inner(scrub, m["msg"]) if m else inner(scrub, line)
    return parse


_APP_LOGS = (
    ("web", "crm-appliance-web", "The web service's log (gunicorn): access lines as client, method, route "
     "template, status, bytes and ms; errors scrubbed."),
    ("scheduler", "crm-appliance-scheduler", "The scheduler daemon's log, scrubbed."),
    ("supervisord", None, "supervisord's own log: starts, exits and restarts of the services, scrubbed."),
)


def _part_app_logs(b: _Build) -> None:
    """web, scheduler and supervisord logs (files in log_dir, or journald under systemd); nginx errors."""
    log_dir = b.settings.appliance.log_dir
    systemd = b.host.systemd_marker.exists()
    for name, unit, reason in _APP_LOGS:
        path = log_dir / (f"{unit}.log" if unit else "supervisord.log")
        before = Counter(b.scrub.counts)
        line_fn = _web_line
        if path.exists():
            try:
                lines = tail_lines(path, b.log_lines)
            except OSError as exc:
                b.missing(f"logs/{name}.log", f"{path}: cannot read: {exc.strerror}")
                continue
            source = str(path)
        elif systemd and unit:
            try:
                res = _run(["journalctl", "-u", unit, "-n", str(b.log_lines), "-o", "short-iso", "--no-pager"])
            except Absent as exc:
                b.missing(f"logs/{name}.log", str(exc))
                continue
            lines = [ln for ln in res.stdout.splitlines() if not ln.startswith("-- ")]
            source, line_fn = f"journalctl -u {unit}", _journal_line(_web_line)
        else:
            b.missing(f"logs/{name}.log", f"no {path}" + (f" and no journal for {unit}" if systemd and unit else "")
                      + " (the service has not run on this host yet, or is not installed)")
            continue
        text = "".join(line_fn(b.scrub, line) + "\n" for line in lines)
        b.add(f"logs/{name}.log", text, f"{reason} Last {b.log_lines} lines of {source}.", before)
    path = b.host.nginx_error_log
    if not path.exists():
        b.missing("logs/nginx-error.log", f"no {path}: nginx is not installed yet")
        return
    before = Counter(b.scrub.counts)
    try:
        lines = tail_lines(path, b.log_lines)
    except OSError as exc:
        b.missing("logs/nginx-error.log", f"{path}: cannot read: {exc.strerror}")
        return
    b.add("logs/nginx-error.log", "".join(_nginx_line(b.scrub, line) + "\n" for line in lines),
          f"nginx's error log (proxy failures, upstream errors, TLS), last {b.log_lines} lines of {path}; "
          f"requests reduced to method and route template.", before)


#: (part name in the manifest's "absent" list, collector), in the order the bundle is built.
PARTS: tuple[tuple[str, Callable[[_Build], None]], ...] = (
    ("host facts, preflight and sizing", _part_host),
    ("disk and memory", _part_resources),
    ("versions", _part_versions),
    ("services", _part_services),
    ("health", _part_health),
    ("database", _part_database),
    ("database schema", _part_schema),
    ("backups", _part_backups),
    ("scheduler history", _part_scheduler),
    ("SLA ledger", _part_sla),
    ("configuration", _part_config),
    ("install and upgrade logs", _part_install_logs),
    ("application logs", _part_app_logs),
)


# ============================================================================= building


def _known_secrets(settings: Settings) -> list[str]:
    """The secret values the configuration names, to scrub them if they ever appear in a log."""
    found = []
    for section, keys in config_mod.schema_keys().items():
        values = getattr(settings, section)
        for key in keys:
            path = getattr(values, key)
            if not (_is_secret_file_key(key) and isinstance(path, Path)):
                continue
            with contextlib.suppress(OSError, UnicodeDecodeError):
                text = path.read_text(encoding="utf-8").strip()
                if text:
                    found.append(text)
                    # A PEM key's body lines too, should a line of it ever be logged on its own.
                    found.extend(line for line in text.splitlines() if len(line) >= 16 and "-----" not in line)
    return found


def _own_addresses() -> list[str]:
    import psutil

    addresses = []
    with contextlib.suppress(Exception):
        for entries in psutil.net_if_addrs().values():
            addresses.extend(e.address for e in entries if e.family in (socket.AF_INET, socket.AF_INET6))
    with contextlib.suppress(OSError, UnicodeError):
        addresses.extend(info[4][0] for info in socket.getaddrinfo(socket.gethostname(), None))
    return addresses


#: Where the names live that the scrubber removes from log text (read into memory, never written).
_NAME_QUERIES = ('SELECT DISTINCT name FROM "user"', "SELECT DISTINCT first_name FROM contact",
                 "SELECT DISTINCT last_name FROM contact", "SELECT DISTINCT first_name FROM lead",
                 "SELECT DISTINCT last_name FROM lead", "SELECT DISTINCT company FROM lead",
                 "SELECT DISTINCT name FROM account")


def _names(b: _Build) -> list[str]:
    """Names of seat users, contacts, leads and accounts, and the boss the installer was given."""
    found: list[str] = []
    extra = b.install_start().get("extra_vars") or {}
    found.extend(str(extra[k]) for k in ("webapp_boss_name",) if extra.get(k))
    for sql in _NAME_QUERIES:
        try:
            found.extend(row[0] for row in b.query(sql) if row[0])
        except Absent:
            break  # the database is down: the pattern rules still apply
        except Exception as exc:  # a table not created yet
            log.info("diagnostics: names not read (%s): %s", sql, exc)
    return found


def build_bundle(settings: Settings, output: Path | None = None, *, preview: bool = False,
                 host: HostPaths | None = None, log_lines: int | None = None, now: float | None = None,
                 cwd: Path | None = None) -> BundleResult:
    """Collect every part, scrub, and write one ``.tar.gz`` (``.tar.gz.enc`` when encrypted).

    ``output``: the file to write (default: ``crm-diagnostics-<host>-<time>.tar.gz`` in ``cwd``).
    ``preview``: build it all in memory and write nothing; the result's manifest and
    ``summary()`` say what would be sent. ``host``: where the installed parts are (tests).
    Raises DiagnosticsError when the output cannot be written or the vendor key is unusable;
    a part that cannot be collected never raises: it is listed under ``absent``.
    """
    import appliance

    started = time.monotonic()
    now = time.time() if now is None else now
    host = host or DEFAULT_HOST
    key_path = settings.diagnostics.vendor_public_key_file
    public_key = load_vendor_public_key(key_path) if key_path is not None else None
    fingerprint = key_fingerprint(public_key) if public_key is not None else None
    created = dt.datetime.fromtimestamp(now, dt.timezone.utc)
    stamp = created.strftime("%Y%m%dT%H%M%SZ")
    hostname = socket.gethostname() or "localhost"
    if output is None and not preview:
        suffix = ".tar.gz.enc" if public_key is not None else ".tar.gz"
        output = (cwd or Path.cwd()) / f"crm-diagnostics-{_safe_name(hostname)}-{stamp}{suffix}"
    if output is not None and not preview:
        output = Path(output)
        if output.exists():
            raise DiagnosticsError(f"{output}: already exists; choose another --output or remove it")
        if not output.parent.is_dir():
            raise DiagnosticsError(f"{output.parent}: no such directory for the bundle; create it or choose "
                                   f"another --output")

    b = _Build(settings, host, log_lines or settings.diagnostics.log_lines, now)
    try:
        try:
            b.pg()
        except Absent:
            pass  # every database part reports it
        public_host = urlsplit(settings.web.public_url).hostname or ""
        b.scrub = Scrubber(routes=RouteMatcher.for_webapp(), data_dir=settings.appliance.data_dir,
                           known_secrets=_known_secrets(settings), names=_names(b),
                           own_addresses=_own_addresses(), local_hosts=(public_host, hostname, socket.getfqdn()))
        for part, collect in PARTS:
            try:
                collect(b)
            except Absent as exc:
                b.missing(part, str(exc))
            except Exception as exc:  # a broken part must not cost the vendor every other part
                log.warning("diagnostics: part %s failed", part, exc_info=True)
                b.missing(part, f"failed while collecting: {type(exc).__name__}: {exc}")
    finally:
        b.close()

    manifest = {
        "format": FORMAT_VERSION, "created": created.isoformat(timespec="seconds").replace("+00:00", "Z"),
        "host": hostname, "appliance_version": appliance.__version__, "config": settings.source,
        "log_lines": b.log_lines, "encrypted_to": fingerprint,
        "files": [{"path": MANIFEST, "reason": "This list: every file in the bundle, why it is there, its size "
                   "and SHA-256."}] + [f.entry() for f in b.files],
        "absent": b.absent,
        "scrubbing": {"replaced": dict(sorted(b.scrub.counts.items())),
                      "ip_addresses": "loopback and this host's own addresses kept; every other address replaced "
                                      "by <ip-N>, numbered within this bundle only",
                      "rules": SCRUB_RULES},
        "never_collected": list(NEVER_COLLECTED),
    }
    files = [BundleFile(MANIFEST, (json.dumps(manifest, indent=2, ensure_ascii=False) + "\n").encode(),
                        manifest["files"][0]["reason"])] + b.files
    top = f"crm-diagnostics-{_safe_name(hostname)}-{stamp}"
    archive = _tar_gz(top, files, now)
    if public_key is not None:
        archive = encrypt_for(public_key, archive)
    if not preview:
        _write_private(output, archive)
    return BundleResult(manifest=manifest, files=files, archive_bytes=len(archive),
                        output=None if preview else output, encrypted_to=fingerprint,
                        seconds=time.monotonic() - started)


def _safe_name(text: str) -> str:
    return re.sub(r"[^\w.-]", "_", text)


SCRUB_RULES = (
    "known secret values (database password, secret key, backup key, TLS key) -> <redacted:secret>",
    "password hashes (argon2, scrypt, bcrypt, pbkdf2) -> <redacted:hash>",
    "Cookie, Set-Cookie and Authorization headers; values after password=, token=, secret=, session=, "
    "csrf_token= and the like -> <redacted>",
    "PostgreSQL 'Key (column)=(value)' and 'Failing row contains (...)' -> values <redacted>",
    "URLs and paths: query strings -> ?<query>; paths of this appliance -> the route template "
    "(/contacts/<int:record_id>, /auth/set-password/<token>); unknown paths -> /<unmatched>; user:password@ dropped",
    "files under <data_dir>/attachments -> <redacted>",
    "e-mail addresses -> <email>; capitalised words of the names of seat users, contacts, leads and "
    "accounts (read into memory for this, never written) -> <name>",
    "IP addresses other than loopback and this host's -> <ip-N>",
    "phone-number-like digit runs (7 to 15 digits) -> <phone>",
    "long random-looking words (links, session ids, keys, hashes) -> <token>",
    "quoted literals that are not paths, identifiers or numbers -> '<redacted>'",
    "CJK text (the appliance logs in English; CJK text in a log is someone's input) -> <text>",
    "access log lines keep only: client, method, route template, status, bytes, duration",
    "install logs keep only: time, event, task, role, host, status, duration, a failure's message",
)


def _tar_gz(top: str, files: list[BundleFile], now: float) -> bytes:
    buffer = io.BytesIO()
    with gzip.GzipFile(fileobj=buffer, mode="wb", mtime=int(now)) as gz:
        with tarfile.open(fileobj=gz, mode="w", format=tarfile.PAX_FORMAT) as tar:
            for f in files:
                info = tarfile.TarInfo(f"{top}/{f.path}")
                info.size, info.mtime, info.mode = len(f.data), int(now), 0o600
                tar.addfile(info, io.BytesIO(f.data))
    return buffer.getvalue()


def _write_private(path: Path, data: bytes) -> None:
    """Mode 0600 from the first byte; a temp file renamed into place, so no half bundle is ever sent."""
    try:
        write_private(path, data)
    except OSError as exc:
        raise DiagnosticsError(f"{path}: cannot write the bundle: {exc.strerror}") from None


# ============================================================================= encryption


def generate_vendor_keys(private_path: Path, public_path: Path) -> str:
    """Make the vendor's X25519 key pair (PEM); returns the public key's fingerprint.

    The private key stays with vendor support (mode 0600); the public key is what
    customer IT names in ``[diagnostics] vendor_public_key_file``.
    """
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

    for path in (private_path, public_path):
        if path.exists():
            raise DiagnosticsError(f"{path}: already exists; a new key pair never overwrites a key")
    key = X25519PrivateKey.generate()
    private_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption())
    public_pem = key.public_key().public_bytes(serialization.Encoding.PEM,
                                               serialization.PublicFormat.SubjectPublicKeyInfo)
    _write_private(private_path, private_pem)
    try:
        public_path.write_bytes(public_pem)
    except OSError as exc:
        raise DiagnosticsError(f"{public_path}: cannot write the public key: {exc.strerror}") from None
    return key_fingerprint(key.public_key())


def load_vendor_public_key(path: Path):
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PublicKey

    where = f"{path}: [diagnostics] vendor_public_key_file"
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise DiagnosticsError(f"{where}: no such file; ask vendor support for their public key, or set "
                               f"vendor_public_key_file = \"none\" to send the bundle unencrypted") from None
    except OSError as exc:
        raise DiagnosticsError(f"{where}: cannot read it: {exc.strerror}") from None
    try:
        key = serialization.load_pem_public_key(data)
    except (ValueError, TypeError) as exc:
        raise DiagnosticsError(f"{where}: expected a PEM public key (-----BEGIN PUBLIC KEY-----), found something "
                               f"else ({exc})") from None
    if not isinstance(key, X25519PublicKey):
        raise DiagnosticsError(f"{where}: expected an X25519 public key (crm-appliance diagnostics keygen makes "
                               f"one), found {type(key).__name__}")
    return key


def _raw_public(public_key) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def key_fingerprint(public_key) -> str:
    """The first 8 bytes of SHA-256 over the raw public key, in hex: how a bundle names its recipient."""
    return hashlib.sha256(_raw_public(public_key)).digest()[:KEY_ID_BYTES].hex()


def _derive(shared: bytes, ephemeral_raw: bytes, recipient_raw: bytes) -> bytes:
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.kdf.hkdf import HKDF

    return HKDF(algorithm=hashes.SHA256(), length=32, salt=ephemeral_raw + recipient_raw,
                info=HKDF_INFO).derive(shared)


def encrypt_for(public_key, data: bytes) -> bytes:
    """``data`` encrypted to the vendor's X25519 public key.

    Layout: ``MAGIC`` (8 bytes) | key id = SHA-256(recipient public key)[:8] | ephemeral
    X25519 public key (32) | nonce (12) | AES-256-GCM ciphertext and 16-byte tag. The AES
    key is HKDF-SHA256(X25519(ephemeral, recipient), salt = ephemeral || recipient public
    key, info = ``HKDF_INFO``); the 60-byte header is the associated data, so no byte of
    it can be changed unnoticed.
    """
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    ephemeral = X25519PrivateKey.generate()
    ephemeral_raw = _raw_public(ephemeral.public_key())
    recipient_raw = _raw_public(public_key)
    key = _derive(ephemeral.exchange(public_key), ephemeral_raw, recipient_raw)
    nonce = os.urandom(NONCE_BYTES)
    header = MAGIC + hashlib.sha256(recipient_raw).digest()[:KEY_ID_BYTES] + ephemeral_raw + nonce
    return header + AESGCM(key).encrypt(nonce, data, header)


def decrypt_bytes(blob: bytes, private_key) -> bytes:
    from cryptography.exceptions import InvalidTag
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PublicKey
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    if len(blob) < HEADER_BYTES + 16 or not blob.startswith(MAGIC):
        raise DiagnosticsError("not an encrypted diagnostics bundle (it does not start with the CRMDIAG header); "
                               "an unencrypted bundle is a plain .tar.gz")
    header = blob[:HEADER_BYTES]
    key_id = header[len(MAGIC):len(MAGIC) + KEY_ID_BYTES]
    ephemeral_raw = header[len(MAGIC) + KEY_ID_BYTES:len(MAGIC) + KEY_ID_BYTES + 32]
    nonce = header[-NONCE_BYTES:]
    recipient_raw = _raw_public(private_key.public_key())
    if hashlib.sha256(recipient_raw).digest()[:KEY_ID_BYTES] != key_id:
        raise DiagnosticsError(f"the bundle was encrypted to the key {key_id.hex()}, not to this private key "
                               f"({key_fingerprint(private_key.public_key())}); use the matching private key")
    key = _derive(private_key.exchange(X25519PublicKey.from_public_bytes(ephemeral_raw)), ephemeral_raw,
                  recipient_raw)
    try:
        return AESGCM(key).decrypt(nonce, blob[HEADER_BYTES:], header)
    except InvalidTag:
        raise DiagnosticsError("the bundle does not decrypt: it was changed or cut in transit; ask for it "
                               "again") from None


def decrypt_bundle(src: Path, private_key_file: Path, output: Path | None = None) -> Path:
    """Vendor side: decrypt ``src`` with the private key into a ``.tar.gz``; returns its path."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

    try:
        key = serialization.load_pem_private_key(private_key_file.read_bytes(), password=None)
    except OSError as exc:
        raise DiagnosticsError(f"{private_key_file}: cannot read the private key: {exc.strerror}") from None
    except (ValueError, TypeError) as exc:
        raise DiagnosticsError(f"{private_key_file}: expected an unencrypted PEM private key, found something else "
                               f"({exc})") from None
    if not isinstance(key, X25519PrivateKey):
        raise DiagnosticsError(f"{private_key_file}: expected an X25519 private key, found {type(key).__name__}")
    try:
        blob = src.read_bytes()
    except OSError as exc:
        raise DiagnosticsError(f"{src}: cannot read the bundle: {exc.strerror}") from None
    data = decrypt_bytes(blob, key)
    if output is None:
        output = src.with_suffix("") if src.suffix == ".enc" else src.with_name(src.name + ".tar.gz")
    if output.exists():
        raise DiagnosticsError(f"{output}: already exists; choose another --output or remove it")
    _write_private(output, data)
    return output
