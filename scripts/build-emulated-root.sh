#!/usr/bin/env bash
# Build (once) the emulated arm64 Raspberry-Pi-OS-like device root and cache it, keyed by its
# recipe (edgekit/lab/emulated.py: RECIPE). Needs root; installs qemu-user-static and debootstrap.
# Prints the root's path. The tests and `edgekit device emulate up` build it too when missing.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/system-deps.sh
exec python3 -m edgekit.lab.emulated build
