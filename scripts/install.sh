#!/usr/bin/env bash
# Install and start the CRM appliance on this Debian 12 host, as root.
#
# Builds the installer's virtual environment (.venv, with Debian's Python), then runs
# `crm-appliance install`: preflight against the sizing profile, then Ansible deploys
# PostgreSQL, the CRM under gunicorn, supervisord or systemd, and nginx with TLS.
# The profile is standard-50 when this host meets it, else eval (not for production);
# set CRM_PROFILE to choose. Extra arguments go to `crm-appliance install`. Safe to run again.
set -euo pipefail
[[ "${DEBUG:-}" == 1 ]] && set -x
cd "$(dirname "${BASH_SOURCE[0]}")/.."

if [[ $(id -u) -ne 0 ]]; then
    echo "FAIL: expected to run as root, found user $(id -un); run: sudo bash scripts/install.sh" >&2
    exit 1
fi

echo "==> Installing what the installer itself needs: python3, python3-venv"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends python3 python3-venv >/dev/null

echo "==> Building the installer's virtual environment in .venv"
[[ -x .venv/bin/python ]] || /usr/bin/python3 -m venv .venv
.venv/bin/pip install -q --disable-pip-version-check --upgrade pip
.venv/bin/pip install -q --disable-pip-version-check -e .

PROFILE="${CRM_PROFILE:-}"
if [[ -z "$PROFILE" ]]; then
    if .venv/bin/crm-appliance preflight --profile standard-50 >/dev/null 2>&1; then
        PROFILE=standard-50
    else
        PROFILE=eval
        echo "==> This host does not meet the standard-50 profile (see: .venv/bin/crm-appliance preflight);"
        echo "    installing the eval profile, which is not for production."
    fi
fi

echo "==> Installing the appliance (profile ${PROFILE})"
exec .venv/bin/crm-appliance install --profile "$PROFILE" --yes "$@"
