"""Quantization-aware training: a model post-training INT8 cannot handle, recovered in full INT8."""

import json

import keras
import numpy as np
import pytest

from edgekit.bundle import read_bundle


def make_spread(model_path, out_path, seed=0):
    """The digits CNN with every fc1 unit scaled by its own factor in [1, 1000] (log-uniform)
    and its outgoing weights divided by it: the same function in float, but fc1's units now
    span three decades. One per-tensor INT8 range cannot hold them all: min/max calibration
    crushes the small units, a clip saturates the large ones."""
    m = keras.models.load_model(model_path)
    W, b = m.get_layer("fc1").get_weights()
    W2, b2 = m.get_layer("logits").get_weights()
    s = np.exp(np.random.default_rng(seed).uniform(0.0, np.log(1000.0), W.shape[1])).astype(np.float32)
    m.get_layer("fc1").set_weights([W * s, b * s])
    m.get_layer("logits").set_weights([W2 / s[:, None], b2])
    m.save(out_path)
    return out_path


@pytest.fixture(scope="module")
def spread(digits, tmp_path_factory):
    model, calib, val = digits
    return make_spread(model, tmp_path_factory.mktemp("qat") / "spread.keras"), model.parent / "train.npz", val


def test_qat_meets_a_budget_post_training_int8_misses_in_full_int8(cli, spread, tmp_path):
    model, train, val = spread
    r = cli("convert", model, "-t", "rpi4", "--calib", train, "--val", val, "--max-accuracy-drop", "1",
            "--no-rescue", "--compat-check", "off", "--out", tmp_path / "ptq")
    assert r.exit_code == 1 and "edgekit qat" in r.stderr
    ptq = json.loads((tmp_path / "ptq" / "spread.convert.json").read_text())["bundles"]
    assert all(b["status"] == "failed" and b["failure"]["validation"]["accuracy_drop_points"] > 1.0 for b in ptq)
    assert not any((tmp_path / "ptq").glob("spread-rpi4*"))      # below the floor: not written

    r = cli("qat", model, "--data", train, "--val", val, "-t", "rpi4", "--max-accuracy-drop", "1",
            "--out", tmp_path / "qat")
    assert r.exit_code == 0, r.stdout + r.stderr
    assert "QAT vs post-training INT8" in r.stdout
    rep = json.loads((tmp_path / "qat" / "spread-qat.qat.json").read_text())
    assert {(b["target"], b["format"]) for b in rep["bundles"]} == {("rpi4", "tflite"), ("rpi4", "onnx")}
    for b in rep["bundles"]:
        assert b["float_ops"] == {}                      # full INT8, nothing kept in float
        assert b["qat_drop"] <= 1.0 < b["ptq_drop"] and b["within_budget"]
        bundle = read_bundle(b["bundle"])
        assert bundle.manifest["source"]["qat"] and bundle.manifest["model"]["precision"] == "int8"
        from edgekit.runtime import load
        from edgekit.runtime.check import golden_check

        assert golden_check(load(bundle.path))["ok"]
        if b["format"] == "tflite":   # and the oldest runtime the target names loads it and agrees
            assert bundle.manifest["compatibility"][0]["ok"]
    assert rep["plan"]["points"] == ["conv1", "conv2", "fc1", "logits"]
    fc1 = next(x for x in rep["ranges"] if x["point"] == "fq_fc1")
    assert fc1["clip"] < 1.0            # the calibrated range clips fc1's outliers (min/max would not)


