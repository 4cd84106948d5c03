"""Activation ranges chosen per tensor by the error they cause in the model's outputs (TFLite).

TFLite's converter takes each activation's range from min/max calibration, so one outlier can
take a tensor's whole INT8 range. The converter has no hook for other ranges, but it can stop
after calibration (`_experimental_calibrate_only`): the result is the float model with a
min/max per activation tensor, which TensorFlow's MLIR quantizer (`mlir_quantize`, what the
converter itself runs next) turns into the INT8 model. Here those min/max are search variables:

- the calibrated model runs in float on up to 128 calibration samples (every tensor kept) to
  give the reference outputs and each activation's values (with 48, as the ONNX rung uses, MLPerf's
  VWW MobileNet overfit: output error on those samples 0.131 -> 0.0044, validation SNR 10.2 -> 9.4
  dB; with 128: 8.7 -> 10.4 dB);
- each tensor's candidates are its min/max scaled by (0.85, 0.7, 0.5, 0.35, 0.25) and its
  values' 99.99 / 99.9 / 99 / 98 percentile ranges (two-sided), widest first;
- greedy coordinate descent, most outlier-heavy tensors first (range over the 99.9% range of
  its values): each candidate is quantized by `mlir_quantize` and run, and a tensor keeps the
  candidate with the smallest output error against the float outputs (convert.ranges'
  noise-to-signal sum), the others at their current choice, two sweeps within a time budget; a
  tensor whose edit does not change the quantized model (its scale is tied to another's) is left;
- the artifact is the calibrated model with the chosen ranges, quantized by `mlir_quantize`
  in the profile's scheme (per-channel or not, int8/uint8/float I/O), finished like the
  profile's own build (source I/O order, multi-row FULLY_CONNECTED rewrite).

With no range changed, the result is the profile's own build (same calibration, same quantizer).
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np

from edgekit.convert.data import Dataset
from edgekit.convert.ranges import output_error
from edgekit.targets import TFLiteBuild

CLIPS = (0.85, 0.7, 0.5, 0.35, 0.25)
PERCENTILES = (99.99, 99.9, 99.0, 98.0)


@dataclass
class Tensor:
    """One activation tensor of the calibrated model and its searched range."""

    index: int
    name: str
    base: Tuple[float, float]                 # min/max from calibration
    candidates: List[Tuple[float, float]] = field(default_factory=list)
    outliers: float = 1.0                     # base range / the range of its values' middle 99.8%
    chosen: Optional[Tuple[float, float]] = None


def supported(build: TFLiteBuild) -> bool:
    return build.activations == "int8"


def calibrate(saved_model: Path, calib: Dataset, build: TFLiteBuild) -> bytes:
    """The float model with min/max per activation tensor, calibrated as the profile's build is."""
    import tensorflow as tf

    from edgekit.convert.tflite import converter

    conv = converter(saved_model, calib, build)
    conv._experimental_calibrate_only = True
    conv.inference_input_type = tf.float32     # I/O types are the quantizer's job (quantize below)
    conv.inference_output_type = tf.float32
    return conv.convert()


def _object(calibrated: bytes):
    from tensorflow.lite.tools import flatbuffer_utils

    return flatbuffer_utils.convert_bytearray_to_object(bytearray(calibrated))


def _tensors(model) -> List[Tensor]:
    out = []
    for i, t in enumerate(model.subgraphs[0].tensors):
        q = t.quantization
        if q is None or q.min is None or q.max is None or len(q.min) != 1 or len(q.max) != 1:
            continue
        name = t.name.decode() if isinstance(t.name, bytes) else str(t.name)
        out.append(Tensor(i, name, (float(q.min[0]), float(q.max[0]))))
    return out


def with_ranges(model, ranges: Dict[int, Tuple[float, float]]) -> bytes:
    """The calibrated model (flatbuffer object) with the given tensors' min/max, serialized."""
    from tensorflow.lite.tools import flatbuffer_utils

    tensors = model.subgraphs[0].tensors
    saved = {}
    for i, (lo, hi) in ranges.items():
        q = tensors[i].quantization
        saved[i] = (q.min, q.max)
        q.min, q.max = np.array([lo], np.float32), np.array([hi], np.float32)
    try:
        return bytes(flatbuffer_utils.convert_object_to_bytearray(model))
    finally:
        for i, (lo, hi) in saved.items():
            tensors[i].quantization.min, tensors[i].quantization.max = lo, hi


