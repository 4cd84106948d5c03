"""Activation ranges chosen per tensor by the error they cause in the model's outputs (ONNX).

Min/max calibration lets one outlier take a tensor's whole INT8 range. Here every activation
range of a QDQ model is a search variable: the model's activation scales and zero points
become graph inputs, the graph runs as written (ONNX Runtime, graph optimizations off: the
reference semantics of convert.numerics), and each tensor in turn keeps the clip of its
min/max range (1, 0.85, 0.7, 0.5, 0.35, 0.25) that gives the smallest error of the model's
outputs against the float model on calibration samples, the other tensors at their current
choice (greedy coordinate descent, most outlier-heavy tensors first, within a time budget).
The chosen ranges are then given to ONNX Runtime's quantizer as TensorQuantOverrides, so the
artifact (bias scales included) is built consistently by the quantizer itself.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np

from edgekit.convert.data import Dataset

CLIPS = (1.0, 0.85, 0.7, 0.5, 0.35, 0.25)
_QRANGE = {1: (0, 255), 2: (0, 65535), 3: (-128, 127), 5: (-32768, 32767)}   # onnx elem type -> (qmin, qmax)


@dataclass
class Group:
    """One scale/zero-point pair of the QDQ model and the activation tensors it quantizes."""

    scale: str
    zero_point: str
    tensors: List[str]
    qmin: int
    qmax: int
    base: Tuple[float, float]           # (rmin, rmax) from calibration
    zp_dtype: np.dtype
    symmetric: bool
    clip: float = 1.0

    def params(self, clip: float) -> Tuple[np.ndarray, np.ndarray]:
        lo, hi = self.base[0] * clip, self.base[1] * clip
        lo, hi = min(lo, 0.0), max(hi, 0.0)
        if self.symmetric:
            m = max(abs(lo), abs(hi), 1e-12)
            scale = m / ((self.qmax - self.qmin) / 2.0)
            zp = 0
        else:
            scale = max(hi - lo, 1e-12) / (self.qmax - self.qmin)
            zp = int(round(self.qmin - lo / scale))
            zp = min(max(zp, self.qmin), self.qmax)
        return np.array(scale, np.float32), np.array(zp, dtype=self.zp_dtype)

    def range(self) -> Tuple[float, float]:
        scale, zp = self.params(self.clip)
        return float((self.qmin - int(zp)) * scale), float((self.qmax - int(zp)) * scale)


def _groups(model) -> List[Group]:
    from onnx import numpy_helper

    g = model.graph
    inits = {i.name: i for i in g.initializer}
    found: Dict[Tuple[str, str], Group] = {}
    for n in g.node:
        if n.op_type != "QuantizeLinear" or n.input[0] in inits or len(n.input) < 3:
            continue
        s_name, z_name = n.input[1], n.input[2]
        if s_name not in inits or z_name not in inits:
            continue
        scale = numpy_helper.to_array(inits[s_name])
        zp = numpy_helper.to_array(inits[z_name])
        if scale.size != 1:          # per-channel activations: not searched
            continue
        qmin, qmax = _QRANGE.get(inits[z_name].data_type, (None, None))
        if qmin is None or qmax - qmin > 255:     # 16-bit activations need no rescue of their ranges
            continue
        key = (s_name, z_name)
        if key in found:
            found[key].tensors.append(n.input[0])
            continue
        s, z = float(scale.reshape(())), int(zp.reshape(()))
        symmetric = qmin < 0 and z == 0
        found[key] = Group(s_name, z_name, [n.input[0]], qmin, qmax, ((qmin - z) * s, (qmax - z) * s),
                           zp.dtype, symmetric)
    return list(found.values())


def _search_model(model, groups: List[Group]) -> bytes:
    """The QDQ model with each group's scale and zero point turned into graph inputs."""
    from onnx import helper

    names = {x for gr in groups for x in (gr.scale, gr.zero_point)}
    keep = [i for i in model.graph.initializer if i.name not in names]
    moved = [i for i in model.graph.initializer if i.name in names]
    del model.graph.initializer[:]
    model.graph.initializer.extend(keep)
    for i in moved:
        model.graph.input.append(helper.make_tensor_value_info(i.name, i.data_type, list(i.dims)))
    return model.SerializeToString()


