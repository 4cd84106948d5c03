#!/usr/bin/env bash
# Installs everything the tests need, then runs them all. .ci/run calls exactly this.
# The deploy tests need root, sshd and iproute2: in CI a device that cannot start fails the run.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/system-deps.sh
python3 -m pip install -q --disable-pip-version-check -e ".[dev]"
exec python3 -m pytest -q "$@"