def quantize(calibrated: bytes, build: TFLiteBuild, io: Optional[str] = None,
             float_nodes: Optional[List[str]] = None) -> bytes:
    """TensorFlow's MLIR quantizer on a calibrated model, in the build's scheme (what the converter runs);
    float_nodes: nodes left in float (mixed precision, the quantization debugger's node names)."""
    import tensorflow as tf
    from tensorflow.lite.python import convert as tfl_convert

    from edgekit.convert.tflite import _IO_TYPES

    dtype = getattr(tf, _IO_TYPES[io or build.io_type])
    return bytes(tfl_convert.mlir_quantize(calibrated, disable_per_channel=not build.per_channel,
                                           input_data_type=dtype, output_data_type=dtype,
                                           denylisted_nodes=list(float_nodes) if float_nodes else None))


def build_with(saved_model: Path, calibrated: bytes, build: TFLiteBuild,
               ranges: Dict[str, Tuple[float, float]], float_nodes: Optional[List[str]] = None) -> bytes:
    """The artifact: the calibrated model with `ranges` (tensor name -> (min, max)), quantized and
    finished like convert.tflite.to_tflite's INT8 build (float_nodes: kept in float)."""
    from edgekit.convert.tflite import keep_io_order
    from edgekit.convert.tflite_fc import rewrite

    model = _object(calibrated)
    by_name = {t.name: t.index for t in _tensors(model)}
    missing = sorted(set(ranges) - set(by_name))
    if missing:
        raise ValueError(f"ranges for tensors the calibrated model lacks: {', '.join(missing[:5])}")
    edited = with_ranges(model, {by_name[n]: r for n, r in ranges.items()})
    return rewrite(keep_io_order(saved_model, quantize(edited, build, float_nodes=float_nodes)))[0]


