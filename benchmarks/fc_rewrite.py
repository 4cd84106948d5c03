"""Multi-row int8 FULLY_CONNECTED rewritten as 1x1 CONV_2D (edgekit.convert.tflite_fc): what it
costs where the original already runs. For a Dense(8) on (32, 16) and a 2-head, 32-token encoder
block (the models of tests/test_fc_rank3.py): size, outputs (rewritten vs plain, in int8 steps,
on 64 random inputs) and latency here (LiteRT, 1 thread, the latency method of DESIGN.md).
Under qemu the speed means nothing; on a board, measure with `edgekit profile`.

    python benchmarks/fc_rewrite.py [--runs 2000]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))


def _int8(keras_path: Path, work: Path) -> bytes:
    import keras
    import tensorflow as tf

    keras.models.load_model(keras_path).export(str(work / "sm"), verbose=False)
    conv = tf.lite.TFLiteConverter.from_saved_model(str(work / "sm"))
    conv.optimizations = [tf.lite.Optimize.DEFAULT]
    rng = np.random.default_rng(0)
    conv.representative_dataset = lambda: ([rng.normal(size=(1, 32, 16)).astype(np.float32)] for _ in range(48))
    conv.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    conv.inference_input_type = conv.inference_output_type = tf.int8
    return conv.convert()


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=2000)
    args = ap.parse_args()
    import test_fc_rank3 as models

    from edgekit.convert.tflite_fc import rewrite
    from edgekit.runtime import load
    from edgekit.table import render

    rows, out = [], []
    with tempfile.TemporaryDirectory() as d:
        for name, build in (("dense(8) on (32,16)", models._rank3), ("encoder block", models._encoder)):
            work = Path(d) / build.__name__
            work.mkdir()
            build(work / "m.keras")
            plain = _int8(work / "m.keras", work)
            fixed, recs = rewrite(plain)
            (work / "plain.tflite").write_bytes(plain)
            (work / "fixed.tflite").write_bytes(fixed)
            a, b = load(work / "plain.tflite", threads=1), load(work / "fixed.tflite", threads=1)
            x = np.random.default_rng(1).integers(-128, 128, size=(64, 32, 16)).astype(np.int8)
            steps = max(int(np.abs(a.run(x[i:i + 1], raw=True)[k].astype(int)
                                   - b.run(x[i:i + 1], raw=True)[k].astype(int)).max())
                        for i in range(len(x)) for k in a.run(x[:1], raw=True))
            # three alternating rounds each (a shared host drifts); the best round's p50 is reported
            la, lb = [], []
            for _ in range(3):
                la.append(a.benchmark(runs=args.runs, warmup=200, end_to_end=False)["latency"])
                lb.append(b.benchmark(runs=args.runs, warmup=200, end_to_end=False)["latency"])
            pa, pb = (min(ls, key=lambda r: r["p50_ms"]) for ls in (la, lb))
            rewritten = sum(r["rewritten"] for r in recs)
            rows.append([name, rewritten, len(plain) / 1024, len(fixed) / 1024, steps,
                         pa["p50_ms"] * 1000, pb["p50_ms"] * 1000])
            out.append({"model": name, "rewritten": rewritten, "bytes_plain": len(plain), "bytes_rewritten": len(fixed),
                        "max_steps": steps, "plain": pa, "rewritten_latency": pb, "backend": a.backend,
                        "backend_version": a.backend_version})
    print(render(["model", "FCs rewritten", "KiB plain", "KiB rewritten", "max steps", "p50 µs plain",
                  "p50 µs rewritten"], rows, title=f"1x1 CONV_2D rewrite here ({out[0]['backend']} "
                                                   f"{out[0]['backend_version']}, 1 thread, {args.runs} runs)"))
    dest = ROOT / "benchmarks" / "results" / "fc_rewrite.json"
    tmp = dest.with_suffix(".tmp")
    tmp.write_text(json.dumps(out, indent=1))
    tmp.replace(dest)
    return 0


if __name__ == "__main__":
    sys.exit(main())
