"""TFLite backend: ai_edge_litert, tflite_runtime (legacy, numpy<2) or tensorflow.lite.

The interpreter module is imported here, inside the function that needs it, so
a device with numpy and any one of them runs edgekit.runtime.
"""

from __future__ import annotations

import importlib
import sys
import warnings
from typing import List, Optional, Tuple

import numpy as np

from edgekit.errors import BackendUnavailable
from edgekit.runtime.spec import TensorSpec

# (backend name, module holding Interpreter, distribution for the version)
IMPLEMENTATIONS = (
    ("litert", "ai_edge_litert.interpreter", "ai-edge-litert"),
    ("tflite-runtime", "tflite_runtime.interpreter", "tflite-runtime"),
    ("tensorflow", "tensorflow.lite.python.interpreter", "tensorflow"),
)


def _dist_version(dist: str, module) -> str:
    from edgekit.runtime.facts import dist_version

    v = dist_version(dist)
    return v if v != "unknown" else getattr(module, "__version__", "unknown")


def find_interpreter(prefer: Optional[str] = None) -> Tuple[str, object, str]:
    """(backend name, Interpreter class, version) of the first importable implementation."""
    tried = []
    for name, modname, dist in IMPLEMENTATIONS:
        if prefer and name != prefer:
            continue
        try:
            mod = importlib.import_module(modname)
            interp = mod.Interpreter
        except Exception as e:  # ImportError, or a broken install (e.g. numpy ABI mismatch)
            tried.append(f"{name}: {type(e).__name__}: {e}".splitlines()[0])
            continue
        top = importlib.import_module(modname.split(".")[0])
        return name, interp, _dist_version(dist, top)
    raise BackendUnavailable(
        "no TFLite interpreter can be imported" + (f" (backend={prefer})" if prefer else "")
        + ("; tried " + "; ".join(tried) if tried else ""), fmt="tflite",
        hint="pip install ai-edge-litert  (or tflite-runtime==2.14.0 with numpy<2 on older images)")


def delegate_refused(message: str) -> bool:
    """A load error that is a delegate refusing a node at prepare time (litert: 'failed to create
    XNNPACK runtime ... Node number N (TfLiteXNNPackDelegate) failed to prepare'), not a missing op."""
    return "XNNPACK" in message and ("failed to prepare" in message or "failed to create" in message)


def _spec(d: dict, name: Optional[str] = None) -> TensorSpec:
    q = d.get("quantization_parameters") or {}
    scales = q.get("scales")
    dtype = np.dtype(d["dtype"]).name
    shape = tuple(int(s) for s in d.get("shape_signature", d["shape"]))
    if scales is not None and len(scales) and np.issubdtype(np.dtype(dtype), np.integer):
        return TensorSpec(name or d["name"], shape, dtype,
                          tuple(float(s) for s in scales),
                          tuple(int(z) for z in q["zero_points"]),
                          int(q.get("quantized_dimension", 0)))
    return TensorSpec(name or d["name"], shape, dtype)


