"""MLPerf Tiny ResNet-8: edgekit's INT8 vs MLPerf Tiny's own reference INT8 tflite.

Size, top-1 agreement with the float Keras model and output SNR, on natural-image crops
(scikit-learn's two bundled photographs; no CIFAR-10 here), all inputs and the crops
the float model commits to (top-1 >= 0.6). Reads ../shared (benchmarks only).

    python benchmarks/resnet8_vs_mlperf.py [--n 500]
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


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=500)
    a = ap.parse_args()
    import keras

    from edgekit.convert import Calibration, ConvertRecipe, convert
    from edgekit.convert.validate import snr_db
    from edgekit.runtime import load
    from imagegen import natural_patches, recognised

    xc, xv = natural_patches(a.n, 0, 32), natural_patches(a.n, 1, 32)
    ref = keras.models.load_model(SHARED / "pretrainedResnet.h5", compile=False).predict(xv, verbose=0)
    sure = recognised(ref)
    rows = []
    with tempfile.TemporaryDirectory() as d:
        np.savez(Path(d) / "c.npz", xc)
        np.savez(Path(d) / "v.npz", xv)
        r = convert(ConvertRecipe(str(SHARED / "pretrainedResnet.h5"), ["rpi4", "x86-avx2"],
                                  calibration=Calibration(d + "/c.npz", samples=a.n), validation=d + "/v.npz"),
                                  d + "/out")
        cands = [(b.path.name, b.path, len(b.artifact.data)) for b in r.bundles]
        ref_file = SHARED / "pretrainedResnet_quant.tflite"
        cands.append(("mlperf-tiny reference INT8", ref_file, ref_file.stat().st_size))
        for name, path, size in cands:
            y = load(path)(xv)
            agree = y.argmax(1) == ref.argmax(1)
            rows.append({"model": name, "bytes": size, "agreement_all": float(agree.mean() * 100),
                         "agreement_recognised": float(agree[sure].mean() * 100),
                         "snr_db": snr_db(ref, y)})
    print(json.dumps({"inputs": a.n, "recognised": int(sure.sum()), "rows": rows}, indent=2))
    from edgekit.table import render

    print(render(["model", "bytes", "agree % (all)", f"agree % (recognised, n={int(sure.sum())})", "SNR dB"],
                 [[r_["model"], r_["bytes"], r_["agreement_all"], r_["agreement_recognised"], r_["snr_db"]]
                  for r_ in rows]))


if __name__ == "__main__":
    main()
