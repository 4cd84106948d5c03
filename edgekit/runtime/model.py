"""load(path) -> Model: float in, float out, whatever backend the device has."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Union

import numpy as np

from edgekit.bundle import Bundle, read_bundle
from edgekit.errors import BackendUnavailable, BundleError, DataError
from edgekit.runtime.spec import TensorSpec

BACKENDS = ("litert", "tflite-runtime", "tensorflow", "onnxruntime")

ArrayLike = Union[np.ndarray, Sequence[Any]]


def _open_backend(model_path: Path, fmt: str, backend: Optional[str], threads: Optional[int],
                  providers: Optional[Sequence[str]], reference_numerics: bool = False):
    if backend is not None and backend not in BACKENDS:
        raise BackendUnavailable(f"unknown backend {backend!r}",
                                 hint="choose one of: " + ", ".join(BACKENDS))
    if fmt == "tflite":
        if backend == "onnxruntime":
            raise BackendUnavailable("onnxruntime cannot run a .tflite model", fmt=fmt,
                                     hint="use a TFLite backend: litert, tflite-runtime or tensorflow")
        from edgekit.runtime.tflite import TFLiteBackend

        return TFLiteBackend(str(model_path), threads=threads, prefer=backend)
    if fmt == "onnx":
        if backend not in (None, "onnxruntime"):
            raise BackendUnavailable(f"{backend} cannot run an .onnx model", fmt=fmt,
                                     hint="use backend='onnxruntime'")
        from edgekit.runtime.onnx import OnnxBackend

        return OnnxBackend(str(model_path), threads=threads, providers=providers,
                           reference_numerics=reference_numerics)
    raise BundleError(f"unknown model format {fmt!r}", path=str(model_path),
                      hint="edgekit runs .tflite and .onnx models")


def load(path: Union[str, Path], *, backend: Optional[str] = None, threads: Optional[int] = None,
         providers: Optional[Sequence[str]] = None, verify: bool = True,
         reference_numerics: bool = False) -> "Model":
    """Load a bundle directory, or any .tflite / .onnx file.

    For a bundle, threads and execution providers default to its target profile's;
    the model file's sha256 is checked against the manifest unless `verify=False`.
    `reference_numerics`: an ONNX QDQ graph runs as written, in float (see OnnxBackend).
    """
    t0 = time.perf_counter_ns()
    p = Path(path)
    bundle: Optional[Bundle] = None
    if p.is_dir():
        bundle = read_bundle(p, verify=verify)
        model_path, fmt = bundle.model_path, bundle.format
        rt = bundle.manifest["target"].get("runtime", {})
        threads = threads if threads is not None else rt.get("threads")
        if providers is None and fmt == "onnx":
            providers = rt.get("execution_providers")
    elif p.is_file():
        model_path = p
        fmt = {".tflite": "tflite", ".onnx": "onnx"}.get(p.suffix.lower())
        if fmt is None:
            raise BundleError("not a model edgekit can run", path=str(p),
                              hint="give a bundle directory, a .tflite or an .onnx file")
    else:
        raise BundleError("no such file or bundle directory", path=str(p))
    impl = _open_backend(model_path, fmt, backend, threads, providers, reference_numerics)
    load_ns = time.perf_counter_ns() - t0
    return Model(impl, path=p, bundle=bundle, load_ns=load_ns)


class Model:
    """A loaded model. `model(x)` takes and returns float arrays.

    Quantization is handled from the manifest (or the model's own tensor
    parameters for a bare file); `run(..., raw=True)` exchanges the integer tensors.
    """

    def __init__(self, impl, *, path: Path, bundle: Optional[Bundle], load_ns: int):
        self._impl = impl
        self.path = path
        self.bundle = bundle
        self.manifest: Optional[Dict[str, Any]] = bundle.manifest if bundle else None
        self.load_ms = load_ns / 1e6
        self.first_inference_ms: Optional[float] = None
        self.inputs: List[TensorSpec] = list(impl.inputs)
        self.outputs: List[TensorSpec] = list(impl.outputs)
        if bundle is not None:
            self._check_manifest_io()

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

    def _check_shape(self, spec: TensorSpec, a: np.ndarray) -> None:
        if a.ndim != len(spec.shape) or any(
                d not in (-1, g) for d, g in zip(spec.shape[1:], a.shape[1:])):
            raise DataError(f"shape {tuple(a.shape)} does not fit the model's {spec.shape} "
                            "(-1: any size)", tensor=spec.name)
        if not np.issubdtype(a.dtype, np.number) and a.dtype != np.bool_:
            raise DataError(f"dtype {a.dtype} is not numeric", tensor=spec.name)

    def run(self, *args, raw: bool = False, **kwargs) -> Dict[str, np.ndarray]:
        """Run once; returns {output name: array}. raw=True: integer tensors in and out."""
        arrays = self._as_list(args, kwargs)
        for s, a in zip(self.inputs, arrays):
            self._check_shape(s, a)
        feeds = [np.ascontiguousarray(a.astype(s.dtype, copy=False) if raw else s.quantize(a))
                 for s, a in zip(self.inputs, arrays)]
        outs = self._run_raw(feeds)
        if not raw:
            outs = [s.dequantize(o) for s, o in zip(self.outputs, outs)]
        return {s.name: o for s, o in zip(self.outputs, outs)}

    def _run_raw(self, feeds: List[np.ndarray]) -> List[np.ndarray]:
        """Run quantized feeds; a batch larger than a fixed batch dimension runs sample by sample."""
        batch = feeds[0].shape[0] if feeds[0].ndim else 1
        fixed = any(s.shape and s.shape[0] not in (-1, a.shape[0])
                    for s, a in zip(self.inputs, feeds))
        if fixed and batch > 1:
            parts = [self._run_raw([f[i:i + 1] for f in feeds]) for i in range(batch)]
            return [np.concatenate([p[k] for p in parts]) for k in range(len(self.outputs))]
        t0 = time.perf_counter_ns()
        self._impl.set_inputs(feeds)
        self._impl.invoke()
        outs = [np.array(o) for o in self._impl.get_outputs()]
        if self.first_inference_ms is None:
            self.first_inference_ms = (time.perf_counter_ns() - t0) / 1e6
        return outs

    def __call__(self, *args, **kwargs):
        """Float in, float out: one output -> an array, several -> a dict by name."""
        out = self.run(*args, **kwargs)
        if len(out) == 1:
            return next(iter(out.values()))
        return out

    # -- measuring ----------------------------------------------------------
    def example_inputs(self, seed: int = 0) -> List[np.ndarray]:
        """Golden inputs for a bundle; otherwise random data in each input's range."""
        if self.bundle is not None and self.bundle.golden_path.is_file():
            g = self.bundle.golden()
            if all(f"input:{s.name}" in g for s in self.inputs):
                return [g[f"input:{s.name}"][:1] for s in self.inputs]
        rng = np.random.default_rng(seed)
        out = []
        for s in self.inputs:
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

    def benchmark(self, runs: int = 200, warmup: int = 20, inputs: Optional[List[ArrayLike]] = None,
                  end_to_end: bool = True) -> Dict[str, Any]:
        """The latency method of DESIGN.md; returns the report as a dict (see runtime.bench)."""
        from edgekit.runtime.bench import benchmark

        return benchmark(self, runs=runs, warmup=warmup, inputs=inputs, end_to_end=end_to_end)

    def __repr__(self) -> str:
        return (f"Model({str(self.path)!r}, format={self.format}, backend={self.backend} "
                f"{self.backend_version}, inputs={[s.name for s in self.inputs]})")
