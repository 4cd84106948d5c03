"""Which artifact is fastest here, at a fixed thread count, against float32 and the stock tools.

For ResNet-8 and MobileNetV2 (see speed_models.py), side by side in one run:

    float32            TFLite (LiteRT, XNNPACK), ONNX Runtime, OpenVINO
    edgekit bundles    x86-avx2 INT8 ONNX (U8S8 QDQ per-channel reduce_range, after a working
                       quant_pre_process) under ONNX Runtime and OpenVINO; x86-avx2 INT8 TFLite
    --select fastest   `edgekit convert --select fastest -t x86-avx2 --format onnx`: its winner,
                       loaded as a device loads it (the backend its manifest prefers, e.g.
                       OpenVINO), and its candidate table (each candidate's backend, p50 at
                       selection, size, fidelity) in the JSON summary
    stock tools        TFLiteConverter full-int8 and dynamic range; quantize_static and
                       quantize_dynamic defaults
    ONNX schemes       quantize_static with each scheme worth trying on x86 (QDQ/QOperator,
                       U8S8/S8S8/U8U8, per-channel/per-tensor, reduce_range), both ONNX backends

Each row is timed with the runtime's own method (Model.benchmark: warm-up discarded, the
inference call alone, monotonic ns clock) through edgekit.runtime.load(..., threads=T).
Rounds interleave every row (a round runs each row in turn), so load on a shared machine
hits all rows alike; a row's p50 is the median of its round p50s. Fidelity: top-1 agreement
and SNR against the float Keras model on the validation crops. Ratio: the best float32 p50 of
TFLite XNNPACK and ONNX Runtime (the issue's baseline) over the row's p50 (>1: faster).

    python benchmarks/speed_bench.py [--models resnet8,mobilenetv2] [--threads 2] [--rounds 5]
        [--runs 40] [--work DIR] [--out benchmarks/results/speed_bench.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any, Dict, Optional

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from speed_models import (ONNX_SCHEMES, ROOT, Workdir, cpu_kind, default_work, fidelity, say,  # noqa: E402
                          size_of, write_result)

# the baseline: the better float32 of TFLite (XNNPACK) and ONNX Runtime
BASELINE = (("float32 TFLite", "litert"), ("float32 ONNX", "onnxruntime"))
MIN_AGREEMENT = 0.90  # the fastest INT8 row named in the summary must agree this well with float


def candidates(w: Workdir):
    """(label, kind, path, backends, build error) for every artifact; a failed build is a row
    with its error, not a crash."""
    out = []

    def add(label, kind, make, backends):
        try:
            out.append((label, kind, make(), backends, None))
        except Exception as e:  # noqa: BLE001 - recorded in the row and printed, not hidden
            msg = f"{type(e).__name__}: {e}".splitlines()[0][:300]
            say(f"{w.model}: {label}: build failed: {msg}")
            out.append((label, kind, None, backends, msg))

    both = ("onnxruntime", "openvino")
    add("float32 TFLite", "float32", w.float_tflite, ("litert",))
    add("float32 ONNX", "float32", w.float_onnx, both)
    bundles = w.bundles()

    def written(name):
        if name not in bundles:   # convert runs with --no-rescue here: a row below the floor is not written
            raise LookupError(f"{name} not written: it missed the fidelity floor (see {w.model}.convert.json)")
        return bundles[name]

    add("edgekit x86-avx2 bundle", "edgekit", lambda: written(f"{w.model}-x86-avx2"), both)
    add("edgekit x86-avx2 INT8 TFLite bundle", "edgekit", lambda: written(f"{w.model}-x86-avx2-tflite"), ("litert",))
    # the backend its manifest prefers, as load() on a device picks it
    add("edgekit --select fastest x86-avx2", "edgekit", lambda: selected_bundle(w), (MANIFEST,))
    add("TFLiteConverter full-int8", "stock", w.tflite_full_int8, ("litert",))
    add("TFLiteConverter dynamic range", "stock", w.tflite_dynamic, ("litert",))
    add("quantize_static defaults", "stock", lambda: w.onnx_scheme("stock-quantize-static-defaults"), both)
    add("quantize_dynamic defaults", "stock", w.onnx_dynamic, ("onnxruntime",))
    for name, kw in ONNX_SCHEMES.items():
        add(f"ONNX {name}", "scheme", lambda name=name, kw=kw: w.onnx_scheme(name, **kw), both)
    return out


MANIFEST = "manifest's choice"


def selected_bundle(w: Workdir) -> Path:
    """`edgekit convert --select fastest` for x86-avx2 (ONNX): the winner's bundle (built once, kept)."""
    import subprocess

    out = w.dir / "select"
    if not (out / ".done").is_file():
        say(f"{w.model}: edgekit convert --select fastest -t x86-avx2 (builds, measures and times every "
            "candidate, ONNX Runtime and OpenVINO: minutes for MobileNetV2)")
        cmd = [sys.executable, "-m", "edgekit.cli", "convert", str(w.keras_path()), "-o", str(out),
               "--calib", str(w.data("calib")), "--val", str(w.data("val")), "--calib-samples", str(w.calib_n),
               "--compat-check", "off", "-q", "--name", w.model, "-t", "x86-avx2", "--format", "onnx",
               "--select", "fastest", "--search-budget", "120"]   # as a user runs it: the rescue ladder on
        p = subprocess.run(cmd, capture_output=True, text=True)
        if p.returncode != 0:
            raise RuntimeError(f"edgekit convert --select fastest failed ({p.returncode}): {p.stderr[-1500:]}")
        (out / ".done").write_text("")
    return out / f"{w.model}-x86-avx2"