class _Runner:
    """Runs a TFLite model on a set of samples, in batches of `chunk` where the graph can be resized,
    else one sample at a time. Tensors' values (kept only when asked: every intermediate tensor is then
    held, so in small chunks) are subsampled to at most 2^20 per tensor and 2^25 in all (128 MB)."""

    def __init__(self, inputs: Dict[str, np.ndarray]):
        self.inputs = inputs
        self.n = len(next(iter(inputs.values())))

    def _interp(self, data: bytes, keep_all: bool = False):
        import sys

        from edgekit.runtime.tflite import delegate_refused, find_interpreter

        _, cls, _ = find_interpreter()
        with warnings.catch_warnings():     # keeping every tensor is what the search needs, not a debug run
            warnings.filterwarnings("ignore", message=".*experimental_preserve_all_tensors.*")
            it = cls(model_content=data, experimental_preserve_all_tensors=keep_all)
            try:
                it.allocate_tensors()
            except RuntimeError as e:   # XNNPACK refused a node when preparing: the built-in kernels run it
                if not delegate_refused(" ".join(str(e).split())):
                    raise
                it = cls(model_content=data, experimental_preserve_all_tensors=keep_all,
                         experimental_op_resolver_type=sys.modules[cls.__module__].OpResolverType
                         .BUILTIN_WITHOUT_DEFAULT_DELEGATES)
            return it

    def _key(self, tensor_name: str) -> str:
        """The dataset's input for a model input: by name (the converter names them
        serving_default_<name>:0 and orders them by name, not as the source does); one input: it."""
        base = tensor_name.split(":")[0]
        base = base[len("serving_default_"):] if base.startswith("serving_default_") else base
        for key in (tensor_name, base):
            if key in self.inputs:
                return key
        if len(self.inputs) == 1:
            return next(iter(self.inputs))
        raise ValueError(f"model input {tensor_name!r} matches none of the data's inputs ({', '.join(self.inputs)})")

    def _feed(self, details, lo: int, hi: int):
        out = []
        for d in details:
            x = self.inputs[self._key(d["name"])][lo:hi]
            out.append((d["index"], x.astype(d["dtype"]) if d["dtype"] == np.float32 else x))
        return out

    def _batches(self, it, step: int, tensors, per_part: int) -> list:
        parts, size = [], None
        for lo in range(0, self.n, step):
            hi = min(lo + step, self.n)
            if hi - lo != size:
                size = hi - lo
                for d in it.get_input_details():
                    shape = list(d["shape"])
                    shape[0] = size
                    it.resize_tensor_input(d["index"], shape, strict=False)
                it.allocate_tensors()
            for idx, x in self._feed(it.get_input_details(), lo, hi):
                it.set_tensor(idx, x)
            it.invoke()
            parts.append(self._collect(it, tensors, per_part))
        return parts

    def run(self, data: bytes, tensors: Optional[List[int]] = None):
        """(outputs in order, {tensor index: values (subsampled)}) for all the samples."""
        step = min(self.n, 8) if tensors else self.n
        cap = min(1 << 20, (1 << 25) // max(1, len(tensors or [])))
        per_part = max(1, cap // -(-self.n // step))
        try:
            parts = self._batches(self._interp(data, keep_all=bool(tensors)), step, tensors, per_part)
        except (RuntimeError, ValueError):       # a graph with a fixed batch: one sample at a time
            it = self._interp(data, keep_all=bool(tensors))
            it.allocate_tensors()
            parts = []
            for n in range(self.n):
                for idx, x in self._feed(it.get_input_details(), n, n + 1):
                    it.set_tensor(idx, x)
                it.invoke()
                parts.append(self._collect(it, tensors, max(1, cap // self.n)))
        outs = [np.concatenate([p[0][k] for p in parts]) for k in range(len(parts[0][0]))]
        values = {i: np.concatenate([p[1][i] for p in parts]) for i in (tensors or [])}
        return outs, values

    @staticmethod
    def _collect(it, tensors, per_part: int):
        outs = [it.get_tensor(d["index"]).copy() for d in it.get_output_details()]
        vals = {}
        for i in tensors or []:
            v = it.get_tensor(i).reshape(-1)
            vals[i] = (v[::v.size // per_part + 1] if v.size > per_part else v).copy()
        return outs, vals


def _candidates(t: Tensor, values: np.ndarray) -> None:
    lo, hi = t.base
    cands = [(lo * c, hi * c) for c in CLIPS]
    v = values[np.isfinite(values)] if values.size else values
    if v.size:
        for p in PERCENTILES:
            cands.append((min(float(np.percentile(v, 100.0 - p)), 0.0) if lo < 0 else lo,
                          max(float(np.percentile(v, p)), 0.0) if hi > 0 else hi))
        mid = float(np.percentile(v, 99.9)) - float(np.percentile(v, 0.1))
        t.outliers = (hi - lo) / mid if mid > 0 else 1.0
    width = hi - lo
    seen, out = set(), []
    for c in sorted(cands, key=lambda r: -(r[1] - r[0])):
        key = (round(c[0], 6), round(c[1], 6))
        if c[1] - c[0] <= 0.02 * width or c[1] - c[0] >= 0.999 * width or key in seen:
            continue
        seen.add(key)
        out.append(c)
    t.candidates = out


def choose(calibrated: bytes, calib: Dataset, build: TFLiteBuild, seconds: float,
           say: Optional[Callable[[str], None]] = None, samples: int = 128, sweeps: int = 2) -> Dict[str, object]:
    """Per-tensor ranges by output error. Returns {'ranges': {tensor name: (min, max)}, 'error_before',
    'error_after', 'tensors', 'searched', 'evaluations', 'tied'}."""
    deadline = time.monotonic() + seconds
    model = _object(calibrated)
    tensors = _tensors(model)
    small = calib.take(slice(0, min(samples, len(calib))))
    runner = _Runner(small.inputs)
    ref, values = runner.run(calibrated, [t.index for t in tensors])
    for t in tensors:
        _candidates(t, values[t.index])
    del values

    def evaluate(ranges: Dict[int, Tuple[float, float]]) -> Tuple[float, bytes]:
        q = quantize(with_ranges(model, ranges), build, io="float32")   # float I/O: the same int8 graph inside
        return output_error(ref, runner.run(q)[0]), q

    current: Dict[int, Tuple[float, float]] = {}
    before, last = evaluate(current)
    best, evals, tied = before, 1, set()
    searched: set = set()
    order = sorted(tensors, key=lambda t: -t.outliers)
    for sweep in range(sweeps):
        gained = False
        for t in order:
            if time.monotonic() > deadline:
                break
            if t.index in tied:
                continue
            searched.add(t.index)
            for k, c in enumerate(t.candidates):
                if current.get(t.index) == c:
                    continue
                e, q = evaluate({**current, t.index: c})
                evals += 1
                if k == 0 and sweep == 0 and q == last:   # the quantizer ties this tensor's scale to another's
                    tied.add(t.index)
                    break
                if e < best:
                    best, last, gained = e, q, True
                    current[t.index] = c
                if time.monotonic() > deadline:
                    break
        if not gained or time.monotonic() > deadline:
            break
    for t in tensors:
        t.chosen = current.get(t.index)
    if say:
        say(f"  ranges by output error: {len(searched)}/{len(tensors)} tensors searched ({len(tied)} tied to another's "
            f"scale), output error {before:.3g} -> {best:.3g} ({evals} evaluations)")
    return {"ranges": {t.name: t.chosen for t in tensors if t.chosen is not None},
            "error_before": before, "error_after": best, "tensors": len(tensors), "searched": len(searched),
            "evaluations": evals, "tied": len(tied)}
