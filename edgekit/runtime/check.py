"""The golden health check: run a bundle's golden inputs, compare with its expected outputs.

Expected outputs come from the converting machine (x86 kernels, the converter's runtime).
A device runs other kernels (ARM, an older runtime), which round differently: on MLPerf
Tiny's ResNet-8 the int8 softmax differs by up to 19 steps between ARM and x86
tflite-runtime 2.14 while every top-1 agrees. So health is judged the way accuracy is:
output SNR against the golden outputs, and top-1 agreement for classifier outputs; the
largest difference (absolute and in quantization steps) is reported beside it.
"""

from __future__ import annotations

from typing import Any, Dict

import numpy as np

from edgekit.errors import BundleError

MIN_SNR_DB = 20.0
MIN_TOP1 = 0.75


def snr_db(expected: np.ndarray, got: np.ndarray) -> float:
    e = expected.astype(np.float64)
    noise = float(np.sum((e - got.astype(np.float64)) ** 2))
    signal = float(np.sum(e ** 2))
    if noise == 0.0:
        return float("inf")
    if signal == 0.0:
        return float("-inf")
    return 10.0 * float(np.log10(signal / noise))


def golden_check(model) -> Dict[str, Any]:
    """{'ok': bool, 'outputs': {name: {snr_db, top1_agreement, max_abs_err, max_steps, ok}}}."""
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
    got = model.run(**feeds)
    result: Dict[str, Any] = {"ok": True, "samples": int(next(iter(feeds.values())).shape[0]),
                              "min_snr_db": min_snr, "outputs": {}}
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
