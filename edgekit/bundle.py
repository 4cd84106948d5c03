"""The artifact bundle: a directory with one model file, manifest.json and golden.npz.

Standard library and numpy only: this module runs on devices.

    <name>-<target>/
      manifest.json   schema, versions, target profile, model file + sha256, I/O with
                      quantization, source sha256, calibration summary, validation metrics
      model.tflite | model.onnx
      golden.npz      a few inputs and the expected outputs (device health check)

Bundles are written into a temporary directory beside the destination and
renamed into place, so a failed write leaves nothing a user would find.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import re
import shutil
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional

from edgekit.errors import BundleError

# numpy is imported where arrays are touched, so the device's release bookkeeping
# (status, verify) starts without it.

SCHEMA_VERSION = 2   # 2: agreement and accuracy as fractions 0..1, drops in points; recipe, numerics
MANIFEST = "manifest.json"
GOLDEN = "golden.npz"
MODEL_FILES = {"tflite": "model.tflite", "onnx": "model.onnx"}
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


def check_name(name: str, what: str = "model name") -> str:
    """Names end up in device paths: letters, digits, '.', '_' and '-', no traversal."""
    if not _NAME_RE.match(name) or ".." in name:
        raise BundleError(f"invalid {what} {name!r}",
                          hint="use letters, digits, '.', '_' and '-' (max 128), not starting "
                               "with '.' or '-', and no '..'")
    return name


def sha256_file(path: os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def sha256_tree(root: os.PathLike) -> str:
    """One digest for a directory: relative paths and contents, in sorted order."""
    root = Path(root)
    return sha256_files(root, sorted(q for q in root.rglob("*") if q.is_file()))


def sha256_files(root: os.PathLike, files) -> str:
    """sha256_tree's digest over `files` under `root` (in the order given)."""
    h = hashlib.sha256()
    for p in files:
        h.update(Path(p).relative_to(root).as_posix().encode() + b"\0")
        h.update(sha256_file(p).encode() + b"\n")
    return h.hexdigest()


@dataclass
class Manifest:
    """manifest.json, typed: read (older schemas upgraded) and written here only.

    Units: `validation.top1_agreement`, `validation.accuracy_float`, `validation.accuracy_quant`
    are fractions 0..1; `validation.accuracy_drop_points` is percentage points; every `snr_db`
    is dB; `*_bytes` bytes. Keys this version does not know are kept (`extra`) and written back.
    """

    name: str
    target: Dict[str, Any]
    model: Dict[str, Any]
    inputs: List[Dict[str, Any]]
    outputs: List[Dict[str, Any]]
    schema: int = SCHEMA_VERSION
    edgekit_version: str = ""
    created: str = ""
    source: Dict[str, Any] = field(default_factory=dict)
    calibration: Dict[str, Any] = field(default_factory=dict)
    validation: Dict[str, Any] = field(default_factory=dict)
    golden: Dict[str, Any] = field(default_factory=dict)
    recipe: Dict[str, Any] = field(default_factory=dict)
    mixed_precision: Optional[Dict[str, Any]] = None
    rescue: List[Dict[str, Any]] = field(default_factory=list)
    candidates: List[Dict[str, Any]] = field(default_factory=list)
    # the backend this artifact was chosen for (--select fastest), honoured by runtime.load() where
    # installed: {"backend": "openvino", "threads": timed with, "hints": {...}, "why": "..."}; None: any
    runtime: Optional[Dict[str, Any]] = None
    # convert.faithful: the builds of about the same speed weighed against this one (fidelity, speed)
    faithful: Optional[Dict[str, Any]] = None
    compatibility: List[Dict[str, Any]] = field(default_factory=list)
    extra: Dict[str, Any] = field(default_factory=dict)

    REQUIRED = ("schema", "name", "model", "target", "inputs", "outputs")

    @classmethod
    def from_dict(cls, d: Dict[str, Any], where: str = "manifest.json") -> "Manifest":
        for key in cls.REQUIRED:
            if key not in d:
                raise BundleError(f"manifest.json lacks '{key}'", path=where)
        if not isinstance(d["schema"], int) or d["schema"] > SCHEMA_VERSION:
            raise BundleError(f"bundle schema {d['schema']} is newer than this edgekit understands "
                              f"({SCHEMA_VERSION})", path=where, hint="upgrade edgekit on this machine")
        d = _upgrade(dict(d))
        known = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        m = cls(**{k: v for k, v in d.items() if k in known})
        m.extra = {k: v for k, v in d.items() if k not in known}
        m.schema = SCHEMA_VERSION
        return m

    def to_dict(self) -> Dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "extra"}
        d.update(self.extra)
        return d

    @staticmethod
    def update(bundle_dir: os.PathLike, **changes: Any) -> None:
        """Set fields of a bundle's manifest in place (atomically), e.g. compatibility records."""
        path = Path(bundle_dir) / MANIFEST
        m = Manifest.from_dict(json.loads(path.read_text(encoding="utf-8")), where=str(bundle_dir))
        for k, v in changes.items():
            if k not in {f.name for f in dataclasses.fields(Manifest)}:
                raise KeyError(k)
            setattr(m, k, v)
        write_json_atomic(path, m.to_dict())


def _upgrade(d: Dict[str, Any]) -> Dict[str, Any]:
    """Schema 1 -> 2: percentages become fractions, int8-named figures become quant-named ones."""
    if d.get("schema", 1) >= 2:
        return d
    v = dict(d.get("validation") or {})
    for old, new in (("top1_agreement", "top1_agreement"), ("accuracy_float", "accuracy_float"),
                     ("accuracy_int8", "accuracy_quant")):
        if v.get(old) is not None:
            v[new] = v.pop(old) / 100.0
    if "accuracy_drop" in v:
        v["accuracy_drop_points"] = v.pop("accuracy_drop")
    if "int8_bytes" in v:
        v["quant_bytes"] = v.pop("int8_bytes")
    d["validation"] = v
    return d


