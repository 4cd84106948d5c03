"""load(path) -> Model: float in, float out, whatever backend the device has."""

from __future__ import annotations

import os
import time
import warnings
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Union

import numpy as np

from edgekit.bundle import Bundle, read_bundle
from edgekit.errors import BackendUnavailable, BundleError, DataError
from edgekit.runtime.spec import TensorSpec

BACKENDS = ("litert", "tflite-runtime", "tensorflow", "onnxruntime", "openvino")
TFLITE_BACKENDS = ("litert", "tflite-runtime", "tensorflow")
ONNX_BACKENDS = ("onnxruntime", "openvino")

ArrayLike = Union[np.ndarray, Sequence[Any]]


def _open_backend(model_path: Path, fmt: str, backend: Optional[str], threads: Optional[int],
                  providers: Optional[Sequence[str]], reference_numerics: bool = False,
                  hints: Optional[Mapping[str, Any]] = None):
    if backend is not None and backend not in BACKENDS:
        raise BackendUnavailable(f"unknown backend {backend!r}",
                                 hint="choose one of: " + ", ".join(BACKENDS))
    if fmt == "tflite":
        if backend in ONNX_BACKENDS:
            raise BackendUnavailable(f"{backend} cannot run a .tflite model", fmt=fmt,
                                     hint="use a TFLite backend: litert, tflite-runtime or tensorflow")
        from edgekit.runtime.tflite import TFLiteBackend

        return TFLiteBackend(str(model_path), threads=threads, prefer=backend)
    if fmt == "onnx":
        if backend in TFLITE_BACKENDS:
            raise BackendUnavailable(f"{backend} cannot run an .onnx model", fmt=fmt,
                                     hint="use backend='onnxruntime' or backend='openvino'")
        if backend == "openvino":
            if reference_numerics:
                raise BackendUnavailable("reference numerics run the QDQ graph in ONNX Runtime", fmt=fmt,
                                         hint="use backend='onnxruntime' with reference_numerics=True")
            from edgekit.runtime.openvino import OpenVinoBackend

            return OpenVinoBackend(str(model_path), threads=threads, hints=hints)
        from edgekit.runtime.onnx import OnnxBackend, onnxruntime_importable

        if backend is None and not reference_numerics and not onnxruntime_importable():
            from importlib.util import find_spec

            if find_spec("openvino") is not None:  # a device with OpenVINO and no ONNX Runtime
                from edgekit.runtime.openvino import OpenVinoBackend

                return OpenVinoBackend(str(model_path), threads=threads)
        return OnnxBackend(str(model_path), threads=threads, providers=providers,
                           reference_numerics=reference_numerics)
    raise BundleError(f"unknown model format {fmt!r}", path=str(model_path),
                      hint="edgekit runs .tflite and .onnx models")


def _open_preferred(model_path: Path, fmt: str, pref: Mapping[str, Any], threads: Optional[int],
                    providers: Optional[Sequence[str]], reference_numerics: bool):
    """Open the backend a bundle's manifest prefers (`runtime.backend`, the one --select fastest
    timed it on), or the next available one. Returns (backend, note): note is None when the
    preferred backend runs it, else why it does not (never a silent fallback)."""
    want = pref.get("backend")
    formats = TFLITE_BACKENDS if fmt == "tflite" else ONNX_BACKENDS
    if want not in formats:
        why = f"{want!r} is not a backend for {fmt} models (one of {', '.join(formats)})"
    elif reference_numerics and want != "onnxruntime":
        why = "reference numerics run the graph as written in ONNX Runtime"
    else:
        try:
            return _open_backend(model_path, fmt, want, threads, providers, reference_numerics,
                                 hints=pref.get("hints")), None
        except BackendUnavailable as e:
            why = e.message
    impl = _open_backend(model_path, fmt, None, threads, providers, reference_numerics)
    note = f"the manifest prefers {want}, not used here: {why}; running on {impl.name}"
    warnings.warn(note, RuntimeWarning, stacklevel=3)
    return impl, note


