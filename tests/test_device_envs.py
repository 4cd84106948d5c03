"""edgekit.runtime on device-like Python environments with no TensorFlow.

- "legacy pi": numpy<2 + tflite-runtime 2.14 (what older Raspberry Pi images run)
- "modern pi": ai-edge-litert only
- "x86 box": onnxruntime only
Each venv is built once and cached (~/.cache/edgekit-tests); a failure to build it fails.
"""

import json

import numpy as np
import pytest

from conftest import bundle_of, device_venv, run_in_venv

ENVS = {
    "legacy-pi": (["numpy<2", "tflite-runtime==2.14.0"], "tflite", "tflite-runtime"),
    "modern-pi": (["ai-edge-litert"], "tflite", "litert"),
    "x86-box": (["onnxruntime"], "onnx", "onnxruntime"),
}

PROBE = """
import sys, json
import numpy as np
from edgekit.runtime import load
from edgekit.runtime.check import golden_check
m = load(sys.argv[1])
x = np.load(sys.argv[2])
y = m(x)
heavy = [k for k in ("tensorflow", "keras", "tf2onnx", "onnx", "paramiko", "click") if k in sys.modules]
print(json.dumps({"backend": m.backend, "version": m.backend_version, "numpy": np.__version__,
                  "y": y.tolist(), "golden": golden_check(m)["ok"], "heavy": heavy}))
"""


@pytest.mark.parametrize("env", sorted(ENVS))
def test_runtime_without_tensorflow(env, digits, digits_build, tmp_path):
    reqs, fmt, backend = ENVS[env]
    py = device_venv(reqs)
    r = run_in_venv(py, "-c", "import tensorflow")
    assert r.returncode != 0, "the device venv must not have TensorFlow"
    _, _, val = digits
    x = np.load(val)["image"][:8]
    np.save(tmp_path / "x.npy", x)
    target = "rpi4" if fmt == "tflite" else "x86-avx2"
    bundle = bundle_of(digits_build, target, fmt).path
    (tmp_path / "probe.py").write_text(PROBE)
    r = run_in_venv(py, tmp_path / "probe.py", bundle, tmp_path / "x.npy")
    assert r.returncode == 0, r.stderr[-2000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["backend"] == backend and out["golden"] and out["heavy"] == []
    if env == "legacy-pi":
        assert out["numpy"].startswith("1.") and out["version"] == "2.14.0"
    from edgekit.runtime import load

    here = load(bundle)(x)
    np.testing.assert_allclose(np.asarray(out["y"]), here, atol=2 * (load(bundle).outputs[0].scale or [1e-5])[0])

    # the device-side command line: check and bench --json
    r = run_in_venv(py, "-m", "edgekit.runtime", "check", bundle, "--json")
    assert r.returncode == 0 and json.loads(r.stdout)["ok"], r.stderr
    r = run_in_venv(py, "-m", "edgekit.runtime", "bench", bundle, "--runs", "20", "--warmup", "2", "--json")
    assert r.returncode == 0, r.stderr
    rep = json.loads(r.stdout)
    assert rep["backend"] == backend and rep["latency"]["count"] == 20 and len(rep["samples_ns"]) == 20


def test_device_without_a_suitable_backend_is_told_what_to_install(digits_build, tmp_path):
    py = device_venv(ENVS["x86-box"][0])
    r = run_in_venv(py, "-m", "edgekit.runtime", "check", bundle_of(digits_build, "rpi4", "tflite").path)
    assert r.returncode == 2
    assert "no TFLite interpreter can be imported" in r.stderr and "pip install ai-edge-litert" in r.stderr
    assert "Traceback" not in r.stderr
