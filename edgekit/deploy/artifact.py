"""A bundle ready to deploy: read once, every file hashed once, its release id computed from those.

A deploy used to hash the same bytes about eight times (read_bundle's check of the model
file, Bundle.digest() per device and per call, the device's checks). Here each file is read
once per run on this side; the release id (bundle.sha256_tree's formula) and the manifest's
model sha256 check both come from that one pass, and every device of a fleet shares it.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from edgekit.bundle import Bundle, is_bundle, read_bundle, sha256_file
from edgekit.errors import BundleError


@dataclass(frozen=True)
class Artifact:
    bundle: Bundle
    sha256: str                                  # the release id on devices
    files: Tuple[Tuple[Path, str, int], ...]     # (local path, relative posix path, bytes)

    @property
    def name(self) -> str:
        return self.bundle.name

    @property
    def target(self) -> str:
        return self.bundle.target

    @property
    def format(self) -> str:
        return self.bundle.format

    @property
    def path(self) -> Path:
        return self.bundle.path

    @property
    def preferred_backend(self) -> Optional[str]:
        """The backend the bundle was timed on (`convert --select fastest`), which load() prefers."""
        return (self.bundle.manifest.get("runtime") or {}).get("backend")

    @property
    def bytes(self) -> int:
        return sum(f[2] for f in self.files)

    @property
    def formats_in_order(self) -> List[str]:
        """The target profile's formats, in its order of preference."""
        return list(self.bundle.manifest["target"].get("formats") or [])


def tree_digest(file_digests: Dict[str, str]) -> str:
    """bundle.sha256_tree's formula, from per-file digests keyed by relative posix path."""
    h = hashlib.sha256()
    for rel in sorted(file_digests):
        h.update(rel.encode() + b"\0")
        h.update(file_digests[rel].encode() + b"\n")
    return h.hexdigest()


def prepare(bundle: Bundle) -> Artifact:
    """Hash every file of the bundle once: the release id and the model file's check."""
    root = bundle.path
    paths = sorted(q for q in root.rglob("*") if q.is_file())
    digests: Dict[str, str] = {}
    files = []
    for p in paths:
        rel = p.relative_to(root).as_posix()
        digests[rel] = sha256_file(p)
        files.append((p, rel, os.stat(p).st_size))
    m = bundle.manifest["model"]
    if Path(m["file"]).name != m["file"] or m["file"] not in digests:
        raise BundleError(f"model file {m['file']} is missing", path=str(root))
    size = next(f[2] for f in files if f[1] == m["file"])
    if size != m["bytes"]:
        raise BundleError(f"{m['file']} is {size} bytes, manifest says {m['bytes']}: the bundle is damaged",
                          path=str(root))
    if digests[m["file"]] != m["sha256"]:
        raise BundleError(f"{m['file']} sha256 {digests[m['file']][:12]}… does not match the manifest's "
                          f"{m['sha256'][:12]}…: the bundle is damaged or was modified", path=str(root))
    if bundle.manifest.get("golden") and bundle.golden_path.name not in digests:
        raise BundleError("golden.npz is missing", path=str(root))
    return Artifact(bundle, tree_digest(digests), tuple(files))


def load(path: os.PathLike) -> List[Artifact]:
    """A bundle directory, or a convert output directory holding bundles of one model."""
    p = Path(path)
    if is_bundle(p) or not p.is_dir():
        return [prepare(read_bundle(p, verify=False))]
    found = [read_bundle(q, verify=False) for q in sorted(p.iterdir()) if q.is_dir() and is_bundle(q)]
    if not found:
        raise BundleError("neither a bundle nor a directory of bundles", path=str(p),
                          hint="give a directory written by `edgekit convert`")
    names = {b.name for b in found}
    if len(names) > 1:
        raise BundleError(f"holds bundles of several models ({', '.join(sorted(names))})", path=str(p),
                          hint="deploy one model at a time: give its bundle directory")
    return [prepare(b) for b in found]
