"""Accuracy-aware mixed precision on a deliberately quantization-sensitive model."""

import json

import numpy as np
import pytest

from edgekit.bundle import read_bundle


def make_sensitive(model_path, out_path):
    """The digits CNN with one fc1 unit scaled x1000 and its outgoing weights /1000: the same
    function in float (ReLU is positively homogeneous), but fc1's output now spans a range
    1000x wider, so per-tensor INT8 activations crush every other unit."""
    import keras

    m = keras.models.load_model(model_path)
    W, b = m.get_layer("fc1").get_weights()
    W2, b2 = m.get_layer("logits").get_weights()
    k = int(np.argmax(np.abs(W2).sum(1)))
    W[:, k] *= 1000.0
    b[k] *= 1000.0
    W2[k, :] /= 1000.0
    m.get_layer("fc1").set_weights([W, b])
    m.get_layer("logits").set_weights([W2, b2])
    m.save(out_path)
    return out_path


@pytest.fixture(scope="module")
def sensitive(digits, tmp_path_factory):
    model, calib, val = digits
    return make_sensitive(model, tmp_path_factory.mktemp("sens") / "sensitive.keras"), calib, val


@pytest.mark.parametrize("target, fmt", [("rpi4", "tflite"), ("rpi4", "onnx")])
def test_mixed_precision_meets_a_budget_plain_int8_misses(cli, sensitive, tmp_path, target, fmt):
    model, calib, val = sensitive
    args = [model, "-t", target, "--format", fmt, "--calib", calib, "--val", val, "--max-accuracy-drop", "1"]
    r = cli("convert", *args, "--no-rescue", "--out", tmp_path / "plain")
    assert r.exit_code == 1
    plain = json.loads((tmp_path / "plain" / "sensitive.convert.json").read_text())["bundles"][0]
    assert plain["failure"]["validation"]["accuracy_drop_points"] > 50  # INT8 alone is useless here

    r = cli("convert", *args, "--out", tmp_path / "mixed")
    assert r.exit_code == 0, r.stdout + r.stderr
    assert "rescue ladder for" in r.stdout and "float for the worst layers" in r.stdout
    b = read_bundle(next(p for p in (tmp_path / "mixed").iterdir() if p.is_dir()))
    m = b.manifest
    assert m["model"]["rescued_by"] == "float for the worst layers"
    assert [s["rung"] for s in m["rescue"]][-1] == "float layers"   # every earlier rung tried and recorded
    mp = m["mixed_precision"]
    assert mp["met"] and {"fc1", "logits"} <= set(mp["float_layers"])
    assert m["validation"]["accuracy_drop_points"] <= 1.0
    assert m["model"]["precision"] == "int8+float"
    assert [s["layer"] for s in mp["sensitivity"]][:2] == ["fc1", "logits"] or \
        {"fc1", "logits"} <= {s["layer"] for s in mp["sensitivity"][:3]}
    assert mp["full_int8"]["drop"] > 50 and all("bytes" in st and "p50_ms" in st for st in mp["steps"])
    if fmt == "tflite":  # the mixed artifact is checked in tflite-runtime 2.14 like any other
        assert b.manifest["compatibility"][0]["ok"]


def test_search_first_and_time_budget(sensitive, tmp_path):
    from edgekit.convert import Calibration, ConvertRecipe, Floor, Search, convert
    from edgekit.errors import BudgetMissed

    model, calib, val = sensitive
    r = convert(ConvertRecipe(str(model), ["rpi4"], calibration=Calibration(str(calib)), validation=str(val),
                              formats=["tflite"], floor=Floor(max_accuracy_drop=1.0), search=Search(first=True)),
                              str(tmp_path / "first"))
    mp = r.bundles[0].artifact.mixed
    assert mp["met"] and mp["steps"][-1]["meets_budget"] and "first candidate" in mp["stopped"]
    assert sum(st["meets_budget"] for st in mp["steps"]) == 1
    with pytest.raises(BudgetMissed):
        convert(ConvertRecipe(str(model), ["rpi4"], calibration=Calibration(str(calib)), validation=str(val),
                              formats=["tflite"], floor=Floor(max_accuracy_drop=1.0), search=Search(seconds=0)),
                              str(tmp_path / "none"))
    rep = json.loads((tmp_path / "none" / "sensitive.convert.json").read_text())["bundles"][0]
    assert rep["status"] == "failed"
    assert any("search budget of 0 s spent" in (st["error"] or "") for st in rep["failure"]["rescue"])


def test_precision_rungs(digits, tmp_path, cli):
    """int16x8: 16-bit activations, 8-bit weights (higher SNR at INT8 size); fp16 for GPU targets only."""
    from edgekit.convert import Calibration, ConvertRecipe, convert
    from edgekit.runtime import load
    from edgekit.runtime.check import golden_check

    model, calib, val = digits
    base = convert(ConvertRecipe(str(model), ["jetson-orin"], calibration=Calibration(str(calib)),
                                 validation=str(val)), str(tmp_path / "i8"))
    r16 = convert(ConvertRecipe(str(model), ["jetson-orin"], calibration=Calibration(str(calib)), validation=str(val),
                                precision="int16x8"), str(tmp_path / "i16"))
    fp = convert(ConvertRecipe(str(model), ["jetson-orin"], calibration=Calibration(str(calib)), validation=str(val),
                               precision="fp16"), str(tmp_path / "fp16"))

    def snr(r, fmt):
        b = next(b for b in r.bundles if b.fmt == fmt)
        m = b.artifact.metrics
        return m["outputs"][m["primary_output"]]["snr_db"], len(b.artifact.data), b

    for fmt in ("tflite", "onnx"):
        s8, n8, _ = snr(base, fmt)
        s16, n16, b16 = snr(r16, fmt)
        sfp, nfp, bfp = snr(fp, fmt)
        assert s16 > s8 + 3 and n16 < 1.2 * n8, (fmt, s8, s16, n8, n16)
        assert sfp > s16 and 1.5 * n8 < nfp < 0.6 * bfp.artifact.float_bytes * 1.2, (fmt, nfp)
        assert read_bundle(b16.path).manifest["model"]["precision"] == "int16x8"
        assert read_bundle(bfp.path).manifest["model"]["precision"] == "fp16"
        cpu = ["CPUExecutionProvider"]  # Jetson bundles ask for TensorRT/CUDA first; none here
        assert golden_check(load(b16.path, providers=cpu))["ok"] and golden_check(load(bfp.path, providers=cpu))["ok"]
    r = cli("convert", model, "-t", "rpi4", "--precision", "fp16", "--calib", calib, "--out", tmp_path / "x")
    assert r.exit_code == 2 and "no FP16 path" in r.stderr
