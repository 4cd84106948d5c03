"""The rescue ladder's first rung for TFLite: activation ranges chosen per tensor by the error they
cause in the model's outputs (convert.tflite_ranges), on a model whose plain INT8 build misses the
floor because one activation's min/max range is taken by rare outliers."""

import json

import numpy as np
import pytest

from edgekit.bundle import read_bundle
from edgekit.runtime import load
from edgekit.runtime.check import snr_db


def spiky_mlp(d, spike=60.0, share=0.1, fire=0.02):
    """A digits MLP (64 -> fc1 48 relu -> 10 logits), trained here, then given one fc1 unit that fires
    on ~2% of inputs with values ~60x the other units' largest (the outlier features of large models,
    a sensor glitch): min/max calibration gives that unit's few firings fc1's whole INT8 range, while
    a firing moves the logits only a little (its outgoing weights are small). The float model, with
    that unit, is the reference."""
    import keras
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    x = (x / 16.0).astype(np.float32)
    keras.utils.set_random_seed(0)
    m = keras.Sequential([keras.Input((64,), name="pixels"), keras.layers.Dense(48, activation="relu", name="fc1"),
                          keras.layers.Dense(10, name="logits")])
    m.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    m.fit(x[:1200], y[:1200], epochs=30, batch_size=64, verbose=0)
    W, b = m.get_layer("fc1").get_weights()
    W2, b2 = m.get_layer("logits").get_weights()
    h = np.maximum(x @ W + b, 0)
    k = int(np.argmin(np.abs(W2).sum(1) * h.mean(0)))         # the unit the trained model uses least
    rng = np.random.default_rng(0)
    v = rng.normal(size=64).astype(np.float32)
    s = x[:200] @ v                                             # the 200 samples convert calibrates on
    t = np.quantile(s, 1 - fire)
    a = spike * h.max() / (s.max() - t)
    W[:, k], b[k] = a * v, -a * t
    W2[k, :] = rng.normal(size=10) * share * (h @ W2 + b2).std() / (spike * h.max())
    m.get_layer("fc1").set_weights([W, b])
    m.get_layer("logits").set_weights([W2, b2])
    m.save(d / "spiky.keras")
    np.savez(d / "calib.npz", pixels=x[:1200])
    np.savez(d / "val.npz", pixels=x[1297:], labels=y[1297:])
    fired = np.maximum(x[:200] @ W[:, k] + b[k], 0)
    assert 0 < (fired > 0).mean() <= 0.05 and fired.max() > 20 * np.delete(h[:200], k, 1).max()
    return d / "spiky.keras", d / "calib.npz", d / "val.npz"


@pytest.fixture(scope="module")
def spiky(tmp_path_factory):
    return spiky_mlp(tmp_path_factory.mktemp("spiky"))


def _convert(spiky, out, floor=None, mixed=False):
    from edgekit.convert import Calibration, ConvertRecipe, Floor, Search, convert

    model, calib, val = spiky
    return convert(ConvertRecipe(str(model), ("rpi4",), formats=("tflite",), calibration=Calibration(str(calib)),
                                 validation=str(val), compat_check="off", floor=floor or Floor(),
                                 search=Search(mixed_precision=mixed)), str(out))


def test_outlier_range_is_rescued_by_ranges_chosen_by_output_error(spiky, tmp_path):
    import keras

    from edgekit.convert import Floor
    from edgekit.convert.validate import floor_misses, primary_snr

    r = _convert(spiky, tmp_path / "o")
    (b,) = r.bundles
    assert b.ok, b.failure and b.failure.reason
    steps = b.artifact.rescue
    plain, rung = steps[0], steps[-1]
    assert plain["rung"] == "profile" and not plain["meets"] and plain["misses"]    # plain INT8 misses the floor
    assert [s["rung"] for s in steps] == ["profile", "ranges"] and rung["meets"]
    assert b.artifact.rescued_by.startswith("ranges by output error")
    assert rung["snr_db"] >= plain["snr_db"] + 3, (plain, rung)
    search = rung["search"]
    assert search["error_after"] < search["error_before"] and search["ranges"] and search["seconds"] > 0
    assert floor_misses(b.artifact.metrics, Floor()) == []

    # the bundle is what was measured: the profile's int8 I/O, its figures reproduced from the file
    man = read_bundle(b.path).manifest
    assert man["rescue"][-1]["rung"] == "ranges" and man["model"]["precision"] == "int8"
    model, _, val = spiky
    q = load(b.path)
    assert [s.dtype for s in q.inputs] == ["int8"] and [s.dtype for s in q.outputs] == ["int8"]
    x = np.load(val)["pixels"]
    ref = keras.models.load_model(model).predict(x, verbose=0)
    assert abs(snr_db(ref, q(x)) - primary_snr(b.artifact.metrics)) < 0.5
    assert json.loads((tmp_path / "o" / "spiky.convert.json").read_text())["bundles"][0]["rescued_by"] \
        == b.artifact.rescued_by