def test_fake_quantized_model_is_what_the_converters_build(spread, tmp_path):
    """The saved QAT model run with its fake quantization gives the INT8 bundles' outputs."""
    from edgekit.convert import Calibration, ConvertRecipe, convert
    from edgekit.convert import fakequant as fq
    from edgekit.optimize import qat as Q
    from edgekit.runtime import load

    model, train, val = spread
    src = keras.models.load_model(model)
    x = np.load(train)["image"]
    q, _ = Q.quantized_model(src)
    Q.calibrate(q, src, x[:128], say=lambda s: None)
    fq.bake(q)
    q.save(tmp_path / "q.keras")
    res = convert(ConvertRecipe(str(tmp_path / "q.keras"), ["rpi4"], calibration=Calibration(str(train)),
                                validation=str(val), compat_check="off"), str(tmp_path / "b"))
    xv = np.load(val)["image"][:64]
    with fq.mode("fakequant"):
        want = keras.models.load_model(tmp_path / "q.keras").predict(xv, verbose=0)
    from edgekit.runtime.check import needs_reference

    for b in res.bundles:   # in the target's numerics (an x86 host without VNNI saturates on rpi4's S8S8)
        m = load(b.path, reference_numerics=needs_reference(read_bundle(b.path).manifest))
        got = next(iter(m.run(image=xv).values()))
        step = (want.max() - want.min()) / 255
        assert np.abs(got - want).max() <= 2.5 * step, b.fmt
        assert (got.argmax(-1) == want.argmax(-1)).mean() >= 0.98


def test_folding_and_points_on_a_residual_depthwise_model(tmp_path):
    """BatchNorm folds exactly; points sit after fused activations and adds; DepthwiseConv2D
    weights are per channel; the result converts to full INT8 in both formats."""
    from edgekit.convert import Calibration, ConvertRecipe, convert
    from edgekit.convert import fakequant as fq
    from edgekit.optimize import qat as Q

    keras.utils.set_random_seed(1)
    inp = keras.Input((16, 16, 3), name="x")
    h = keras.layers.Conv2D(8, 3, padding="same", use_bias=False, name="c1")(inp)
    h = keras.layers.BatchNormalization(name="bn1")(h)
    h = keras.layers.ReLU(name="r1")(h)
    d = keras.layers.DepthwiseConv2D(3, padding="same", depth_multiplier=2, name="dw")(h)
    d = keras.layers.BatchNormalization(name="bn2")(d)
    d = keras.layers.Conv2D(8, 1, name="pw")(d)
    h = keras.layers.Add(name="add")([h, d])
    h = keras.layers.Activation("relu", name="r2")(h)
    h = keras.layers.GlobalAveragePooling2D(name="gap")(h)
    out = keras.layers.Dense(4, activation="softmax", name="head")(h)
    m = keras.Model(inp, out)
    x = np.random.default_rng(0).normal(size=(64, 16, 16, 3)).astype(np.float32)
    for bn in ("bn1", "bn2"):   # non-trivial statistics, so that folding has something to get wrong
        layer = m.get_layer(bn)
        n = layer.gamma.shape[0]
        layer.set_weights([np.linspace(0.5, 2, n), np.linspace(-1, 1, n), np.linspace(-0.3, 0.3, n),
                           np.linspace(0.5, 3, n)])

    plan = Q.analyse(m)
    assert plan["folded"] == {"bn1": "c1", "bn2": "dw"}
    assert plan["points"] == ["r1", "bn2", "pw", "r2", "head"]   # bn2: the depthwise output, folded
    q, info = Q.quantized_model(m)
    # gap: average pooling requantizes onto its input's range; head: softmax split off its dense
    assert info["fake_quant"] == ["fq_x", "fq_r1", "fq_bn2", "fq_pw", "fq_r2", "fq_gap", "fq_head_pre", "fq_head"]
    assert q.get_layer("fq_gap").same_as == "fq_r2"
    with fq.mode("float"):
        np.testing.assert_allclose(q.predict(x, verbose=0), m.predict(x, verbose=0), atol=1e-5)
    Q.calibrate(q, m, x, say=lambda s: None)
    fq.bake(q)
    assert float(q.get_layer("fq_gap").hi.numpy()) == float(q.get_layer("fq_r2").hi.numpy())
    q.save(tmp_path / "q.keras")
    np.savez(tmp_path / "c.npz", x=x)
    res = convert(ConvertRecipe(str(tmp_path / "q.keras"), ["rpi4"], calibration=Calibration(str(tmp_path / "c.npz")),
                                compat_check="off"), str(tmp_path / "b"))
    for b in res.bundles:
        assert b.artifact.float_ops == {}, (b.fmt, b.artifact.float_ops)
        assert b.artifact.metrics["top1_agreement"] >= 0.90