def load(path: Union[str, Path], *, backend: Optional[str] = None, threads: Optional[int] = None,
         providers: Optional[Sequence[str]] = None, verify: bool = True,
         reference_numerics: bool = False) -> "Model":
    """Load a bundle directory, or any .tflite / .onnx file.

    Backend: `backend=` is used as given; otherwise a bundle's manifest may prefer one
    (`runtime.backend`: the backend `--select fastest` timed the artifact on, e.g. openvino),
    used when it is installed and can open the model, else the next available backend runs it
    and `model.backend_note` says why (also in benchmark reports and golden checks).
    Threads: `threads=` is used as given (1 to 4 per usable CPU: threads.check_threads); otherwise, for a
    bundle, the count measured fastest: the manifest's measured choice, a cached probe, or a probe timed
    here once and cached (see runtime.threadprobe), never above the target profile's count clamped to the
    CPUs this process may use (affinity and cgroup quota, see runtime.threads); that ceiling where a probe is not
    cheap. A bare file without `threads=` uses those usable CPUs. `model.threads_requested` and
    `model.threads` say what was asked and what is used; `model.threads_chosen_by` (argument,
    manifest, probe, cache, profile, usable CPUs) and `model.threads_choice` why.
    For a bundle, execution providers default to its target profile's;
    the model file's sha256 is checked against the manifest unless `verify=False`.
    `reference_numerics`: an ONNX QDQ graph runs as written, in float (see OnnxBackend): what a
    target with exact integer arithmetic computes, on a host whose integer kernels saturate.
    A language-model bundle (manifest kind "llm") or a bare ONNX Runtime GenAI folder (genai_config.json)
    gives a runtime.llm.LanguageModel instead (generate, chat, conversation, benchmark, check).
    """
    from edgekit.runtime.threads import choose_threads

    t0 = time.perf_counter_ns()
    p = Path(path)
    from edgekit.runtime import llm

    if llm.is_llm(p):
        if reference_numerics:
            raise BackendUnavailable("reference numerics are for ONNX QDQ graphs, not language models",
                                     fmt="onnx-genai", hint="leave out reference_numerics")
        return llm.load_llm(p, threads=threads, verify=verify, backend=backend)
    bundle: Optional[Bundle] = None
    profile_threads: Optional[int] = None
    pref: Mapping[str, Any] = {}
    if p.is_dir():
        bundle = read_bundle(p, verify=verify)
        model_path, fmt = bundle.model_path, bundle.format
        rt = bundle.manifest["target"].get("runtime", {})
        profile_threads = rt.get("threads")
        if providers is None and fmt == "onnx":
            providers = rt.get("execution_providers")
        pref = bundle.manifest.get("runtime") or {}
    elif p.is_file():
        model_path = p
        fmt = {".tflite": "tflite", ".onnx": "onnx"}.get(p.suffix.lower())
        if fmt is None:
            raise BundleError("not a model edgekit can run", path=str(p),
                              hint="give a bundle directory, a .tflite or an .onnx file")
    else:
        raise BundleError("no such file or bundle directory", path=str(p))
    requested = threads if threads is not None else profile_threads
    used = choose_threads(threads, profile_threads)
    chosen_by = "argument" if threads is not None else ("profile" if profile_threads is not None
                                                        else "usable CPUs")
    choice: Optional[Dict[str, Any]] = None
    auto = threads is None and bundle is not None and not reference_numerics
    if auto:
        from edgekit.runtime import threadprobe

        got = threadprobe.from_manifest(pref, used)
        if got is not None:
            (used, choice), chosen_by, auto = got, "manifest", False
    note = None
    if backend is None and pref.get("backend"):
        impl, note = _open_preferred(model_path, fmt, pref, used, providers, reference_numerics)
    else:
        impl = _open_backend(model_path, fmt, backend, used, providers, reference_numerics)
    first_ms = None
    if auto and used > 1:
        hints = pref.get("hints") if impl.name == pref.get("backend") else None
        impl, used, chosen_by, choice, first_ms = _probe_threads(
            impl, bundle, used, chosen_by,
            lambda t: _open_backend(model_path, fmt, impl.name, t, providers, reference_numerics, hints=hints))
    load_ns = time.perf_counter_ns() - t0
    model = Model(impl, path=p, bundle=bundle, load_ns=load_ns, threads_requested=requested)
    model.threads_chosen_by = chosen_by
    model.threads_choice = choice
    if first_ms is not None:   # the chosen instance's first inference ran in the probe
        model.first_inference_ms = first_ms
    model.backend_preferred = pref.get("backend")
    model.backend_chosen_by = "argument" if backend is not None else (
        "manifest" if pref.get("backend") and note is None else "default")
    # why the preferred backend does not run it, and why the backend runs it as it does (a delegate refused)
    model.backend_note = "; ".join(n for n in (note, getattr(impl, "note", None)) if n) or None
    return model


