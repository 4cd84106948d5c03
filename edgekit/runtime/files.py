"""The files a device needs to run edgekit.runtime (standard library only): pushed to devices
by deploy, copied next to an older runtime by the converter's compatibility check."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path
from typing import List

PKG = Path(__file__).resolve().parent.parent


def runtime_files() -> List[str]:
    """Paths relative to the edgekit package: the runtime and what it imports."""
    return ["__init__.py", "errors.py", "bundle.py", "table.py"] + \
        sorted(f"runtime/{p.name}" for p in (PKG / "runtime").glob("*.py")) + \
        sorted(f"serve/{p.name}" for p in (PKG / "serve").glob("*.py"))  # python -m edgekit.serve (needs uvicorn)


def runtime_digest() -> str:
    h = hashlib.sha256()
    for rel in runtime_files():
        h.update(rel.encode() + b"\0" + (PKG / rel).read_bytes())
    return h.hexdigest()


def copy_runtime(dest: Path) -> Path:
    """Copy the runtime to dest/edgekit/...; returns dest (put it on PYTHONPATH)."""
    for rel in runtime_files():
        target = dest / "edgekit" / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(PKG / rel, target)
    return dest
