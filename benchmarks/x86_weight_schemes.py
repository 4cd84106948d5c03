"""x86 without VNNI: u8 x 7-bit weights (the x86-avx2 profile) against u8 x u8 (the rescue ladder's
uint8-weights rung). Both are exact on VPMADDUBSW-era CPUs (7-bit weights keep the int16 pair sums
below saturation; u8 x u8 runs on widening 16-bit madds). Which costs what?

- fidelity: torch_bench's three digits models (CNN, detector, encoder; same training), exported
  with the TorchScript exporter, quantized by ONNX Runtime (QDQ, per-channel, min/max) both ways,
  SNR of the worst output against torch on 200 held-out samples, run with this host's kernels and
  as written (graph optimizations off; the two agree when the build cannot saturate);
- speed: two larger random-weight models (a 6-conv net at 3x128x128, a 3-layer MLP over 128
  tokens of 512), p50 of single-thread ONNX Runtime runs on this host. Compare within a run.

    python benchmarks/x86_weight_schemes.py [--json out.json]
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
sys.path.insert(0, str(ROOT / "benchmarks"))

SCHEMES = {"u8 x 7-bit (x86-avx2 profile)": ("int8", True), "u8 x u8 (ladder rung)": ("uint8", False)}


def _quantize(src: Path, dst: Path, name: str, x_cal: np.ndarray, weight: str, reduce_range: bool) -> None:
    from onnxruntime.quantization import QuantFormat, QuantType

    from stockroute import quantize_static

    quantize_static(src, dst, name, x_cal, quant_format=QuantFormat.QDQ, per_channel=True,
                    reduce_range=reduce_range, activation_type=QuantType.QUInt8,
                    weight_type=QuantType.QInt8 if weight == "int8" else QuantType.QUInt8)


def _session(path: Path, as_written: bool = False, threads: int = 0):
    import onnxruntime as ort

    so = ort.SessionOptions()
    if as_written:
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    if threads:
        so.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def _p50_ms(path: Path, name: str, x: np.ndarray, runs: int = 40) -> float:
    s = _session(path, threads=1)
    for _ in range(5):
        s.run(None, {name: x})
    t = []
    for _ in range(runs):
        t0 = time.perf_counter_ns()
        s.run(None, {name: x})
        t.append((time.perf_counter_ns() - t0) / 1e6)
    return float(np.median(t))


def fidelity(d: Path):
    import torch

    import torch_bench
    from edgekit.runtime.check import snr_db

    rows = []
    for key, (model, x, name, _det) in torch_bench._models(["cnn", "detector", "transformer"]).items():
        x_cal, x_val = x[:300], x[300:500]
        with torch.no_grad():
            out = model(torch.from_numpy(x_val))
        refs = [t.numpy() for t in (out if isinstance(out, tuple) else (out,))]
        f = d / f"{key}.onnx"
        torch.onnx.export(model, (torch.from_numpy(x[:1]),), str(f), input_names=[name],
                          output_names=[f"o{i}" for i in range(len(refs))], dynamo=False, opset_version=17)
        for label, (weight, rr) in SCHEMES.items():
            q = d / f"{key}-{weight}.onnx"
            _quantize(f, q, name, x_cal, weight, rr)
            row = {"model": key, "scheme": label, "bytes": q.stat().st_size}
            for how, written in (("host", False), ("as_written", True)):
                s = _session(q, as_written=written)
                got = [np.concatenate(z) for z in zip(*[s.run(None, {name: a[None]}) for a in x_val])]
                row[f"snr_db_{how}"] = min(snr_db(r, g) for r, g in zip(refs, got))
            rows.append(row)
    return rows


def speed(d: Path):
    import torch
    from torch import nn

    torch.manual_seed(0)

    def block(i, o, s):
        return nn.Sequential(nn.Conv2d(i, o, 3, s, 1), nn.BatchNorm2d(o), nn.ReLU())

    nets = {
        "6-conv net, 3x128x128": (nn.Sequential(block(3, 32, 2), block(32, 64, 1), block(64, 128, 2), block(128, 128, 1),
                                                block(128, 256, 2), block(256, 256, 1), nn.AdaptiveAvgPool2d(1),
                                                nn.Flatten(), nn.Linear(256, 1000)), (3, 128, 128)),
        "MLP 512-1024-1024-512, 128 tokens": (nn.Sequential(nn.Linear(512, 1024), nn.ReLU(), nn.Linear(1024, 1024),
                                                            nn.ReLU(), nn.Linear(1024, 512)), (128, 512)),
    }
    rows = []
    rng = np.random.default_rng(0)
    for key, (net, shape) in nets.items():
        net.eval()
        x_cal = rng.standard_normal((16, *shape)).astype(np.float32)
        f = d / "speed.onnx"
        torch.onnx.export(net, (torch.from_numpy(x_cal[:1]),), str(f), input_names=["x"], dynamo=False, opset_version=17)
        for label, (weight, rr) in SCHEMES.items():
            q = d / f"speed-{weight}.onnx"
            _quantize(f, q, "x", x_cal, weight, rr)
            # alternate the two builds so that load on a shared host falls on both alike
            rows.append({"model": key, "scheme": label, "path": q})
        for _ in range(3):
            for r in rows[-2:]:
                r.setdefault("p50_ms_runs", []).append(_p50_ms(r["path"], "x", x_cal[:1]))
        for r in rows[-2:]:
            r["p50_ms"] = min(r["p50_ms_runs"])
            r["path"] = r["path"].name      # measured before the next model's builds replace it
    return rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--json")
    a = ap.parse_args()
    from edgekit.convert.numerics import this_host
    from edgekit.table import render

    with tempfile.TemporaryDirectory(prefix="x86-schemes-") as tmp:
        fid = fidelity(Path(tmp))
        spd = speed(Path(tmp))
    print(render(["model", "scheme", "KiB", "SNR dB host", "SNR dB as written"],
                 [[r["model"], r["scheme"], r["bytes"] / 1024, r["snr_db_host"], r["snr_db_as_written"]] for r in fid],
                 title=f"fidelity against torch, 200 held-out samples ({this_host().describe()})"))
    print(render(["model", "scheme", "p50 ms (1 thread, best of 3 alternating runs)"],
                 [[r["model"], r["scheme"], r["p50_ms"]] for r in spd], title="speed"))
    if a.json:
        Path(a.json).write_text(json.dumps({"host": this_host().describe(), "fidelity": fid, "speed": spd}, indent=2))


if __name__ == "__main__":
    main()