def _probe_threads(impl, bundle: Bundle, ceiling: int, default_by: str, open_at):
    """The cached or probed thread count for a bundle (runtime.threadprobe):
    (backend instance at that count, threads, chosen_by, record, its first inference ms or None)."""
    from edgekit.runtime import threadprobe as tp
    from edgekit.runtime.bench import cpu_model

    tried = tp.candidates(ceiling)
    cpu = cpu_model()
    key = tp.cache_key(str(bundle.manifest["model"].get("sha256")), impl.name, impl.version,
                       list(impl.providers), ceiling, cpu)
    rec = tp.read_cache(key, tried)
    if rec is not None:
        rec["cache"] = str(tp.cache_path(key))
        t = int(rec["threads"])
        return (impl if t == ceiling else open_at(t)), t, "cache", rec, None
    if not tp.probe_enabled():
        return impl, ceiling, default_by, {"why": f"not probed ({tp.PROBE_ENV}=0)"}, None
    t0 = time.perf_counter()
    feeds = [np.ascontiguousarray(s.quantize(a)) for s, a in zip(impl.inputs, _example_inputs(bundle, impl.inputs))]

    def call_of(m):
        def call():
            m.set_inputs(feeds)
            m.invoke()
            return m.get_outputs()
        return call

    impls, first = {ceiling: impl}, {ceiling: tp.time_one(call_of(impl))}
    per_call = min(tp.time_one(call_of(impl)) for _ in range(3))
    rec = {"tried": tried, "where": f"probed at load on this machine ({cpu})",
           "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
           "loadavg": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None}
    if per_call > tp.PROBE_MAX_MS:
        rec.update(threads=ceiling, skipped=True,
                   why=f"one inference takes {per_call:.1f} ms at {ceiling} threads (over {tp.PROBE_MAX_MS:g} ms): "
                       "not probed; the profile's count, clamped to the usable CPUs")
    else:
        for t in tried:
            if t not in impls:
                impls[t] = open_at(t)
                first[t] = tp.time_one(call_of(impls[t]))
        for m in impls.values():   # warm-up
            for _ in range(3):
                call_of(m)()
        p50, runs, rounds = tp.measure({t: call_of(m) for t, m in impls.items()}, per_call)
        chosen = tp.pick(p50)
        rec.update(threads=chosen, p50_ms={str(t): round(v, 6) for t, v in sorted(p50.items())},
                   rounds=rounds, runs_per_round=runs, why=tp.explain(p50, chosen))
    rec["probe_ms"] = round((time.perf_counter() - t0) * 1e3, 1)
    cached = tp.write_cache(key, rec)
    if cached:
        rec["cache"] = cached
    t = int(rec["threads"])
    return impls[t], t, ("profile" if rec.get("skipped") else "probe"), rec, first[t]


