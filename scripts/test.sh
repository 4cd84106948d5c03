#!/usr/bin/env bash
# Installs everything the tests need, then runs them all. .ci/run calls exactly this.
# The tests run in a virtual environment made anew on every run (.venv-test, or $EDGEKIT_TEST_VENV), where pip
# resolves `.[dev]` as a fresh `pip install` does today: not in whatever an earlier run left in site-packages.
# EDGEKIT_TEST_REUSE_VENV=1 keeps an existing one (faster local re-runs; CI never sets it).
# The deploy tests need root, sshd and iproute2: in CI a device that cannot start fails the run.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/system-deps.sh
venv="${EDGEKIT_TEST_VENV:-.venv-test}"
if [ "${EDGEKIT_TEST_REUSE_VENV:-0}" = 1 ] && [ -x "$venv/bin/python" ]; then
  echo "test.sh: reusing $venv (EDGEKIT_TEST_REUSE_VENV=1)"
else
  python3 -m venv --clear "$venv"
  "$venv/bin/python" -m pip install -q --disable-pip-version-check --upgrade pip
  "$venv/bin/python" -m pip install -q --disable-pip-version-check -e ".[dev]"
fi
"$venv/bin/python" -m pip check
# what the suite ran with, for the log and the closing notes
"$venv/bin/python" -m pip list --disable-pip-version-check --format=freeze > "$venv/versions.txt"
grep -iE '^(numpy|tensorflow|tensorflow-cpu|keras|onnx|onnxruntime|onnxruntime-genai|torch|transformers|ai-edge-litert|openvino|tf2onnx|paramiko|uvicorn)==' "$venv/versions.txt" | tr '\n' ' '; echo
export PATH="$PWD/$venv/bin:$PATH"
set +e
"$venv/bin/python" -m pytest -q "$@"
rc=$?
set -e
[ "$rc" = 5 ] && { echo "test.sh: pytest collected no test" >&2; exit 1; }
exit "$rc"
