"""What the server serves: each model's loaded release, a pool of runtime instances, the hot swap.

A model comes from a bundle directory, a bare .tflite/.onnx file, or a deployed model directory
(`<root>/models/<name>/current -> releases/<sha256>`, see edgekit.runtime.releases). Its version
is the release's sha256 prefix (12 hex digits). A deployed model follows `current`: a new
release is loaded and golden-checked beside the old one and swapped in only when it passes;
requests already running finish on the release they started on. Standard library and numpy.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

from edgekit.bundle import check_name, is_bundle, read_bundle, sha256_file, sha256_tree
from edgekit.errors import BundleError, EdgekitError

log = logging.getLogger("edgekit.serve")

VERSION_CHARS = 12


@dataclass(frozen=True)
class Source:
    """Where a model comes from: kind 'bundle' or 'file' (fixed), or 'deployed' (follows current)."""

    name: str
    kind: str
    path: Path  # the bundle/file, or the model directory <root>/models/<name>

    def resolve(self) -> Optional[Path]:
        """The release to serve now (None: a deployed model without a `current`)."""
        if self.kind != "deployed":
            return self.path
        try:
            target = os.readlink(self.path / "current")
        except OSError:
            return None
        rel = Path(target).name
        return self.path / "releases" / rel


def discover(paths: List[str]) -> List[Source]:
    """Bundle dirs, model files, device roots (with models/) or deployed model dirs -> sources."""
    out: Dict[str, Source] = {}

    def add(src: Source) -> None:
        if src.name in out:
            raise BundleError(f"two models are named '{src.name}' ({out[src.name].path} and {src.path})",
                              hint="serve them from separate servers, or rename one bundle")
        out[src.name] = src

    for raw in paths:
        p = Path(raw)
        if p.is_file():
            if p.suffix.lower() not in (".tflite", ".onnx"):
                raise BundleError("not a model edgekit can serve", path=str(p),
                                  hint="give a bundle directory, a .tflite/.onnx file, or a device root")
            add(Source(check_name(p.stem), "file", p))
        elif _llm_name(p):  # a language model: an LLM bundle or a bare ONNX Runtime GenAI folder
            add(Source(_llm_name(p), "bundle", p))
        elif is_bundle(p):
            add(Source(read_bundle(p, verify=False).name, "bundle", p))
        elif (p / "current").is_symlink() or (p / "releases").is_dir():
            add(Source(check_name(p.name), "deployed", p))
        elif (p / "models").is_dir():
            found = False
            for m in sorted((p / "models").iterdir()):
                if m.is_dir() and ((m / "current").is_symlink() or (m / "releases").is_dir()):
                    try:
                        add(Source(check_name(m.name), "deployed", m))
                        found = True
                    except BundleError as e:
                        log.warning("skipping %s: %s", m, e)
            if not found:
                raise BundleError("no deployed models under models/", path=str(p),
                                  hint="deploy one with `edgekit deploy`, or give a bundle directory")
        elif not p.exists():
            raise BundleError("no such bundle, model file or device root", path=str(p))
        else:
            raise BundleError("not a bundle (no manifest.json), a model file, or a device root (no models/)",
                              path=str(p))
    if not out:
        raise BundleError("nothing to serve", hint="give a bundle directory or a device root")
    return list(out.values())


def _llm_name(p: Path) -> Optional[str]:
    """The name of a language model at `p` (manifest name, else the folder's), or None when it is not one."""
    from edgekit.runtime.llm import is_llm, llm_manifest

    if not is_llm(p):
        return None
    return check_name(str((llm_manifest(p) or {}).get("name") or p.name))


class InstancePool:
    """Runtime instances of one release (a TFLite interpreter runs one inference at a time)."""

    def __init__(self, instances: List[Any]):
        self._free: "queue.SimpleQueue[Any]" = queue.SimpleQueue()
        for m in instances:
            self._free.put(m)
        self.size = len(instances)

    def acquire(self):
        return self._free.get()

    def release(self, m) -> None:
        self._free.put(m)


@dataclass
class Release:
    """One loaded release of a model."""

    name: str
    sha256: str
    path: Path
    format: str
    backend: str
    backend_version: str
    inputs: list
    outputs: list
    load_seconds: float
    check: Optional[Dict[str, Any]]
    pool: InstancePool
    sample_ms: float = 0.0  # one sample's inference time, measured at load
    loaded_at: float = field(default_factory=time.time)

    @property
    def version(self) -> str:
        return self.sha256[:VERSION_CHARS]

    @property
    def batchable(self) -> bool:
        """Every input has a dynamic first (batch) dimension: requests can be stacked."""
        return all(s.shape and s.shape[0] == -1 for s in self.inputs)

    def matches(self, v: Optional[str]) -> bool:
        return v in (None, "", "current", self.version) or (len(v) >= 7 and self.sha256.startswith(v))


def load_release(src: Source, path: Path, *, instances: int, threads: Optional[int],
                 backend: Optional[str], check: bool) -> Release:
    """Load `instances` runtime instances of the release at `path`; golden-check the first.

    Raises EdgekitError when it cannot load or fails its golden check."""
    from edgekit.runtime import load
    from edgekit.runtime.check import golden_check

    t0 = time.perf_counter()
    if src.kind == "file":
        sha = sha256_file(path)
    elif src.kind == "deployed":
        sha = path.name
    else:
        sha = sha256_tree(path)
    first = load(path, threads=threads, backend=backend)
    result = None
    if check and first.bundle is not None and first.bundle.golden_path.is_file():
        result = golden_check(first)
        if not result["ok"]:
            bad = {k: v for k, v in result["outputs"].items() if not v["ok"]}
            raise BundleError("the golden check failed: " + "; ".join(
                f"output '{k}' SNR {v['snr_db']:.1f} dB, top-1 agreement {v['top1_agreement']}"
                for k, v in bad.items()), path=str(path))
    models = [first] + [load(path, threads=threads, backend=backend, verify=False)
                        for _ in range(max(instances, 1) - 1)]
    x = first.example_inputs()
    for m in models:  # the first inference of an instance is slow: not a client's
        m.run(*x)
    times = []
    for _ in range(3):
        t1 = time.perf_counter()
        first.run(*x)
        times.append(time.perf_counter() - t1)
    return Release(name=src.name, sha256=sha, path=path, format=first.format, backend=first.backend,
                   backend_version=first.backend_version, inputs=list(first.inputs),
                   outputs=list(first.outputs), load_seconds=time.perf_counter() - t0, check=result,
                   pool=InstancePool(models), sample_ms=min(times) * 1e3)


class ModelEntry:
    """A served model: its active release, the last failure, and whether a load is under way.

    The hot swap is here for every kind of model: `_load` makes a release (here a tensor model's
    instance pool; serve.llm_entry.LLMEntry: a language model's batching engine) and `_swapped` is told
    when one replaced another."""

    kind = "tensor"

    def __init__(self, src: Source):
        self.source = src
        self.name = src.name
        self.active: Optional[Release] = None
        self.failure: Optional[Dict[str, Any]] = None  # the last release that failed to come up
        self.loading: Optional[str] = None
        self.swaps = 0
        self._lock = threading.Lock()

    @property
    def ready(self) -> bool:
        return self.active is not None

    def state(self) -> Dict[str, Any]:
        a = self.active
        d: Dict[str, Any] = {"ready": a is not None, "source": self.source.kind,
                             "version": a.version if a else None,
                             "sha256": a.sha256 if a else None,
                             "backend": f"{a.backend} {a.backend_version}" if a else None,
                             "instances": a.pool.size if a else 0,
                             "load_seconds": round(a.load_seconds, 4) if a else None,
                             "golden_check": (None if a is None or a.check is None else
                                              {"ok": a.check["ok"], "samples": a.check.get("samples")}),
                             "swaps": self.swaps}
        if self.loading:
            d["loading"] = self.loading[:VERSION_CHARS]
        if self.failure:
            d["failed_release"] = self.failure
        return d

    def try_load(self, path: Optional[Path], **kw) -> bool:
        """Load `path` and swap it in if it passes; on failure keep the old release. Thread-safe."""
        if path is None:
            if self.failure is None or self.failure.get("version") is not None:
                msg = f"model '{self.name}' has no current release"
                log.warning(msg)
                self.failure = {"version": None, "error": msg, "at": time.time()}
            return False
        ident = path.name
        with self._lock:
            if self.loading:
                return False
            self.loading = ident
        try:
            rel = self._load(path, **kw)
        except EdgekitError as e:
            self._fail(ident, str(e))
            return False
        except Exception as e:  # a backend crashing on a broken model: the old release keeps serving
            self._fail(ident, f"{type(e).__name__}: {e}")
            return False
        finally:
            self.loading = None
        old = self.active
        self.active = rel  # one reference assignment: new requests take the new release
        self.failure = None
        if old is not None:
            self.swaps += 1
        self._swapped(old, rel)
        return True

    def _load(self, path: Path, **kw):
        return load_release(self.source, path, **kw)

    def _swapped(self, old, rel) -> None:
        """`rel` serves now, instead of `old` (None: the first release)."""
        if old is not None:
            log.info("model %s: swapped %s -> %s (loaded and golden-checked in %.2f s)", self.name,
                     old.version, rel.version, rel.load_seconds)
        else:
            log.info("model %s: serving %s (%s %s, %d instance(s), loaded in %.2f s)", self.name, rel.version,
                     rel.backend, rel.backend_version, rel.pool.size, rel.load_seconds)

    def _fail(self, ident: str, error: str) -> None:
        self.failure = {"version": ident[:VERSION_CHARS], "error": error, "at": time.time()}
        if self.active is not None:
            log.error("model %s: release %s failed (%s); still serving %s", self.name,
                      ident[:VERSION_CHARS], error, self.active.version)
        else:
            log.error("model %s: release %s failed (%s); the model is not ready", self.name,
                      ident[:VERSION_CHARS], error)

    def wants_reload(self) -> Optional[Path]:
        """For a deployed model: the release `current` points at, when it is new and not known bad."""
        if self.source.kind != "deployed" or self.loading:
            return None
        path = self.source.resolve()
        if path is None:
            return None
        if self.active is not None and self.active.sha256 == path.name:
            return None
        if self.failure is not None and self.failure.get("version") == path.name[:VERSION_CHARS]:
            return None
        return path
