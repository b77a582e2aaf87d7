#!/usr/bin/python
# -*- coding: utf-8 -*-
"""Ansible module: a PostgreSQL database with the given owner."""

from __future__ import annotations

DOCUMENTATION = r"""
module: crm_pg_database
short_description: Ensure a PostgreSQL database exists and belongs to a role.
description:
  - Creates the database (UTF-8, from template0) when it is missing, and changes its
    owner when it belongs to another role. An existing database is never recreated.
options:
  name:
    description: Database name (lower-case letters, digits, underscores).
    required: true
    type: str
  owner:
    description: Role that owns the database (required with C(state=present)).
    type: str
  state:
    description: C(present), or C(absent) to drop the database, closing its connections.
    type: str
    choices: [present, absent]
    default: present
  port:
    description: Port of the cluster (selects the cluster on Debian).
    type: int
    default: 5432
attributes:
  check_mode:
    support: full
"""

EXAMPLES = r"""
- name: Ensure the crm database exists, owned by crm.
  crm_pg_database:
    name: crm
    owner: crm
"""

RETURN = r"""
action:
  description: What was done, or would be done in check mode.
  returned: always
  type: str
  sample: created
"""

from ansible.module_utils.basic import AnsibleModule
from ansible.module_utils.crm_psql import check_identifier, psql, quote_ident, quote_literal


def main():
    module = AnsibleModule(
        argument_spec=dict(
            name=dict(type="str", required=True),
            owner=dict(type="str"),
            port=dict(type="int", default=5432),
            state=dict(type="str", default="present", choices=["present", "absent"]),
        ),
        required_if=[("state", "present", ["owner"])],
        supports_check_mode=True,
    )
    name, owner, port = module.params["name"], module.params["owner"], module.params["port"]
    check_identifier(module, name, "database")
    rows = psql(module, "SELECT pg_get_userbyid(datdba) FROM pg_database WHERE datname = %s;"
                % quote_literal(name), port)
    if module.params["state"] == "absent":
        if not rows:
            module.exit_json(changed=False, action="none")
        if not module.check_mode:
            psql(module, "DROP DATABASE %s WITH (FORCE);" % quote_ident(name), port)
        module.exit_json(changed=True, action="dropped")
    check_identifier(module, owner, "owner")
    if rows and rows[0] == owner:
        module.exit_json(changed=False, action="none")
    if rows:
        action, sql = "owner changed", "ALTER DATABASE %s OWNER TO %s;" % (quote_ident(name), quote_ident(owner))
    else:
        action = "created"
        sql = ("CREATE DATABASE %s OWNER %s ENCODING 'UTF8' TEMPLATE template0;"
               % (quote_ident(name), quote_ident(owner)))
    if not module.check_mode:
        psql(module, sql, port)
    module.exit_json(changed=True, action=action, previous_owner=rows[0] if rows else None)


if __name__ == "__main__":
    main()
