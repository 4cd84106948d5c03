"""Faithfulness on models of the kinds users bring, before and after the floor (issue 10).

For each model and artifact (rpi4 and x86-avx2, both formats):
- "host": the profile's plain INT8 build measured with this host's kernels (what edgekit reported
  before: on an AVX2 host without VNNI, ARM S8S8 ONNX artifacts saturate here and not on the Pi);
- "target": the same plain build measured in the target's numerics (convert.numerics);
- "shipped": what convert writes now: the plain build if it meets the floor, else the rescue
  ladder's first rung that does (or FAILED).
Agreement with the float model (fraction), output SNR (dB), accuracy with labels.

Models: a Keras 2 .h5 CNN with BatchNorm and separable convs (tf_keras, trained here); a
depthwise / BatchNorm / residual Keras 3 CNN (trained here); PaddleOCR's text-direction
classifier (a Paddle-exported ONNX with dynamic H/W, BatchNorm, hard-swish: tests/models/ppocr-cls);
MLPerf Tiny ResNet-8 (Keras 2 .h5); a Keras transformer encoder (trained here).

    python benchmarks/faithful_bench.py [--out benchmarks/results/faithful.json] [--only NAME]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "examples"))
MODELS = ROOT / "tests" / "models"


def _digits(d: Path):
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    x = (x / 16.0).astype(np.float32).reshape(-1, 8, 8, 1)
    x = np.repeat(np.repeat(x, 2, 1), 2, 2)           # 16x16: room for two strided stages
    np.savez(d / "calib.npz", image=x[:1200])
    np.savez(d / "val.npz", image=x[1297:], labels=y[1297:])
    return x[:1200], y[:1200]


def keras2_separable(d: Path) -> dict:
    import tf_keras as k2

    x, y = _digits(d)
    k2.utils.set_random_seed(0)
    m = k2.Sequential([k2.Input((16, 16, 1), name="image"),
                       k2.layers.Conv2D(16, 3, padding="same", use_bias=False), k2.layers.BatchNormalization(),
                       k2.layers.ReLU(),
                       k2.layers.SeparableConv2D(32, 3, strides=2, padding="same", use_bias=False),
                       k2.layers.BatchNormalization(), k2.layers.ReLU(),
                       k2.layers.SeparableConv2D(64, 3, strides=2, padding="same", use_bias=False),
                       k2.layers.BatchNormalization(), k2.layers.ReLU(),
                       k2.layers.GlobalAveragePooling2D(), k2.layers.Dense(10, name="logits")])
    m.compile("adam", k2.losses.SparseCategoricalCrossentropy(from_logits=True))
    m.fit(x, y, epochs=15, batch_size=64, verbose=0)
    m.save(d / "sepcnn.h5")
    return {"model": d / "sepcnn.h5", "calib": d / "calib.npz", "val": d / "val.npz"}


def depthwise_residual(d: Path) -> dict:
    import keras
    from keras import layers

    x, y = _digits(d)
    keras.utils.set_random_seed(0)
    inp = keras.Input((16, 16, 1), name="image")
    h = layers.ReLU()(layers.BatchNormalization()(layers.Conv2D(16, 3, padding="same", use_bias=False)(inp)))
    r = layers.DepthwiseConv2D(3, padding="same", use_bias=False)(h)
    r = layers.ReLU()(layers.BatchNormalization()(r))
    r = layers.BatchNormalization()(layers.Conv2D(16, 1, use_bias=False)(r))
    h = layers.ReLU()(layers.Add()([h, r]))
    h = layers.ReLU()(layers.BatchNormalization()(layers.Conv2D(32, 3, strides=2, padding="same")(h)))
    out = layers.Dense(10, name="logits")(layers.GlobalAveragePooling2D()(h))
    m = keras.Model(inp, out)
    m.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    m.fit(x, y, epochs=15, batch_size=64, verbose=0)
    m.save(d / "dwres.keras")
    return {"model": d / "dwres.keras", "calib": d / "calib.npz", "val": d / "val.npz"}


def ppocr(d: Path) -> dict:
    from imagegen import natural_patches

    def lines(n, seed):  # text-line-shaped crops of natural photos, RapidOCR's normalisation
        p = natural_patches(n, seed, 48)
        x = np.concatenate([p] * 4, axis=2)[:, :48, :192, :]
        return ((x - 0.5) / 0.5).transpose(0, 3, 1, 2).astype(np.float32)

    np.save(d / "calib.npy", lines(200, 0))
    np.save(d / "val.npy", lines(200, 1))
    return {"model": MODELS / "ppocr-cls" / "ch_ppocr_mobile_v2.0_cls_infer.onnx", "calib": d / "calib.npy",
            "val": d / "val.npy", "input_shapes": (("x", (1, 3, 48, 192)),)}


def resnet8(d: Path) -> dict:
    from imagegen import natural_patches

    np.savez(d / "calib.npz", natural_patches(300, 0, 32))
    np.savez(d / "val.npz", natural_patches(300, 1, 32))
    return {"model": MODELS / "mlperf-tiny" / "pretrainedResnet.h5", "calib": d / "calib.npz",
            "val": d / "val.npz"}


def transformer(d: Path) -> dict:
    from seqmodels import train_encoder

    return {"model": train_encoder(d), "calib": d / "calib.npz", "val": d / "val.npz"}


MAKERS = {"keras2-h5-separable": keras2_separable, "depthwise-residual": depthwise_residual,
          "paddle-onnx-ppocr": ppocr, "mlperf-resnet8-h5": resnet8, "keras-transformer": transformer}


def _fig(metrics):
    if metrics is None:
        return {}
    return {"agreement": metrics.get("top1_agreement"), "snr_db": min(o["snr_db"] for o in metrics["outputs"].values()),
            "accuracy": metrics.get("accuracy_quant"), "accuracy_float": metrics.get("accuracy_float")}


def run(name: str, spec: dict, d: Path) -> list:
    from unittest import mock

    from edgekit.convert import Calibration, ConvertRecipe, Floor, Search, convert, numerics
    from edgekit.errors import BudgetMissed

    def recipe(**kw):
        return ConvertRecipe(str(spec["model"]), ("rpi4", "x86-avx2"), calibration=Calibration(str(spec["calib"])),
                             validation=str(spec["val"]), compat_check="off",
                             input_shapes=spec.get("input_shapes", ()), **kw)

    def attempt(r, out):
        try:
            return convert(r, str(d / out))
        except BudgetMissed as e:
            return e.result

    no_floor = dict(floor=Floor(min_snr_db=-100, min_agreement=0.0), search=Search(rescue=False))
    t0 = time.monotonic()
    with mock.patch.object(numerics, "for_onnx",     # before: every ONNX figure from this host's kernels
                           lambda p, b, h=None: numerics.Numerics("host", "this host's kernels (as before)")):
        host = attempt(recipe(**no_floor), "host")
    plain = attempt(recipe(**no_floor), "plain")
    shipped = attempt(recipe(), "shipped")
    rows = []
    by_host = {(b.target, b.fmt): b for b in host.bundles}
    by_shipped = {(b.target, b.fmt): b for b in shipped.bundles}
    for b in plain.bundles:
        row = {"model": name, "bundle": b.path.name, "format": b.fmt}
        if not b.ok:
            row["plain_error"] = b.failure.reason
        else:
            row["numerics"] = b.artifact.numerics["mode"]
            row["target_numerics"] = _fig(b.artifact.metrics)
            h = by_host.get((b.target, b.fmt))
            row["host_numerics"] = _fig(h.artifact.metrics) if h is not None and h.ok else None
        s = by_shipped.get((b.target, b.fmt))
        if s is not None:
            row["shipped"] = ("FAILED: " + s.failure.reason) if not s.ok else dict(
                _fig(s.artifact.metrics), rescued_by=s.artifact.rescued_by, precision=s.artifact.precision,
                bytes=len(s.artifact.data))
        rows.append(row)
    print(f"{name}: {time.monotonic() - t0:.0f} s", flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "faithful.json"))
    ap.add_argument("--only", action="append")
    a = ap.parse_args()
    from edgekit.convert.numerics import this_host

    rows = []
    for name, make in MAKERS.items():
        if a.only and name not in a.only:
            continue
        with tempfile.TemporaryDirectory(prefix=f"ek-{name}-") as d:
            spec = make(Path(d))
            rows += run(name, spec, Path(d))
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)   # after each model: a long run keeps what it has
        Path(a.out).write_text(json.dumps({"host": this_host().describe(), "rows": rows}, indent=2, default=str))
    from edgekit.table import render

    def f(x, k, scale=1.0):
        v = (x or {}).get(k) if isinstance(x, dict) else None
        return None if v is None else v * scale

    print(render(["bundle", "numerics", "before (host): agree %", "before: SNR dB", "target: agree %",
                  "target: SNR dB", "target: acc %", "shipped: agree %", "shipped: SNR dB", "shipped: acc %",
                  "rescued by"],
                 [[r["bundle"], r.get("numerics"), f(r.get("host_numerics"), "agreement", 100),
                   f(r.get("host_numerics"), "snr_db"),
                   f(r.get("target_numerics"), "agreement", 100), f(r.get("target_numerics"), "snr_db"),
                   f(r.get("target_numerics"), "accuracy", 100),
                   f(r.get("shipped"), "agreement", 100), f(r.get("shipped"), "snr_db"),
                   f(r.get("shipped"), "accuracy", 100),
                   r["shipped"] if isinstance(r.get("shipped"), str) else (r.get("shipped") or {}).get("rescued_by")]
                  for r in rows], title=f"faithfulness on {this_host().describe()}"))


if __name__ == "__main__":
    main()
