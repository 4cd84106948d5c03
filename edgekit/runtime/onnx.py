"""ONNX Runtime backend, with the target's execution providers and a CPU fallback."""

from __future__ import annotations

import warnings
from typing import List, Optional, Sequence

import numpy as np

from edgekit.errors import BackendUnavailable
from edgekit.runtime.spec import TensorSpec

_ORT_TYPES = {
    "tensor(float)": "float32", "tensor(float16)": "float16", "tensor(double)": "float64",
    "tensor(int8)": "int8", "tensor(uint8)": "uint8", "tensor(int16)": "int16",
    "tensor(int32)": "int32", "tensor(int64)": "int64", "tensor(bool)": "bool",
}


def _shape(dims) -> tuple:
    return tuple(d if isinstance(d, int) and d >= 0 else -1 for d in dims)


def onnxruntime_importable() -> bool:
    from importlib.util import find_spec

    return find_spec("onnxruntime") is not None


class OnnxBackend:
    format = "onnx"
    name = "onnxruntime"
    returns_fresh_arrays = True  # InferenceSession.run allocates its outputs

    def __init__(self, path: str, threads: Optional[int] = None,
                 providers: Optional[Sequence[str]] = None, reference_numerics: bool = False):
        """reference_numerics: run a QDQ graph as written (graph optimizations off: no fused
        integer kernels), i.e. the exact-arithmetic result a target computes, on a host whose
        integer kernels saturate (x86 without VNNI)."""
        try:
            import onnxruntime as ort
        except Exception as e:
            raise BackendUnavailable(f"onnxruntime cannot be imported ({type(e).__name__}: {e})",
                                     fmt="onnx", hint="pip install onnxruntime") from None
        self.version = ort.__version__
        available = ort.get_available_providers()
        wanted = list(providers or ["CPUExecutionProvider"])
        chosen = [p for p in wanted if p in available]
        missing = [p for p in wanted if p not in available]
        if missing:
            warnings.warn(f"execution providers not available here: {', '.join(missing)}; "
                          f"running on {', '.join(chosen) or 'CPUExecutionProvider'}", RuntimeWarning,
                          stacklevel=3)
        if "CPUExecutionProvider" not in chosen:
            chosen.append("CPUExecutionProvider")
        self.providers_requested = wanted
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        self.reference_numerics = reference_numerics
        if reference_numerics:
            opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        if threads:
            opts.intra_op_num_threads = int(threads)
            opts.inter_op_num_threads = 1
        self.threads = threads
        try:
            self._sess = ort.InferenceSession(str(path), sess_options=opts, providers=chosen)
        except Exception as e:
            raise BackendUnavailable(f"onnxruntime {self.version} cannot load {path}: "
                                     f"{str(e).splitlines()[0]}", fmt="onnx",
                                     hint="the model may need a newer opset than this runtime has") from None
        self.providers: List[str] = list(self._sess.get_providers())
        self.inputs = [TensorSpec(i.name, _shape(i.shape), _ORT_TYPES.get(i.type, "float32"))
                       for i in self._sess.get_inputs()]
        self.outputs = [TensorSpec(o.name, _shape(o.shape), _ORT_TYPES.get(o.type, "float32"))
                        for o in self._sess.get_outputs()]
        self._out_names = [o.name for o in self.outputs]
        self._in0 = self.inputs[0].name if self.inputs else None
        self._feeds: dict = {}
        self._result: List[np.ndarray] = []

    def set_inputs(self, arrays: List[np.ndarray]) -> None:
        self._feeds = {s.name: a for s, a in zip(self.inputs, arrays)}

    def run1(self, a: np.ndarray) -> np.ndarray:
        """One input in, one output out: Model's steady-state call path."""
        return self._sess.run(self._out_names, {self._in0: a})[0]

    def invoke(self) -> None:
        self._result = self._sess.run(self._out_names, self._feeds)

    def get_outputs(self) -> List[np.ndarray]:
        return list(self._result)
