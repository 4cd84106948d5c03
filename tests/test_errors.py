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


def test_threads_above_four_per_usable_cpu_refused_before_the_load(tmp_path, cli, monkeypatch):
    """--threads 100000 hung (1000: 45 s on 2 CPUs): an explicit count past MAX_THREADS_PER_CPU x the usable CPUs
    is one line naming them, said before the model is looked at (the missing path is not what it names); at the
    bound it is taken as asked (oversubscribing on purpose stays possible)."""
    from edgekit.errors import EdgekitError
    from edgekit.runtime import threads as th

    cap = th.MAX_THREADS_PER_CPU * th.usable_cpus()
    assert th.choose_threads(cap, 4) == cap
    with pytest.raises(EdgekitError, match=f"this process can use {th.usable_cpus()} .*give at most {cap}"):
        th.choose_threads(cap + 1, 4)
    q = tmp_path / "cpu.max"
    q.write_text("150000 100000")   # a quota of 1.5 CPUs: 1 usable, 4 threads at most, the quota named
    monkeypatch.setenv(th.CPU_MAX_ENV, str(q))
    assert th.choose_threads(4, None) == 4
    with pytest.raises(EdgekitError, match="can use 1 .*cgroup CPU quota 1.5.*give at most 4"):
        th.choose_threads(5, None)
    monkeypatch.delenv(th.CPU_MAX_ENV)
    for cmd in (("run", tmp_path / "nothing", "-p", "hi"), ("bench", tmp_path / "nothing"),
                ("chat", tmp_path / "nothing")):
        r = cli(*cmd, "--threads", 100000)
        assert r.exit_code == 2 and "threads 100000 is more than" in _one_line(r.stderr), r.output


@pytest.mark.parametrize("option, value, words", [
    ("--runs", 0, "--runs must be at least 1 (got 0)"), ("--warmup", -1, "--warmup must be at least 0 (got -1)"),
    ("--prompt-tokens", 0, "--prompt-tokens must be at least 1"),
    ("--new-tokens", 1, "--new-tokens must be at least 2"),
])
def test_bench_counts_checked_before_any_load(tmp_path, cli, option, value, words):
    """In the CLI's option names, before a model is loaded (the missing path is not what it says)."""
    r = cli("bench", tmp_path / "nothing", option, value)
    assert r.exit_code == 2 and words in _one_line(r.stderr) and "benchmarking" not in r.stderr, r.output


def test_bench_out_that_cannot_be_written_is_refused_before_measuring(tmp_path, cli):
    """--out a directory, or under a file: one line naming the path, before any model is looked at."""
    (tmp_path / "afile").write_text("x")
    for out, words in ((tmp_path, f"{tmp_path}: Is a directory"),
                       (tmp_path / "afile" / "r.json", f"{tmp_path / 'afile'}: Not a directory")):
        r = cli("bench", tmp_path / "nothing", "--out", out)
        line = _one_line(r.stderr)
        assert r.exit_code == 2 and words in line and "choose another path" in line, r.output
    assert (tmp_path / "afile").read_text() == "x" and sorted(p.name for p in tmp_path.iterdir()) == ["afile"]


def test_an_oserror_on_a_path_is_one_line_exit_2_and_a_traceback_with_debug(tmp_path, cli, monkeypatch):
    """A write that fails after the work (a full disk, a folder made read-only meanwhile): `error: PATH: strerror`,
    exit 2, no traceback; --debug shows it."""
    import errno

    import edgekit.bundle
    import edgekit.runtime

    class Fake:
        kind, backend, backend_version = None, "onnxruntime", "1"

        def benchmark(self, runs, warmup):
            return {"runs": runs}

    def refuse(path, data):
        raise OSError(errno.EROFS, "Read-only file system", str(path))

    monkeypatch.setattr(edgekit.runtime, "load", lambda *a, **k: Fake())
    monkeypatch.setattr(edgekit.bundle, "write_json_atomic", refuse)
    (tmp_path / "m.onnx").write_bytes(b"x")
    out = tmp_path / "r.json"
    r = cli("bench", tmp_path / "m.onnx", "--runs", 1, "--out", out)
    assert r.exit_code == 2 and _one_line(r.stderr) == \
        f"error: {out}: Read-only file system (choose another path; --debug for the traceback)", r.output
    with pytest.raises(OSError):
        cli("--debug", "bench", tmp_path / "m.onnx", "--runs", 1, "--out", out)

    def no_tool(path, data):   # a missing executable is ENOENT naming it: not the user's path, not "choose another"
        raise FileNotFoundError(errno.ENOENT, "No such file or directory", "unshare")

    monkeypatch.setattr(edgekit.bundle, "write_json_atomic", no_tool)
    with pytest.raises(FileNotFoundError):
        cli("bench", tmp_path / "m.onnx", "--runs", 1, "--out", out)


def test_device_runtime_bench_oserror_on_out_is_one_line(tmp_path, monkeypatch, capsys):
    """`python -m edgekit.runtime bench --out DIR` (the device's CLI) wrote its traceback after the benchmark: one
    line naming the path, exit 2; --debug raises."""
    import errno

    import edgekit.bundle
    import edgekit.runtime
    from edgekit.runtime.__main__ import main

    class Fake:
        kind, backend, backend_version = None, "onnxruntime", "1"

        def benchmark(self, runs, warmup, **_):
            return {"runs": runs}

    def refuse(path, data):
        raise OSError(errno.EISDIR, "Is a directory", str(path))

    monkeypatch.setattr(edgekit.runtime, "load", lambda *a, **k: Fake())
    monkeypatch.setattr(edgekit.bundle, "write_json_atomic", refuse)
    (tmp_path / "m.onnx").write_bytes(b"x")
    assert main(["bench", str(tmp_path / "m.onnx"), "--runs", "1", "--out", str(tmp_path)]) == 2
    assert _one_line(capsys.readouterr().err) == \
        f"error: {tmp_path}: Is a directory (choose another path; --debug for the traceback)"
    with pytest.raises(OSError):
        main(["--debug", "bench", str(tmp_path / "m.onnx"), "--runs", "1", "--out", str(tmp_path)])


def test_serve_parsers_refuse_deeply_nested_json_as_bad_json():
    """[[[[... a hundred thousand deep: json's RecursionError was a 500; it is a 400 saying the JSON is bad."""
    from edgekit.serve.protocol import ProtocolError, parse_infer
    from edgekit.serve.repository import parse_index_request

    deep = "[" * 100_000 + "]" * 100_000
    body = ('{"inputs": [{"name": "x", "shape": [1], "datatype": "FP32", "data": %s}]}' % deep).encode()
    for parse in (lambda: parse_infer(body, None, 10 ** 6), lambda: parse_index_request(('{"ready": %s}' % deep)
                                                                                         .encode())):
        with pytest.raises(ProtocolError) as e:
            parse()
        assert e.value.status == 400 and "not valid JSON (nested too deeply)" in e.value.message
