#!/usr/bin/python
# -*- coding: utf-8 -*-
"""Ansible module: a PostgreSQL login role with a password, stored as a SCRAM verifier."""

from __future__ import annotations

DOCUMENTATION = r"""
module: crm_pg_user
short_description: Ensure a PostgreSQL login role exists with the given password.
description:
  - Creates the role, or sets its password when the stored verifier does not match O(password).
  - The password is turned into a SCRAM-SHA-256 verifier by the module: the server
    never sees the plain password, and it never appears on a command line.
  - Talks to the cluster through C(runuser -u postgres -- psql) on the local socket.
options:
  name:
    description: Role name (lower-case letters, digits, underscores).
    required: true
    type: str
  password:
    description: The password (give it through a file lookup on the controller, with no_log).
    type: str
  port:
    description: Port of the cluster (selects the cluster on Debian).
    type: int
    default: 5432
  replication:
    description: The role may open replication connections (pg_basebackup). Set or cleared to match.
    type: bool
    default: false
  member_of:
    description: Roles this role is granted (e.g. pg_read_all_data); missing grants are added, others kept.
    type: list
    elements: str
    default: []
  state:
    description: C(present) or C(absent).
    type: str
    choices: [present, absent]
    default: present
attributes:
  check_mode:
    support: full
"""

EXAMPLES = r"""
- name: Ensure the crm role exists with the generated password.
  crm_pg_user:
    name: crm
    password: "{{ lookup('ansible.builtin.file', '/etc/crm-appliance/db-password') }}"
  no_log: true
"""

RETURN = r"""
action:
  description: What was done, or would be done in check mode.
  returned: always
  type: str
  sample: created
"""

from ansible.module_utils.basic import AnsibleModule
from ansible.module_utils.crm_psql import (check_identifier, password_matches, psql, quote_ident,
                                           quote_literal, scram_verifier)


def main():
    module = AnsibleModule(
        argument_spec=dict(
            name=dict(type="str", required=True),
            password=dict(type="str", no_log=True),
            port=dict(type="int", default=5432),
            replication=dict(type="bool", default=False),
            member_of=dict(type="list", elements="str", default=[]),
            state=dict(type="str", default="present", choices=["present", "absent"]),
        ),
        supports_check_mode=True,
    )
    name, port, state = module.params["name"], module.params["port"], module.params["state"]
    check_identifier(module, name, "role")
    rows = psql(module, "SELECT coalesce(rolpassword, '') FROM pg_authid WHERE rolname = %s;"
                % quote_literal(name), port)
    exists = bool(rows) or _exists(module, name, port)
    if state == "absent":
        if exists and not module.check_mode:
            psql(module, "DROP ROLE %s;" % quote_ident(name), port)
        module.exit_json(changed=exists, action="dropped" if exists else "none")

    password = module.params["password"]
    if not password:
        module.fail_json(msg="role %s: a password is required with state=present" % name)
    actions = []
    if not (exists and password_matches(rows[0] if rows else "", password, name)):
        actions.append("password set" if exists else "created")
        if not module.check_mode:
            verb = "ALTER" if exists else "CREATE"
            psql(module, "%s ROLE %s WITH LOGIN PASSWORD %s;"
                 % (verb, quote_ident(name), quote_literal(scram_verifier(password))), port)
    replication = module.params["replication"]
    current = psql(module, "SELECT rolreplication FROM pg_roles WHERE rolname = %s;" % quote_literal(name), port)
    if (current[:1] == ["t"]) != replication:
        actions.append("replication %s" % ("granted" if replication else "revoked"))
        if not module.check_mode:
            psql(module, "ALTER ROLE %s WITH %sREPLICATION;" % (quote_ident(name), "" if replication else "NO"), port)
    granted = set(psql(module, "SELECT b.rolname FROM pg_auth_members m JOIN pg_roles b ON b.oid = m.roleid "
                               "JOIN pg_roles r ON r.oid = m.member WHERE r.rolname = %s;" % quote_literal(name),
                       port))
    for group in module.params["member_of"]:
        check_identifier(module, group, "member_of role")
        if group not in granted:
            actions.append("granted %s" % group)
            if not module.check_mode:
                psql(module, "GRANT %s TO %s;" % (quote_ident(group), quote_ident(name)), port)
    module.exit_json(changed=bool(actions), action=", ".join(actions) or "none")


def _exists(module, name, port):
    """A role with a NULL password gives an empty line, which psql -At drops: ask again."""
    return bool(psql(module, "SELECT 1 FROM pg_roles WHERE rolname = %s;" % quote_literal(name), port))


if __name__ == "__main__":
    main()
