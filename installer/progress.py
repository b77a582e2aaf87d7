"""The Ansible event stream: live progress on the console and the full install log.

``ansible_runner.run(event_handler=...)`` calls an :class:`EventHandler` with every
event. The handler

- shows progress with rich: "task n of m", the task's name, the host, and ok /
  changed / failed (a live bar on a terminal, one line per task elsewhere);
- writes every event as one JSON line to the install log;
- remembers what the caller needs afterwards: the play's totals, the failed task
  and its message, the tasks that changed (with their diffs in check mode), and the
  boss seat's one-time link, which it keeps out of the log.

Everything here is plain data in, plain data out, so the tests feed it recorded events.
"""

from __future__ import annotations

import difflib
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import yaml
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

#: Name of the webapp task whose JSON output carries the boss seat's link.
BOSS_TASK = "Ensure the first boss seat exists, with a one-time link while it has no password."
REDACTED = "<one-time link: shown on the console only>"
#: Name of the webapp task that ends a failed release switch, saying what was rolled back.
SWITCH_REPORT_TASK = "Report the failed release switch."
_ERROR_RE = re.compile(r"ERROR!|\[ERROR\]:")
_LINK_RE = re.compile(r"https?://[^\s\"']+/auth/set-password/[A-Za-z0-9_\-]+")

_STYLES = {"ok": "green", "changed": "yellow", "failed": "bold red", "unreachable": "bold red",
           "skipped": "dim", "would change": "yellow"}


# ----------------------------------------------------------------------------- counting


def count_tasks(playbook: Path) -> int:
    """How many tasks (not handlers) the playbook's plays start, counting imports statically.

    The same number ``ansible-playbook --list-tasks`` prints, plus one "Gathering Facts"
    per play that gathers facts. Tasks skipped by ``when`` still count: Ansible starts them.
    """
    plays = yaml.safe_load(playbook.read_text()) or []
    roles_dir = playbook.parent / "roles"
    total = 0
    for play in plays:
        if play.get("gather_facts", True):
            total += 1
        for section in ("pre_tasks", "roles", "tasks", "post_tasks"):
            for entry in play.get(section) or []:
                if section == "roles":
                    name = entry if isinstance(entry, str) else entry.get("role") or entry.get("name")
                    total += _count_file(roles_dir / name / "tasks" / "main.yml", roles_dir)
                else:
                    total += _count_entry(entry, playbook.parent, roles_dir)
    return total


def _count_file(path: Path, roles_dir: Path) -> int:
    return sum(_count_entry(entry, path.parent, roles_dir) for entry in yaml.safe_load(path.read_text()) or [])


def _count_entry(entry: dict, here: Path, roles_dir: Path) -> int:
    for key in ("ansible.builtin.import_tasks", "import_tasks"):
        if key in entry:
            return _count_file(here / entry[key], roles_dir)
    for key in ("ansible.builtin.import_role", "import_role"):
        if key in entry:
            spec = entry[key]
            tasks_from = spec.get("tasks_from", "main.yml")
            return _count_file(roles_dir / spec["name"] / "tasks" / tasks_from, roles_dir)
    if "block" in entry:
        return sum(_count_entry(e, here, roles_dir) for e in (entry["block"] or []) + (entry.get("always") or []))
    return 1


# ----------------------------------------------------------------------------- what the run left


@dataclass
class TaskResult:
    """One task on one host, as the event stream reported it."""

    task: str
    role: str
    host: str
    status: str  # ok, changed (in check mode: would change), failed, unreachable, skipped
    message: str = ""
    diff: str = ""
    action: str = ""
    path: str = ""

    @property
    def title(self) -> str:
        return f"{self.role} : {self.task}" if self.role else self.task


@dataclass
class BossSeat:
    email: str
    state: str  # created, reissued, pending, kept
    link: str | None = None
    expires_at: str | None = None


@dataclass
class RunRecord:
    """What the caller reads after the run."""

    tasks_started: int = 0
    results: list[TaskResult] = field(default_factory=list)
    stats: dict[str, dict[str, int]] = field(default_factory=dict)
    failure: TaskResult | None = None  # the first failed task: the cause
    rollback: str | None = None  # what a failed release switch put back
    boss: BossSeat | None = None
    warnings: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)  # Ansible's own errors (syntax, inventory, ...)

    def total(self, key: str) -> int:
        """Sum of one play-recap counter (ok, changed, failures, dark, skipped, ...) over hosts."""
        return sum((self.stats.get(key) or {}).values())

    @property
    def changed(self) -> list[TaskResult]:
        return [r for r in self.results if r.status == "changed"]


# ----------------------------------------------------------------------------- the handler


