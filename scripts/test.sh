#!/usr/bin/env bash
# Run the whole test suite on a fresh Debian 12 machine, as root:
# system packages, a virtual environment built with Debian's Python, then pytest.
# Tests start their own throwaway PostgreSQL cluster and headless Chromium.
set -euo pipefail
[[ "${DEBUG:-}" == 1 ]] && set -x
cd "$(dirname "${BASH_SOURCE[0]}")/.."

# PostgreSQL server and client, Debian's Python with venv, Chromium for the browser tests,
# a CJK font so screenshots of the Chinese UI show characters, and sshd, which the e2e test
# starts on 127.0.0.1 to install over ssh as to another host, and zstd and lz4, which restores
# read base backups with.
PACKAGES=(postgresql python3 python3-venv chromium fonts-wqy-microhei openssh-server zstd lz4)

echo "==> Installing system packages: ${PACKAGES[*]}"
if [[ $(id -u) -eq 0 ]]; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${PACKAGES[@]}" >/dev/null
else
    echo "    not root: assuming the packages are installed"
fi

echo "==> Building the virtual environment in .venv"
if [[ ! -x .venv/bin/python ]]; then
    /usr/bin/python3 -m venv .venv
fi
.venv/bin/pip install -q --disable-pip-version-check --upgrade pip
.venv/bin/pip install -q --disable-pip-version-check -e '.[test]'

echo "==> Running the tests"
mkdir -p test-artifacts
exec .venv/bin/python -m pytest -q -p no:cacheprovider "$@"