def selection(path: Optional[str]) -> Optional[Dict[str, Any]]:
    """The --select fastest record of a bundle: the backend it prefers and every candidate."""
    if not path:
        return None
    m = json.loads((Path(path) / "manifest.json").read_text())
    return {"runtime": m.get("runtime"),
            "candidates": [{k: c.get(k) for k in ("what", "backend", "p50_ms", "threads", "bytes", "top1_agreement",
                                                  "snr_db", "meets", "chosen", "error")}
                           for c in m.get("candidates") or []]}


def predict(m, xv: np.ndarray) -> np.ndarray:
    """One sample at a time: what is timed is batch 1, and a batch of 100 would make ONNX Runtime's
    arena (and OpenVINO's compiled shapes) hold 100 samples' activations for every row."""
    return np.concatenate([m(xv[i:i + 1]) for i in range(len(xv))])


def summarize(model: str, rows):
    """Ratios to the best float32 (TFLite XNNPACK, ONNX Runtime) and the summary of one model."""
    timed = [r for r in rows if "p50_ms" in r]
    base = [r for r in timed if (r["artifact"], r["backend"]) in BASELINE]
    best = min(base, key=lambda r: r["p50_ms"]) if base else None
    floats = [r for r in timed if r["kind"] == "float32"]
    best_any = min(floats, key=lambda r: r["p50_ms"]) if floats else None
    for r in timed:
        r["speedup_vs_best_float32"] = best["p50_ms"] / r["p50_ms"] if best else None
        r["speedup_vs_best_float32_any_backend"] = best_any["p50_ms"] / r["p50_ms"] if best_any else None
        best_min = min(b["min_ms"] for b in base) if base else None
        r["speedup_by_min_vs_best_float32"] = best_min / r["min_ms"] if best_min else None
    summary = {"model": model,
               "best_float32": {k: best[k] for k in ("artifact", "backend", "p50_ms")} if best else None,
               "best_float32_any_backend": ({k: best_any[k] for k in ("artifact", "backend", "p50_ms")}
                                            if best_any else None)}
    x86 = [r for r in timed if r["artifact"] == "edgekit x86-avx2 bundle"]
    summary["x86_avx2_bundle"] = {r["backend"]: {"p50_ms": r["p50_ms"], "ratio": r["speedup_vs_best_float32"],
                                                 "top1_agreement": r["top1_agreement"]} for r in x86}
    sel = [r for r in timed if r["artifact"].startswith("edgekit --select fastest")]
    if sel:
        summary["select_fastest"] = {"backend": sel[0]["backend"], "p50_ms": sel[0]["p50_ms"],
                                     "ratio": sel[0]["speedup_vs_best_float32"],
                                     "top1_agreement": sel[0]["top1_agreement"], **(sel[0].get("selection") or {})}
    int8 = [r for r in timed if r["kind"] != "float32" and r["top1_agreement"] >= MIN_AGREEMENT]
    if int8:
        f = max(int8, key=lambda r: r["speedup_vs_best_float32"])
        summary["fastest_int8"] = {k: f[k] for k in ("artifact", "backend", "p50_ms", "speedup_vs_best_float32",
                                                     "top1_agreement", "snr_db")}
    return summary