def test_qat_bad_input(cli, spread, tmp_path):
    model, train, val = spread
    r = cli("qat", model, "--data", train, "-t", "rpi4", "--epochs", "-1", "--out", tmp_path)
    assert r.exit_code == 2 and "--epochs must be >= 0" in r.stderr
    r = cli("qat", tmp_path / "nope.keras", "--data", train, "-t", "rpi4", "--out", tmp_path)
    assert r.exit_code == 2 and "model file not found" in r.stderr
    (tmp_path / "m.tflite").write_bytes(b"x")
    r = cli("qat", tmp_path / "m.tflite", "--data", train, "-t", "rpi4", "--out", tmp_path)
    assert r.exit_code == 2 and "Keras model file" in r.stderr
    assert not list(tmp_path.glob("*.keras"))


def test_a_qat_model_converts_to_int8_only(cli, spread, tmp_path):
    from edgekit.convert import fakequant as fq
    from edgekit.optimize import qat as Q

    model, train, val = spread
    q, _ = Q.quantized_model(keras.models.load_model(model))
    Q.calibrate(q, keras.models.load_model(model), np.load(train)["image"][:64], say=lambda s: None)
    fq.bake(q)
    q.save(tmp_path / "q.keras")
    r = cli("convert", tmp_path / "q.keras", "-t", "rpi4", "--calib", train, "--precision", "int16x8",
            "--out", tmp_path / "o")
    assert r.exit_code == 2 and "INT8 only" in r.stderr
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").iterdir())


def test_weight_grid_follows_the_coarsest_build(spread, tmp_path):
    """ONNX Runtime's reduce_range builds (x86-avx2) take 7-bit weights: QAT trains on that grid."""
    from edgekit.convert import fakequant as fq
    from edgekit.optimize import qat as Q
    from edgekit.targets import load_target

    assert Q.weight_levels_for([load_target("rpi4")]) == 127
    assert Q.weight_levels_for([load_target("rpi4"), load_target("x86-avx2")]) == 64
    assert Q.weight_levels_for([load_target("x86-avx2")], formats=["tflite"]) == 127
    model, _, _ = spread
    q, info = Q.quantized_model(keras.models.load_model(model), weight_levels=64)
    fq.bake(q)
    q.save(tmp_path / "q.keras")
    layer = keras.models.load_model(tmp_path / "q.keras").get_layer("fc1")
    assert layer.weight_levels == 64
    k = layer.get_weights()[0]
    steps = k / (np.abs(k).max(0) / 64)
    np.testing.assert_allclose(steps, np.round(steps), atol=1e-3)
    assert np.abs(np.round(steps)).max() == 64


def test_sequential_model_and_batchnorm_after_an_activation():
    """A Sequential model works as its functional graph; a BatchNorm after a ReLU'd conv is not
    folded (folding it would move it before the ReLU: another function)."""
    from edgekit.convert import fakequant as fq
    from edgekit.optimize import qat as Q

    m = keras.Sequential([keras.Input((8, 8, 1)), keras.layers.Conv2D(8, 3, activation="relu", name="c"),
                          keras.layers.BatchNormalization(name="bn"), keras.layers.MaxPooling2D(),
                          keras.layers.Flatten(), keras.layers.Dense(10, name="d")])
    m.get_layer("bn").set_weights([np.linspace(0.5, 2, 8), np.linspace(-1, 1, 8), np.linspace(-0.3, 0.3, 8),
                                   np.linspace(0.5, 3, 8)])
    plan = Q.analyse(m)
    assert plan == {"folded": {}, "points": ["c", "bn", "d"]}
    q, _ = Q.quantized_model(m)
    x = np.random.default_rng(0).uniform(0, 1, (16, 8, 8, 1)).astype(np.float32)
    with fq.mode("float"):
        np.testing.assert_allclose(q.predict(x, verbose=0), m.predict(x, verbose=0), atol=1e-5)