@dataclass(frozen=True)
class Bundle:
    """A bundle read from disk and verified."""

    path: Path
    manifest: Dict[str, Any]           # the manifest as JSON (upgraded to this schema)
    meta: Optional[Manifest] = None    # the same, typed

    @property
    def name(self) -> str:
        return self.manifest["name"]

    @property
    def target(self) -> str:
        return self.manifest["target"]["name"]

    @property
    def format(self) -> str:
        return self.manifest["model"]["format"]

    @property
    def model_path(self) -> Path:
        return self.path / self.manifest["model"]["file"]

    @property
    def golden_path(self) -> Path:
        return self.path / GOLDEN

    def digest(self) -> str:
        """The release id used on devices: the sha256 of the whole bundle directory."""
        return sha256_tree(self.path)

    def golden(self) -> Dict[str, Any]:
        import numpy as np

        with np.load(self.golden_path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}


def is_bundle(path: os.PathLike) -> bool:
    return (Path(path) / MANIFEST).is_file()


def read_bundle(path: os.PathLike, verify: bool = True) -> Bundle:
    """Read a bundle's manifest; with `verify`, check the model file's size and sha256."""
    p = Path(path)
    mpath = p / MANIFEST
    if not p.is_dir():
        raise BundleError("bundle directory not found", path=str(p),
                          hint="give the directory `edgekit convert` wrote, e.g. build/model-rpi4")
    if not mpath.is_file():
        raise BundleError("not a bundle: no manifest.json", path=str(p),
                          hint="give a directory written by `edgekit convert`, or a .tflite/.onnx file")
    try:
        raw = json.loads(mpath.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise BundleError(f"manifest.json is not valid JSON ({e})", path=str(p)) from None
    if not isinstance(raw, dict):
        raise BundleError("manifest.json is not a JSON object", path=str(p))
    meta = Manifest.from_dict(raw, where=str(p))
    manifest = meta.to_dict()
    bundle = Bundle(p, manifest, meta)
    check_name(bundle.name)
    if verify:
        verify_bundle(bundle)
    return bundle


def verify_bundle(bundle: Bundle) -> None:
    m = bundle.manifest["model"]
    mp = bundle.model_path
    if Path(m["file"]).name != m["file"]:
        raise BundleError(f"model file name {m['file']!r} is not a plain file name", path=str(bundle.path))
    if not mp.is_file():
        raise BundleError(f"model file {m['file']} is missing", path=str(bundle.path))
    size = mp.stat().st_size
    if size != m["bytes"]:
        raise BundleError(f"{m['file']} is {size} bytes, manifest says {m['bytes']}: "
                          "the bundle is damaged", path=str(bundle.path))
    digest = sha256_file(mp)
    if digest != m["sha256"]:
        raise BundleError(f"{m['file']} sha256 {digest[:12]}… does not match the manifest's "
                          f"{m['sha256'][:12]}…: the bundle is damaged or was modified",
                          path=str(bundle.path))
    golden = bundle.manifest.get("golden")
    if golden and not bundle.golden_path.is_file():
        raise BundleError("golden.npz is missing", path=str(bundle.path))


def _jsonable(obj: Any) -> Any:
    np = sys.modules.get("numpy")
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if np is not None and isinstance(obj, np.generic):
        return obj.item()
    if np is not None and isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, float) and (obj != obj or obj in (float("inf"), float("-inf"))):
        return None  # JSON has no NaN/Inf
    return obj


def write_json_atomic(path: os.PathLike, data: Any) -> None:
    """Write JSON via a temporary file in the same directory and an atomic rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(_jsonable(data), f, indent=2, sort_keys=False)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def staged_dir(dest: Path) -> Iterator[Path]:
    """A temporary directory beside `dest` to fill. When the block ends without error it takes `dest`'s place
    (an existing `dest` is moved aside first and removed only then); on any error it is removed and `dest`
    is left as it was: nothing half-written where a user would find it."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
    old = None
    try:
        yield tmp
        if dest.exists():
            old = dest.with_name(f".{dest.name}.old-{os.getpid()}")
            os.replace(dest, old)
        os.replace(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None and not dest.exists():
            os.replace(old, dest)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def write_bundle(dest: os.PathLike, *, fmt: str, model_bytes: bytes, manifest: Dict[str, Any],
                 golden: Dict[str, Any],
                 check: Optional[Callable[[Path], None]] = None) -> Bundle:
    """Write a bundle atomically: temp dir beside `dest`, fill, optional `check(tmpdir)`, rename.

    `manifest` gets the model file entry filled in here. An existing bundle at
    `dest` is replaced only once the new one is complete.
    """
    import numpy as np

    dest = Path(dest)
    with staged_dir(dest) as tmp:
        fname = MODEL_FILES[fmt]
        (tmp / fname).write_bytes(model_bytes)
        np.savez(tmp / GOLDEN, **golden)
        manifest = dict(manifest)
        manifest["schema"] = SCHEMA_VERSION
        manifest["model"] = dict(manifest.get("model", {}), file=fname, format=fmt,
                                 sha256=hashlib.sha256(model_bytes).hexdigest(),
                                 bytes=len(model_bytes))
        write_json_atomic(tmp / MANIFEST, Manifest.from_dict(manifest, where=str(dest)).to_dict())
        if check is not None:
            check(tmp)
    return read_bundle(dest)
