"""A user's mistake: one clear line, exit 2, no traceback, nothing half-written."""

import json

import numpy as np
import pytest

from conftest import run_cli_process


def _one_line(stderr):
    lines = [ln for ln in stderr.strip().splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, stderr
    assert "Traceback" not in stderr
    return lines[0]


def test_real_process_exit_status_and_no_traceback(tmp_path, digits):
    model, calib, _ = digits
    p = run_cli_process("convert", tmp_path / "missing.keras", "-t", "rpi4", "--calib", calib,
                        "--out", tmp_path / "out")
    assert p.returncode == 2
    assert "missing.keras" in _one_line(p.stderr) and "not found" in p.stderr
    p = run_cli_process("--debug", "convert", tmp_path / "missing.keras", "-t", "rpi4",
                        "--calib", calib, "--out", tmp_path / "out")
    assert p.returncode != 0 and "Traceback" in p.stderr
    assert not (tmp_path / "out").exists()


def test_calibration_shape_mismatch_named_before_any_conversion(tmp_path, digits, cli):
    model, _, _ = digits
    np.savez(tmp_path / "bad.npz", image=np.zeros((10, 8, 9, 1), np.float32))
    r = cli("convert", model, "-t", "rpi4", "--calib", tmp_path / "bad.npz", "--out", tmp_path / "o")
    assert r.exit_code == 2
    line = _one_line(r.stderr)
    assert "bad.npz" in line and "'image'" in line and "(10, 8, 9, 1)" in line and "(N, 8, 8, 1)" in line
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("make, words", [
    (lambda: {"image": np.full((5, 8, 8, 1), np.nan, np.float32)}, "NaN or Inf in 5 of 5"),
    (lambda: {"image": np.zeros((0, 8, 8, 1), np.float32)}, "empty"),
    (lambda: {"pixels": np.zeros((5, 8, 8, 1), np.float32), "other": np.zeros(3)}, "cannot tell which array"),
    (lambda: {"image": np.array([["a"] * 4] * 2)}, "not numbers"),
])
def test_bad_calibration_data(tmp_path, digits, cli, make, words):
    model, _, _ = digits
    np.savez(tmp_path / "c.npz", **make())
    r = cli("convert", model, "-t", "rpi4", "--calib", tmp_path / "c.npz", "--out", tmp_path / "o")
    assert r.exit_code == 2
    assert words in _one_line(r.stderr)
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("args, words", [
    (["-t", "rpi9"], "unknown target 'rpi9'"),
    ([], "no calibration data"),
    (["-t", "rpi4", "--calib-random", "--calib", "x.npz"], "not both"),
])
def test_bad_arguments(tmp_path, digits, cli, args, words):
    model, _, _ = digits
    if "-t" not in args:
        args = ["-t", "rpi4"] + args
    r = cli("convert", model, *args, "--out", tmp_path / "o")
    assert r.exit_code == 2 and words in _one_line(r.stderr)


def test_unknown_model_format(tmp_path, cli):
    f = tmp_path / "model.caffemodel"
    f.write_bytes(b"x")
    r = cli("convert", f, "-t", "rpi4", "--calib-random", "--out", tmp_path / "o")
    assert r.exit_code == 2 and "unknown model format '.caffemodel'" in _one_line(r.stderr)


def test_run_with_wrong_input(tmp_path, digits_build, cli):
    np.save(tmp_path / "x.npy", np.zeros((1, 28, 28, 1), np.float32))
    path = digits_build.bundles[0].path
    r = cli("run", path, "--input", tmp_path / "x.npy")
    assert r.exit_code == 2 and "does not fit" in _one_line(r.stderr)
    r = cli("bench", tmp_path / "nothing")
    assert r.exit_code == 2 and "no such file or bundle" in _one_line(r.stderr)


def test_budget_miss_exits_1_and_still_writes_the_report(tmp_path, digits, cli):
    """Calibration on data 100x too small saturates every activation: a real accuracy loss. Without
    the rescue ladder the artifact is refused: a FAILED row, no bundle, the report, exit 1."""
    model, calib, val = digits
    np.savez(tmp_path / "tiny.npz", image=np.load(calib)["image"] * 0.01)
    r = cli("convert", model, "-t", "rpi4", "--format", "tflite", "--calib", tmp_path / "tiny.npz",
            "--val", val, "--max-accuracy-drop", "0.5", "--no-rescue", "--out", tmp_path / "o")
    assert r.exit_code == 1, r.stderr
    assert "accuracy drop" in _one_line(r.stderr) and "> 0.5" in _one_line(r.stderr) and "FAILED" in r.stdout
    report = json.loads((tmp_path / "o" / "digits.convert.json").read_text())
    assert report["bundles"][0]["status"] == "failed"
    assert report["bundles"][0]["failure"]["validation"]["accuracy_drop_points"] > 0.5
    assert not (tmp_path / "o" / "digits-rpi4").exists()
    r = cli("convert", model, "-t", "rpi4", "--format", "tflite", "--calib", calib, "--val", val,
            "--max-accuracy-drop", "0.5", "--out", tmp_path / "o2")
    assert r.exit_code == 0 and " ok" in r.stdout


def test_random_calibration_only_when_asked_and_flagged(tmp_path, digits, cli):
    model, _, _ = digits
    r = cli("convert", model, "-t", "rpi-zero2", "--calib-random", "--calib-samples", "20",
            "--out", tmp_path / "o")
    assert r.exit_code == 0, r.stderr
    assert "accuracy figures above mean nothing" in r.stdout
    m = json.loads((tmp_path / "o" / "digits-rpi-zero2" / "manifest.json").read_text())
    assert m["calibration"]["random"] is True and "mean nothing" in m["calibration"]["note"]


def test_image_folder_calibration(tmp_path, digits, cli):
    from PIL import Image

    model, calib, val = digits
    imgs = np.load(calib)["image"][:60, :, :, 0]
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i, im in enumerate(imgs):
        Image.fromarray((im * 255).astype(np.uint8)).resize((32, 32)).save(folder / f"{i:03d}.png")
    r = cli("convert", model, "-t", "rpi4", "--format", "tflite", "--calib", folder,
            "--preprocess", "resize=8x8,scale=1/255", "--val", val, "--out", tmp_path / "o", "--json")
    assert r.exit_code == 0, r.stderr
    rep = json.loads(r.stdout)
    assert rep["calibration"]["samples"] == 60
    assert rep["bundles"][0]["validation"]["accuracy_drop_points"] <= 1.0
    r = cli("convert", model, "-t", "rpi4", "--calib", folder, "--preprocess", "resize=8x8,gamma=2",
            "--out", tmp_path / "o2")
    assert r.exit_code == 2 and "unknown preprocess key 'gamma'" in _one_line(r.stderr)


def test_training_tools_print_nothing_but_the_error(tmp_path, digits):
    """TensorFlow's C++ start-up lines (which ignore TF_CPP_MIN_LOG_LEVEL) stay off the terminal."""
    model, _, _ = digits
    for args in (("prune", model, "--data", tmp_path / "nope.npz"),
                 ("qat", model, "--data", tmp_path / "nope.npz", "-t", "rpi4", "--out", tmp_path / "q")):
        p = run_cli_process(*args)
        assert p.returncode == 2
        assert p.stderr.strip().splitlines() == [_one_line(p.stderr)], p.stderr
        assert "nope.npz" in p.stderr and "not found" in p.stderr
