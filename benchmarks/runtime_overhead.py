"""edgekit's model.benchmark() p50 vs a bare interpreter invoke loop, same model, same process.

Rounds alternate between the two (A B A B ...) so drift on a shared machine hits both;
the figure is the median over rounds of p50(edgekit) / p50(bare).

    python benchmarks/runtime_overhead.py [--model path.tflite|bundle] [--rounds 15] [--runs 300]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

SHARED = Path(__file__).resolve().parents[2] / "shared" / "models" / "mlperf-tiny"


def bare_p50(interp, idx_in, x, runs):
    interp.set_tensor(idx_in, x)
    s = []
    for _ in range(runs):
        t0 = time.perf_counter_ns()
        interp.invoke()
        s.append(time.perf_counter_ns() - t0)
    return float(np.percentile(s, 50)) / 1e6


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=str(SHARED / "pretrainedResnet_quant.tflite"))
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--runs", type=int, default=300)
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    from ai_edge_litert.interpreter import Interpreter

    from edgekit.runtime import load

    m = load(a.model, threads=a.threads, backend="litert")
    model_file = m.bundle.model_path if m.bundle else a.model
    interp = Interpreter(model_path=str(model_file), num_threads=a.threads)
    interp.allocate_tensors()
    d = interp.get_input_details()[0]
    x = m.example_inputs()[0]
    xq = m.inputs[0].quantize(x)
    for _ in range(50):
        interp.set_tensor(d["index"], xq)
        interp.invoke()
    ratios, ek, bare = [], [], []
    for _ in range(a.rounds):
        b = bare_p50(interp, d["index"], xq, a.runs)
        e = m.benchmark(runs=a.runs, warmup=10, inputs=[x], end_to_end=False)["latency"]["p50_ms"]
        ratios.append(e / b)
        ek.append(e)
        bare.append(b)
    res = {"model": a.model, "threads": a.threads, "rounds": a.rounds, "runs": a.runs,
           "bare_p50_ms": float(np.median(bare)), "edgekit_p50_ms": float(np.median(ek)),
           "ratio_median": float(np.median(ratios)), "ratio_min": float(min(ratios)),
           "ratio_max": float(max(ratios))}
    print(json.dumps(res, indent=2))
    print(f"edgekit benchmark() p50 / bare invoke p50 = {res['ratio_median']:.4f} "
          f"({(res['ratio_median'] - 1) * 100:+.2f}%), over {a.rounds} alternating rounds")


if __name__ == "__main__":
    main()