def _example_inputs(bundle: Optional[Bundle], specs: Sequence[TensorSpec], seed: int = 0) -> List[np.ndarray]:
    """Golden inputs for a bundle; otherwise random data in each input's range."""
    if bundle is not None and bundle.golden_path.is_file():
        g = bundle.golden()
        if all(f"input:{s.name}" in g for s in specs):
            return [g[f"input:{s.name}"][:1] for s in specs]
    rng = np.random.default_rng(seed)
    out = []
    for s in specs:
        shape = tuple(1 if d < 0 else d for d in s.shape)
        if s.quantized:
            lo = float(s.dequantize(np.array(np.iinfo(s.dtype).min, dtype=s.dtype)))
            hi = float(s.dequantize(np.array(np.iinfo(s.dtype).max, dtype=s.dtype)))
            out.append(rng.uniform(lo, hi, size=shape).astype(np.float32))
        elif np.issubdtype(np.dtype(s.dtype), np.floating):
            out.append(rng.standard_normal(shape).astype(s.dtype))
        else:
            out.append(rng.integers(0, 2, size=shape).astype(s.dtype))
    return out


class Model:
    """A loaded model. `model(x)` takes and returns float arrays.

    Quantization is handled from the manifest (or the model's own tensor
    parameters for a bare file); `run(..., raw=True)` exchanges the integer tensors.
    """

    def __init__(self, impl, *, path: Path, bundle: Optional[Bundle], load_ns: int,
                 threads_requested: Optional[int] = None):
        self._impl = impl
        self.threads_requested: Optional[int] = threads_requested
        self.threads_chosen_by: str = "argument" if threads_requested is not None else "usable CPUs"
        self.threads_choice: Optional[Dict[str, Any]] = None   # the measured choice, where one was made
        self.backend_preferred: Optional[str] = None    # the manifest's runtime.backend, if any
        self.backend_chosen_by: str = "default"         # "argument" | "manifest" | "default"
        self.backend_note: Optional[str] = None         # why the preferred backend is not the one running
        self.path = path
        self.bundle = bundle
        self.manifest: Optional[Dict[str, Any]] = bundle.manifest if bundle else None
        self.load_ms = load_ns / 1e6
        self.first_inference_ms: Optional[float] = None
        self.inputs: List[TensorSpec] = list(impl.inputs)
        self.outputs: List[TensorSpec] = list(impl.outputs)
        if bundle is not None:
            self._check_manifest_io()
        self._prepare()

    # -- facts ------------------------------------------------------------
    @property
    def format(self) -> str:
        return self._impl.format

    @property
    def backend(self) -> str:
        return self._impl.name

    @property
    def backend_version(self) -> str:
        return self._impl.version

    @property
    def threads(self) -> Optional[int]:
        """The threads the backend runs with (see threads_requested for what was asked)."""
        return self._impl.threads

    @property
    def providers(self) -> List[str]:
        return list(self._impl.providers)

    def _check_manifest_io(self) -> None:
        for kind, specs in (("inputs", self.inputs), ("outputs", self.outputs)):
            declared = self.manifest.get(kind, [])
            names = [d["name"] for d in declared]
            if names != [s.name for s in specs]:
                raise BundleError(f"manifest {kind} {names} do not match the model's "
                                  f"{[s.name for s in specs]}", path=str(self.path))
            for d, s in zip(declared, specs):
                if d["dtype"] != s.dtype:
                    raise BundleError(f"manifest says {kind[:-1]} '{s.name}' is {d['dtype']}, "
                                      f"the model has {s.dtype}", path=str(self.path))
                q = d.get("quantization")
                if s.quantized and q and not np.allclose(q["scale"], s.scale, rtol=1e-6):
                    raise BundleError(f"manifest scale of '{s.name}' differs from the model's",
                                      path=str(self.path))

    # -- inference --------------------------------------------------------
    def _as_list(self, args, kwargs) -> List[np.ndarray]:
        if kwargs and args:
            raise TypeError("pass inputs either positionally or by name, not both")
        if len(args) == 1 and isinstance(args[0], Mapping):
            kwargs, args = dict(args[0]), ()
        if kwargs:
            names = [s.name for s in self.inputs]
            unknown = [k for k in kwargs if k not in names]
            if unknown:
                raise DataError(f"unknown input {unknown[0]!r}; the model's inputs are {names}")
            missing = [n for n in names if n not in kwargs]
            if missing:
                raise DataError(f"missing input {missing[0]!r}; the model's inputs are {names}")
            return [np.asarray(kwargs[n]) for n in names]
        if len(args) != len(self.inputs):
            raise DataError(f"the model takes {len(self.inputs)} input(s) "
                            f"({[s.name for s in self.inputs]}), got {len(args)}")
        return [np.asarray(a) for a in args]

    def _prepare(self) -> None:
        """Per-tensor work done once, so a call does only what each input needs."""
        self._in_names = [s.name for s in self.inputs]
        # an input whose rank and non-batch dims are fixed skips the full shape check when they match
        self._in_tail = [None if not s.shape or -1 in s.shape[1:] else tuple(s.shape[1:]) for s in self.inputs]
        self._in_batch = [s.shape[0] if s.shape and s.shape[0] != -1 else None for s in self.inputs]
        self._in_conv = [_Converter(s) for s in self.inputs]
        self._out_conv = [_Converter(s) for s in self.outputs]
        self._out_names = [s.name for s in self.outputs]
        self._owns_outputs = bool(getattr(self._impl, "returns_fresh_arrays", False))
        self._one_to_one = len(self.inputs) == 1 and len(self.outputs) == 1 and self._in_tail[0] is not None
        # model(x) for one float array of the shape the last call ran (checked, quantized, run) goes
        # straight to the backend's run1: the shape and dtype checks, batch split and first-inference
        # clock have nothing left to do for it
        self._fast: tuple = _NO_FAST   # (shape, dtype, call) of the steady state
        self._fast_ok = (self._one_to_one and self._owns_outputs and hasattr(self._impl, "run1")
                         and not self._in_conv[0].per_axis and not self._out_conv[0].per_axis)

    def _check_shape(self, spec: TensorSpec, a: np.ndarray) -> None:
        if a.ndim != len(spec.shape) or any(
                d not in (-1, g) for d, g in zip(spec.shape[1:], a.shape[1:])):
            raise DataError(f"shape {tuple(a.shape)} does not fit the model's {spec.shape} "
                            "(-1: any size)", tensor=spec.name)
        if not np.issubdtype(a.dtype, np.number) and a.dtype != np.bool_:
            raise DataError(f"dtype {a.dtype} is not numeric", tensor=spec.name)

    def _feeds(self, args, kwargs, raw: bool) -> List[np.ndarray]:
        if not kwargs and len(args) == len(self.inputs) and all(type(a) is np.ndarray for a in args):
            arrays = args  # the common case: arrays, positionally
        else:
            arrays = self._as_list(args, kwargs)
        feeds = []
        for i, a in enumerate(arrays):
            tail = self._in_tail[i]
            if tail is None or a.shape[1:] != tail or a.dtype.kind not in "fiub":
                self._check_shape(self.inputs[i], a)
            if raw:
                a = a.astype(self.inputs[i].dtype, copy=False)
            else:
                a = self._in_conv[i].quantize(a)
            feeds.append(a if a.flags.c_contiguous else np.ascontiguousarray(a))
        return feeds

    def run(self, *args, raw: bool = False, **kwargs) -> Dict[str, np.ndarray]:
        """Run once; returns {output name: array}. raw=True: integer tensors in and out."""
        outs = self._run_raw(self._feeds(args, kwargs, raw))
        if not raw:
            outs = [c.dequantize(o) for c, o in zip(self._out_conv, outs)]
        return dict(zip(self._out_names, outs))

    def _run_raw(self, feeds: List[np.ndarray]) -> List[np.ndarray]:
        """Run quantized feeds; a batch larger than a fixed batch dimension runs sample by sample."""
        batch = feeds[0].shape[0] if feeds[0].ndim else 1
        if batch > 1 and any(b is not None and b != a.shape[0] for b, a in zip(self._in_batch, feeds)):
            parts = [self._run_raw([f[i:i + 1] for f in feeds]) for i in range(batch)]
            return [np.concatenate([p[k] for p in parts]) for k in range(len(self.outputs))]
        impl = self._impl
        if self.first_inference_ms is None:
            t0 = time.perf_counter_ns()
        impl.set_inputs(feeds)
        impl.invoke()
        outs = impl.get_outputs()
        if not self._owns_outputs:
            outs = [np.array(o) for o in outs]
        if self.first_inference_ms is None:
            self.first_inference_ms = (time.perf_counter_ns() - t0) / 1e6
        return outs

    def __call__(self, *args, **kwargs):
        """Float in, float out: one output -> an array, several -> a dict by name."""
        if len(args) == 1 and not kwargs:
            a = args[0]
            shape, dtype, fast = self._fast   # one attribute: a consistent triple across threads
            if a.__class__ is _ndarray and a.shape == shape and (a.dtype is dtype or a.dtype == dtype):
                return fast(a)  # the steady state: the shape and dtype of the last call
            if self._one_to_one and type(a) is np.ndarray and a.ndim and a.shape[1:] == self._in_tail[0] \
                    and a.dtype.kind in "fiu":
                q = self._in_conv[0].quantize(a)
                outs = self._run_raw([q if q.flags.c_contiguous else np.ascontiguousarray(q)])
                if self._fast_ok and a.dtype.kind == "f" and (self._in_batch[0] in (None, a.shape[0])) \
                        and (not self._out_conv[0].quantized or outs[0].dtype == self._out_conv[0].dtype):
                    self._fast = (a.shape, a.dtype, self._make_fast(a.dtype))
                return self._out_conv[0].dequantize(outs[0])
        if len(self.outputs) == 1 and "raw" not in kwargs:
            outs = self._run_raw(self._feeds(args, kwargs, False))
            return self._out_conv[0].dequantize(outs[0])
        out = self.run(*args, **kwargs)
        if len(out) == 1:
            return next(iter(out.values()))
        return out

    def _make_fast(self, dtype: np.dtype):
        """model(x) for an input already seen to fit (its shape and dtype checked, its batch one the
        model runs whole, its first inference clocked): quantize, the backend's run1, dequantize,
        with each step's constants bound once. The same numbers as the checked path."""
        quantize = self._in_conv[0].quantizer(dtype)
        dequantize = self._out_conv[0].dequantizer()
        impl = self._impl

        def fast(a: np.ndarray) -> np.ndarray:
            return dequantize(impl.run1(quantize(a)))
        return fast

    # -- measuring ----------------------------------------------------------
    def example_inputs(self, seed: int = 0) -> List[np.ndarray]:
        """Golden inputs for a bundle; otherwise random data in each input's range."""
        return _example_inputs(self.bundle, self.inputs, seed)

    def benchmark(self, runs: int = 200, warmup: int = 20, inputs: Optional[List[ArrayLike]] = None,
                  end_to_end: bool = True) -> Dict[str, Any]:
        """The latency method of DESIGN.md; returns the report as a dict (see runtime.bench)."""
        from edgekit.runtime.bench import benchmark

        return benchmark(self, runs=runs, warmup=warmup, inputs=inputs, end_to_end=end_to_end)

    def __repr__(self) -> str:
        return (f"Model({str(self.path)!r}, format={self.format}, backend={self.backend} "
                f"{self.backend_version}, inputs={[s.name for s in self.inputs]})")


