"""Each source format, the MLPerf Tiny models, multi-input models, ONNX sources."""

import numpy as np
import pytest

from conftest import MODELS
from edgekit.bundle import read_bundle
from edgekit.convert import Calibration, ConvertRecipe, convert
from edgekit.errors import BudgetMissed, SourceModelError
from edgekit.runtime import load
from edgekit.runtime.check import golden_check
from imagegen import natural_patches, recognised


def test_resnet8_h5(tmp_path):
    """MLPerf Tiny ResNet-8 (.h5, Keras 3): converts, runs, keeps top-1 agreement.

    Inputs: natural-image crops (no CIFAR-10 here). On the crops the float model commits
    to (top-1 >= 0.6) agreement must be >= 97%; on all crops, no worse than MLPerf Tiny's
    own reference INT8 model. Plain full INT8 is compared (no rescue): on these out-of-distribution
    crops its output SNR (~17.5 dB) is under convert's default floor, where convert would rescue it
    with float layers (benchmarks/faithful_bench.py), and MLPerf's model is full INT8.
    """
    import keras

    from edgekit.convert import Floor, Search
    from edgekit.runtime.check import needs_reference

    np.savez(tmp_path / "calib.npz", natural_patches(300, 0, 32))
    xv = natural_patches(300, 1, 32)
    np.savez(tmp_path / "val.npz", xv)
    r = convert(ConvertRecipe(str(MODELS / "pretrainedResnet.h5"), ["rpi4"],
                              calibration=Calibration(str(tmp_path / "calib.npz")),
                              validation=str(tmp_path / "val.npz"), floor=Floor(min_snr_db=15.0, min_agreement=0.85),
                              search=Search(rescue=False)), str(tmp_path / "out"))
    assert r.source["kind"] == "keras-h5"
    ref = keras.models.load_model(MODELS / "pretrainedResnet.h5", compile=False).predict(xv, verbose=0)
    sure = recognised(ref)
    assert sure.sum() >= 100
    theirs = load(MODELS / "pretrainedResnet_quant.tflite")(xv).argmax(1) == ref.argmax(1)
    for b in r.bundles:   # in the target's numerics (rpi4's S8S8 ONNX saturates on x86 without VNNI)
        agree = load(b.path, reference_numerics=needs_reference(read_bundle(b.path).manifest))(xv).argmax(1) \
            == ref.argmax(1)
        assert agree[sure].mean() >= 0.97, (b.path.name, agree[sure].mean())
        assert agree.mean() >= theirs.mean(), (b.path.name, agree.mean(), theirs.mean())
        assert golden_check(load(b.path))["ok"]
    ours = len(r.bundles[0].artifact.data)
    assert ours <= (MODELS / "pretrainedResnet_quant.tflite").stat().st_size  # no bigger than MLPerf's


def test_kws_saved_model(tmp_path):
    """MLPerf Tiny KWS DS-CNN as a SavedModel (tf.saved_model.load fails on it)."""
    rng = np.random.default_rng(0)
    # MFCC-like: per-coefficient offsets and scales, smooth over time
    base = rng.normal(0, 1, (400, 1, 10, 1)) * np.linspace(20, 2, 10)[None, None, :, None]
    x = (base + rng.normal(0, 3, (400, 49, 10, 1))).astype(np.float32)
    np.savez(tmp_path / "calib.npz", input_1=x[:300])
    np.savez(tmp_path / "val.npz", input_1=x[300:])
    r = convert(ConvertRecipe(str(MODELS / "kws_ref_model_savedmodel"), ["rpi4"],
                              calibration=Calibration(str(tmp_path / "calib.npz")),
                              validation=str(tmp_path / "val.npz"), name="kws"), str(tmp_path / "out"))
    assert r.source["kind"] == "savedmodel"
    for b in r.bundles:
        assert b.artifact.metrics["top1_agreement"] >= 0.97, (b.fmt, b.artifact.metrics)
        m = load(b.path)
        assert m.inputs[0].name == "input_1"
        assert golden_check(m)["ok"]


def test_vww_h5_through_the_tf_keras_fallback(tmp_path):
    """vww_96.h5 has a config Keras 3 rejects: loaded with tf_keras, converted, agreeing."""
    import tf_keras

    x = natural_patches(160, 2, 96, scale=1 / 255)
    np.save(tmp_path / "calib.npy", x[:100])
    np.save(tmp_path / "val.npy", x[100:])
    r = convert(ConvertRecipe(str(MODELS / "vww_96.h5"), ["rpi4"],
                              calibration=Calibration(str(tmp_path / "calib.npy")),
                              validation=str(tmp_path / "val.npy"), formats=["tflite"]), str(tmp_path / "out"))
    assert r.source["kind"] == "tf_keras-h5" and "tf_keras" in r.source["notes"][0]
    ref = tf_keras.models.load_model(MODELS / "vww_96.h5", compile=False).predict(x[100:], verbose=0)
    agree = load(r.bundles[0].path)(x[100:]).argmax(1) == ref.argmax(1)
    assert agree.mean() >= 0.97, agree.mean()