class EventHandler:
    """The ``event_handler`` for ``ansible_runner.run``: display, log, record.

    Returns False for the one event that carries the boss seat's link, so ansible-runner
    does not store it among its artifacts either.
    """

    def __init__(self, total: int, console: Console, log: IO[str] | None = None, check: bool = False):
        self.total = max(total, 1)
        self.console = console
        self.log = log
        self.check = check
        self.record = RunRecord()
        self._task: dict[str, str] = {}
        self._progress: Progress | None = None
        self._bar = None

    # -- lifecycle

    def __enter__(self) -> "EventHandler":
        if self.console.is_terminal:
            self._progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                      TimeElapsedColumn(), console=self.console, transient=True)
            self._progress.start()
            self._bar = self._progress.add_task("Starting Ansible", total=self.total)
        return self

    def __exit__(self, *exc) -> None:
        if self._progress is not None:
            self._progress.stop()

    # -- the callback

    def __call__(self, event: dict[str, Any]) -> bool:
        kind = event.get("event", "")
        data = event.get("event_data") or {}
        keep = True
        if kind in ("playbook_on_task_start", "playbook_on_handler_task_start"):
            # ansible-runner reports handlers as task starts too; their path tells them apart.
            handler = kind == "playbook_on_handler_task_start" or "/handlers/" in (data.get("task_path") or "")
            self._task_started(data, handler=handler)
        elif kind in ("runner_on_ok", "runner_on_failed", "runner_on_skipped", "runner_on_unreachable"):
            keep = self._task_finished(kind, data)
        elif kind == "playbook_on_stats":
            self.record.stats = {key: dict(data.get(key) or {}) for key in
                                 ("ok", "changed", "failures", "dark", "skipped", "rescued", "ignored")}
        elif kind in ("warning", "deprecated") and event.get("stdout"):
            self.record.warnings.append(_one_line(event["stdout"]))
        elif kind in ("verbose", "error") and _ERROR_RE.search(event.get("stdout") or ""):
            self.record.errors.append(_one_line(_ERROR_RE.split(event["stdout"], 1)[-1]))
        self._write(event, redact=not keep)
        return keep

    def _task_started(self, data: dict, handler: bool) -> None:
        name = data.get("task") or data.get("name") or "(unnamed task)"
        role = data.get("role") or ""
        self._task = {"name": name, "role": role, "handler": handler}
        if not handler:
            self.record.tasks_started += 1
            self.total = max(self.total, self.record.tasks_started)
        label = f"{role} : {name}" if role else name
        if self._progress is not None:
            prefix = "handler" if handler else f"{self.record.tasks_started}/{self.total}"
            self._progress.update(self._bar, description=_escape(f"[{prefix}] {label}"), total=self.total,
                                  completed=self.record.tasks_started)

    def _task_finished(self, kind: str, data: dict) -> bool:
        res = data.get("res") or {}
        status = {"runner_on_failed": "failed", "runner_on_skipped": "skipped",
                  "runner_on_unreachable": "unreachable"}.get(kind, "ok")
        if status == "ok" and res.get("changed"):
            status = "would change" if self.check else "changed"
        if status == "failed" and data.get("ignore_errors"):
            status = "ok"
        result = TaskResult(task=data.get("task") or self._task.get("name", ""), role=data.get("role") or "",
                            host=data.get("host") or "", status="changed" if status == "would change" else status,
                            message=_message(res), diff=render_diff(res.get("diff")),
                            action=data.get("task_action") or "", path=_path_of(res))
        keep = True
        if result.task == BOSS_TASK and status in ("ok", "changed", "would change"):
            self.record.boss = _boss_from(res)
            keep = self.record.boss is None or not self.record.boss.link
        self.record.results.append(result)
        if status == "failed" and result.task == SWITCH_REPORT_TASK:
            self.record.rollback = result.message
        if status in ("failed", "unreachable") and self.record.failure is None:
            self.record.failure = result
        self._show(result, status)
        return keep

    # -- output

    def _show(self, result: TaskResult, status: str) -> None:
        quiet = status in ("ok", "skipped")
        if self._progress is not None and quiet:
            return
        where = f"  ({result.host})" if result.host else ""
        counter = "handler" if self._task.get("handler") else f"{self.record.tasks_started:>3}/{self.total}"
        style = _STYLES.get(status, "")
        line = f"{_escape(f'[{counter}]')} [{style}]{status:<12}[/{style}] {_escape(result.title)}{_escape(where)}"
        self.console.print(line, highlight=False, soft_wrap=True)
        if status in ("failed", "unreachable") and result.message:
            self.console.print(f"          {_escape(result.message)}", style="red", highlight=False, soft_wrap=True)

    def _write(self, event: dict, redact: bool) -> None:
        if self.log is None:
            return
        if redact:
            event = json.loads(_LINK_RE.sub(REDACTED, json.dumps(event)))
        self.log.write(json.dumps(event, default=str, ensure_ascii=False) + "\n")
        self.log.flush()


