"""The golden health check: run a bundle's golden inputs, compare with its expected outputs."""

from __future__ import annotations

from typing import Any, Dict

import numpy as np

from edgekit.errors import BundleError


def golden_check(model) -> Dict[str, Any]:
    """{'ok': bool, 'outputs': {name: {max_abs_err, atol, max_steps}}}; needs a bundle."""
    if model.bundle is None:
        raise BundleError("the golden check needs a bundle (a bare model file has no golden data)",
                          path=str(model.path))
    g = model.bundle.golden()
    spec = model.manifest.get("golden") or {}
    atol = spec.get("atol", {})
    feeds = {}
    for s in model.inputs:
        key = f"input:{s.name}"
        if key not in g:
            raise BundleError(f"golden.npz lacks {key}", path=str(model.path))
        feeds[s.name] = g[key]
    got = model.run(**feeds)
    result: Dict[str, Any] = {"ok": True, "samples": int(next(iter(feeds.values())).shape[0]),
                              "outputs": {}}
    for s in model.outputs:
        expected = g[f"output:{s.name}"]
        err = np.abs(got[s.name].astype(np.float64) - expected.astype(np.float64))
        max_err = float(err.max()) if err.size else 0.0
        tol = float(atol.get(s.name, 1e-5))
        step = float(s.scale[0]) if s.quantized and len(s.scale) == 1 else None
        ok = bool(np.isfinite(got[s.name]).all()) and max_err <= tol
        result["outputs"][s.name] = {"max_abs_err": max_err, "atol": tol, "ok": ok,
                                     "max_steps": (max_err / step) if step else None}
        result["ok"] = result["ok"] and ok
    return result
