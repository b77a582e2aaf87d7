"""Ensure the first boss seat; print one JSON line saying what was done.

Run by the webapp role with the appliance's own Python (``ansible.builtin.script``
with ``executable: <venv>/bin/python``), so it reuses ``appliance.seats``:

- no active boss seat: create one; the JSON carries its one-time set-password ``link``;
- a boss seat without a password and no valid link: issue a new link (also with ``--new-link``);
- a boss seat without a password whose link is still valid: nothing (``state: pending``);
- a boss seat with a password: nothing (``state: kept``).

``--dry-run`` reports what would be done and changes nothing (Ansible's check mode).
"""

from __future__ import annotations

import argparse
import json
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("--email", required=True)
    parser.add_argument("--name", required=True)
    parser.add_argument("--new-link", action="store_true")
    parser.add_argument("--dry-run", action="store_true")
    args = parser.parse_args(argv)

    from appliance import config, seats
    from appliance.db import check_connection, open_database
    from appliance.errors import ApplianceError
    from webapp import audit
    from webapp.models import Role, SetPasswordToken, User, utcnow

    try:
        settings = config.load(args.config)
        db = open_database(settings)
        check_connection(db, settings)
        with db.connection_context():
            boss = (User.select().join(Role).where(Role.is_admin, User.active).order_by(User.id).first())
            result = {"email": boss.email if boss else seats.normalise_email(args.email),
                      "link": None, "expires_at": None}
            if boss is None:
                result.update(state="created", changed=True)
                if not args.dry_run:
                    created = seats.add_seat(settings, args.email, args.name, "boss")
                    audit.write_row("installer", "user", created.user.id, "create",
                                    {"email": [None, created.user.email], "role": [None, "boss"]})
                    result.update(link=created.link, expires_at=created.expires_at.isoformat() + "Z")
            elif boss.password_hash:
                result.update(state="kept", changed=False)
            else:
                pending = (SetPasswordToken.select()
                           .where(SetPasswordToken.user == boss, SetPasswordToken.used_at.is_null(),
                                  SetPasswordToken.expires_at > utcnow())
                           .order_by(SetPasswordToken.expires_at.desc()).first())
                if pending is not None and not args.new_link:
                    result.update(state="pending", changed=False,
                                  expires_at=pending.expires_at.isoformat() + "Z")
                else:
                    result.update(state="reissued", changed=True)
                    if not args.dry_run:
                        link, expires = seats.issue_link(settings, boss)
                        result.update(link=link, expires_at=expires.isoformat() + "Z")
        db.close_all()
    except ApplianceError as exc:
        print(json.dumps({"changed": False, "state": "failed", "error": str(exc)}))
        print(f"ensure_boss: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