_ndarray = np.ndarray
_NO_FAST = (None, None, None)   # no steady state yet (no shape equals None)

try:  # the clip ufunc itself: np.clip's Python wrappers cost more than clipping a small tensor
    _clip = np._core.umath.clip
except AttributeError:  # numpy < 2
    _clip = np.core.umath.clip


class _Converter:
    """One tensor's float <-> integer conversion with its constants made once: the same
    numbers as TensorSpec.quantize / dequantize (a scale of 1 divides by nothing; an 8-bit
    tensor dequantizes through a 256-entry table of exactly those numbers)."""

    __slots__ = ("spec", "dtype", "quantized", "per_axis", "scale", "zp", "lo", "hi", "unit", "table", "u8")

    def __init__(self, spec: TensorSpec):
        self.spec = spec
        self.dtype = np.dtype(spec.dtype)
        self.quantized = spec.quantized
        self.per_axis = self.quantized and len(spec.scale) > 1
        self.table = None
        if self.quantized and not self.per_axis:
            self.scale = np.float32(spec.scale[0])
            self.zp = np.float32(spec.zero_point[0])
            self.unit = self.scale == np.float32(1.0)
            info = np.iinfo(self.dtype)
            self.lo, self.hi = np.float32(info.min), np.float32(info.max)
            if self.dtype.itemsize == 1:
                # every integer value's float, computed as dequantize computes it: (q - zp) * scale
                levels = np.arange(256, dtype=np.uint8).view(self.dtype).astype(np.float32)
                levels -= self.zp
                levels *= self.scale
                self.table = levels
                self.u8 = np.dtype(np.uint8)

    def quantize(self, x: np.ndarray) -> np.ndarray:
        if not self.quantized:
            return x.astype(self.dtype, copy=False)
        if self.per_axis or x.dtype.kind != "f":
            return self.spec.quantize(x)
        if self.unit:
            q = np.rint(x, dtype=np.float32)
        else:
            q = np.divide(x, self.scale, dtype=np.float32)
            np.rint(q, out=q)
        q += self.zp  # integers: exact
        _clip(q, self.lo, self.hi, out=q)
        return q.astype(self.dtype)

    def quantizer(self, dtype: np.dtype):
        """quantize() for a float array of `dtype`, specialised: returns a C-contiguous array."""
        contiguous = np.ascontiguousarray
        if not self.quantized and dtype == self.dtype:
            return contiguous   # the array itself where it is C-contiguous already
        if not self.quantized or self.per_axis or dtype.kind != "f":
            quantize = self.quantize
            return lambda x: contiguous(quantize(x))
        rint, divide, clip, f32 = np.rint, np.divide, _clip, np.float32
        scale, zp, lo, hi, dt = self.scale, self.zp, self.lo, self.hi, self.dtype
        if self.unit:
            def quantize_unit(x):
                q = rint(x, dtype=f32)
                q += zp
                clip(q, lo, hi, out=q)
                return q.astype(dt)
            return quantize_unit

        def quantize_scaled(x):
            q = divide(x, scale, dtype=f32)
            rint(q, out=q)
            q += zp
            clip(q, lo, hi, out=q)
            return q.astype(dt)
        return quantize_scaled

    def dequantizer(self):
        """dequantize() for the backend's output of this tensor (its dtype, as declared)."""
        if self.table is not None:
            take, u8 = self.table.take, self.u8
            return lambda q: take(q.view(u8))
        return self.dequantize

    def dequantize(self, q: np.ndarray) -> np.ndarray:
        if not self.quantized:
            return q
        if self.table is not None and q.dtype == self.dtype:
            return self.table.take(q.view(self.u8))
        if self.per_axis:
            return self.spec.dequantize(q)
        f = q.astype(np.float32)
        f -= self.zp
        f *= self.scale
        return f
