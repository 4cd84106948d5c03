"""OpenVINO as a runtime backend for ONNX artifacts (edgekit[openvino]): float in, float out,
threads honoured, the same top-1 as ONNX Runtime on an INT8 QDQ bundle, the same bench method,
listed by runtime.facts and accepted by `edgekit run/bench --backend`."""

from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import bundle_of
from edgekit.errors import BackendUnavailable
from edgekit.runtime import load


@pytest.fixture(scope="module")
def qdq_bundle(digits_build):
    """The digits CNN's x86-avx2 bundle: U8S8 QDQ, per-channel, reduce_range."""
    import onnx

    b = bundle_of(digits_build, "x86-avx2", "onnx")
    build = json.loads(b.path.joinpath("manifest.json").read_text())["model"]["build"]
    assert (build["quant_format"], build["activation_type"], build["weight_type"]) == ("qdq", "uint8", "int8")
    ops = {n.op_type for n in onnx.load(str(b.path / "model.onnx")).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    return b.path


@pytest.fixture(scope="module")
def val_inputs(digits):
    _, _, val = digits
    with np.load(val) as z:
        x = z[z.files[0]]
    return x[:200].astype(np.float32)


def test_same_top1_as_onnxruntime(qdq_bundle, val_inputs):
    ov = load(qdq_bundle, backend="openvino", threads=2)
    ort = load(qdq_bundle, backend="onnxruntime", threads=2)
    assert (ov.backend, ort.backend) == ("openvino", "onnxruntime")
    assert [s.name for s in ov.inputs] == [s.name for s in ort.inputs]
    assert [s.name for s in ov.outputs] == [s.name for s in ort.outputs]
    y_ov, y_ort = ov(val_inputs), ort(val_inputs)
    assert y_ov.dtype == np.float32 and y_ov.shape == y_ort.shape
    same = y_ov.argmax(1) == y_ort.argmax(1)
    # the two runtimes' integer kernels round differently: a near-tie may flip, nothing more
    top2 = np.sort(y_ort, axis=1)[:, -2:]
    clear = top2[:, 1] - top2[:, 0] >= 0.2
    assert clear.sum() >= len(y_ort) // 2
    assert same[clear].all(), f"{int((~same[clear]).sum())} clear winners differ"
    assert same.mean() >= 0.95, same.mean()
    # one sample at a time gives what the batch gave (the model is recompiled per input shape)
    np.testing.assert_allclose(ov(val_inputs[:1]), y_ov[:1], atol=1e-5)


@pytest.mark.parametrize("threads", [1, 2])
def test_threads_honoured(qdq_bundle, threads):
    m = load(qdq_bundle, backend="openvino", threads=threads)
    assert (m.threads_requested, m.threads) == (threads, threads)
    compiled = m._impl._request.get_compiled_model()
    assert int(compiled.get_property("INFERENCE_NUM_THREADS")) == threads


def test_default_threads_fit_the_machine(qdq_bundle, tmp_path, monkeypatch):
    (tmp_path / "cpu.max").write_text("100000 100000")
    monkeypatch.setenv("EDGEKIT_CGROUP_CPU_MAX", str(tmp_path / "cpu.max"))
    m = load(qdq_bundle, backend="openvino")
    assert (m.threads_requested, m.threads) == (4, 1)


def test_bench_and_golden(qdq_bundle):
    from edgekit.runtime.check import golden_check

    m = load(qdq_bundle, backend="openvino", threads=1)
    rep = m.benchmark(runs=5, warmup=1)
    assert rep["backend"] == "openvino" and rep["backend_version"].startswith("20")
    assert rep["latency"]["count"] == 5 and len(rep["samples_ns"]) == 5
    assert rep["end_to_end"]["count"] == 5
    assert rep["load_ms"] > 0 and rep["first_inference_ms"] > 0
    assert golden_check(m)["ok"]


def test_refuses_tflite(digits_build):
    with pytest.raises(BackendUnavailable, match="openvino cannot run a .tflite"):
        load(bundle_of(digits_build, "rpi4", "tflite").path, backend="openvino")


def test_facts_list_openvino():
    from edgekit.runtime.facts import backends, installed_backends

    f = backends()["openvino"]
    assert f["available"] and f["format"] == "onnx" and "CPU" in f["providers"]
    assert installed_backends()["openvino"]["available"]


def test_cli_run_and_bench(qdq_bundle, val_inputs, tmp_path, cli):
    np.save(tmp_path / "x.npy", val_inputs[:2])
    r = cli("run", qdq_bundle, "-i", tmp_path / "x.npy", "--backend", "openvino", "--threads", "1", "--json")
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    want = load(qdq_bundle, backend="openvino", threads=1)(val_inputs[:2])
    np.testing.assert_allclose(np.array(next(iter(out.values()))), want, atol=1e-6)
    r = cli("bench", qdq_bundle, "--backend", "openvino", "--threads", "1", "--runs", "3", "--warmup", "1", "--json")
    assert r.exit_code == 0, r.output
    rep = json.loads(r.stdout)
    assert (rep["backend"], rep["threads"], rep["threads_requested"]) == ("openvino", 1, 1)


@pytest.fixture
def prefers_openvino(qdq_bundle, tmp_path):
    """The x86-avx2 bundle, its manifest naming OpenVINO as the backend it was timed on."""
    import shutil

    from edgekit.bundle import Manifest

    b = tmp_path / "digits-x86-avx2-ov"
    shutil.copytree(qdq_bundle, b)
    Manifest.update(b, runtime={"backend": "openvino", "threads": 2, "why": "test",
                                "hints": {"PERFORMANCE_HINT": "LATENCY", "NUM_STREAMS": 1}})
    return b


def test_manifest_preference_is_honoured(prefers_openvino, qdq_bundle):
    m = load(prefers_openvino, threads=1)
    assert (m.backend, m.backend_preferred, m.backend_chosen_by, m.backend_note) == ("openvino", "openvino",
                                                                                   "manifest", None)
    assert m._impl.hints == {"PERFORMANCE_HINT": "LATENCY", "NUM_STREAMS": 1}
    assert load(prefers_openvino, backend="onnxruntime").backend == "onnxruntime"   # the argument wins
    plain = load(qdq_bundle)   # a manifest without a preference (and older ones): the default backend
    assert (plain.backend, plain.backend_preferred, plain.backend_chosen_by) == ("onnxruntime", None, "default")


def test_preference_falls_back_and_says_why(prefers_openvino, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "openvino", None)   # as on a device without openvino
    with pytest.warns(RuntimeWarning, match="the manifest prefers openvino"):
        m = load(prefers_openvino, threads=1)
    assert m.backend == "onnxruntime" and m.backend_chosen_by == "default"
    assert m.backend_note.startswith("the manifest prefers openvino, not used here: openvino cannot be imported")
    rep = m.benchmark(runs=3, warmup=1)
    assert (rep["backend"], rep["backend_preferred"], rep["backend_note"]) == ("onnxruntime", "openvino",
                                                                               m.backend_note)
    from edgekit.runtime.report import bench_table

    assert m.backend_note in bench_table([rep])


def test_device_side_follows_the_manifest(prefers_openvino):
    """python -m edgekit.runtime check and the release health check load through the same path."""
    import subprocess
    import sys

    from edgekit.runtime.releases import health_check

    r = subprocess.run([sys.executable, "-m", "edgekit.runtime", "check", str(prefers_openvino), "--json"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    assert (res["ok"], res["backend"], res["backend_preferred"], res["backend_note"]) == (True, "openvino",
                                                                                         "openvino", None)
    h = health_check(prefers_openvino)
    assert h["ok"] and h["backend"] == "openvino"