def _two_input_model(path, seed=None):
    """seed: Keras' initializers seeded (keras.utils.set_random_seed), else random weights."""
    import keras

    if seed is not None:
        keras.utils.set_random_seed(seed)
    a = keras.Input((6,), name="sensor")
    b = keras.Input((4, 4, 1), name="patch")
    hb = keras.layers.Flatten()(keras.layers.Conv2D(4, 3, activation="relu")(b))
    h = keras.layers.Concatenate()([keras.layers.Dense(8, activation="relu")(a), hb])
    out1 = keras.layers.Dense(3, name="cls")(h)
    out2 = keras.layers.Dense(1, name="score")(h)
    m = keras.Model([a, b], [out1, out2])
    m.save(path)
    return m


def test_multi_input_multi_output_keras(tmp_path):
    km = _two_input_model(tmp_path / "two.keras")
    rng = np.random.default_rng(0)
    data = {"sensor": rng.normal(size=(120, 6)).astype(np.float32),
            "patch": rng.uniform(size=(120, 4, 4, 1)).astype(np.float32)}
    np.savez(tmp_path / "calib.npz", **data)
    # compat in the x86 venv: under arm64 emulation tflite-runtime 2.14 segfaults on this model
    # (see test_emulated.py::test_runtime_crash_on_arm_fails_conversion)
    r = convert(ConvertRecipe(str(tmp_path / "two.keras"), ["rpi4"],
                              calibration=Calibration(str(tmp_path / "calib.npz")), compat_check="venv"),
                              str(tmp_path / "out"))
    assert r.calibration["validation_samples"] == 24  # held out: last 20%
    for b in r.bundles:
        m = load(b.path)
        assert sorted(s.name for s in m.inputs) == ["patch", "sensor"]
        out = m.run(sensor=data["sensor"][:5], patch=data["patch"][:5])
        assert len(out) == 2
        ref = km.predict([data["sensor"][:5], data["patch"][:5]], verbose=0)
        shapes = sorted(v.shape for v in out.values())
        assert shapes == sorted(v.shape for v in ref)
        assert golden_check(m)["ok"]


def test_onnx_source_builds_onnx_at_each_profiles_opset(tmp_path, digits):
    import keras
    import onnx

    from edgekit.convert.onnx import saved_model_to_onnx

    model, calib, val = digits
    keras.models.load_model(model).export(str(tmp_path / "sm"), verbose=False)
    (tmp_path / "digits13.onnx").write_bytes(saved_model_to_onnx(tmp_path / "sm", 13))
    (tmp_path / "digits17.onnx").write_bytes(saved_model_to_onnx(tmp_path / "sm", 17))
    np.savez(tmp_path / "calib.npz", np.load(calib)["image"])
    r = convert(ConvertRecipe(str(tmp_path / "digits13.onnx"), ["x86-avx2", "jetson-nano"], formats=("onnx",),
                              calibration=Calibration(str(tmp_path / "calib.npz")), validation=str(val)),
                              str(tmp_path / "out"))
    assert r.source["kind"] == "onnx"
    assert {(b.target, b.fmt) for b in r.bundles} == {("x86-avx2", "onnx"), ("jetson-nano", "onnx")}
    for b in r.bundles:
        assert b.artifact.metrics["accuracy_drop_points"] <= 1.0
        opset = onnx.load(str(read_bundle(b.path).model_path)).opset_import[0].version
        assert opset == (17 if b.target == "x86-avx2" else 13)  # the profile's opset
        assert golden_check(load(b.path))["ok"]
    # opset 17 -> 13 has no adapter for Shape: a clear error in that row, nothing written, exit 1
    with pytest.raises(BudgetMissed, match="opset 17 and the target needs 13"):
        convert(ConvertRecipe(str(tmp_path / "digits17.onnx"), ["jetson-nano"], formats=("onnx",),
                              calibration=Calibration(str(tmp_path / "calib.npz"))), str(tmp_path / "o1"))
    assert not (tmp_path / "o1" / "digits17-jetson-nano").exists()


def test_tflite_is_not_a_source(tmp_path):
    with pytest.raises(SourceModelError, match="already converted"):
        convert(ConvertRecipe(str(MODELS / "pretrainedResnet_quant.tflite"), ["rpi4"],
                              calibration=Calibration(random=True)), str(tmp_path))
