"""Faithful figures: the target's numerics, the fidelity floor and its rescue, per-row failures,
transformers in both formats (INT8 and dynamic), recipes that rebuild, a quiet terminal."""

import hashlib
import json

import numpy as np
import pytest

from conftest import MODELS, bundle_of, run_cli_process
from edgekit.bundle import read_bundle
from edgekit.convert.numerics import this_host
from edgekit.convert.validate import floor_misses
from edgekit.runtime import load
from edgekit.runtime.check import snr_db


def test_arm_onnx_figures_are_the_targets_not_this_hosts(digits, digits_build):
    """rpi4's S8S8 ONNX artifact on an x86 host: what convert reports and the golden outputs are what
    exact integer arithmetic (the Pi) computes, on AVX2-only and VNNI hosts alike."""
    _, _, val = digits
    b = bundle_of(digits_build, "rpi4", "onnx")
    man = read_bundle(b.path).manifest
    x = np.load(val)["image"]
    ref = load(b.path, reference_numerics=True, providers=["CPUExecutionProvider"])   # exact: the Pi's result
    host = load(b.path, providers=["CPUExecutionProvider"])                          # this host's kernels
    want = ref(x)
    assert man["validation"]["numerics"]["mode"] == ("host" if this_host().exact_int8 else "reference")
    reported = man["validation"]["outputs"][man["validation"]["primary_output"]]["snr_db"]
    import keras

    flt = keras.models.load_model(digits[0]).predict(x, verbose=0)
    assert abs(reported - snr_db(flt, want)) < 1.0, (reported, snr_db(flt, want))
    g = read_bundle(b.path).golden()
    got = ref(g["input:image"])
    assert snr_db(g[f"output:{b.artifact.outputs[0]['name']}"], got) > 35
    if this_host().exact_int8:        # VNNI / ARM host: its kernels are the target's, within rounding
        assert snr_db(want, host(x)) > 30
    else:                             # AVX2 without VNNI: the host saturates; convert did not use it
        assert snr_db(flt, host(x)) < reported - 3
    assert reported >= 20 and man["validation"]["top1_agreement"] >= 0.9


@pytest.fixture(scope="module")
def fragile(digits, tmp_path_factory):
    """A model built to break plain INT8: one fc1 unit x1000 (its outgoing weights /1000, the same
    float function), so one range serves no unit of fc1."""
    from test_mixed import make_sensitive

    model, calib, val = digits
    return make_sensitive(model, tmp_path_factory.mktemp("fragile") / "fragile.keras"), calib, val


def test_below_the_floor_is_rescued_or_refused_never_shipped(fragile, tmp_path, cli):
    model, calib, val = fragile
    r = cli("convert", model, "-t", "rpi4", "--calib", calib, "--val", val, "--no-mixed-precision",
            "--compat-check", "off", "--out", tmp_path / "o", "--json")
    rep = json.loads(r.stdout)
    assert r.exit_code == (1 if any(b["status"] == "failed" for b in rep["bundles"]) else 0)
    for row in rep["bundles"]:
        steps = row["rescue"] if row["status"] == "written" else row["failure"]["rescue"]
        assert steps[0]["rung"] == "profile" and not steps[0]["meets"] and steps[0]["misses"]  # plain INT8 misses
        assert len({s["rung"] for s in steps}) >= 3          # the ladder was walked, each step recorded
        if row["status"] == "written":
            from edgekit.convert.recipe import Floor

            assert floor_misses(row["validation"], Floor()) == [] and row["rescued_by"] == steps[-1]["what"]
            assert read_bundle(row["path"]).manifest["rescue"][-1]["meets"]
        else:
            assert not (tmp_path / "o" / row["path"].split("/")[-1]).exists()
            assert "even after the rescue ladder" in row["failure"]["reason"]


@pytest.fixture(scope="module")
def encoder(tmp_path_factory):
    from seqmodels import train_encoder

    d = tmp_path_factory.mktemp("encoder")
    return train_encoder(d), d / "calib.npz", d / "val.npz"


def test_transformer_converts_in_both_formats_int8_and_dynamic(encoder, tmp_path):
    """MultiHeadAttention, LayerNormalization, exact GELU (tf2onnx's Erfc rewritten), softmax, residual adds."""
    import onnx

    from edgekit.convert import Calibration, ConvertRecipe, convert

    model, calib, val = encoder
    figures = {}
    for precision in ("int8", "dynamic"):
        r = convert(ConvertRecipe(str(model), ("rpi4", "x86-avx2"), calibration=Calibration(str(calib)),
                                  validation=str(val), precision=precision, compat_check="venv"),
                    str(tmp_path / precision))
        assert {(b.target, b.fmt) for b in r.written} == {("rpi4", "tflite"), ("rpi4", "onnx"),
                                                          ("x86-avx2", "onnx"), ("x86-avx2", "tflite")}
        for b in r.written:
            m = b.artifact.metrics
            assert m["accuracy_float"] >= 0.9 and m["accuracy_drop_points"] <= 2.0, (precision, b.path.name, m)
            figures[(precision, b.path.name)] = (m["accuracy_quant"], len(b.artifact.data))
            if b.fmt == "onnx":
                ops = {n.op_type for n in onnx.load(str(b.path / "model.onnx")).graph.node}
                assert "Erfc" not in ops
                assert ("MatMulInteger" in ops) if precision == "dynamic" else ("QuantizeLinear" in ops)
                if precision == "int8":   # the quantizer's long Q/DQ names made it 1.97x the float ONNX
                    assert len(b.artifact.data) < b.artifact.float_bytes, (b.path.name, len(b.artifact.data))
            assert read_bundle(b.path).manifest["model"]["precision"] == precision
    assert figures[("dynamic", "encoder-rpi4")][1] < figures[("int8", "encoder-rpi4")][1] * 1.5