# ----------------------------------------------------------------------------- helpers


def open_log(path: Path) -> IO[str]:
    """The install log, readable by root only (it names hosts, paths and versions)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    return os.fdopen(fd, "w", encoding="utf-8")


def render_diff(diff: Any) -> str:
    """Ansible's ``diff`` result (a dict or a list of them) as unified-diff text."""
    if not diff:
        return ""
    parts = diff if isinstance(diff, list) else [diff]
    out: list[str] = []
    for part in parts:
        if not isinstance(part, dict):
            continue
        if "prepared" in part:
            out.append(str(part["prepared"]).rstrip("\n"))
            continue
        before, after = part.get("before", ""), part.get("after", "")
        if isinstance(before, dict) or isinstance(after, dict):
            for key in sorted(set(before or {}) | set(after or {})):
                old, new = (before or {}).get(key), (after or {}).get(key)
                if old != new:
                    out.append(f"{part.get('before_header', '')} {key}: {old} -> {new}".strip())
            continue
        if before == after:
            continue
        header = str(part.get("before_header", "current"))
        lines = difflib.unified_diff(str(before).splitlines(), str(after).splitlines(),
                                     fromfile=f"{header} (on the host)", tofile=f"{header} (intended)", lineterm="")
        out.extend(lines)
    return "\n".join(out)


def _path_of(res: dict) -> str:
    """The file a task manages: its dest or path, else the header of its diff."""
    if res.get("dest") or res.get("path"):
        return str(res.get("dest") or res.get("path"))
    diff = res.get("diff")
    first = diff[0] if isinstance(diff, list) and diff else diff
    header = first.get("before_header") if isinstance(first, dict) else None
    return str(header) if header and str(header).startswith("/") else ""


def _message(res: dict) -> str:
    """The most telling single line of a task result: msg, else the end of stderr, else stdout."""
    for key in ("msg", "stderr", "module_stderr", "stdout", "module_stdout"):
        text = res.get(key)
        if isinstance(text, list):
            text = "\n".join(str(t) for t in text)
        if text and str(text).strip() and str(text).strip() not in ("non-zero return code", "MODULE FAILURE"):
            return _one_line(str(text), last=key != "msg")
    if res.get("results"):
        for item in res["results"]:
            if isinstance(item, dict) and item.get("failed"):
                return _message(item)
    return "non-zero return code" if res.get("rc") else ""


def _one_line(text: str, last: bool = False) -> str:
    lines = [line.strip() for line in str(text).strip().splitlines() if line.strip()]
    if not lines:
        return ""
    line = lines[-1] if last else " ".join(lines)
    line = re.sub(r"\s+", " ", line)
    return line if len(line) <= 400 else line[:397] + "..."


def _boss_from(res: dict) -> BossSeat | None:
    try:
        data = json.loads(res.get("stdout") or "")
    except (TypeError, ValueError):
        return None
    if not isinstance(data, dict) or "state" not in data:
        return None
    return BossSeat(email=data.get("email") or "", state=data["state"], link=data.get("link"),
                    expires_at=data.get("expires_at"))


def _escape(text: str) -> str:
    from rich.markup import escape

    return escape(text)


# ----------------------------------------------------------------------------- rendering results


def print_install(console: Console, result) -> None:
    """What ``crm-appliance install`` prints at the end: totals, notes, the URL and the boss's link."""
    console.print()
    if result.previous_version and result.previous_version != result.version:
        console.print(f"Upgraded crm-appliance from {result.previous_version} to {result.version} on {result.host} "
                      f"({result.changed} changed, {result.ok} ok, {result.elapsed_seconds:.0f} s).", highlight=False)
    else:
        verb = "Installed" if result.changed else "Nothing to change:"
        console.print(f"{verb} crm-appliance {result.version} on {result.host} "
                      f"({result.changed} changed, {result.ok} ok, {result.elapsed_seconds:.0f} s).", highlight=False)
    for note in result.notes:
        console.print(f"  note: {note}", highlight=False, markup=False, soft_wrap=True)
    console.print(f"Install log: {result.log_path}", highlight=False)
    console.print(f"The CRM runs at {result.public_url}", highlight=False)
    boss = result.boss
    if boss is not None and boss.link:
        console.print(f"Open this one-time link to set the password of {boss.email} "
                      f"(valid until {boss.expires_at}):", highlight=False)
        console.print(boss.link, highlight=False, markup=False, soft_wrap=True)
    elif boss is not None and boss.state == "pending":
        console.print(f"{boss.email} has not set a password yet; the link printed earlier is valid until "
                      f"{boss.expires_at}. Lost it? Run install again with --new-boss-link.", highlight=False)


