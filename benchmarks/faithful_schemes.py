"""The x86-avx2 ONNX candidates convert.faithful weighs: fidelity of each, and p50 of each here.

For each model (the depthwise / BatchNorm / residual CNN of tests/residualcnn.py, trained here;
MLPerf Tiny ResNet-8 on natural image patches): `edgekit convert` for x86-avx2, ONNX, twice —
as it ships now (convert.faithful on) and with the profile's build kept (convert.faithful off) —
then:

    fidelity  each candidate of the shipped bundle's `faithful` record: top-1 agreement, SNR of
              the worst output, accuracy drop (points, with labels), whether it met the floor
    speed     both bundles (the profile's u8 x 7-bit build and whatever ships) timed here with
              load(bundle, threads=t)(x) for t in 1, 2, alternating rounds, median of round p50s.
              On a host without VNNI that is the target's speed; on a VNNI host it is not (u8 x u8
              has no VNNI kernel): the table says which host it was.

    python benchmarks/faithful_schemes.py [--models residual,resnet8] [--rounds 7] [--runs 200]
        [--out benchmarks/results/faithful_schemes.json]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from unittest import mock

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "examples"))
sys.path.insert(0, str(ROOT / "benchmarks"))
from speed_models import cpu_kind, say, write_result  # noqa: E402


def _residual(d: Path):
    from residualcnn import train_residual

    return train_residual(d)


def _resnet8(d: Path):
    from imagegen import natural_patches

    np.savez(d / "calib.npz", natural_patches(300, 0, 32))
    np.savez(d / "val.npz", natural_patches(300, 1, 32))
    return ROOT / "tests" / "models" / "mlperf-tiny" / "pretrainedResnet.h5", d / "calib.npz", d / "val.npz"


MAKERS = {"residual": _residual, "resnet8": _resnet8}


def _p50(fn, runs: int) -> float:
    s = []
    for _ in range(runs):
        t0 = time.perf_counter_ns()
        fn()
        s.append(time.perf_counter_ns() - t0)
    return float(np.percentile(s, 50)) / 1e6


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="residual,resnet8")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--runs", type=int, default=200)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "faithful_schemes.json")
    a = ap.parse_args()
    from edgekit.bundle import read_bundle
    from edgekit.convert import Calibration, ConvertRecipe, convert, faithful
    from edgekit.convert.numerics import this_host
    from edgekit.runtime import load
    from edgekit.table import render

    rows, fid_table, speed_table = [], [], []
    for name in a.models.split(","):
        with tempfile.TemporaryDirectory(prefix=f"ek-faithful-{name}-") as tmp:
            d = Path(tmp)
            model, calib, val = MAKERS[name](d)
            recipe = ConvertRecipe(str(model), ("x86-avx2",), calibration=Calibration(str(calib)),
                                   validation=str(val), formats=("onnx",), compat_check="off")
            t0 = time.monotonic()
            now = convert(recipe, str(d / "now")).bundles[0]
            with mock.patch.object(faithful, "more_faithful", lambda *args: args[6]):
                before = convert(recipe, str(d / "before")).bundles[0]
            say(f"{name}: converted twice in {time.monotonic() - t0:.0f} s")
            rec = read_bundle(now.path).manifest.get("faithful") or {}
            for c in rec.get("candidates", []):
                fid_table.append([name, c["what"], None if c.get("top1_agreement") is None else 100 * c["top1_agreement"],
                                  c.get("snr_db"), c.get("accuracy_drop_points"),
                                  "yes" if c.get("meets") else "no", "yes" if c.get("shipped") else ""])
            x = np.load(val)
            x = x[x.files[0]][:1]
            builds = {"profile's build": before.path, "shipped now": now.path}
            fns = {}
            for label, path in builds.items():
                for t in (1, 2):
                    m = load(path, threads=t)
                    fns[(label, t)] = (lambda m=m: m(x))
            for fn in fns.values():
                for _ in range(20):
                    fn()
            res = {k: [] for k in fns}
            for _ in range(a.rounds):
                for k, fn in fns.items():
                    res[k].append(_p50(fn, a.runs))
            med = {k: float(np.median(v)) for k, v in res.items()}
            for t in (1, 2):
                base = med[("profile's build", t)]
                for label, path in builds.items():
                    b = read_bundle(path).manifest["model"]["build"]
                    speed_table.append([name, label, f"{b['weight_type']}, reduce_range {b['reduce_range']}", t,
                                        med[(label, t)], f"{(med[(label, t)] / base - 1) * 100:+.1f}%"])
            rows.append({"model": name, "faithful": rec, "p50_ms_here": {f"{k[0]} @{k[1]}": v for k, v in med.items()},
                         "round_p50_ms": {f"{k[0]} @{k[1]}": v for k, v in res.items()},
                         "before_build": read_bundle(before.path).manifest["model"]["build"],
                         "shipped_build": read_bundle(now.path).manifest["model"]["build"]})
    host = f"{this_host().describe()} ({cpu_kind()['kind']})"
    write_result(a.out, {"benchmark": "faithful_schemes", "method": __doc__, "host": host, "rounds": a.rounds,
                         "runs": a.runs, "rows": rows})
    print(render(["model", "candidate", "top-1 agree %", "SNR dB", "acc drop pts", "meets", "shipped"], fid_table,
                 title="x86-avx2 ONNX candidates (fidelity in the target's numerics)"))
    print(render(["model", "bundle", "weights", "threads", "p50 ms here", "vs profile's"], speed_table,
                 title=f"p50 of load(bundle)(x) on this host: {host}; {a.rounds} alternating rounds x {a.runs} runs"))


if __name__ == "__main__":
    main()
