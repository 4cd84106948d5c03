"""Converter compatibility check: the artifact must load and match in the oldest runtime the
target's devices run (runtime.min_runtime), or the conversion fails naming the op."""

import json

import numpy as np
import pytest

from conftest import bundle_of
from edgekit.bundle import read_bundle
from edgekit.convert import Calibration, ConvertRecipe, convert
from edgekit.errors import BudgetMissed

BOARD = """
name = "pi-16x8"
description = "a Raspberry Pi 4 asked for 16-bit activations"
[device]
arch = "aarch64"
cpu = "Cortex-A72"
cores = 4
memory_mb = 4096
[build]
formats = ["tflite"]
[tflite]
activations = "int16"
[runtime]
threads = 4
min_runtime = ["tflite-runtime==2.14.0", "numpy<2"]
"""


def test_every_digits_bundle_records_its_check(digits_build):
    from edgekit.targets import load_target

    for b in digits_build.bundles:
        recs = read_bundle(b.path).manifest["compatibility"]
        checked = [r for r in recs if r.get("checked", True) and "where" in r]
        declared = [e for e in load_target(b.target).runtime.min_runtime
                    if e.startswith("tflite-runtime" if b.fmt == "tflite" else "onnxruntime")]
        pinned = [e for e in declared if " " not in e]
        if pinned:  # installable here: checked, and passed
            assert len(checked) == 1 and checked[0]["ok"], (b.path.name, recs)
            assert checked[0]["backend_version"] == pinned[0].split("==")[1]
            assert checked[0]["requirements"][0] == pinned[0]
        else:       # a device's own build (Jetson) or nothing declared: recorded, not checked
            assert not checked
            assert [r["requirements"][0] for r in recs] == declared
    arm = read_bundle(bundle_of(digits_build, "rpi4", "tflite").path).manifest["compatibility"][0]
    assert arm["where"] in ("x86_64 venv", "emulated aarch64 (qemu)")


def _log_model(path):
    import keras

    class Log1p(keras.layers.Layer):
        def call(self, x):
            import tensorflow as tf

            return tf.math.log(tf.abs(x) + 1.0)

    inp = keras.Input((16,), name="x")
    out = keras.layers.Dense(4, name="head")(Log1p(name="log1p")(keras.layers.Dense(16)(inp)))
    keras.Model(inp, out).export(str(path), verbose=False)  # a SavedModel: no custom-layer registry needed


def test_op_newer_than_the_device_runtime_fails_conversion(tmp_path, cli):
    _log_model(tmp_path / "m")
    (tmp_path / "board.toml").write_text(BOARD)
    np.save(tmp_path / "calib.npy", np.random.default_rng(0).normal(size=(40, 16)).astype(np.float32))
    with pytest.raises(BudgetMissed) as e:    # the artifact's failure is its row: not written, exit 1
        convert(ConvertRecipe(str(tmp_path / "m"), [str(tmp_path / "board.toml")],
                              calibration=Calibration(str(tmp_path / "calib.npy"))), str(tmp_path / "out"))
    msg = str(e.value)
    assert "op LOG version 2 is newer than tflite-runtime==2.14.0" in msg and "m-pi-16x8" in msg
    assert e.value.result.failed[0].failure.stage == "compatibility"
    assert not (tmp_path / "out" / "m-pi-16x8").exists()
    # through the CLI: one line, exit 1; and --compat-check off accepts the risk, recorded
    r = cli("convert", tmp_path / "m", "-t", tmp_path / "board.toml", "--calib", tmp_path / "calib.npy",
            "--out", tmp_path / "out")
    assert r.exit_code == 1 and "op LOG version 2" in r.stderr and "FAILED (compatibility)" in r.stdout
    r = cli("convert", tmp_path / "m", "-t", tmp_path / "board.toml", "--calib", tmp_path / "calib.npy",
            "--out", tmp_path / "out", "--compat-check", "off")
    assert r.exit_code == 0, r.stderr
    m = json.loads((tmp_path / "out" / "m-pi-16x8" / "manifest.json").read_text())
    assert m["compatibility"][0]["checked"] is False and m["model"]["precision"] == "int16x8"


def test_relative_output_directory(digits, tmp_path, monkeypatch, cli):
    """The check runs the old runtime from another working directory: relative paths must hold."""
    model, calib, _ = digits
    monkeypatch.chdir(tmp_path)
    r = cli("convert", model, "-t", "x86-avx2", "--format", "onnx", "--calib", calib, "--out", "rel/build")
    assert r.exit_code == 0, r.stderr
    m = json.loads((tmp_path / "rel" / "build" / "digits-x86-avx2" / "manifest.json").read_text())
    assert m["compatibility"][0]["ok"] and m["compatibility"][0]["backend_version"] == "1.16.3"
