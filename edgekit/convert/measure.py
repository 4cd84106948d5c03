"""Measuring an artifact against the float reference: metrics, golden data, float ops, I/O.

An artifact is loaded once here, in its target's numerics (convert.numerics): golden outputs
are what the target computes, within the tolerance recorded in the manifest.
"""

from __future__ import annotations

import platform
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np

from edgekit.bundle import MODEL_FILES
from edgekit.convert import validate
from edgekit.convert.data import Dataset
from edgekit.convert.numerics import Numerics
from edgekit.runtime import load as load_model

GOLDEN_SAMPLES = 8


@dataclass
class Context:
    """What every artifact of one conversion is measured against."""

    val: Dataset
    ref_outputs: Dict[str, np.ndarray]
    ref_in: List[str]
    ref_out: List[str]

    @classmethod
    def make(cls, reference, val: Dataset, source=None) -> "Context":
        ref_in = [s.name for s in reference.inputs]
        ref_out = [s.name for s in reference.outputs]
        outs = getattr(source, "reference_outputs", None)
        ref_outputs = outs(val) if callable(outs) else reference.run(**val.inputs)
        return cls(val, ref_outputs, ref_in, ref_out)


@dataclass
class Measured:
    metrics: Dict[str, Any]
    golden: Dict[str, np.ndarray]
    float_ops: Dict[str, int]
    inputs: List[Dict[str, Any]]
    outputs: List[Dict[str, Any]]
    backend: str
    p50_ms: Optional[float] = None
    reference: bool = False                    # measured with the graph as written
    numerics_runs: Optional[Dict[str, Any]] = None   # both runs, where both were made


def feeds(model, ds_inputs: Dict[str, np.ndarray], ref_names: List[str]) -> Dict[str, np.ndarray]:
    """Feed by name; where the artifact renamed inputs, by position in the reference's order."""
    names = [s.name for s in model.inputs]
    if set(names) == set(ds_inputs):
        return {n: ds_inputs[n] for n in names}
    return {n: ds_inputs[r] for n, r in zip(names, ref_names)}


def by_ref_names(out: Dict[str, np.ndarray], model, ref_out_names: List[str]) -> Dict[str, np.ndarray]:
    names = [s.name for s in model.outputs]
    if set(names) == set(ref_out_names):
        return out
    return {r: out[n] for n, r in zip(names, ref_out_names)}


def p50(model, runs: int) -> float:
    return model.benchmark(runs=runs, warmup=10, end_to_end=False)["latency"]["p50_ms"]


def measure(data: bytes, fmt: str, ctx: Context, num: Numerics, timing_runs: int = 0,
            threads: Optional[int] = None, per_sample: bool = False, backend: Optional[str] = None) -> Measured:
    """Measure the artifact in `num`'s numerics. In reference numerics (a host whose integer kernels
    saturate, a target whose do not) it is run both ways, and the run closer to the float model is
    kept: each is a lower bound of the target's fidelity (saturation only loses precision; the graph
    as written requantizes where the target's fused kernels do not), so the better one is the nearer
    estimate of what the target computes. `num.chosen` is set to the run kept.
    `backend`: measure through that backend (e.g. openvino: what ships with a bundle preferring it)."""
    if backend is not None or not (num.reference and fmt == "onnx"):
        return _measure_once(data, fmt, ctx, num, timing_runs, threads, per_sample, reference=False,
                             backend=backend)
    as_written = _measure_once(data, fmt, ctx, num, timing_runs, threads, per_sample, reference=True)
    host = _measure_once(data, fmt, ctx, num, timing_runs, threads, per_sample, reference=False)
    keep_host = validate.score(host.metrics) > validate.score(as_written.metrics)
    kept, other = (host, as_written) if keep_host else (as_written, host)
    kept.numerics_runs = {"kept": "host kernels" if keep_host else "as written",
                          "as_written": _summary(as_written.metrics), "host_kernels": _summary(host.metrics)}
    return kept


def numerics_record(num: Numerics, m: Measured) -> Dict[str, Any]:
    """The manifest's `numerics`: how the figures and golden outputs were computed."""
    d = num.to_dict()
    if m.numerics_runs is not None:
        d.update(mode="reference" if m.reference else "host", runs=m.numerics_runs,
                 why=d["why"] + f"; kept: {m.numerics_runs['kept']} (closer to the float model; each run is a "
                              "lower bound of the target's fidelity)")
    return d


def _summary(metrics: Dict[str, Any]) -> Dict[str, Any]:
    return {"top1_agreement": metrics.get("top1_agreement"),
            "snr_db": validate.primary_snr(metrics)}


def _measure_once(data: bytes, fmt: str, ctx: Context, num: Numerics, timing_runs: int,
                  threads: Optional[int], per_sample: bool, reference: bool,
                  backend: Optional[str] = None) -> Measured:
    """Load the artifact once and measure everything from that one load."""
    from edgekit.convert import onnx as onnx_conv
    from edgekit.convert import tflite as tflite_conv

    with tempfile.TemporaryDirectory(prefix="edgekit-art-") as d:
        path = Path(d) / MODEL_FILES[fmt]
        # as written: QDQ runs unfused (no integer kernels), and integer matmuls of a dynamically
        # quantized graph are computed exactly (int32), as the target computes them
        path.write_bytes(onnx_conv.exact_integer_ops(data) if reference else data)
        q = load_model(path, providers=["CPUExecutionProvider"], reference_numerics=reference, threads=threads,
                       backend=backend)
        if per_sample:  # activations quantized at run time: per batch, so as a device runs it
            got = _one_by_one(q, feeds(q, ctx.val.inputs, ctx.ref_in))
        else:
            got = q.run(**feeds(q, ctx.val.inputs, ctx.ref_in))
        got = by_ref_names(got, q, ctx.ref_out)
        metrics = validate.compare(ctx.ref_outputs, got, ctx.ref_out, ctx.val.labels)
        n = min(GOLDEN_SAMPLES, len(ctx.val))
        g_in = feeds(q, ctx.val.take(slice(0, n)).inputs, ctx.ref_in)
        g_out = _one_by_one(q, g_in)   # as the golden check runs them: one sample at a time
        golden = {f"input:{k}": v for k, v in g_in.items()}
        golden.update({f"output:{k}": v for k, v in g_out.items()})
        return Measured(metrics, golden,
                        tflite_conv.float_ops(path) if fmt == "tflite" else onnx_conv.float_ops(data),
                        [s.to_dict() for s in q.inputs], [s.to_dict() for s in q.outputs],
                        f"{q.backend} {q.backend_version} on {platform.machine()}"
                        + (" (the graph as written: unfused, integer products exact)" if reference else "")
                        + _delegate_note(q, data, fmt),
                        p50(q, timing_runs) if timing_runs else None, reference=reference)


def _delegate_note(model, data: bytes, fmt: str) -> str:
    """Where the default delegate refused the artifact and the built-in kernels ran it (runtime's
    fallback): which node it refused and why (compat.delegate_refusal), for the manifest."""
    if fmt != "tflite" or "XNNPACK" not in (getattr(model, "backend_note", None) or ""):
        return ""
    from edgekit.convert.compat import delegate_refusal

    found = delegate_refusal(data)
    return (f", built-in kernels: {found['statement']}" if found else
            f", built-in kernels: {model.backend_note}")


def _one_by_one(model, inputs: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
    n = next(iter(inputs.values())).shape[0]
    parts = [model.run(**{k: v[i:i + 1] for k, v in inputs.items()}) for i in range(n)]
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