def output_error(ref: List[np.ndarray], got: List[np.ndarray]) -> float:
    """Sum over outputs of the noise-to-signal power ratio (scale-free)."""
    total = 0.0
    for r, q in zip(ref, got):
        r64 = r.astype(np.float64)
        total += float(np.sum((r64 - q.astype(np.float64)) ** 2)) / max(float(np.sum(r64 ** 2)), 1e-30)
    return total


def _run(sess, feeds: Dict[str, np.ndarray], step: Optional[int], extra: Optional[Dict] = None) -> List[np.ndarray]:
    if not step:
        return sess.run(None, dict(feeds, **(extra or {})))
    n = next(iter(feeds.values())).shape[0]
    parts = [sess.run(None, dict({k: v[i:i + step] for k, v in feeds.items()}, **(extra or {})))
             for i in range(0, n, step)]
    return [np.concatenate([p[j] for p in parts]) for j in range(len(parts[0]))]


def choose(qdq_bytes: bytes, float_bytes: bytes, calib: Dataset, seconds: float,
           say: Optional[Callable[[str], None]] = None, samples: int = 48) -> Dict[str, object]:
    """Per-tensor ranges by output error. Returns {'overrides': {tensor: (rmin, rmax)},
    'error_before', 'error_after', 'tensors', 'searched', 'evaluations'}."""
    import onnx
    import onnxruntime as ort

    deadline = time.monotonic() + seconds
    model = onnx.load_from_string(qdq_bytes)
    groups = _groups(model)
    small = calib.take(slice(0, min(samples, len(calib))))
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    opts.log_severity_level = 3
    fsess = ort.InferenceSession(float_bytes, sess_options=opts, providers=["CPUExecutionProvider"])
    feeds = {i.name: small.inputs[i.name] for i in fsess.get_inputs() if i.name in small.inputs}
    if len(feeds) != len(fsess.get_inputs()):
        feeds = {i.name: v for i, v in zip(fsess.get_inputs(), small.inputs.values())}
    fixed = {int(i.shape[0]) for i in fsess.get_inputs() if i.shape and isinstance(i.shape[0], int) and i.shape[0] > 0}
    step = max(fixed) if fixed else None      # a fixed batch (torch exports: 1) runs in chunks of it
    if step:
        n = (len(small) // step) * step
        feeds = {k: v[:n] for k, v in feeds.items()}
    ref = _run(fsess, feeds, step)
    sess = ort.InferenceSession(_search_model(model, groups), sess_options=opts,
                                providers=["CPUExecutionProvider"])
    qfeeds = {i.name: feeds[i.name] for i in sess.get_inputs() if i.name in feeds}

    def evaluate() -> float:
        params = {}
        for gr in groups:
            params[gr.scale], params[gr.zero_point] = gr.params(gr.clip)
        return output_error(ref, _run(sess, qfeeds, step, params))

    before = best = evaluate()
    evals = 1
    # outlier-heavy tensors first: where a clip helps most (range vs the spread of the values is
    # not known here; the base range's magnitude relative to the others' is a fair first guess)
    order = sorted(groups, key=lambda gr: -(gr.base[1] - gr.base[0]))
    searched = 0
    for gr in order:
        if time.monotonic() > deadline:
            break
        searched += 1
        start = gr.clip
        for c in CLIPS:
            if c == start:
                continue
            gr.clip = c
            e = evaluate()
            evals += 1
            if e < best:
                best, start = e, c
        gr.clip = start
    if say:
        say(f"  ranges by output error: {searched}/{len(groups)} tensors searched, output error "
            f"{before:.3g} -> {best:.3g} ({evals} evaluations)")
    return {"overrides": {t: gr.range() for gr in groups if gr.clip != 1.0 for t in gr.tensors},
            "error_before": before, "error_after": best, "tensors": len(groups), "searched": searched,
            "evaluations": evals}
