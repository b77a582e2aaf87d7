#!/usr/bin/python
# -*- coding: utf-8 -*-
"""Ansible module: fail when a port the appliance needs is held by another program."""

from __future__ import annotations

DOCUMENTATION = r"""
module: crm_port_check
short_description: Check that each port is free or held by the program meant to hold it.
description:
  - Reads the listening TCP sockets from /proc/net/tcp and /proc/net/tcp6 and the
    programs that own them from /proc/<pid>/fd, so it needs neither ss nor lsof.
  - Read-only; fails with one line naming the port, the program holding it and the remedy.
options:
  ports:
    description:
      - List of dicts with C(port) (int), C(owners) (program names allowed to hold it,
        as in /proc/<pid>/comm) and C(purpose) (words for the message).
    required: true
    type: list
    elements: dict
attributes:
  check_mode:
    support: full
"""

EXAMPLES = r"""
- name: Check that nothing but nginx holds port 443.
  crm_port_check:
    ports:
      - {port: 443, owners: [nginx], purpose: HTTPS}
"""

RETURN = r"""
listeners:
  description: For each port asked about, the programs listening on it.
  returned: always
  type: dict
  sample: {"443": [{"pid": 812, "program": "nginx"}]}
"""

import os

from ansible.module_utils.basic import AnsibleModule

LISTEN = "0A"


def listening_inodes():
    """{socket inode: port} for every listening TCP socket (IPv4 and IPv6)."""
    found = {}
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as handle:
                next(handle)
                for line in handle:
                    fields = line.split()
                    if fields[3] == LISTEN:
                        found[fields[9]] = int(fields[1].rsplit(":", 1)[1], 16)
        except OSError:
            continue
    return found


def owners_of(inodes):
    """{inode: [(pid, program)]} by walking /proc/<pid>/fd."""
    owners = {}
    wanted = {"socket:[%s]" % inode: inode for inode in inodes}
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            fds = os.listdir("/proc/%s/fd" % pid)
            with open("/proc/%s/comm" % pid) as handle:
                program = handle.read().strip()
        except OSError:
            continue
        for fd in fds:
            try:
                target = os.readlink("/proc/%s/fd/%s" % (pid, fd))
            except OSError:
                continue
            if target in wanted:
                owners.setdefault(wanted[target], []).append((int(pid), program))
    return owners


def main():
    module = AnsibleModule(argument_spec=dict(ports=dict(type="list", elements="dict", required=True)),
                           supports_check_mode=True)
    inodes = listening_inodes()
    owners = owners_of(inodes)
    by_port = {}
    for inode, port in inodes.items():
        for pid, program in owners.get(inode, [(None, "an unknown program")]):
            entry = {"pid": pid, "program": program}
            if entry not in by_port.setdefault(port, []):
                by_port[port].append(entry)
    result = {}
    for want in module.params["ports"]:
        port, allowed = int(want["port"]), set(want.get("owners") or [])
        holders = by_port.get(port, [])
        result[str(port)] = holders
        strangers = [h for h in holders if h["program"] not in allowed]
        if strangers:
            first = strangers[0]
            pid = " (pid %s)" % first["pid"] if first["pid"] else ""
            module.fail_json(
                msg="port %d (%s) is held by %s%s, expected it free or held by %s; stop that program or free "
                    "the port, then run install again" % (port, want.get("purpose", "needed by the appliance"),
                                                          first["program"], pid, " or ".join(sorted(allowed))),
                listeners=result)
    module.exit_json(changed=False, listeners=result)


if __name__ == "__main__":
    main()
