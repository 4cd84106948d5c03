"""The digits CNN through every target: accuracy, size, manifest, golden, runtime, CLI."""

import json

import numpy as np
import pytest

from conftest import bundle_of
from edgekit.bundle import read_bundle
from edgekit.runtime import load
from edgekit.runtime.check import golden_check
from edgekit.targets import builtin_names, load_target


def test_every_target_gets_every_format_it_lists(digits_build):
    got = {(b.target, b.fmt) for b in digits_build.bundles}
    want = {(t, f) for t in builtin_names() for f in load_target(t).formats}
    assert got == want
    for b in digits_build.bundles:
        assert read_bundle(b.path).format == b.fmt  # verified: sha256, size


def test_int8_keeps_accuracy_and_shrinks(digits_build):
    for b in digits_build.bundles:
        m = b.artifact.metrics
        assert m["accuracy_float"] > 0.90, m
        assert m["accuracy_drop_points"] <= 0.5, (b.path.name, m)
        assert m["top1_agreement"] >= 0.98
        assert m["outputs"][m["primary_output"]]["snr_db"] > 20
        assert b.artifact.float_ops == {}, b.artifact.float_ops
        ratio = len(b.artifact.data) / b.artifact.float_bytes
        assert ratio <= (0.30 if b.fmt == "tflite" else 0.32), (b.path.name, ratio)


def test_identical_builds_are_converted_once(digits_build):
    tfl = {id(b.artifact) for b in digits_build.bundles if b.fmt == "tflite"}
    assert len(tfl) == 1  # every profile asks for the same TFLite build
    orin, avx2 = bundle_of(digits_build, "jetson-orin", "onnx"), bundle_of(digits_build, "x86-avx2", "onnx")
    assert orin.artifact is not avx2.artifact


def test_manifest_records_what_was_built(digits_build):
    b = bundle_of(digits_build, "jetson-orin", "onnx")
    m = read_bundle(b.path).manifest
    assert m["target"]["name"] == "jetson-orin" and m["target"]["onnx"]["symmetric_activations"]
    assert m["model"]["format"] == "onnx" and m["model"]["build"]["activation_type"] == "int8"
    assert m["source"]["kind"] == "keras" and len(m["source"]["sha256"]) == 64
    assert m["calibration"]["samples"] == 200 and m["calibration"]["random"] is False
    assert m["validation"]["samples"] == len(np.load(digits_build.calibration["validation_source"])["labels"])
    assert m["inputs"][0]["name"] == "image"
    outs = m["validation"]["outputs"]
    assert {"snr_db", "max_abs_err"} <= set(outs["logits"] if "logits" in outs else next(iter(outs.values())))
    t = read_bundle(bundle_of(digits_build, "rpi4", "tflite").path).manifest
    assert t["inputs"][0]["dtype"] == "int8" and t["inputs"][0]["quantization"]["scale"]
    assert digits_build.report_path.is_file()


def test_onnx_quantization_follows_the_profile(digits_build):
    import onnx
    from onnx import numpy_helper

    def zero_points(target):
        m = onnx.load(str(bundle_of(digits_build, target, "onnx").path / "model.onnx"))
        inits = {i.name: numpy_helper.to_array(i) for i in m.graph.initializer}
        zps = [inits[n.input[2]] for n in m.graph.node if n.op_type == "QuantizeLinear" and len(n.input) > 2]
        return zps

    orin = zero_points("jetson-orin")
    assert orin and all(z.dtype == np.int8 and not z.any() for z in orin)      # TensorRT: symmetric S8
    avx2 = zero_points("x86-avx2")
    assert avx2 and all(z.dtype == np.uint8 for z in avx2)                    # U8 activations


def test_runtime_float_in_float_out(digits, digits_build):
    _, _, val = digits
    x = np.load(val)["image"][:16]
    labels = np.load(val)["labels"][:16]
    for target, fmt in (("rpi4", "tflite"), ("x86-avx2", "onnx")):
        m = load(bundle_of(digits_build, target, fmt).path)
        y = m(x)
        assert y.dtype == np.float32 and y.shape == (16, 10)
        assert (y.argmax(1) == labels).mean() >= 0.85
        assert golden_check(m)["ok"]


