"""The README's main job: the example model converted for every target, run and measured here.

    python examples/main_job.py [--out edgekit-demo] [--runs 200]

1. trains the digits CNN (examples/digits.py) unless <out>/digits.keras exists;
2. `edgekit convert` for every shipped target, validated on held-out digits;
3. loads each bundle with edgekit.runtime, checks its golden outputs, benchmarks it;
4. prints one table (target, format, size, accuracy float -> INT8, p50 latency) and saves
   <out>/main-job.json.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from digits import train  # noqa: E402

from edgekit.bundle import write_json_atomic  # noqa: E402
from edgekit.convert import convert  # noqa: E402
from edgekit.progress import Progress  # noqa: E402
from edgekit.runtime import load  # noqa: E402
from edgekit.runtime.check import golden_check  # noqa: E402
from edgekit.table import render  # noqa: E402
from edgekit.targets import builtin_names  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="edgekit-demo")
    ap.add_argument("--runs", type=int, default=200)
    ap.add_argument("--warmup", type=int, default=20)
    a = ap.parse_args()
    out = Path(a.out)
    progress = Progress()
    model = out / "digits.keras"
    if not model.exists():
        progress.say("training the digits CNN (scikit-learn's bundled digits)")
        train(out)
    result = convert(str(model), builtin_names(), str(out / "build"), calib=str(out / "calib.npz"),
                     val=str(out / "val.npz"), progress=progress)
    print(result.table())
    rows, records = [], []
    for b in result.bundles:
        progress.say(f"measuring {b.path.name}: {a.warmup} warm-up + {a.runs} runs")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # GPU providers absent on this machine
            m = load(b.path)
        health = golden_check(m)
        rep = m.benchmark(runs=a.runs, warmup=a.warmup)
        v = b.artifact.metrics
        rows.append([b.target, b.fmt, len(b.artifact.data) / 1024, len(b.artifact.data) / b.artifact.float_bytes,
                     f"{v['accuracy_float']:.2f} → {v['accuracy_int8']:.2f}", v["top1_agreement"],
                     f"{m.backend} ({', '.join(p.replace('ExecutionProvider', '') for p in m.providers)})",
                     m.threads, rep["latency"]["p50_ms"], rep["end_to_end"]["p50_ms"],
                     "ok" if health["ok"] else "FAILED", "noisy" if rep["noisy"] else "ok"])
        records.append({"bundle": str(b.path), "target": b.target, "format": b.fmt,
                        "validation": v, "health": health, "benchmark": {
                            k: rep[k] for k in ("latency", "end_to_end", "backend", "backend_version",
                                                "threads", "providers", "conditions", "noisy",
                                                "noise_reasons", "load_ms", "first_inference_ms")}})
    print()
    print(render(["target", "format", "KiB", "size×", "accuracy % float → INT8", "agree %",
                  "backend here", "thr", "p50 ms", "e2e p50 ms", "golden", "timing"], rows,
                 title="edgekit main job: digits CNN, every target, measured on this machine"))
    c = records[0]["benchmark"]["conditions"] if records else {}
    print(f"measured on {c.get('cpu_model')} ({c.get('cpu_count')} cores); latency is this machine's, "
          "not the target's: deploy and `edgekit profile` for the device's figures")
    write_json_atomic(out / "main-job.json", {"convert": result.to_dict(), "bundles": records})
    print(f"bundles in {out / 'build'}, JSON in {out / 'main-job.json'}")
    return 0 if all(r["health"]["ok"] for r in records) else 1


if __name__ == "__main__":
    sys.exit(main())
