"""Pruning (structured, magnitude) and distillation on Keras 3 models, with measured effects."""

import json

import keras
import numpy as np
import pytest

from conftest import MODELS
from edgekit.optimize import surgery


@pytest.fixture(scope="module")
def train_npz(digits, tmp_path_factory):
    model, calib, val = digits
    d = tmp_path_factory.mktemp("opt")
    np.savez(d / "train.npz", image=np.load(model.parent / "train.npz")["image"],
             labels=np.load(model.parent / "train.npz")["labels"])
    return d / "train.npz"


def test_surgery_identity_rebuild_is_exact_and_keeps_residual_outputs():
    r = keras.models.load_model(MODELS / "pretrainedResnet.h5", compile=False)
    plan = surgery.plan(r)
    assert plan and all(len(v["targets"]) for v in plan.values())
    same = surgery.rebuild(r, {n: np.arange(r.get_layer(n).get_weights()[0].shape[-1]) for n in plan})
    x = np.random.default_rng(0).uniform(0, 255, (4, 32, 32, 3)).astype(np.float32)
    np.testing.assert_array_equal(same.predict(x, verbose=0), r.predict(x, verbose=0))
    half = surgery.rebuild(r, {n: surgery.l1_keep(r.get_layer(n), 0.5) for n in plan})
    c0, c1 = surgery.count(r), surgery.count(half)
    assert c1["params"] < 0.6 * c0["params"] and c1["flops"] < 0.6 * c0["flops"]
    assert half.predict(x, verbose=0).shape == (4, 10)


def test_structured_pruning_makes_a_smaller_model(cli, digits, train_npz, tmp_path):
    model, _, val = digits
    out = tmp_path / "pruned.keras"
    r = cli("prune", model, "--data", train_npz, "--val", val, "--sparsity", "0.5", "--epochs", "3",
            "-o", out, "--json")
    assert r.exit_code == 0, r.stderr
    res = json.loads(r.stdout)
    assert res["ratios"]["params"] < 0.3 and res["ratios"]["flops"] < 0.3
    assert res["after"]["tflite_bytes"] < 0.3 * res["before"]["tflite_bytes"]
    assert res["accuracy_drop"] <= 2.0
    pruned = keras.models.load_model(out)
    assert pruned.count_params() == res["after"]["params"]
    assert res["kept_channels"] == {"conv1": 16, "conv2": 32, "fc1": 64}
    # the pruned model converts like any other
    r = cli("convert", out, "-t", "rpi4", "--format", "tflite", "--calib", train_npz, "--out", tmp_path / "b")
    assert r.exit_code == 0, r.stderr


def test_magnitude_pruning_zeroes_weights_and_compresses(digits, train_npz, tmp_path):
    from edgekit.optimize.prune import prune

    model, _, val = digits
    res = prune(str(model), str(train_npz), method="magnitude", sparsity=0.8, epochs=2, val=str(val),
                out=str(tmp_path / "m.keras"), say=lambda t: None, runs=20)
    assert res["after"]["params"] == res["before"]["params"]
    kernels = [w for w in keras.models.load_model(tmp_path / "m.keras").weights if w.path.endswith("kernel")]
    zeros = sum(int((np.asarray(k.numpy()) == 0).sum()) for k in kernels) / sum(int(np.prod(k.shape)) for k in kernels)
    assert 0.78 <= zeros <= 0.82
    assert res["ratios"]["gzip"] < 0.5 and res["accuracy_drop"] <= 3.0


def test_distillation_with_a_derived_student(cli, digits, train_npz, tmp_path):
    model, _, val = digits
    r = cli("distill", "--teacher", model, "--width", "0.5", "--data", train_npz, "--val", val,
            "--epochs", "4", "--baseline", "-o", tmp_path / "s.keras", "--json")
    assert r.exit_code == 0, r.stderr
    res = json.loads(r.stdout)
    assert res["student"]["params"] < 0.35 * res["teacher"]["params"]
    assert res["student"]["accuracy"] > 85 and "gain_from_teacher" in res
    assert keras.models.load_model(tmp_path / "s.keras").count_params() == res["student"]["params"]


@pytest.mark.parametrize("args, words", [
    (["--sparsity", "1.5"], "--sparsity must be between 0 and 1"),
    (["--data", "nope.npz"], "training data not found"),
])
def test_prune_bad_input(cli, digits, train_npz, args, words):
    model, _, _ = digits
    base = ["--data", train_npz] if "--data" not in args else []
    r = cli("prune", model, *base, *args)
    assert r.exit_code == 2 and words in r.stderr


def test_distill_needs_one_student(cli, digits, train_npz):
    model, _, _ = digits
    r = cli("distill", "--teacher", model, "--data", train_npz)
    assert r.exit_code == 2 and "--student FILE or --width" in r.stderr