def test_raw_integer_tensors(digits, digits_build):
    _, _, val = digits
    x = np.load(val)["image"][:1]
    m = load(bundle_of(digits_build, "rpi4", "tflite").path)
    spec_in, spec_out = m.inputs[0], m.outputs[0]
    raw = m.run(image=spec_in.quantize(x), raw=True)["logits" if "logits" in m.run(x) else spec_out.name]
    assert raw.dtype == np.int8
    np.testing.assert_allclose(spec_out.dequantize(raw), m(x), atol=1e-6)


def test_benchmark_report_follows_the_method(digits_build):
    m = load(bundle_of(digits_build, "rpi4", "tflite").path)
    r = m.benchmark(runs=30, warmup=5)
    lat = r["latency"]
    assert len(r["samples_ns"]) == 30 and len(r["end_to_end_samples_ns"]) == 30
    assert all(isinstance(s, int) and s > 0 for s in r["samples_ns"])
    assert lat["min_ms"] <= lat["p50_ms"] <= lat["p90_ms"] <= lat["p99_ms"] <= lat["max_ms"]
    assert r["load_ms"] > 0 and r["first_inference_ms"] > 0
    from edgekit.runtime.threads import usable_cpus

    # the profile's 4 threads, clamped to the CPUs this process may use, is the ceiling; below it the
    # count measured fastest (runtime.threadprobe), and the report says which
    assert r["backend"] == "litert" and 1 <= r["threads"] <= min(4, usable_cpus()) and r["threads_requested"] == 4
    assert r["threads_chosen_by"] in (("profile",) if min(4, usable_cpus()) == 1 else ("probe", "cache"))
    for k in ("cpu_model", "governor", "loadavg", "temperature_c", "machine"):
        assert k in r["conditions"]
    assert isinstance(r["noisy"], bool) and isinstance(r["noise_reasons"], list)
    json.dumps(r)


def test_cli_run_and_bench(cli, digits, digits_build, tmp_path):
    _, _, val = digits
    x = tmp_path / "x.npy"
    np.save(x, np.load(val)["image"][:2])
    path = bundle_of(digits_build, "rpi4", "tflite").path
    r = cli("run", path, "--input", x, "--json")
    assert r.exit_code == 0, r.stderr
    out = json.loads(r.stdout)
    assert np.asarray(next(iter(out.values()))).shape == (2, 10)
    r = cli("bench", path, "--runs", 20, "--warmup", 2, "--json", "--out", tmp_path / "b.json")
    assert r.exit_code == 0, r.stderr
    assert json.loads(r.stdout)["runs"] == 20 and json.loads((tmp_path / "b.json").read_text())["latency"]
    r = cli("bench", path, "--runs", 20, "--warmup", 2)
    assert "p50 ms" in r.stdout and "conditions:" in r.stdout


def test_runs_any_tflite_from_other_tools():
    """MLPerf Tiny's own INT8 ResNet-8 (made by another tool) runs with float in/out."""
    from conftest import MODELS

    m = load(MODELS / "pretrainedResnet_quant.tflite")
    assert m.inputs[0].quantized
    y = m(np.random.default_rng(0).uniform(0, 255, (2, 32, 32, 3)).astype(np.float32))
    assert y.shape == (2, 10) and np.isfinite(y).all()


def test_backend_can_be_forced(digits_build):
    p = bundle_of(digits_build, "rpi4", "tflite").path
    assert load(p, backend="tensorflow").backend == "tensorflow"
    from edgekit.errors import BackendUnavailable

    with pytest.raises(BackendUnavailable, match="cannot run a .tflite"):
        load(p, backend="onnxruntime")
    with pytest.warns(RuntimeWarning, match="TensorrtExecutionProvider"):
        m = load(bundle_of(digits_build, "jetson-orin", "onnx").path)
    assert m.providers == ["CPUExecutionProvider"]