def run_model(w: Workdir, threads: int, rounds: int, runs: int):
    from edgekit.runtime import load

    ref, xv = w.reference(), w.inputs("val")
    x1 = xv[:1]
    rows, loaded = [], []
    for label, kind, path, backends, err in candidates(w):
        for be in backends:
            row = {"model": w.model, "artifact": label, "kind": kind, "backend": be,
                   "path": str(path) if path else None, "bytes": size_of(path) if path else None,
                   "threads": threads, "error": err}
            rows.append(row)
            if err:
                continue
            try:
                m = load(path, backend=None if be == MANIFEST else be, threads=threads)
                if be == MANIFEST:
                    row.update(backend=m.backend, backend_chosen_by=m.backend_chosen_by, backend_note=m.backend_note,
                               selection=selection(row["path"]))
                row.update(backend_version=m.backend_version, threads_used=m.threads,
                           load_ms=m.load_ms, **fidelity(predict(m, xv), ref))
            except Exception as e:  # noqa: BLE001 - recorded in the row and printed
                row["error"] = f"{type(e).__name__}: {e}".splitlines()[0][:300]
                say(f"{w.model}: {label} on {be}: {row['error']}")
                continue
            row["first_inference_ms"] = m.first_inference_ms
            loaded.append((row, m))
    say(f"{w.model}: timing {len(loaded)} rows, {rounds} interleaved rounds x {runs} runs, {threads} threads")
    for row, _ in loaded:
        row["round_p50_ms"], row["round_min_ms"], row["round_cv"], row["noise_reasons"] = [], [], [], []
    for r in range(rounds):
        for row, m in loaded:
            rep = m.benchmark(runs=runs, warmup=max(3, runs // 10), inputs=[x1], end_to_end=False)
            row["round_p50_ms"].append(rep["latency"]["p50_ms"])
            row["round_min_ms"].append(rep["latency"]["min_ms"])
            row["round_cv"].append(rep["latency"]["cv"])
            row["noise_reasons"] = rep["noise_reasons"]
            row["conditions"] = rep["conditions"]
        say(f"  round {r + 1}/{rounds}")
    for row, _ in loaded:
        row["p50_ms"] = float(np.median(row["round_p50_ms"]))
        row["min_ms"] = float(min(row["round_min_ms"]))  # the least disturbed run: robust to load
    return rows, summarize(w.model, rows)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="resnet8,mobilenetv2")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--runs", type=int, default=40)
    ap.add_argument("--work", type=Path, default=default_work())
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "speed_bench.json")
    a = ap.parse_args()
    from edgekit.runtime.bench import conditions
    from edgekit.runtime.threads import cpu_budget
    from edgekit.table import render

    t0 = time.time()
    all_rows, summaries = [], []
    start = conditions()
    for name in a.models.split(","):
        rows, summary = run_model(Workdir(a.work, name), a.threads, a.rounds, a.runs)
        all_rows += rows
        summaries.append(summary)
    out = {"benchmark": "speed_bench", "method": __doc__, "threads": a.threads, "rounds": a.rounds,
           "runs": a.runs, "cpu": cpu_kind(), "cpu_budget": cpu_budget(), "conditions_start": start,
           "conditions_end": conditions(), "seconds": time.time() - t0, "summary": summaries,
           "rows": all_rows}
    write_result(a.out, out)
    table = []
    for r in all_rows:
        table.append([r["model"], r["artifact"], r["backend"], r.get("bytes") and round(r["bytes"] / 1024),
                      r.get("p50_ms"), r.get("speedup_vs_best_float32") and f"{r['speedup_vs_best_float32']:.2f}x",
                      r.get("min_ms"),
                      r.get("speedup_by_min_vs_best_float32") and f"{r['speedup_by_min_vs_best_float32']:.2f}x",
                      r.get("top1_agreement"), r.get("snr_db"), r.get("error") or ""])
    print(render(["model", "artifact", "backend", "KiB", "p50 ms", "vs best fp32", "min ms", "by min",
                  "top-1 agree", "SNR dB",
                  "error"], table))
    c = out["conditions_end"]
    print(f"{c['cpu_model']} ({out['cpu']['kind']}), {a.threads} threads, load average {start['loadavg']} -> "
          f"{c['loadavg']}; {a.rounds} interleaved rounds x {a.runs} runs. JSON: {a.out}")
    for s in summaries:
        b = s["best_float32"]
        print(f"{s['model']}: best float32 {b['artifact']} ({b['backend']}) {b['p50_ms']:.3f} ms; "
              + "; ".join(f"x86-avx2 bundle on {k}: {v['p50_ms']:.3f} ms = {v['ratio']:.2f}x"
                          for k, v in s["x86_avx2_bundle"].items())
              + (f"; --select fastest: {s['select_fastest']['backend']} {s['select_fastest']['p50_ms']:.3f} ms = "
                 f"{s['select_fastest']['ratio']:.2f}x" if "select_fastest" in s else "")
              + (f"; fastest INT8: {s['fastest_int8']['artifact']} on {s['fastest_int8']['backend']} "
                 f"{s['fastest_int8']['speedup_vs_best_float32']:.2f}x" if "fastest_int8" in s else ""))
        for c in (s.get("select_fastest") or {}).get("candidates", []):
            def num(v, fmt):
                return "-" if v is None else format(v, fmt)
            on = f" on {c['backend']}" if c.get("backend") else ""     # the profile's build may not exist
            print(f"  select candidate {c['what']}{on}: p50 {num(c['p50_ms'], '.3f')} ms, "
                  f"{num(c['bytes'] and c['bytes'] / 1024, '.0f')} KiB, top-1 {num(c['top1_agreement'], '.3f')}, "
                  f"SNR {num(c['snr_db'], '.1f')} dB" + (" (chosen)" if c["chosen"] else "")
                  + ("" if c["meets"] or c.get("error") else " (below the floor: not timed)")
                  + (f" error: {c['error'][:80]}" if c.get("error") else ""))


if __name__ == "__main__":
    main()
