"""ARM kernels vs x86 kernels on the same bundle, and the emulated root's build time.

For the digits CNN and MLPerf Tiny ResNet-8 rpi4 bundles: raw int8 outputs on the emulated
aarch64 device (tflite-runtime 2.14, numpy<2, under qemu) vs here (x86: LiteRT, and
tflite-runtime 2.14 in a venv), as the largest difference in quantization steps and top-1
agreement. Needs root and the emulated root (built if missing: minutes).

    python benchmarks/arm_vs_x86.py [--n 64]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "models" / "mlperf-tiny"
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "examples"))

CODE = ("import sys,json,numpy as np; from edgekit.runtime import load; m=load(sys.argv[1]); "
        "o=m.run(np.load(sys.argv[2]), raw=True); print(json.dumps(next(iter(o.values())).astype(int).tolist()))")


def on_arm(bundle: Path, xq: np.ndarray) -> np.ndarray:
    from edgekit.lab import emulated as emulate
    from edgekit.runtime.files import copy_runtime

    root = emulate.root_path()
    emulate.ensure_binfmt()
    t = Path(tempfile.mkdtemp(dir=root / "tmp"))
    try:
        copy_runtime(t / "rt")
        shutil.copytree(bundle, t / "b")
        np.save(t / "x.npy", xq)
        inside = "/" + str(t.relative_to(root))
        p = emulate.in_root(root, [f"{emulate.VENV}/bin/python", "-c", CODE, f"{inside}/b", f"{inside}/x.npy"],
                            env={"PYTHONPATH": f"{inside}/rt"}, capture=True)
        if p.returncode != 0:
            raise RuntimeError(f"on the emulated device: {p.stderr[-500:]}")
        return np.asarray(json.loads(p.stdout))
    finally:
        shutil.rmtree(t, ignore_errors=True)


def in_venv(bundle: Path, xq: np.ndarray, reqs) -> np.ndarray:
    from edgekit.convert.compat import venv_python
    from edgekit.runtime.files import copy_runtime

    with tempfile.TemporaryDirectory() as d:
        copy_runtime(Path(d))
        np.save(Path(d) / "x.npy", xq)
        p = subprocess.run([str(venv_python(reqs)), "-c", CODE, str(bundle), str(Path(d) / "x.npy")],
                           capture_output=True, text=True, check=True, env={"PYTHONPATH": d})
    return np.asarray(json.loads(p.stdout))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=64)
    a = ap.parse_args()
    from digits import digits_data, train
    from imagegen import natural_patches

    from edgekit.convert import Calibration, ConvertRecipe, convert
    from edgekit.lab import emulated as emulate
    from edgekit.runtime import load

    t0 = time.monotonic()
    built_before = emulate.is_built()
    emulate.build()
    rows = {"root_built_before": built_before, "root_build_seconds_from_nothing": emulate.build_seconds(),
            "root_ready_seconds_this_run": time.monotonic() - t0, "models": []}
    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        train(d, epochs=8)
        np.savez(d / "rc.npz", natural_patches(300, 0, 32))
        cases = [("digits CNN", str(d / "digits.keras"), str(d / "calib.npz"), digits_data()[1][0][: a.n]),
                 ("MLPerf Tiny ResNet-8", str(SHARED / "pretrainedResnet.h5"), str(d / "rc.npz"),
                  natural_patches(a.n, 7, 32))]
        for label, model, calib, x in cases:
            r = convert(ConvertRecipe(model, ["rpi4"], calibration=Calibration(calib), formats=["tflite"],
                                      compat_check="off"), str(d / "out"))
            b = r.bundles[0].path
            m = load(b)
            xq = m.inputs[0].quantize(x)
            here = next(iter(m.run(xq, raw=True).values())).astype(int)
            old_x86 = in_venv(b, xq, ["tflite-runtime==2.14.0", "numpy<2"])
            arm = on_arm(b, xq)
            rows["models"].append({
                "model": label, "samples": len(x),
                "max_steps_arm214_vs_x86_litert": int(np.abs(arm - here).max()),
                "max_steps_arm214_vs_x86_214": int(np.abs(arm - old_x86).max()),
                "mean_steps_arm214_vs_x86_214": float(np.abs(arm - old_x86).mean()),
                "top1_agreement_arm_vs_x86_litert": float((arm.argmax(1) == here.argmax(1)).mean()),
                "x86_litert": f"{m.backend} {m.backend_version}"})
    print(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
