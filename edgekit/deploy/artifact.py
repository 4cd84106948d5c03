"""A bundle ready to deploy: read once, every file hashed once, its release id computed from those.

A deploy used to hash the same bytes about eight times (read_bundle's check of the model
file, Bundle.digest() per device and per call, the device's checks). Here each file is read
once per run on this side; the release id (bundle.sha256_tree's formula) and the manifest's
model sha256 check both come from that one pass, and every device of a fleet shares it.

A language-model bundle (manifest kind "llm": model/ with the ONNX decoder, its external data,
tokenizer and genai_config, golden.json) is an Artifact too: every file listed in its manifest is
checked against its sha256 and size in the same pass, and `memory_need()` gives what the device
must hold to run it (weights plus the KV cache at the bundle's context).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from edgekit.bundle import MANIFEST, Bundle, check_name, is_bundle, read_bundle, sha256_file
from edgekit.errors import BundleError

LLM = "llm"
KV_DTYPE_BYTES = 4   # a KV cache element when the manifest does not give bytes per token (float32: the CPU default)


@dataclass(frozen=True)
class Artifact:
    bundle: Bundle
    sha256: str                                  # the release id on devices
    files: Tuple[Tuple[Path, str, int], ...]     # (local path, relative posix path, bytes)
    digests: Tuple[str, ...] = ()                # sha256 of each of `files`, in the same order

    def __post_init__(self):
        if len(self.digests) != len(self.files):     # built by hand (not prepare()): hash the files now
            object.__setattr__(self, "digests", tuple(sha256_file(p) for p, _, _ in self.files))

    @property
    def name(self) -> str:
        return self.bundle.name

    @property
    def kind(self) -> str:
        """"llm" for a language-model bundle, "tensor" for the others."""
        return str(self.bundle.manifest.get("kind") or "tensor")

    @property
    def is_llm(self) -> bool:
        return self.kind == LLM

    def file_digests(self) -> Dict[str, str]:
        """Relative path -> sha256 (the content-addressed store's object names)."""
        return {rel: d for (_, rel, _), d in zip(self.files, self.digests)}

    @property
    def model_bytes(self) -> int:
        """The bytes of the model itself (weights and graph): what a device loads into memory."""
        m = self.bundle.manifest["model"]
        if self.is_llm:
            return int(m.get("bytes") or sum(int(f["bytes"]) for f in m["files"].values()))
        return int(m["bytes"])

    def memory_need(self) -> Dict[str, int]:
        """{'total', 'weights', 'kv_cache', 'context'}: bytes a device needs free to run the model;
        for a language model the KV cache at the bundle's default context is part of it."""
        weights = self.model_bytes
        if not self.is_llm:
            return {"total": weights, "weights": weights, "kv_cache": 0, "context": 0}
        man = self.bundle.manifest
        m, llm = man["model"], man.get("llm") or {}
        context = int(llm.get("context_default") or m.get("context") or 0)
        per_token = llm.get("kv_bytes_per_token")
        if per_token is None:
            per_token = 2 * int(m.get("layers", 0)) * int(m.get("kv_heads", 0)) * int(m.get("head_dim", 0)) \
                * KV_DTYPE_BYTES
        kv = int(per_token) * context
        return {"total": weights + kv, "weights": weights, "kv_cache": kv, "context": context}

    @property
    def target(self) -> str:
        return self.bundle.target

    @property
    def format(self) -> str:
        return str(self.bundle.manifest.get("format") or "onnx-genai") if self.is_llm else self.bundle.format

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


def _hash_all(root: Path) -> Tuple[Dict[str, str], List[Tuple[Path, str, int]]]:
    paths = sorted(q for q in root.rglob("*") if q.is_file())
    digests: Dict[str, str] = {}
    files = []
    for p in paths:
        rel = p.relative_to(root).as_posix()
        digests[rel] = sha256_file(p)
        files.append((p, rel, os.stat(p).st_size))
    return digests, files


def prepare(bundle: Bundle) -> Artifact:
    """Hash every file of the bundle once: the release id and the model file's check."""
    root = bundle.path
    if bundle.manifest.get("kind") == LLM:   # its types first: memory_need reads them (a hand edit: one line)
        from edgekit.runtime.llm import check_manifest

        check_manifest(bundle.manifest, root / MANIFEST)
    digests, files = _hash_all(root)
    if bundle.manifest.get("kind") == LLM:
        _check_llm_files(bundle, digests, {rel: n for _, rel, n in files})
        return Artifact(bundle, tree_digest(digests), tuple(files), tuple(digests[rel] for _, rel, _ in files))
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
    return Artifact(bundle, tree_digest(digests), tuple(files), tuple(digests[rel] for _, rel, _ in files))


def _check_llm_files(bundle: Bundle, digests: Dict[str, str], sizes: Dict[str, int]) -> None:
    """Every file the manifest lists under model/ is there with its size and sha256; golden.json too."""
    root, m = bundle.path, bundle.manifest["model"]
    mdir = str(m.get("dir") or "model").strip("/")
    listed = m.get("files")
    if not isinstance(listed, dict) or not listed:
        raise BundleError("manifest.json lists no model files (model.files)", path=str(root))
    for rel, entry in listed.items():
        if rel.startswith("/") or ".." in Path(rel).parts:
            raise BundleError(f"model file {rel!r} is not a relative path inside the bundle", path=str(root))
        key = f"{mdir}/{rel}" if f"{mdir}/{rel}" in digests or rel not in digests else rel
        if key not in digests:
            raise BundleError(f"model file {key} is missing", path=str(root))
        if "bytes" in entry and sizes[key] != int(entry["bytes"]):
            raise BundleError(f"{key} is {sizes[key]} bytes, manifest says {entry['bytes']}: the bundle is damaged",
                              path=str(root))
        if digests[key] != entry.get("sha256"):
            raise BundleError(f"{key} sha256 {digests[key][:12]}… does not match the manifest's "
                              f"{str(entry.get('sha256'))[:12]}…: the bundle is damaged or was modified",
                              path=str(root))
    golden = bundle.manifest.get("golden")
    if golden and str(golden) not in digests:
        raise BundleError(f"{golden} is missing", path=str(root))


def _llm_name(p: Path, manifest: Dict) -> str:
    """The model's name: the manifest's, else the directory's name less -<target>-<precision>."""
    if manifest.get("name"):
        return str(manifest["name"])
    name = p.resolve().name
    target = (manifest.get("target") or {}).get("name")
    precision = (manifest.get("recipe") or {}).get("precision")
    for suffix in (f"-{target}-{precision}", f"-{target}"):
        if target and name.endswith(suffix) and len(name) > len(suffix):
            return name[:-len(suffix)]
    return name


def read(path: os.PathLike) -> Bundle:
    """A bundle directory's manifest (not verified here: prepare() hashes every file), a language
    model's as well as the others'."""
    p = Path(path)
    if p.is_dir() and (p / MANIFEST).is_file():
        try:
            raw = json.loads((p / MANIFEST).read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError) as e:
            raise BundleError(f"manifest.json is not valid JSON ({e})", path=str(p)) from None
        if isinstance(raw, dict) and raw.get("kind") == LLM:
            for key in ("model", "target"):
                if not isinstance(raw.get(key), dict):
                    raise BundleError(f"manifest.json lacks '{key}'", path=str(p))
            if "name" not in (raw["target"] or {}):
                raise BundleError("manifest.json's target has no name", path=str(p))
            raw = dict(raw, name=check_name(_llm_name(p, raw)))
            return Bundle(p, raw, None)
    return read_bundle(p, verify=False)


def read_one(path: os.PathLike) -> Artifact:
    """One bundle directory, prepared."""
    return prepare(read(path))


def load(path: os.PathLike) -> List[Artifact]:
    """A bundle directory, or a convert output directory holding bundles of one model."""
    p = Path(path)
    if is_bundle(p) or not p.is_dir():
        return [prepare(read(p))]
    found = [read(q) for q in sorted(p.iterdir()) if q.is_dir() and is_bundle(q)]
    if not found:
        raise BundleError("neither a bundle nor a directory of bundles", path=str(p),
                          hint="give a directory written by `edgekit convert`")
    names = {b.name for b in found}
    if len(names) > 1:
        raise BundleError(f"holds bundles of several models ({', '.join(sorted(names))})", path=str(p),
                          hint="deploy one model at a time: give its bundle directory")
    return [prepare(b) for b in found]
