#!/usr/bin/env bash
# Install and start the CRM appliance on this Debian 12 host, as root.
#
# Until the Ansible installer lands this is the quick start: Debian's PostgreSQL,
# a virtual environment in /opt/crm-appliance, the CRM under gunicorn on port 8000,
# and a one-time link for the first boss seat. Safe to run again.
set -euo pipefail
[[ "${DEBUG:-}" == 1 ]] && set -x
cd "$(dirname "${BASH_SOURCE[0]}")/.."

if [[ $(id -u) -ne 0 ]]; then
    echo "FAIL: expected to run as root, found user $(id -un); run: sudo bash scripts/install.sh" >&2
    exit 1
fi

PREFIX=/opt/crm-appliance
PACKAGES=(postgresql python3 python3-venv)

echo "==> Installing system packages: ${PACKAGES[*]}"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${PACKAGES[@]}" >/dev/null

echo "==> Installing the appliance into ${PREFIX}/venv"
mkdir -p "${PREFIX}"
# Debian's Python, not one under /root: the service user must be able to run it.
[[ -x "${PREFIX}/venv/bin/python" ]] || /usr/bin/python3 -m venv "${PREFIX}/venv"
"${PREFIX}/venv/bin/pip" install -q --disable-pip-version-check --upgrade pip
"${PREFIX}/venv/bin/pip" install -q --disable-pip-version-check --upgrade .

echo "==> Setting up and starting the CRM"
PATH="${PREFIX}/venv/bin:${PATH}" exec "${PREFIX}/venv/bin/crm-appliance" quickstart "$@"