def print_drift(console: Console, report) -> None:
    """What ``crm-appliance install --check`` prints: each drifted task with its diff."""
    if not report.drifted:
        console.print(f"No drift: {report.host} is in the state the installer set "
                      f"({report.elapsed_seconds:.0f} s). Log: {report.log_path}", highlight=False)
        return
    console.print(f"Drift on {report.host}: {len(report.items)} task(s) would change "
                  f"(run install to put them back):", highlight=False)
    for item in report.items:
        where = f" [{item.path}]" if item.path else ""
        console.print(f"- {item.task}{where}", highlight=False, markup=False, soft_wrap=True)
        for line in item.diff.splitlines():
            console.print(f"    {line}", highlight=False, markup=False, soft_wrap=True)
    console.print(f"Log: {report.log_path}", highlight=False)


def print_uninstall(console: Console, result) -> None:
    console.print(f"Uninstalled from {result.host} ({len(result.changed_tasks)} changes, "
                  f"{result.elapsed_seconds:.0f} s). Kept:", highlight=False)
    for item in result.kept:
        console.print(f"- {item}", highlight=False, markup=False, soft_wrap=True)
    console.print(f"Log: {result.log_path}", highlight=False)


def print_status(console: Console, status: dict) -> None:
    console.print(f"crm-appliance {status.get('version') or '(not installed)'} on {status['host']}",
                  highlight=False)
    for service in status["services"]:
        console.print(f"  {service['name']:<26} {service['state']}", highlight=False, markup=False, soft_wrap=True)
    maintenance = status.get("maintenance")
    if maintenance:
        console.print(f"  {'maintenance page':<26} ON since {maintenance.get('since', '?')} "
                      f"({maintenance.get('reason', '?')} {maintenance.get('from', '')} -> {maintenance.get('to', '')}); "
                      f"an interrupted upgrade? run crm-appliance upgrade again", highlight=False, markup=False,
                      soft_wrap=True)
    console.print(f"  {'nginx':<26} {status['nginx']}", highlight=False)
    console.print(f"  {'postgresql':<26} {status['postgresql']}", highlight=False)
    health = status["health"]
    answer = f"HTTP {health['status']} in {health['ms']} ms" if "status" in health else health.get("error")
    console.print(f"  {'health':<26} {answer} ({health['url']})", highlight=False, markup=False, soft_wrap=True)
    schema = status["schema"]
    level = schema.get("error") or f"{len(schema['applied'])} applied, {len(schema['pending'])} pending"
    console.print(f"  {'schema':<26} {level}", highlight=False, markup=False, soft_wrap=True)
    disk = status.get("disk") or {}
    if "data_bytes" in disk:
        line = f"{disk['data_bytes'] / 1e9:.2f} GB in {disk['data_dir']}, {disk['disk_free_bytes'] / 1e9:.1f} GB free"
        if disk.get("plan_budget_bytes"):
            line += (f"; {disk['plan_budget_used']:.1%} of the plan's year-one budget of "
                     f"{disk['plan_budget_bytes'] / 1e9:.1f} GB"
                     + ("" if disk["free_covers_budget"] else " (the free space no longer covers the rest)"))
        console.print(f"  {'disk':<26} {line}", highlight=False, markup=False, soft_wrap=True)
    backups = status.get("last_backups")
    if backups and "error" in backups:
        console.print(f"  {'last backups':<26} {backups['error']}", highlight=False, markup=False, soft_wrap=True)
    elif backups:
        line = "; ".join(f"{kind} {b['id']} ({b['state']}, {b['size_bytes'] / 1e6:.1f} MB)" for kind, b in
                         sorted(backups.items()))
        console.print(f"  {'last backups':<26} {line}", highlight=False, markup=False, soft_wrap=True)
    elif backups is not None:
        console.print(f"  {'last backups':<26} none yet (the scheduler takes them; crm-appliance backup takes one now)",
                      highlight=False, markup=False, soft_wrap=True)
    sla = status.get("availability")
    if sla and "error" in sla:
        console.print(f"  {'availability':<26} {sla['error']}", highlight=False, markup=False, soft_wrap=True)
    elif sla and sla["probes"]:
        console.print(f"  {'availability':<26} {sla['month']}: {sla['availability_percent']:.3f}% "
                      f"({sla['counted_downtime_minutes']:.1f} of {sla['budget_minutes']:.1f} budget minutes down, "
                      f"{sla['unknown_minutes']:.0f} min unknown; {sla['verdict']}); crm-appliance sla for more",
                      highlight=False, markup=False, soft_wrap=True)
    elif sla:
        console.print(f"  {'availability':<26} no probes recorded in {sla['month']} yet (the scheduler probes "
                      f"/healthz)", highlight=False, markup=False, soft_wrap=True)
    if status.get("accepted_risks"):
        console.print(f"  {'accepted risks':<26} {', '.join(status['accepted_risks'])}", highlight=False)