def test_unedited_ranges_rebuild_the_profiles_build(spiky, tmp_path):
    """The rung's path (calibrate only, edit nothing, TensorFlow's MLIR quantizer) gives the converter's
    own INT8 model: the rung changes ranges and nothing else."""
    import tensorflow as tf

    from edgekit.convert import tflite_ranges as tr
    from edgekit.convert.data import Dataset
    from edgekit.convert.tflite import to_tflite
    from edgekit.targets import TFLiteBuild

    model, calib, val = spiky
    sm = tmp_path / "sm"
    import keras

    keras.models.load_model(model).export(str(sm), verbose=False)
    sig = tf.saved_model.load(str(sm)).signatures["serving_default"]
    name = list(sig.structured_input_signature[1])[0]
    data = Dataset({name: np.load(calib)["pixels"][:200]}, None, str(calib))
    build = TFLiteBuild()
    plain = to_tflite(sm, data, build)
    calibrated = tr.calibrate(sm, data, build)
    same = tr.build_with(sm, calibrated, build, {})
    x = np.load(val)["pixels"]
    outs = []
    for i, blob in enumerate((plain, same)):
        p = tmp_path / f"m{i}.tflite"
        p.write_bytes(blob)
        outs.append(load(p)(x))
    np.testing.assert_array_equal(outs[0], outs[1])


def test_a_rung_that_misses_hands_on_to_the_next(spiky, tmp_path):
    """A floor no 8-bit build meets: the ranges rung is measured and recorded, then the later rungs
    (per-tensor weights, 16-bit activations) are tried in order, and the row fails with every step."""
    from edgekit.convert import Floor
    from edgekit.errors import BudgetMissed

    with pytest.raises(BudgetMissed) as e:
        _convert(spiky, tmp_path / "o", floor=Floor(min_snr_db=80.0, min_agreement=0.9))
    (b,) = e.value.result.bundles
    assert not b.ok and not (tmp_path / "o" / "spiky-rpi4").exists()
    steps = b.failure.rescue
    rungs = [s["rung"] for s in steps]
    assert rungs[:2] == ["profile", "ranges"] and "16-bit" in rungs and rungs.index("16-bit") > 1, rungs
    assert steps[1]["snr_db"] > steps[0]["snr_db"] and not steps[1]["meets"]


def test_float_layers_start_from_the_chosen_ranges(spiky, tmp_path):
    """Ranges that helped but missed the floor are kept by the float-layers rung: its candidates are the
    calibrated model with those ranges and the chosen nodes in float, in the profile's int8 I/O."""
    from edgekit.convert import Floor

    r = _convert(spiky, tmp_path / "o", floor=Floor(min_snr_db=27.0), mixed=True)
    (b,) = r.bundles
    steps = b.failure.rescue if not b.ok else b.artifact.rescue
    by = {s["rung"]: s for s in steps}
    assert by["ranges"]["snr_db"] > by["profile"]["snr_db"] and not by["ranges"]["meets"], steps
    assert "on the ranges chosen by output error" in by["float layers"]["what"], steps
    assert b.ok and b.artifact.rescued_by == "float for the worst layers"
    q = load(b.path)
    assert [s.dtype for s in q.inputs] == ["int8"] and [s.dtype for s in q.outputs] == ["int8"]


def test_inputs_are_fed_by_name_not_position():
    """The calibrated model names its inputs serving_default_<name>:0 and orders them by name."""
    import numpy as np

    from edgekit.convert.tflite_ranges import _Runner

    r = _Runner({"tokens": np.zeros((2, 4)), "mask": np.ones((2, 4))})
    assert r._key("serving_default_mask:0") == "mask" and r._key("serving_default_tokens:0") == "tokens"
    assert r._key("tokens") == "tokens"
    with pytest.raises(ValueError, match="matches none of the data's inputs"):
        r._key("serving_default_other:0")
    assert _Runner({"x": np.zeros((2, 4))})._key("serving_default_input_1:0") == "x"
