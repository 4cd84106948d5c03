"""Venvs of old runtimes: a device's Python environment (tflite-runtime 2.14 with numpy<2, ONNX Runtime
1.16.3, ...) built once here and cached, keyed by its requirements. The compatibility check runs
bundles in them, and the tests use them as the lab devices' Pythons."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import List


class VenvUnavailable(Exception):
    """The environment cannot be had here (offline, pip refused, no venv module, ...)."""


def cache_dir() -> Path:
    return Path(os.environ.get("EDGEKIT_COMPAT_CACHE", Path.home() / ".cache" / "edgekit" / "compat"))


def venv_python(reqs: List[str]) -> Path:
    """A cached venv with exactly `reqs` (built once; pip reaches the package registry)."""
    key = hashlib.sha256(("\n".join(sorted(reqs)) + sys.version).encode()).hexdigest()[:16]
    venv = cache_dir() / f"venv-{key}"
    py = venv / "bin" / "python"
    if (venv / ".complete").is_file():
        return py
    tmp = cache_dir() / f".venv-{key}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.parent.mkdir(parents=True, exist_ok=True)
    try:
        subprocess.run([sys.executable, "-m", "venv", str(tmp)], check=True, capture_output=True)
        r = subprocess.run([str(tmp / "bin" / "python"), "-m", "pip", "install", "-q", "--only-binary=:all:",
                            "--disable-pip-version-check", *reqs], capture_output=True, text=True, timeout=900)
        if r.returncode != 0:
            raise VenvUnavailable(f"pip install {' '.join(reqs)} failed: "
                                  + (r.stderr.strip().splitlines() or ["?"])[-1])
        (tmp / ".complete").write_text("\n".join(reqs))
        if venv.exists():
            shutil.rmtree(venv)
        os.replace(tmp, venv)  # venvs are relocatable enough for `python -m` use
    except (OSError, subprocess.SubprocessError) as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise VenvUnavailable(f"cannot build a venv for {' '.join(reqs)}: {e}") from None
    except VenvUnavailable:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return py
