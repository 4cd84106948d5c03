"""OpenVINO backend for ONNX models on x86 CPUs (`pip install edgekit[openvino]`).

OpenVINO reads the ONNX file directly (QDQ INT8 included: it folds the Q/DQ pairs into
its own low-precision kernels). The model is compiled for the CPU with a latency hint,
one stream and INFERENCE_NUM_THREADS set to the runtime's thread count. A dynamic
dimension is fixed to the size of the input that arrives, and the model is compiled
again (and kept) when another size comes: static shapes are OpenVINO's fast path.
"""

from __future__ import annotations

from typing import Dict, List, Mapping, Optional, Tuple

import numpy as np

from edgekit.errors import BackendUnavailable
from edgekit.runtime.spec import TensorSpec


def _import():
    try:
        import openvino as ov
    except ImportError as e:
        raise BackendUnavailable(f"openvino cannot be imported ({type(e).__name__}: {e})".splitlines()[0],
                                 fmt="onnx", hint="pip install 'edgekit[openvino]'  (openvino from PyPI)") from None
    return ov


def _reason(e: Exception) -> str:
    """The informative part of an OpenVINO exception (its first lines name only source files)."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    if "Summary:" in lines:
        return "; ".join(ln.lstrip("- ") for ln in lines[lines.index("Summary:") + 1:])[:400]
    useful = [ln for ln in lines if not ln.startswith(("Exception from", "Check '"))]
    return (useful[-1] if useful else (lines[0] if lines else type(e).__name__))[:400]


def _port_name(port) -> str:
    names = sorted(port.get_names())
    try:
        return port.get_any_name()
    except RuntimeError:  # a port without a tensor name
        return names[0] if names else ""


def _dims(pshape) -> Tuple[int, ...]:
    return tuple(d.get_length() if d.is_static else -1 for d in pshape)


class OpenVinoBackend:
    format = "onnx"
    name = "openvino"
    returns_fresh_arrays = True  # get_outputs copies

    # what the CPU plugin is compiled with unless a manifest's runtime.hints say otherwise
    DEFAULT_CONFIG: Dict[str, object] = {"PERFORMANCE_HINT": "LATENCY", "NUM_STREAMS": 1}

    def __init__(self, path: str, threads: Optional[int] = None, device: str = "CPU",
                 hints: Optional[Mapping[str, object]] = None):
        """hints: OpenVINO properties (e.g. {"PERFORMANCE_HINT": "LATENCY", "NUM_STREAMS": 1}, what
        --select fastest timed the model with), over DEFAULT_CONFIG; threads are set by `threads`."""
        ov = _import()
        self._ov = ov
        from edgekit.runtime.facts import dist_version

        v = dist_version("openvino")
        self.version = v if v != "unknown" else ov.get_version().split("-")[0]
        self.threads = threads
        self.device = device
        self._core = ov.Core()
        try:
            self._model = self._core.read_model(str(path))
        except RuntimeError as e:
            raise BackendUnavailable(f"openvino {self.version} cannot read {path}: {_reason(e)}", fmt="onnx",
                                     hint="the model may use an op this OpenVINO does not support; "
                                          "try backend='onnxruntime'") from None
        self._config: Dict[str, object] = dict(self.DEFAULT_CONFIG)
        self._config.update({k: v for k, v in (hints or {}).items() if k != "INFERENCE_NUM_THREADS"})
        self.hints = dict(self._config)
        if threads:
            self._config["INFERENCE_NUM_THREADS"] = int(threads)
        self.providers: List[str] = [f"OpenVINO {device}"]
        et = {ov.Type.f32: "float32", ov.Type.f16: "float16", ov.Type.f64: "float64",
              ov.Type.i8: "int8", ov.Type.u8: "uint8", ov.Type.i16: "int16", ov.Type.i32: "int32",
              ov.Type.i64: "int64", ov.Type.boolean: "bool"}
        self.inputs = [TensorSpec(_port_name(p), _dims(p.get_partial_shape()), et.get(p.get_element_type(), "float32"))
                       for p in self._model.inputs]
        self.outputs = [TensorSpec(_port_name(p), _dims(p.get_partial_shape()), et.get(p.get_element_type(), "float32"))
                        for p in self._model.outputs]
        self._compiled: Dict[tuple, object] = {}
        self._request = None
        self._shapes: Optional[tuple] = None
        # Compile now for the declared shapes with a dynamic dimension set to 1, so load
        # time is load time and the first inference does not pay for the compilation.
        self._select(tuple(tuple(1 if d < 0 else d for d in s.shape) for s in self.inputs))

    def _select(self, shapes: tuple) -> None:
        if shapes == self._shapes:
            return
        req = self._compiled.get(shapes)
        if req is None:
            model = self._model
            if any(-1 in s.shape for s in self.inputs):
                model = model.clone()
                model.reshape({i: self._ov.PartialShape(list(s)) for i, s in enumerate(shapes)})
            try:
                compiled = self._core.compile_model(model, self.device, self._config)
            except RuntimeError as e:
                raise BackendUnavailable(f"openvino {self.version} cannot compile the model for "
                                         f"{self.device}: {_reason(e)}", fmt="onnx",
                                         hint="try backend='onnxruntime'") from None
            # what the compiled model really runs with (the request, or OpenVINO's own choice)
            self.threads = int(compiled.get_property("INFERENCE_NUM_THREADS"))
            req = compiled.create_infer_request()
            self._compiled[shapes] = req
        self._request, self._shapes = req, shapes

    def set_inputs(self, arrays: List[np.ndarray]) -> None:
        self._select(tuple(tuple(a.shape) for a in arrays))
        req = self._request
        for i, a in enumerate(arrays):
            req.set_input_tensor(i, self._ov.Tensor(a, shared_memory=True))

    def run1(self, a: np.ndarray) -> np.ndarray:
        """One input in, one output out: Model's steady-state call path."""
        self.set_inputs([a])
        self._request.infer()
        return self._request.get_output_tensor(0).data.copy()

    def invoke(self) -> None:
        self._request.infer()

    def get_outputs(self) -> List[np.ndarray]:
        # the request's buffers are reused by the next inference: copy
        return [self._request.get_output_tensor(i).data.copy() for i in range(len(self.outputs))]
