"""The thread count load() picks, against every count timed side by side.

For each bundle (ResNet-8 and MobileNetV2; the rpi4 INT8 TFLite and the x86-avx2 INT8 ONNX bundles
made by `edgekit convert`):

    probe     load(bundle) with an empty cache directory: the probe's own figures (the counts it
              tried, their p50, its pick, how long it took), then load(bundle) again: from the cache
    side by side
              model = load(bundle, threads=t) for each count the probe tried, and the default
              load(bundle); model(x) timed in alternating rounds (A B C A B C ...) so drift on a
              shared machine hits each alike; a round's figure is p50 over --runs calls; the
              figure of a count is the median over rounds
    verdict   the default's p50 against the best fixed count's (+x%)

    python benchmarks/threads_bench.py [--models resnet8,mobilenetv2] [--rounds 9] [--runs 200]
        [--work DIR] [--out benchmarks/results/threads_bench.json]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from speed_models import ROOT, Workdir, cpu_kind, default_work, say, write_result  # noqa: E402


def p50_ms(fn, runs: int) -> float:
    clock = time.perf_counter_ns
    s = []
    for _ in range(runs):
        t0 = clock()
        fn()
        s.append(clock() - t0)
    return float(np.percentile(s, 50)) / 1e6


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="resnet8,mobilenetv2")
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--runs", type=int, default=200)
    ap.add_argument("--work", type=Path, default=default_work())
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "threads_bench.json")
    a = ap.parse_args()
    from edgekit.runtime import load
    from edgekit.runtime import threadprobe as tp
    from edgekit.runtime.bench import conditions
    from edgekit.runtime.threads import cpu_budget
    from edgekit.table import render

    rows, table = [], []
    for name in a.models.split(","):
        w = Workdir(a.work, name)
        bundles = w.bundles()
        x = w.inputs("val")[:1]
        for bname in (f"{name}-rpi4", f"{name}-x86-avx2"):
            if bname not in bundles:
                say(f"{bname}: not written by edgekit convert: skipped")
                continue
            b = bundles[bname]
            with tempfile.TemporaryDirectory(prefix="edgekit-threads-") as cache:
                os.environ[tp.CACHE_ENV] = cache
                t0 = time.perf_counter()
                probed = load(b)
                load_s = time.perf_counter() - t0
                again = load(b)
                assert again.threads_chosen_by == "cache", again.threads_chosen_by
            rec = probed.threads_choice or {}
            say(f"{bname}: {probed.format} on {probed.backend}: {probed.threads} thread(s) by "
                f"{probed.threads_chosen_by} ({rec.get('why')}; probe {rec.get('probe_ms')} ms)")
            counts = [int(t) for t in rec.get("tried", [probed.threads])]
            models = {t: load(b, threads=t) for t in counts}
            fns = {t: (lambda m=m: m(x)) for t, m in models.items()}
            fns["default"] = lambda: probed(x)
            for fn in fns.values():
                for _ in range(max(10, a.runs // 5)):
                    fn()
            res = {k: [] for k in fns}
            for r in range(a.rounds):
                for k, fn in fns.items():
                    res[k].append(p50_ms(fn, a.runs))
            med = {k: float(np.median(v)) for k, v in res.items()}
            best_t = min(counts, key=lambda t: med[t])
            over = med["default"] / med[best_t] - 1
            row = {"model": name, "bundle": bname, "format": probed.format, "backend": probed.backend,
                   "ceiling": probed.threads_requested, "default_threads": probed.threads,
                   "chosen_by": probed.threads_chosen_by, "probe": rec, "first_load_s": load_s,
                   "side_by_side_p50_ms": {str(k): v for k, v in med.items()},
                   "round_p50_ms": {str(k): v for k, v in res.items()},
                   "best_fixed_threads": best_t, "default_over_best": over}
            rows.append(row)
            table.append([bname, f"{probed.backend}", " / ".join(f"{t}: {rec.get('p50_ms', {}).get(str(t), 0):.4g}"
                                                                  for t in counts),
                          probed.threads, " / ".join(f"{t}: {med[t]:.4g}" for t in counts), med["default"],
                          f"{over * 100:+.1f}%", rec.get("probe_ms")])
    cond = conditions()
    out = {"benchmark": "threads_bench", "method": __doc__, "rounds": a.rounds, "runs": a.runs,
           "rule": f"fewest threads within {tp.TOLERANCE:.0%} of the fastest", "cpu": cpu_kind(),
           "cpu_budget": cpu_budget(), "conditions": cond, "rows": rows}
    write_result(a.out, out)
    print(render(["bundle", "backend", "probe p50 ms by threads", "chosen", "side by side p50 ms", "default p50",
                  "default vs best", "probe ms"], table))
    print(f"{cond['cpu_model']} ({cpu_kind()['kind']}), load average {cond['loadavg']}; "
          f"{a.rounds} alternating rounds x {a.runs} runs. JSON: {a.out}")


if __name__ == "__main__":
    main()
