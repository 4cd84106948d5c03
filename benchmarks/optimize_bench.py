"""Issue 4's figures, measured here side by side.

    python benchmarks/optimize_bench.py mixed     # sensitive model: plain INT8 vs mixed precision
    python benchmarks/optimize_bench.py prune     # 50% structured: digits (accuracy) and ResNet-8 (fidelity)
    python benchmarks/optimize_bench.py distill   # half-width student with vs without the teacher
    python benchmarks/optimize_bench.py qat       # spread model: post-training INT8, mixed precision, QAT

ResNet-8 has no labelled data here: its "accuracy" is fidelity, the pruned model's top-1
agreement with the original on natural-image crops, fine-tuned on the original's labels.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "models" / "mlperf-tiny"
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "examples"))


def digits_model(d: Path, epochs: int = 15) -> Path:
    from digits import train

    return train(d, epochs=epochs)


def bench_mixed(d: Path) -> dict:
    from test_mixed import make_sensitive

    from edgekit.convert import Calibration, ConvertRecipe, Floor, convert

    model = digits_model(d)
    sens = make_sensitive(model, d / "sensitive.keras")
    out = {}
    for fmt in ("tflite", "onnx"):
        r = convert(ConvertRecipe(str(sens), ["rpi4"], calibration=Calibration(str(d / "calib.npz")),
                                  validation=str(d / "val.npz"), formats=[fmt], compat_check="off",
                                  floor=Floor(max_accuracy_drop=1.0)), str(d / f"mp-{fmt}"))
        a = r.bundles[0].artifact
        mp = a.mixed or {}          # the rescue ladder may meet the floor before its mixed-precision rung
        plain = a.rescue[0] if a.rescue else {}
        out[fmt] = {"plain_int8_drop": plain.get("accuracy_drop_points"), "plain_int8_bytes": plain.get("bytes"),
                    "rescued_by": a.rescued_by, "rescue_steps": [s["what"] for s in a.rescue],
                    "rescued_drop": a.metrics["accuracy_drop_points"], "rescued_bytes": len(a.data),
                    "float_bytes": a.float_bytes, "float_layers": mp.get("float_layers"),
                    "layers_in_model": len(mp.get("sensitivity", [])), "candidates_tried": len(mp.get("steps", []))}
    return out


def bench_prune(d: Path) -> dict:
    import keras

    from imagegen import natural_patches

    from edgekit.optimize.prune import prune

    model = digits_model(d)
    res = {"digits": prune(str(model), str(d / "train.npz"), sparsity=0.5, epochs=5, val=str(d / "val.npz"),
                           out=str(d / "digits-pruned.keras"), say=lambda t: None, runs=500)}
    ref = keras.models.load_model(SHARED / "pretrainedResnet.h5", compile=False)
    xt, xv = natural_patches(4000, 11, 32), natural_patches(500, 12, 32)
    np.savez(d / "r_train.npz", xt, labels=ref.predict(xt, verbose=0).argmax(1))
    np.savez(d / "r_val.npz", xv, labels=ref.predict(xv, verbose=0).argmax(1))
    for distill in (False, True):
        res[f"resnet8_fidelity{'_distilled' if distill else ''}"] = prune(
            str(SHARED / "pretrainedResnet.h5"), str(d / "r_train.npz"), sparsity=0.5, epochs=10,
            val=str(d / "r_val.npz"), out=str(d / "r-pruned.keras"), distill=distill, say=lambda t: None, runs=500)
    return {k: {"params_ratio": v["ratios"]["params"], "flops_ratio": v["ratios"]["flops"],
                "p50_ratio": v["ratios"]["p50"], "accuracy_before": v["before"]["accuracy"],
                "accuracy_after": v["after"]["accuracy"], "drop_points": v["accuracy_drop"],
                "right_after_cut": v["accuracy_right_after_cut"], "kept": v["kept_channels"]}
            for k, v in res.items()}


def bench_distill(d: Path) -> dict:
    from edgekit.optimize.distill import distill

    model = digits_model(d)
    rows = []
    for seed in (0, 1, 2):
        r = distill(str(model), str(d / "train.npz"), width=0.5, val=str(d / "val.npz"), baseline=True,
                    seed=seed, say=lambda t: None, runs=50)
        rows.append({"seed": seed, "student": r["student"]["accuracy"],
                     "without_teacher": r["student_without_teacher"]["accuracy"], "gain": r["gain_from_teacher"],
                     "teacher": r["teacher"]["accuracy"], "student_params": r["student"]["params"],
                     "teacher_params": r["teacher"]["params"]})
    return {"runs": rows, "mean_gain": float(np.mean([x["gain"] for x in rows]))}


def bench_qat(d: Path) -> dict:
    """Digits CNN with fc1's units spread over three decades (tests/test_qat.py): post-training
    INT8 (min/max), mixed precision, QAT ranges without training (--epochs 0), QAT (3 epochs),
    over 3 seeds of the spread. ResNet-8: ranges only (see the note in the result)."""
    import keras

    from imagegen import natural_patches
    from test_qat import make_spread

    from edgekit.convert import Calibration, ConvertRecipe, Floor, convert
    from edgekit.optimize.qat import qat

    model = digits_model(d)
    rows = []
    for seed in (0, 1, 2):
        sp = make_spread(model, d / f"spread{seed}.keras", seed=seed)
        mp = convert(ConvertRecipe(str(sp), ["rpi4"], calibration=Calibration(str(d / "train.npz")),
                                   validation=str(d / "val.npz"), formats=["tflite"], compat_check="off",
                                   floor=Floor(max_accuracy_drop=1.0)), str(d / f"mp{seed}")).bundles[0].artifact
        plain = mp.rescue[0] if mp.rescue else {}
        row = {"seed": seed, "ptq_drop": plain.get("accuracy_drop_points"), "ptq_bytes": plain.get("bytes"),
               "rescued_by": mp.rescued_by, "rescued_drop": mp.metrics["accuracy_drop_points"],
               "mixed_float_layers": (mp.mixed or {}).get("float_layers"),
               "rescued_bytes": len(mp.data), "float_bytes": mp.float_bytes}
        for epochs in (0, 3):
            r = qat(str(sp), str(d / "train.npz"), ["rpi4"], str(d / f"q{seed}-{epochs}"), val=str(d / "val.npz"),
                    epochs=epochs, compat_check="off", say=lambda t: None)
            for b in r["bundles"]:
                row[f"qat{epochs}_{b['format']}_drop"] = b["qat_drop"]
                row[f"qat{epochs}_{b['format']}_float_ops"] = b["float_ops"]
                row[f"qat{epochs}_{b['format']}_bytes"] = b["bytes"]
                row[f"ptq_{b['format']}_drop"] = b["ptq_drop"]
            row[f"qat{epochs}_seconds"] = r["seconds"]
        rows.append(row)
    out = {"digits_spread": rows,
           "mean": {k: float(np.mean([r[k] for r in rows])) for k in rows[0]
                    if k.endswith("_drop") and all(r[k] is not None for r in rows)}}
    ref = keras.models.load_model(SHARED / "pretrainedResnet.h5", compile=False)
    ref.save(d / "resnet8.keras")
    xt, xv = natural_patches(2000, 11, 32), natural_patches(500, 12, 32)
    np.savez(d / "r_train.npz", input_1=xt, labels=ref.predict(xt, verbose=0).argmax(1))
    np.savez(d / "r_val.npz", input_1=xv, labels=ref.predict(xv, verbose=0).argmax(1))
    for label, kw in (("ranges_only", {"epochs": 0}), ("labels_2_epochs", {"epochs": 2, "lr": 3e-5}),
                      ("distill_2_epochs", {"epochs": 2, "lr": 3e-5, "distill": True})):
        r = qat(str(d / "resnet8.keras"), str(d / "r_train.npz"), ["rpi4"], str(d / f"rq-{label}"),
                val=str(d / "r_val.npz"), compat_check="off", say=lambda t: None, **kw)
        out[f"resnet8_fidelity_{label}"] = [{k: b[k] for k in ("format", "ptq_accuracy", "qat_accuracy", "float_ops")}
                                            for b in r["bundles"]]
    out["resnet8_note"] = ("fidelity = top-1 agreement with the float model on 500 natural crops (no CIFAR-10 "
                           "here); the 'labels' are the float model's own argmax on 2000 other crops")
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=["mixed", "prune", "distill", "qat"])
    a = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="edgekit-opt-") as d:
        res = {"mixed": bench_mixed, "prune": bench_prune, "distill": bench_distill,
               "qat": bench_qat}[a.what](Path(d))
    print(json.dumps(res, indent=2, default=str))


if __name__ == "__main__":
    main()