def _tflite_gelus(path):
    """approximate flag of each GELU op in a .tflite file."""
    from tensorflow.lite.tools import flatbuffer_utils as fu

    m = fu.read_model(str(path))
    return [op.builtinOptions.approximate for op in m.subgraphs[0].operators
            if fu.opcode_to_name(m, op.opcodeIndex) == "GELU"]


def test_tanh_gelu_transformer_converts_in_both_formats(encoder, tmp_path):
    """The same encoder with tanh-approximate GELU (keras.activations.gelu(approximate=True), the trained
    weights kept): INT8 TFLite (a GELU op, approximate) and INT8 ONNX (Tanh, Pow; no Erf) meet the floor."""
    import onnx

    from edgekit.convert import Calibration, ConvertRecipe, convert
    from seqmodels import with_tanh_gelu

    model, calib, val = encoder
    tanh = with_tanh_gelu(model, tmp_path / "encoder_tanh.keras")
    r = convert(ConvertRecipe(str(tanh), ("rpi4",), calibration=Calibration(str(calib)), validation=str(val),
                              compat_check="off"), str(tmp_path / "o"))
    assert {b.fmt for b in r.written} == {"tflite", "onnx"}, [b.failure for b in r.failed]
    for b in r.written:
        m = b.artifact.metrics
        assert m["accuracy_float"] >= 0.9 and m["accuracy_drop_points"] <= 2.0, (b.path.name, m)
        assert read_bundle(b.path).manifest["model"]["precision"] == "int8"
    onnx_b = next(b for b in r.written if b.fmt == "onnx")
    ops = {n.op_type for n in onnx.load(str(onnx_b.path / "model.onnx")).graph.node}
    assert {"Tanh", "QuantizeLinear"} <= ops and not ops & {"Erf", "Erfc"}, ops
    assert len(onnx_b.artifact.data) < onnx_b.artifact.float_bytes
    gelus = _tflite_gelus(next(b for b in r.written if b.fmt == "tflite").path / "model.tflite")
    assert gelus and all(gelus), gelus


def test_one_artifacts_failure_is_a_row_not_an_abort(encoder, tmp_path):
    """TFLite has no 16-bit SquaredDifference kernel (LayerNormalization): that row fails, with the op
    named, in one line; the ONNX row is written; exit 1; no traceback."""
    model, calib, val = encoder
    p = run_cli_process("convert", model, "-t", "rpi4", "--precision", "int16x8", "--calib", calib, "--val", val,
                        "--compat-check", "off", "-q", "--out", tmp_path / "o")
    assert p.returncode == 1, p.stdout + p.stderr
    assert "Traceback" not in p.stderr and len(p.stderr.strip().splitlines()) == 1, p.stderr
    assert "SquaredDifference" in p.stderr and "FAILED" in p.stdout
    assert (tmp_path / "o" / "encoder-rpi4-onnx" / "manifest.json").is_file()
    assert not (tmp_path / "o" / "encoder-rpi4").exists()
    rep = json.loads((tmp_path / "o" / "encoder.convert.json").read_text())
    assert [b["status"] for b in rep["bundles"]] == ["failed", "written"]


def test_a_manifests_recipe_rebuilds_the_same_bundle(digits, tmp_path, cli):
    model, calib, val = digits
    r = cli("convert", model, "-t", "rpi4", "--calib", calib, "--val", val, "--compat-check", "off",
            "--out", tmp_path / "a")
    assert r.exit_code == 0, r.stderr
    r = cli("convert", "--recipe", tmp_path / "a" / "digits-rpi4", "--out", tmp_path / "b")
    assert r.exit_code == 0, r.stderr
    for name in ("digits-rpi4", "digits-rpi4-onnx"):
        a, b = (read_bundle(tmp_path / o / name).manifest for o in ("a", "b"))
        assert a["recipe"] == b["recipe"]
        assert a["model"]["sha256"] == b["model"]["sha256"], name    # both converters are deterministic
        assert hashlib.sha256((tmp_path / "b" / name / a["model"]["file"]).read_bytes()).hexdigest() == \
            a["model"]["sha256"]


def test_the_terminal_gets_edgekits_lines_the_log_gets_the_libraries(tmp_path):
    """A Keras 2 .h5 goes through tf_keras's model.export(), which prints its whole signature listing;
    that and every converter line go to OUT/<name>.convert.log, named in the report."""
    p = run_cli_process("convert", MODELS / "vww_96.h5", "-t", "rpi4", "--format", "tflite", "--calib-random",
                        "--calib-samples", "8", "--compat-check", "off", "--out", tmp_path / "o")
    assert p.returncode == 0, p.stderr[-3000:]
    out = p.stdout + p.stderr
    assert "Saved artifact at" not in out and "Captures:" not in out
    log = (tmp_path / "o" / "vww_96.convert.log").read_text()
    assert "Saved artifact at" in log
    assert f"log: {tmp_path / 'o' / 'vww_96.convert.log'}" in p.stdout