class TFLiteBackend:
    format = "tflite"
    returns_fresh_arrays = True  # Interpreter.get_tensor returns a copy

    def __init__(self, path: str, threads: Optional[int] = None, prefer: Optional[str] = None):
        self.name, interp_cls, self.version = find_interpreter(prefer)
        kwargs = {"model_path": str(path)}
        if threads:
            kwargs["num_threads"] = int(threads)
        self.note: Optional[str] = None   # why the default delegate does not run this model, if it does not
        self.providers: List[str] = ["XNNPACK (default delegate)"]
        try:
            self._interp = self._open(interp_cls, kwargs)
        except (ValueError, RuntimeError) as e:  # unknown op version (load) / unsupported type (prepare)
            msg = " ".join(str(e).split())
            if not delegate_refused(msg):
                raise BackendUnavailable(f"{self.name} {self.version} cannot load {path}: {msg}",
                                         fmt="tflite",
                                         hint="the model needs an op or op version this runtime "
                                              "does not have; upgrade the runtime or rebuild for it") from None
            # XNNPACK accepted the graph's ops, then refused one node's parameters when building its
            # runtime (e.g. a requantization scale outside its range): the built-in kernels run it
            resolver = getattr(sys.modules[interp_cls.__module__], "OpResolverType", None)
            if resolver is None:
                raise BackendUnavailable(f"{self.name} {self.version} cannot load {path}: {msg}", fmt="tflite",
                                         hint="the XNNPACK delegate refused a node of this graph (not a missing "
                                              "op) and this runtime cannot run without it; rebuild the model") from None
            try:
                self._interp = self._open(interp_cls, dict(
                    kwargs, experimental_op_resolver_type=resolver.BUILTIN_WITHOUT_DEFAULT_DELEGATES))
            except (ValueError, RuntimeError) as e2:
                raise BackendUnavailable(f"{self.name} {self.version} cannot load {path}: {msg}; without "
                                         f"XNNPACK: {' '.join(str(e2).split())}", fmt="tflite",
                                         hint="the XNNPACK delegate refused a node and the built-in kernels "
                                              "failed too; rebuild the model") from None
            self.note = (f"the XNNPACK delegate refused this graph ({msg}); running on {self.name}'s "
                         "built-in kernels, without XNNPACK (slower)")
            self.providers = ["built-in kernels (XNNPACK refused the graph)"]
            warnings.warn(self.note, RuntimeWarning, stacklevel=3)
        self.threads = threads
        in_det = self._interp.get_input_details()
        out_det = self._interp.get_output_details()
        in_names, out_names = self._signature_names(in_det, out_det)
        self._in_index = [d["index"] for d in in_det]
        self._out_index = [d["index"] for d in out_det]
        self.inputs = [_spec(d, n) for d, n in zip(in_det, in_names)]
        self.outputs = [_spec(d, n) for d, n in zip(out_det, out_names)]
        self._shapes = [tuple(d["shape"]) for d in in_det]
        self.run1 = self._make_run1()

    @staticmethod
    def _open(interp_cls, kwargs):
        interp = interp_cls(**kwargs)
        interp.allocate_tensors()
        return interp

    def _make_run1(self):
        """run1(a): one raw input in, one raw output out, for Model's steady-state call path
        (a model with one input and one output); the interpreter's methods bound once."""
        it, shapes, set_inputs = self._interp, self._shapes, self.set_inputs
        set_tensor, invoke, get_tensor = it.set_tensor, it.invoke, it.get_tensor
        i, o = self._in_index[0] if self._in_index else None, self._out_index[0] if self._out_index else None

        def run1(a: np.ndarray) -> np.ndarray:
            if a.shape != shapes[0]:
                set_inputs([a])  # resizes a dynamic batch
            else:
                set_tensor(i, a)
            invoke()
            return get_tensor(o)
        return run1

    def _signature_names(self, in_det, out_det):
        """Names from the model's signature (what the source model called them), else tensor names."""
        in_names = [d["name"] for d in in_det]
        out_names = [d["name"] for d in out_det]
        try:
            sigs = self._interp.get_signature_list()
        except (AttributeError, ValueError, RuntimeError):  # an interpreter without signature support
            return in_names, out_names
        if len(sigs) != 1:
            return in_names, out_names
        key = next(iter(sigs))
        try:
            runner = self._interp.get_signature_runner(key)
            by_index_in = {d["index"]: n for n, d in runner.get_input_details().items()}
            by_index_out = {d["index"]: n for n, d in runner.get_output_details().items()}
        except (AttributeError, ValueError, RuntimeError):  # a signature the interpreter cannot run by name
            return in_names, out_names
        in_names = [by_index_in.get(d["index"], d["name"]) for d in in_det]
        out_names = [by_index_out.get(d["index"], d["name"]) for d in out_det]
        return in_names, out_names

    def set_inputs(self, arrays: List[np.ndarray]) -> None:
        """Set raw (already quantized) inputs, resizing a dynamic batch when it changes."""
        resized = False
        for i, (idx, a) in enumerate(zip(self._in_index, arrays)):
            if tuple(a.shape) != self._shapes[i]:
                self._interp.resize_tensor_input(idx, list(a.shape), strict=True)
                self._shapes[i] = tuple(a.shape)
                resized = True
        if resized:
            self._interp.allocate_tensors()
        for idx, a in zip(self._in_index, arrays):
            self._interp.set_tensor(idx, a)

    def invoke(self) -> None:
        self._interp.invoke()

    def get_outputs(self) -> List[np.ndarray]:
        return [self._interp.get_tensor(i) for i in self._out_index]
