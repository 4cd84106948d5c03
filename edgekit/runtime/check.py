"""The golden health check: run a bundle's golden inputs, compare with its expected outputs.

Expected outputs come from the converting machine (x86 kernels, the converter's runtime).
A device runs other kernels (ARM, an older runtime), which round differently: on MLPerf
Tiny's ResNet-8 the int8 softmax differs by up to 19 steps between ARM and x86
tflite-runtime 2.14 while every top-1 agrees. So health is judged the way accuracy is:
output SNR against the golden outputs, and top-1 agreement for classifier outputs; the
largest difference (absolute and in quantization steps) is reported beside it.

The golden inputs run the way a device application runs the model: one sample at a time
when the batch dimension is dynamic (or 1), in chunks of the model's fixed batch otherwise.
A golden file is a stack of samples, not a shape the device will use: tflite-runtime 2.14's
optimized aarch64 kernels (under qemu at least) crash on int8 FULLY_CONNECTED with more than
one row, so a batch of 8 failed models that a device runs one sample at a time.
"""

from __future__ import annotations

from typing import Any, Dict, List

import numpy as np

from edgekit.errors import BundleError
from edgekit.runtime.cpuid import cpu_flags  # noqa: F401  (re-exported: convert.numerics)
from edgekit.runtime.snr import snr_db  # noqa: F401  (re-exported: convert.validate, serve.probe)

MIN_SNR_DB = 20.0
MIN_TOP1 = 0.75


def batch_size(model) -> int:
    """Samples per run a device application uses: the fixed batch dimension, else 1."""
    fixed = {int(s.shape[0]) for s in model.inputs if s.shape and int(s.shape[0]) > 0}
    return max(fixed) if fixed else 1


def run_like_a_device(model, feeds: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
    """Run stacked samples in chunks of batch_size(model); outputs concatenated back into one
    stack. (A golden stack that is not a multiple of a fixed batch leaves a short last chunk,
    which Model.run handles as it handles any short batch.)"""
    n = int(next(iter(feeds.values())).shape[0])
    step = batch_size(model)
    parts: List[Dict[str, np.ndarray]] = []
    for i in range(0, n, step):
        parts.append(model.run(**{k: v[i:i + step] for k, v in feeds.items()}))
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]} if parts else model.run(**feeds)


X86 = ("x86_64", "amd64", "i686", "i386")
VNNI = ("avx512_vnni", "avx_vnni", "avx_vnni_int8")


def exact_int8(arch: str, features) -> bool:
    """Integer dot products without int16 saturation: any non-x86 CPU (NEON, sdot), or x86 with VNNI.
    Without VNNI, ONNX Runtime's u8 x s8 kernels (VPMADDUBSW) saturate int16 pair sums."""
    return arch.lower() not in X86 or any(v in features for v in VNNI)


def host_saturates() -> bool:
    import platform

    return not exact_int8(platform.machine(), cpu_flags())


def target_exact(manifest: Dict[str, Any]) -> bool:
    """The bundle's target computes integer dot products exactly (ARM, or x86 with VNNI)."""
    dev = (manifest.get("target") or {}).get("device") or {}
    arch = str(dev.get("arch", ""))
    return bool(arch) and exact_int8(arch, dev.get("cpu_features", ()))


def needs_reference(manifest: Dict[str, Any]) -> bool:
    """Whether this host must run the bundle's ONNX graph as written to compute what its target
    computes: an x86 host without VNNI, an exact-arithmetic target, an ONNX artifact."""
    return ((manifest.get("model") or {}).get("format") == "onnx" and host_saturates()
            and target_exact(manifest))


def golden_check(model) -> Dict[str, Any]:
    """{'ok': bool, 'outputs': {name: {snr_db, top1_agreement, max_abs_err, max_steps, ok}}}.

    Run on a machine that is not the bundle's target, an ONNX INT8 bundle for an exact-arithmetic
    target (a Pi, a Jetson, VNNI) can miss on an x86 host without VNNI only because this host's
    kernels saturate: then the graph is run again as written (reference numerics, what the target
    computes) and the result says so (`numerics`, and `host` with this host's own figures).
    A language model (runtime.llm) has its own check: runtime.llmcheck (agreement, logit SNR, a generation)."""
    if getattr(model, "kind", None) == "llm":
        return model.check()
    result = _golden_check(model)
    if result["ok"] or getattr(model._impl, "reference_numerics", False) or not needs_reference(model.manifest):
        return result
    from edgekit.runtime.model import load

    exact = load(model.path, reference_numerics=True, providers=["CPUExecutionProvider"], threads=model.threads)
    again = _golden_check(exact)
    again["numerics"] = ("reference: this x86 host has no VNNI, its integer kernels saturate where the "
                         "target's do not; the graph was run as written")
    again["host"] = {"ok": result["ok"], "outputs": result["outputs"]}
    return again


def _golden_check(model) -> Dict[str, Any]:
    if model.bundle is None:
        raise BundleError("the golden check needs a bundle (a bare model file has no golden data)",
                          path=str(model.path))
    g = model.bundle.golden()
    spec = model.manifest.get("golden") or {}
    min_snr = float(spec.get("min_snr_db", MIN_SNR_DB))
    min_top1 = float(spec.get("min_top1_agreement", MIN_TOP1))
    feeds = {}
    for s in model.inputs:
        key = f"input:{s.name}"
        if key not in g:
            raise BundleError(f"golden.npz lacks {key}", path=str(model.path))
        feeds[s.name] = g[key]
    got = run_like_a_device(model, feeds)
    result: Dict[str, Any] = {"ok": True, "samples": int(next(iter(feeds.values())).shape[0]),
                              "batch": batch_size(model), "min_snr_db": min_snr, "outputs": {}}
    if getattr(model, "backend_note", None):   # e.g. a delegate refused the graph: built-in kernels ran it
        result["backend_note"] = model.backend_note
    for s in model.outputs:
        expected, out = g[f"output:{s.name}"], got[s.name]
        err = np.abs(out.astype(np.float64) - expected.astype(np.float64))
        max_err = float(err.max()) if err.size else 0.0
        step = float(s.scale[0]) if s.quantized and len(s.scale) == 1 else None
        snr = snr_db(expected, out)
        top1 = None
        if expected.ndim == 2 and expected.shape[1] > 1:
            top1 = float((expected.argmax(1) == out.argmax(1)).mean())
        ok = bool(np.isfinite(out).all()) and snr >= min_snr and (top1 is None or top1 >= min_top1)
        result["outputs"][s.name] = {"snr_db": snr if np.isfinite(snr) else (999.0 if snr > 0 else -999.0),
                                     "top1_agreement": top1, "max_abs_err": max_err,
                                     "max_steps": round(max_err / step, 3) if step else None, "ok": ok}
        result["ok"] = result["ok"] and ok
    return result
