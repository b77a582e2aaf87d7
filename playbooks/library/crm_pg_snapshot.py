#!/usr/bin/python
# -*- coding: utf-8 -*-
"""Ansible module: a copy of a database taken before an upgrade migrates it, to roll back to."""

from __future__ import annotations

DOCUMENTATION = r"""
module: crm_pg_snapshot
short_description: Take, restore or drop a whole-database snapshot for an upgrade's rollback.
description:
  - C(state=taken) copies the database into C(snapshot) with C(CREATE DATABASE ... TEMPLATE
    ... STRATEGY FILE_COPY): a file-level copy inside the cluster, as fast as the disk, with
    no dump to parse back. An older snapshot of the same name is replaced.
  - C(state=restored) puts the snapshot back in the database's place (the database is
    dropped, the snapshot renamed), so a failed upgrade leaves the data exactly as it was.
    Nothing happens when there is no snapshot.
  - C(state=absent) drops the snapshot once the upgrade has passed its health gate.
  - Connections to the databases involved are closed first: the services are stopped
    during the switch, so only stray sessions (psql, a monitor) are cut.
options:
  name:
    description: The database.
    required: true
    type: str
  snapshot:
    description: Name of the copy.
    required: true
    type: str
  state:
    description: C(taken), C(restored) or C(absent).
    type: str
    choices: [taken, restored, absent]
    required: true
  port:
    description: Port of the cluster (selects the cluster on Debian).
    type: int
    default: 5432
attributes:
  check_mode:
    support: full
"""

EXAMPLES = r"""
- name: Ensure a snapshot of the database exists before the schema is migrated.
  crm_pg_snapshot:
    name: crm
    snapshot: crm_before_upgrade
    state: taken
"""

RETURN = r"""
action:
  description: What was done, or would be done in check mode.
  returned: always
  type: str
  sample: taken
"""

from ansible.module_utils.basic import AnsibleModule
from ansible.module_utils.crm_psql import check_identifier, psql, quote_ident, quote_literal


def _exists(module, name, port):
    return bool(psql(module, "SELECT 1 FROM pg_database WHERE datname = %s;" % quote_literal(name), port))


def _close_connections(module, names, port):
    listed = ", ".join(quote_literal(n) for n in names)
    psql(module, "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                 "WHERE datname IN (%s) AND pid <> pg_backend_pid();" % listed, port)


def main():
    module = AnsibleModule(
        argument_spec=dict(
            name=dict(type="str", required=True),
            snapshot=dict(type="str", required=True),
            state=dict(type="str", required=True, choices=["taken", "restored", "absent"]),
            port=dict(type="int", default=5432),
        ),
        supports_check_mode=True,
    )
    name, snapshot, port, state = (module.params[k] for k in ("name", "snapshot", "port", "state"))
    check_identifier(module, name, "database")
    check_identifier(module, snapshot, "snapshot")
    if name == snapshot:
        module.fail_json(msg="snapshot %r: expected a name other than the database's own" % snapshot)
    have_snapshot = _exists(module, snapshot, port)

    if state == "absent":
        if not have_snapshot:
            module.exit_json(changed=False, action="none")
        if not module.check_mode:
            psql(module, "DROP DATABASE %s WITH (FORCE);" % quote_ident(snapshot), port)
        module.exit_json(changed=True, action="dropped")

    if state == "restored":
        if not have_snapshot:
            module.exit_json(changed=False, action="none")
        if not module.check_mode:
            _close_connections(module, [name, snapshot], port)
            # Two statements, not one transaction: DROP DATABASE cannot run in one. Between
            # them the database is missing, never half migrated; a re-run finishes the rename.
            psql(module, "DROP DATABASE IF EXISTS %s WITH (FORCE);" % quote_ident(name), port)
            psql(module, "ALTER DATABASE %s RENAME TO %s;" % (quote_ident(snapshot), quote_ident(name)), port)
        module.exit_json(changed=True, action="restored")

    if not _exists(module, name, port):
        module.fail_json(msg="database %r does not exist on port %s: nothing to snapshot" % (name, port))
    if not module.check_mode:
        _close_connections(module, [name], port)
        if have_snapshot:
            psql(module, "DROP DATABASE %s WITH (FORCE);" % quote_ident(snapshot), port)
        owner = psql(module, "SELECT pg_get_userbyid(datdba) FROM pg_database WHERE datname = %s;"
                     % quote_literal(name), port)[0]
        psql(module, "CREATE DATABASE %s TEMPLATE %s OWNER %s STRATEGY FILE_COPY;"
             % (quote_ident(snapshot), quote_ident(name), quote_ident(owner)), port)
    module.exit_json(changed=True, action="taken", replaced=have_snapshot)


if __name__ == "__main__":
    main()
