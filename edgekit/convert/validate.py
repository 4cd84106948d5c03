"""Float vs INT8: top-1 agreement, accuracy with labels, SNR, max abs error."""

from __future__ import annotations

from typing import Any, Dict, List, Optional

import numpy as np

from edgekit.runtime.check import snr_db


def _is_classifier(a: np.ndarray) -> bool:
    return a.ndim == 2 and a.shape[1] > 1


def compare(ref: Dict[str, np.ndarray], got: Dict[str, np.ndarray], names: List[str],
            labels: Optional[np.ndarray] = None) -> Dict[str, Any]:
    """Metrics per output; the first output is the primary one (agreement, accuracy)."""
    per: Dict[str, Any] = {}
    for n in names:
        r, g = ref[n], got[n]
        err = np.abs(r.astype(np.float64) - g.astype(np.float64))
        per[n] = {"snr_db": snr_db(r, g), "max_abs_err": float(err.max()),
                  "mean_abs_err": float(err.mean())}
    primary = names[0]
    r, g = ref[primary], got[primary]
    result: Dict[str, Any] = {"samples": int(r.shape[0]), "outputs": per,
                              "primary_output": primary, "top1_agreement": None,
                              "accuracy_float": None, "accuracy_int8": None, "accuracy_drop": None}
    if _is_classifier(r):
        rt, gt = r.argmax(axis=1), g.argmax(axis=1)
        result["top1_agreement"] = float((rt == gt).mean() * 100.0)
        if labels is not None:
            result["accuracy_float"] = float((rt == labels).mean() * 100.0)
            result["accuracy_int8"] = float((gt == labels).mean() * 100.0)
            result["accuracy_drop"] = result["accuracy_float"] - result["accuracy_int8"]
    return result


def budget_drop(metrics: Dict[str, Any]) -> Optional[float]:
    """The figure --max-accuracy-drop is held against: accuracy points with labels, else
    100 - top-1 agreement, else None (not a classifier: SNR is reported instead)."""
    if metrics.get("accuracy_drop") is not None:
        return metrics["accuracy_drop"]
    if metrics.get("top1_agreement") is not None:
        return 100.0 - metrics["top1_agreement"]
    return None
