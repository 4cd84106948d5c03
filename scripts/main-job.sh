#!/usr/bin/env bash
# The main job on a fresh machine: install edgekit with its converter (and, as root, sshd +
# iproute2 for the local device), then run examples/main_job.py: digits CNN -> every target ->
# run, check, measure -> deploy to a local device over SSH -> profile there -> tables.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/system-deps.sh
python3 -m pip install -q --disable-pip-version-check -e ".[dev]"
exec python3 examples/main_job.py "$@"
