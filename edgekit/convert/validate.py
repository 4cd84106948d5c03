"""Float vs quantized: top-1 agreement, accuracy with labels, SNR, max abs error; the fidelity floor.

Units: agreement and accuracy are fractions 0..1; drops are percentage points; SNR is dB.
"""

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
        snr = snr_db(r, g)
        per[n] = {"snr_db": snr if np.isfinite(snr) else (999.0 if snr > 0 else -999.0),
                  "max_abs_err": float(err.max()) if err.size else 0.0,
                  "mean_abs_err": float(err.mean()) if err.size else 0.0,
                  "finite": bool(np.isfinite(g).all())}
    primary = names[0]
    r, g = ref[primary], got[primary]
    result: Dict[str, Any] = {"samples": int(r.shape[0]), "outputs": per,
                              "primary_output": primary, "top1_agreement": None,
                              "accuracy_float": None, "accuracy_quant": None, "accuracy_drop_points": None}
    if _is_classifier(r):
        rt, gt = r.argmax(axis=1), g.argmax(axis=1)
        result["top1_agreement"] = float((rt == gt).mean())
        if labels is not None:
            result["accuracy_float"] = float((rt == labels).mean())
            result["accuracy_quant"] = float((gt == labels).mean())
            result["accuracy_drop_points"] = 100.0 * (result["accuracy_float"] - result["accuracy_quant"])
    return result


def budget_drop(metrics: Dict[str, Any]) -> Optional[float]:
    """The figure --max-accuracy-drop is held against, in points: accuracy with labels, else
    100 x (1 - top-1 agreement), else None (not a classifier: SNR is the measure)."""
    if metrics.get("accuracy_drop_points") is not None:
        return metrics["accuracy_drop_points"]
    if metrics.get("top1_agreement") is not None:
        return 100.0 * (1.0 - metrics["top1_agreement"])
    return None


def floor_misses(metrics: Dict[str, Any], floor) -> List[str]:
    """Each way `metrics` falls below the fidelity floor, as a short phrase (empty: it meets it)."""
    out = []
    for name, o in metrics["outputs"].items():
        if not o.get("finite", True):
            out.append(f"output {name} has NaN/Inf")
        elif o["snr_db"] < floor.min_snr_db:
            out.append(f"SNR {o['snr_db']:.1f} dB < {floor.min_snr_db:g}"
                       + (f" ({name})" if len(metrics["outputs"]) > 1 else ""))
    agree = metrics.get("top1_agreement")
    if agree is not None and agree < floor.min_agreement:
        out.append(f"top-1 agreement {100 * agree:.1f}% < {100 * floor.min_agreement:.0f}%")
    if floor.max_accuracy_drop is not None:
        drop = budget_drop(metrics)
        if drop is not None and drop > floor.max_accuracy_drop:
            what = "accuracy" if metrics.get("accuracy_drop_points") is not None else "agreement"
            out.append(f"{what} drop {drop:.2f} points > {floor.max_accuracy_drop:g}")
    return out


def score(metrics: Dict[str, Any]) -> tuple:
    """Higher is better: for ranking candidates that all miss (agreement, then worst SNR)."""
    agree = metrics.get("top1_agreement")
    return (agree if agree is not None else 1.0, primary_snr(metrics))


def primary_snr(metrics: Dict[str, Any]) -> float:
    """The worst output's SNR (dB): the figure the floor holds every output to."""
    return min(o["snr_db"] for o in metrics["outputs"].values())
