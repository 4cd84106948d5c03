#!/usr/bin/env bash
# The main job on a fresh machine: install edgekit with the converter, then run
# examples/main_job.py (digits CNN -> every target -> run, check, measure -> table).
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install -q --disable-pip-version-check -e ".[dev]"
exec python3 examples/main_job.py "$@"
